//! Snapshots: durable, verifiable directories with weights, optimiser and link state, source
//! offsets and Parquet records of what happened since the previous snapshot.
//!
//! Layout: `<data_dir>/snapshots/<step:010>-<short id>/` written into a temporary sibling,
//! every file fsynced, then renamed into place and the parent directory fsynced; the
//! `manifest.json` (written last) carries the sha256 of every other file.

pub mod cli;
pub mod parquet_io;
pub mod resume;

use crate::model::WeightExport;
use crate::source::Offsets;
use crate::util::{fsync_dir, safetensors_bytes, sha256_hex, write_durable};
use anyhow::{Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Snapshot format version written into manifests.
pub const FORMAT_VERSION: u32 = 1;

/// `[snapshot]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotConfig {
    /// Write a snapshot every this many learner steps (and at shutdown).
    pub every_steps: u64,
    /// Keep the last K snapshots (promoted ones are always kept).
    pub keep_last: usize,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            every_steps: 50,
            keep_last: 5,
        }
    }
}

/// One learner step, as recorded in `metrics.parquet`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: i64,
    pub objective: String,
    pub loss: f64,
    pub pairs: u32,
    pub grad_norm: f64,
    pub index_mean: f64,
    pub index_std: f64,
    /// Share of pairs in the batch whose index sign agrees with the label.
    pub batch_accuracy: f64,
    pub step_seconds: f64,
    pub link_drift_sup: f64,
    pub link_drift_l2: f64,
    /// Whether the update was applied (false: non-finite, rejected).
    pub applied: bool,
}

/// What happened to one consumed record, as recorded in `events.parquet`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventRecord {
    pub event_id: String,
    pub stream: String,
    pub partition: i32,
    pub offset: i64,
    /// `train`, `holdout` or `dead_letter`.
    pub role: String,
    /// The learner step that trained it (train only).
    pub step: Option<u64>,
    pub weight: f64,
}

/// Everything one snapshot holds, copied out of the learner.
pub struct SnapshotContent {
    pub step: u64,
    pub events_seen: u64,
    pub objective: String,
    pub config_hash: String,
    pub parent: Option<String>,
    pub weights: WeightExport,
    pub optimizer: Vec<(String, Tensor)>,
    pub optimizer_step: u64,
    /// Learner state that is not tensors: link estimator, objective memory, RNG, counters.
    pub learner_state: serde_json::Value,
    pub offsets: Offsets,
    pub metrics: Vec<StepRecord>,
    pub events: Vec<EventRecord>,
}

/// `manifest.json`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format_version: u32,
    pub name: String,
    pub step: u64,
    pub events_seen: u64,
    pub objective: String,
    pub config_hash: String,
    pub parent: Option<String>,
    pub created: String,
    pub offsets: Offsets,
    /// File name → sha256 (hex) of every other file in the directory.
    pub files: BTreeMap<String, String>,
}

/// A written snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub name: String,
    pub path: PathBuf,
    pub manifest: Manifest,
}

/// Directory that holds the snapshots of a data directory.
pub fn snapshots_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("snapshots")
}

/// Write one snapshot durably and atomically. Returns once it is on disk.
pub fn write_snapshot(data_dir: &Path, content: SnapshotContent) -> Result<SnapshotInfo> {
    let root = snapshots_dir(data_dir);
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let id_seed = format!(
        "{}/{}/{}/{}",
        content.step,
        content.events_seen,
        content.config_hash,
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
    );
    let short = &sha256_hex(id_seed.as_bytes())[..8];
    let name = format!("{:010}-{short}", content.step);
    let tmp = root.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;

    let mut files = BTreeMap::new();
    let mut put = |fname: &str, bytes: &[u8]| -> Result<()> {
        write_durable(&tmp.join(fname), bytes)?;
        files.insert(fname.to_string(), sha256_hex(bytes));
        Ok(())
    };
    put(
        &content.weights.tensor_file,
        &safetensors_bytes(&content.weights.tensors)?,
    )?;
    for (fname, bytes) in &content.weights.side_files {
        put(fname, bytes)?;
    }
    put(
        "optimizer.safetensors",
        &safetensors_bytes(&content.optimizer)?,
    )?;
    let state = serde_json::json!({
        "optimizer_step": content.optimizer_step,
        "learner": content.learner_state,
    });
    put(
        "state.json",
        serde_json::to_string_pretty(&state)?.as_bytes(),
    )?;
    put(
        "metrics.parquet",
        &parquet_io::steps_parquet(&content.metrics)?,
    )?;
    put(
        "events.parquet",
        &parquet_io::events_parquet(&content.events)?,
    )?;

    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        name: name.clone(),
        step: content.step,
        events_seen: content.events_seen,
        objective: content.objective,
        config_hash: content.config_hash,
        parent: content.parent,
        created: chrono::Utc::now().to_rfc3339(),
        offsets: content.offsets,
        files,
    };
    write_durable(
        &tmp.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    fsync_dir(&tmp)?;
    let dest = root.join(&name);
    std::fs::rename(&tmp, &dest)
        .with_context(|| format!("renaming {} into place", tmp.display()))?;
    fsync_dir(&root)?;
    Ok(SnapshotInfo {
        name,
        path: dest,
        manifest,
    })
}

/// Read and verify a snapshot's manifest and checksums.
pub fn verify(dir: &Path) -> Result<Manifest> {
    let text = std::fs::read_to_string(dir.join("manifest.json"))
        .with_context(|| format!("{}: no readable manifest.json", dir.display()))?;
    let m: Manifest = serde_json::from_str(&text)
        .with_context(|| format!("{}: manifest.json is not valid", dir.display()))?;
    for (f, sum) in &m.files {
        let got = crate::util::sha256_file(&dir.join(f))
            .with_context(|| format!("{}: missing file {f}", dir.display()))?;
        if &got != sum {
            anyhow::bail!(
                "{}: checksum mismatch for {f} (manifest {sum}, file {got})",
                dir.display()
            );
        }
    }
    Ok(m)
}

/// Snapshot directories of a data directory, oldest first (by name = step order).
pub fn list(data_dir: &Path) -> Result<Vec<PathBuf>> {
    let root = snapshots_dir(data_dir);
    if !root.exists() {
        return Ok(vec![]);
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| !n.starts_with('.'))
        })
        .collect();
    v.sort();
    Ok(v)
}
