//! `spoke snapshot bench`: does background snapshot writing stall training? Runs the real
//! learner (embedded tiny Llama, optionally enlarged) on the synthetic stream and measures
//! the training loop's per-step time (learner step + the snapshot hand-off) with no
//! snapshots, with snapshots written by the [`BackgroundWriter`], and with snapshots written
//! synchronously, reporting p50 / p99 / max of each.

use super::writer::BackgroundWriter;
use super::{write_snapshot, SnapshotConfig, SnapshotContent};
use crate::config::Config;
use crate::learner::Learner;
use crate::source::{synthetic::synthetic_event, Offsets, Position};
use anyhow::{Context, Result};
use std::path::Path;
use std::time::Instant;

/// Arguments of `spoke snapshot bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct SnapshotBenchArgs {
    /// Measured learner steps per mode.
    #[arg(long, default_value_t = 120)]
    pub steps: u64,
    /// Snapshot every this many steps.
    #[arg(long, default_value_t = 5)]
    pub every: u64,
    /// Preference pairs per step.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Tiny model hidden size (the embedded default is 64).
    #[arg(long, default_value_t = 256)]
    pub hidden: usize,
    /// Tiny model layers (the embedded default is 2).
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
}

/// Percentiles of one mode.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModeStats {
    pub mode: String,
    pub steps: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub snapshots: usize,
    pub mean_write_ms: f64,
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let k = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[k.min(v.len() - 1)]
}

fn content(learner: &Learner, cfg: &Config) -> Result<SnapshotContent> {
    let (weights, optimizer, optimizer_step) = learner.export()?;
    let mut offsets = Offsets::default();
    offsets.set(
        "synthetic",
        0,
        (learner.step_count() as usize * cfg.run.batch_size) as i64,
    );
    Ok(SnapshotContent {
        step: learner.step_count(),
        events_seen: learner.step_count() * cfg.run.batch_size as u64,
        objective: learner.objective_name().into(),
        config_hash: cfg.hash(),
        parent: None,
        weights,
        optimizer,
        optimizer_step,
        learner_state: serde_json::to_value(learner.state())?,
        offsets,
        metrics: vec![],
        events: vec![],
        link_curve: learner.link().curve(),
        replay: learner.replay_batch()?,
        eval: None,
    })
}

/// Run the benchmark under `data_dir` (the model and the snapshots go there).
pub fn run(data_dir: &Path, a: &SnapshotBenchArgs) -> Result<Vec<ModeStats>> {
    let mut cfg = Config::default();
    cfg.run.data_dir = data_dir.to_path_buf();
    cfg.run.batch_size = a.batch_size;
    cfg.model.tiny.hidden_size = a.hidden;
    cfg.model.tiny.intermediate_size = a.hidden * 11 / 4;
    cfg.model.tiny.num_hidden_layers = a.layers;
    cfg.snapshot = SnapshotConfig {
        every_steps: a.every,
        keep_last: 2,
    };
    let policy = crate::model::load_policy(&cfg.model, data_dir).context("loading the policy")?;
    eprintln!("policy: {}", policy.describe());
    let mut learner = Learner::new(policy, &cfg)?;
    let bs = a.batch_size as u64;
    let mut next_batch = 0u64;
    let mut batch = || {
        let rows: Vec<_> = (next_batch * bs..(next_batch + 1) * bs)
            .map(|i| {
                (
                    synthetic_event(&cfg.source.synthetic, i).event,
                    Position {
                        stream: "synthetic".into(),
                        partition: 0,
                        offset: i as i64,
                    },
                )
            })
            .collect::<Vec<_>>();
        next_batch += 1;
        crate::buffer::to_batch(&rows)
    };
    // Warm up.
    for _ in 0..5 {
        learner.step(&batch()?)?;
    }
    let mut out = vec![];
    for mode in ["none", "background", "synchronous"] {
        let mut writer = BackgroundWriter::new(data_dir, cfg.snapshot.clone())?;
        let mut times = Vec::with_capacity(a.steps as usize);
        let mut writes = vec![];
        let mut snapshots = 0;
        for k in 1..=a.steps {
            let b = batch()?;
            let t0 = Instant::now();
            learner.step(&b)?;
            if mode != "none" && k % a.every == 0 {
                let c = content(&learner, &cfg)?;
                if mode == "background" {
                    writer.submit(c)?;
                } else {
                    let w0 = Instant::now();
                    write_snapshot(data_dir, c)?;
                    writes.push(w0.elapsed().as_secs_f64());
                }
                snapshots += 1;
            }
            for r in writer.try_completed() {
                r?;
            }
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        for r in writer.wait_idle_blocking() {
            r?;
        }
        writes.extend(writer.take_write_seconds());
        let mean_write_ms = if writes.is_empty() {
            0.0
        } else {
            writes.iter().sum::<f64>() / writes.len() as f64 * 1e3
        };
        let s = ModeStats {
            mode: mode.into(),
            steps: times.len(),
            p50_ms: pct(&mut times, 0.5),
            p99_ms: pct(&mut times, 0.99),
            max_ms: pct(&mut times, 1.0),
            snapshots,
            mean_write_ms,
        };
        eprintln!(
            "{:<12} p50 {:8.2} ms  p99 {:8.2} ms  max {:8.2} ms  ({} snapshots, mean write {:.1} ms)",
            s.mode, s.p50_ms, s.p99_ms, s.max_ms, s.snapshots, s.mean_write_ms
        );
        out.push(s);
    }
    Ok(out)
}
