//! The single index t = f'(π/π_ref)(y1) − f'(π/π_ref)(y0) for an f-divergence f.

use anyhow::Result;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// f-divergences supported for the index.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Divergence {
    /// KL(π‖π_ref): f'(u) = log u + 1, t = log-ratio difference.
    #[default]
    Kl,
}

/// Index from policy and reference log-probs of y1 and y0 (all `[n]`).
pub fn index(
    div: Divergence,
    logp1: &Tensor,
    ref1: &Tensor,
    logp0: &Tensor,
    ref0: &Tensor,
) -> Result<Tensor> {
    match div {
        Divergence::Kl => Ok(((logp1 - ref1)? - (logp0 - ref0)?)?),
    }
}
