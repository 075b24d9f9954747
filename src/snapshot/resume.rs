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
}

fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, device)
        .with_context(|| format!("loading {}", path.display()))
}

/// Load the newest snapshot that verifies; corrupted ones are skipped with a warning.
pub fn load_latest(data_dir: &Path, learner: &mut Learner) -> Result<Option<Resumed>> {
    for dir in list(data_dir)?.into_iter().rev() {
        let manifest = match verify(&dir) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("Skipping snapshot that does not verify: {e:#}.");
                continue;
            }
        };
        let device = learner.policy().device().clone();
        let weights_file = manifest
            .files
            .keys()
            .find(|f| *f == "model.safetensors" || *f == "adapter_model.safetensors")
            .cloned()
            .with_context(|| format!("{}: no weights file", dir.display()))?;
        let weights = load_tensors(&dir.join(&weights_file), &device)?;
        let optimizer = load_tensors(&dir.join("optimizer.safetensors"), &device)?;
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("state.json"))?)?;
        let opt_step = state["optimizer_step"].as_u64().unwrap_or(0);
        let ls: LearnerState = serde_json::from_value(state["learner"].clone())
            .with_context(|| format!("{}: state.json learner state", dir.display()))?;
        learner.restore(&weights, &optimizer, opt_step, ls)?;
        return Ok(Some(Resumed {
            name: manifest.name.clone(),
            manifest,
        }));
    }
    Ok(None)
}
