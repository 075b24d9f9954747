//! Resume: find the latest snapshot that verifies and load it into a learner.

use super::{list, verify, Manifest};
use crate::learner::{Learner, LearnerState};
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// A snapshot that was loaded.
pub struct Resumed {
    pub name: String,
    pub manifest: Manifest,
    /// Snapshots newer than this one that were skipped because they do not verify.
    pub skipped: Vec<String>,
}

fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device)
        .with_context(|| format!("loading {}", path.display()))
}

/// What a snapshot directory holds for a learner, read and checked but not yet applied.
pub struct LoadedSnapshot {
    pub manifest: Manifest,
    pub weights: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    pub optimizer_step: u64,
    pub state: LearnerState,
    /// The learner's replay buffer (`replay.parquet`), if the snapshot has one.
    pub replay: Option<arrow::record_batch::RecordBatch>,
}

/// Verify a snapshot directory and read what resume needs from it.
pub fn read_snapshot(dir: &Path, device: &Device) -> Result<LoadedSnapshot> {
    let manifest = verify(dir)?;
    let weights_file = if manifest.weights_file.is_empty() {
        manifest
            .files
            .keys()
            .find(|f| *f == "model.safetensors" || *f == "adapter_model.safetensors")
            .cloned()
            .with_context(|| format!("{}: no weights file", dir.display()))?
    } else {
        manifest.weights_file.clone()
    };
    let weights = load_tensors(&dir.join(&weights_file), device)?;
    let optimizer = load_tensors(&dir.join("optimizer.safetensors"), device)?;
    let state_path = dir.join("state.json");
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&state_path).with_context(|| format!("reading {}", state_path.display()))?,
    )
    .with_context(|| format!("{}: not valid JSON", state_path.display()))?;
    let optimizer_step = state["optimizer_step"]
        .as_u64()
        .with_context(|| format!("{}: optimizer_step missing", state_path.display()))?;
    let ls: LearnerState = serde_json::from_value(state["learner"].clone())
        .with_context(|| format!("{}: learner state", state_path.display()))?;
    let replay = if manifest.files.contains_key("replay.parquet") {
        Some(super::parquet_io::read_parquet(
            &dir.join("replay.parquet"),
        )?)
    } else {
        None
    };
    Ok(LoadedSnapshot {
        manifest,
        weights,
        optimizer,
        optimizer_step,
        state: ls,
        replay,
    })
}

/// Load one snapshot directory into a learner (after verifying it).
pub fn load_into(dir: &Path, learner: &mut Learner) -> Result<Manifest> {
    let device = learner.policy().device().clone();
    read_snapshot(dir, &device)?.apply(dir, learner)
}

impl LoadedSnapshot {
    /// Restore a learner from what was read from `dir`; returns the manifest.
    pub fn apply(self, dir: &Path, learner: &mut Learner) -> Result<Manifest> {
        learner
            .restore(
                &self.weights,
                &self.optimizer,
                self.optimizer_step,
                self.state,
                self.replay.as_ref(),
            )
            .with_context(|| format!("{}: restoring the learner", dir.display()))?;
        Ok(self.manifest)
    }
}

/// Load the newest snapshot that verifies; corrupted ones are skipped with a warning and the
/// previous good one is used. A snapshot that verifies but does not fit the learner (e.g.
/// a different model) is an error, not silently skipped.
pub fn load_latest(data_dir: &Path, learner: &mut Learner) -> Result<Option<Resumed>> {
    let mut skipped = vec![];
    for dir in list(data_dir)?.into_iter().rev() {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let device = learner.policy().device().clone();
        let s = match read_snapshot(&dir, &device) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("Skipping snapshot {name}: {e:#}.");
                skipped.push(name);
                continue;
            }
        };
        let manifest = s.apply(&dir, learner)?;
        return Ok(Some(Resumed {
            name,
            manifest,
            skipped,
        }));
    }
    Ok(None)
}
