//! Background snapshot writing: the learner hands over content it has already copied out and
//! keeps training while a worker thread serialises, fsyncs and renames it into place, then
//! (optionally) considers it for promotion and applies retention.
//!
//! At most one write is in flight and at most one more is queued; a further `submit` blocks
//! until the queued one starts (backpressure when snapshots are slower than their cadence).
//! Results come back in submission order, so offsets may be committed in order as each
//! write completes.

use super::{retention, write_snapshot, SnapshotConfig, SnapshotContent, SnapshotInfo};
use crate::promote::{PromoteConfig, Promoter};
use anyhow::{anyhow, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

/// A completed write, with how long it took on the worker.
pub type Completed = Result<SnapshotInfo>;

/// Writes snapshots on a dedicated thread.
pub struct BackgroundWriter {
    jobs: Option<mpsc::SyncSender<SnapshotContent>>,
    done: tokio::sync::mpsc::UnboundedReceiver<(Completed, f64)>,
    outstanding: usize,
    protected: Arc<Mutex<BTreeSet<String>>>,
    handle: Option<std::thread::JoinHandle<()>>,
    last_write_seconds: Vec<f64>,
}

impl BackgroundWriter {
    /// Start a writer for `data_dir` (removes stale `.tmp-*` directories first).
    pub fn new(data_dir: &Path, cfg: SnapshotConfig) -> Result<Self> {
        Self::with_promotion(data_dir, cfg, None)
    }

    /// Start a writer that also runs periodic promotion after each durable write.
    pub fn with_promotion(
        data_dir: &Path,
        cfg: SnapshotConfig,
        promote: Option<PromoteConfig>,
    ) -> Result<Self> {
        retention::gc_tmp(data_dir)?;
        let (tx, rx) = mpsc::sync_channel::<SnapshotContent>(1);
        let (done_tx, done) = tokio::sync::mpsc::unbounded_channel();
        let protected = Arc::new(Mutex::new(BTreeSet::new()));
        let worker = Worker {
            data_dir: data_dir.to_path_buf(),
            cfg,
            promoter: promote.map(|p| Promoter::new(data_dir, p)),
            protected: protected.clone(),
            last: None,
        };
        let handle = std::thread::Builder::new()
            .name("spoke-snapshot".into())
            .spawn(move || worker.run(rx, done_tx))
            .map_err(|e| anyhow!("cannot start the snapshot writer thread: {e}"))?;
        Ok(Self {
            jobs: Some(tx),
            done,
            outstanding: 0,
            protected,
            handle: Some(handle),
            last_write_seconds: vec![],
        })
    }

    /// Never delete this snapshot in retention (e.g. the one resumed from).
    pub fn protect(&self, name: &str) {
        if let Ok(mut p) = self.protected.lock() {
            p.insert(name.to_string());
        }
    }

    /// Hand over a snapshot to write. Blocks only while another write is in flight AND one
    /// is already queued.
    pub fn submit(&mut self, content: SnapshotContent) -> Result<()> {
        let tx = self
            .jobs
            .as_ref()
            .ok_or_else(|| anyhow!("snapshot writer is shut down"))?;
        tx.send(content)
            .map_err(|_| anyhow!("snapshot writer thread has stopped"))?;
        self.outstanding += 1;
        Ok(())
    }

    /// Writes submitted and not yet reported.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// Seconds the worker spent on each write reported so far (drained by this call).
    pub fn take_write_seconds(&mut self) -> Vec<f64> {
        std::mem::take(&mut self.last_write_seconds)
    }

    /// Writes that completed since the last call, in submission order.
    pub fn try_completed(&mut self) -> Vec<Completed> {
        let mut out = vec![];
        while let Ok((r, secs)) = self.done.try_recv() {
            self.outstanding = self.outstanding.saturating_sub(1);
            self.last_write_seconds.push(secs);
            out.push(r);
        }
        out
    }

    /// Wait until every submitted write has completed; returns their results in order.
    pub async fn wait_idle(&mut self) -> Vec<Completed> {
        let mut out = self.try_completed();
        while self.outstanding > 0 {
            let got = self.done.recv().await;
            self.take(got, &mut out);
        }
        out
    }

    /// Books one message from the writer thread (None: the thread has stopped).
    fn take(&mut self, got: Option<(Completed, f64)>, out: &mut Vec<Completed>) {
        match got {
            Some((r, secs)) => {
                self.outstanding -= 1;
                self.last_write_seconds.push(secs);
                out.push(r);
            }
            None => {
                out.push(Err(anyhow!("snapshot writer thread has stopped")));
                self.outstanding = 0;
            }
        }
    }

    /// Blocking version of [`BackgroundWriter::wait_idle`] for non-async callers.
    pub fn wait_idle_blocking(&mut self) -> Vec<Completed> {
        let mut out = self.try_completed();
        while self.outstanding > 0 {
            let got = self.done.blocking_recv();
            self.take(got, &mut out);
        }
        out
    }
}

impl Drop for BackgroundWriter {
    fn drop(&mut self) {
        // Closing the queue lets the worker finish what it has and exit.
        self.jobs = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Run the writer thread at a lower CPU priority (nice +10) so that serialisation and hashing
/// yield to the learner when cores are scarce. Best effort; Linux only.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls on the calling thread's own id; no memory is shared.
    unsafe {
        let tid = libc::gettid();
        let _ = libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
    }
}

struct Worker {
    data_dir: PathBuf,
    cfg: SnapshotConfig,
    promoter: Option<Promoter>,
    protected: Arc<Mutex<BTreeSet<String>>>,
    last: Option<String>,
}

impl Worker {
    fn run(
        mut self,
        rx: mpsc::Receiver<SnapshotContent>,
        done: tokio::sync::mpsc::UnboundedSender<(Completed, f64)>,
    ) {
        lower_priority();
        while let Ok(content) = rx.recv() {
            let t0 = Instant::now();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.one(content)))
                .unwrap_or_else(|_| Err(anyhow!("snapshot writer panicked")));
            if done.send((r, t0.elapsed().as_secs_f64())).is_err() {
                break;
            }
        }
    }

    fn one(&mut self, mut content: SnapshotContent) -> Result<SnapshotInfo> {
        if let Some(p) = &self.last {
            content.parent = Some(p.clone());
        }
        let mut info = write_snapshot(&self.data_dir, content)?;
        self.last = Some(info.name.clone());
        if let Some(pr) = &mut self.promoter {
            match pr.consider(&info) {
                Ok(p) => info.promoted = p,
                Err(e) => tracing::warn!("Promotion after snapshot {} failed: {e:#}.", info.name),
            }
        }
        let mut keep: BTreeSet<String> =
            self.protected.lock().map(|p| p.clone()).unwrap_or_default();
        keep.insert(info.name.clone());
        if let Some(pr) = &self.promoter {
            keep.extend(pr.pending_names().map(str::to_string));
        }
        if let Err(e) = retention::apply(&self.data_dir, self.cfg.keep_last, &keep) {
            tracing::warn!("Snapshot retention failed: {e:#}.");
        }
        Ok(info)
    }
}
