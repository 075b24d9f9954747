//! Objectives on the index t: DPO (logistic link), PSPO (profiled, plug-in link), OSPO
//! (orthogonalised, kernel link), RSPO (link-free ranking).

pub mod index;

use crate::link::RecursiveLink;
use anyhow::Result;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

pub use index::{index, Divergence};

/// Which objective the learner optimises.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ObjectiveKind {
    #[default]
    Dpo,
    Pspo,
    Ospo,
    Rspo,
}

impl std::str::FromStr for ObjectiveKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "dpo" => Ok(Self::Dpo),
            "pspo" => Ok(Self::Pspo),
            "ospo" => Ok(Self::Ospo),
            "rspo" => Ok(Self::Rspo),
            other => Err(format!(
                "unknown objective {other:?} (expected dpo, pspo, ospo or rspo)"
            )),
        }
    }
}

impl ObjectiveKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Dpo => "dpo",
            Self::Pspo => "pspo",
            Self::Ospo => "ospo",
            Self::Rspo => "rspo",
        }
    }
}

/// `[objective]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectiveConfig {
    pub kind: ObjectiveKind,
    /// Scale of the index in the DPO loss (and in the warm-up of PSPO/OSPO).
    pub beta: f64,
    /// f-divergence that defines the index.
    pub divergence: Divergence,
    /// PSPO/OSPO: train with DPO for this many steps before plugging in the learned link.
    pub warmup_steps: u64,
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        Self {
            kind: ObjectiveKind::Dpo,
            beta: 0.1,
            divergence: Divergence::default(),
            warmup_steps: 20,
        }
    }
}

/// Numerically stable softplus(x) = log(1 + e^x).
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    // softplus(x) = relu(x) + log1p(exp(-|x|))
    let relu = x.relu()?;
    let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((relu + tail)?)
}

/// The configured objective with whatever state it keeps between steps.
pub struct Objective {
    pub cfg: ObjectiveConfig,
}

impl Objective {
    pub fn new(cfg: ObjectiveConfig) -> Self {
        Self { cfg }
    }

    /// Weighted mean loss for a minibatch. `t`: index (differentiable), `z`: labels in {0,1},
    /// `w`: event weights, all `[n]` f32.
    pub fn loss(
        &mut self,
        t: &Tensor,
        z: &Tensor,
        w: &Tensor,
        _link: &RecursiveLink,
        _step: u64,
    ) -> Result<Tensor> {
        // DPO: -log σ(β s) with s = (2z - 1) t.
        let sign = ((z * 2.0)? - 1.0)?;
        let s = (t * &sign)?;
        let l = softplus(&(s * -self.cfg.beta)?)?;
        Ok(((l * w)?.sum_all()? / w.sum_all()?)?)
    }

    /// Record the detached index values of a finished step (OSPO memory).
    pub fn observe(&mut self, _t: &[f64], _z: &[f64]) {}

    /// Serializable state for snapshots.
    pub fn state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    pub fn load_state(&mut self, _v: &serde_json::Value) -> Result<()> {
        Ok(())
    }
}
