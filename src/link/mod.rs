//! The recursive (streaming) estimate of the link Ψ(t) = P(z = 1 | t), and its drift from a
//! logistic link. Plain math on (t, z): knows no model.

use anyhow::Result;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// `[link]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LinkConfig {
    /// Number of bins over the standardised index.
    pub bins: usize,
    /// Per-update forgetting factor in (0, 1]; 1 keeps everything.
    pub forgetting: f64,
    /// Values are clipped to [eps, 1 - eps].
    pub eps: f64,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            bins: 64,
            forgetting: 0.995,
            eps: 1e-3,
        }
    }
}

/// Distance of the learned link from the best-fitting logistic σ(a t + b).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Drift {
    pub sup: f64,
    pub l2: f64,
    pub a: f64,
    pub b: f64,
}

/// The learned link on a grid, for `link.parquet` and dashboards.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LinkCurve {
    /// Index values (original, unstandardised units).
    pub t: Vec<f64>,
    /// Ψ̂(t).
    pub psi: Vec<f64>,
    /// dΨ̂/dt.
    pub dpsi: Vec<f64>,
    /// Discounted mass of observations in the bin around each point.
    pub mass: Vec<f64>,
    /// Best-fitting logistic σ(a t + b) at the same points.
    pub logistic: Vec<f64>,
}

/// Streaming monotone link estimate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecursiveLink {
    pub cfg: LinkConfig,
}

impl RecursiveLink {
    pub fn new(cfg: LinkConfig) -> Self {
        Self { cfg }
    }
    /// Fold a minibatch of detached (t, z, w) into the estimate.
    pub fn update(&mut self, _t: &[f64], _z: &[f64], _w: &[f64]) {}
    /// Ψ̂(t).
    pub fn psi(&self, t: f64) -> f64 {
        1.0 / (1.0 + (-t).exp())
    }
    /// Ψ̂ applied to a tensor, differentiable in `t`.
    pub fn psi_tensor(&self, t: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::sigmoid(t)?)
    }
    /// Drift from the best-fitting logistic link.
    pub fn drift(&self) -> Drift {
        Drift::default()
    }
    /// The curve on its bin grid.
    pub fn curve(&self) -> LinkCurve {
        LinkCurve::default()
    }
    /// Effective (discounted) number of observations.
    pub fn mass(&self) -> f64 {
        0.0
    }
}
