//! AdamW whose full state (moments and step count) can be saved and restored, so that a
//! resumed run continues exactly. (candle's built-in AdamW keeps its state private.)

use anyhow::{bail, Context, Result};
use candle_core::{backprop::GradStore, DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// `[optim]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value (0 disables).
    pub max_grad_norm: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
        }
    }
}

impl OptimConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(format!("optim.lr: must be > 0, got {}", self.lr));
        }
        for (k, v) in [("optim.beta1", self.beta1), ("optim.beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(format!("{k}: must be in [0, 1), got {v}"));
            }
        }
        if !(self.eps > 0.0) {
            return Err(format!("optim.eps: must be > 0, got {}", self.eps));
        }
        if self.weight_decay < 0.0 || self.max_grad_norm < 0.0 {
            return Err("optim.weight_decay and optim.max_grad_norm must be >= 0".into());
        }
        Ok(())
    }
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
}

/// AdamW (decoupled weight decay, bias-corrected), as in Loshchilov & Hutter and PyTorch.
pub struct AdamW {
    cfg: OptimConfig,
    slots: Vec<Slot>,
    step: u64,
}

/// What one optimiser step saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepInfo {
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Whether every gradient was finite (if not, the step was skipped).
    pub finite: bool,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, cfg: OptimConfig) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let z = var.as_tensor().zeros_like()?.to_dtype(DType::F32)?;
                Ok(Slot {
                    name,
                    m: z.clone(),
                    v: z,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg,
            slots,
            step: 0,
        })
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }
    pub fn config(&self) -> &OptimConfig {
        &self.cfg
    }
    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// One update from gradients. Variables without a gradient are left as they are.
    /// Non-finite gradients skip the update entirely (the weights stay the last good ones).
    pub fn step(&mut self, grads: &GradStore) -> Result<StepInfo> {
        let mut sq = 0f64;
        let mut gs = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let g = grads
                .get(s.var.as_tensor())
                .map(|g| g.to_dtype(DType::F32))
                .transpose()?;
            if let Some(g) = &g {
                sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
            gs.push(g);
        }
        let norm = sq.sqrt();
        if !norm.is_finite() {
            return Ok(StepInfo {
                grad_norm: norm,
                finite: false,
            });
        }
        let clip = if self.cfg.max_grad_norm > 0.0 && norm > self.cfg.max_grad_norm {
            self.cfg.max_grad_norm / (norm + 1e-6)
        } else {
            1.0
        };
        self.step += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        let lr = self.cfg.lr;
        for (s, g) in self.slots.iter_mut().zip(gs) {
            let Some(g) = g else { continue };
            let g = if clip != 1.0 { (g * clip)? } else { g };
            s.m = ((&s.m * b1)? + (&g * (1.0 - b1))?)?;
            s.v = ((&s.v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let m_hat = (&s.m / bc1)?;
            let v_hat = (&s.v / bc2)?;
            let upd = (m_hat / (v_hat.sqrt()? + self.cfg.eps)?)?;
            let p = s.var.as_tensor().to_dtype(DType::F32)?;
            let p = (p * (1.0 - lr * self.cfg.weight_decay))?;
            let p = (p - (upd * lr)?)?;
            s.var.set(&p.to_dtype(s.var.dtype())?)?;
        }
        Ok(StepInfo {
            grad_norm: norm,
            finite: true,
        })
    }

    /// State tensors (`<name>.exp_avg`, `<name>.exp_avg_sq`) and the step count.
    pub fn state(&self) -> Result<(Vec<(String, Tensor)>, u64)> {
        let mut out = Vec::with_capacity(self.slots.len() * 2);
        for s in &self.slots {
            out.push((format!("{}.exp_avg", s.name), s.m.copy()?));
            out.push((format!("{}.exp_avg_sq", s.name), s.v.copy()?));
        }
        Ok((out, self.step))
    }

    /// Restore state saved by [`AdamW::state`].
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for s in &mut self.slots {
            let m = tensors
                .get(&format!("{}.exp_avg", s.name))
                .with_context(|| format!("optimizer state lacks {}.exp_avg", s.name))?;
            let v = tensors
                .get(&format!("{}.exp_avg_sq", s.name))
                .with_context(|| format!("optimizer state lacks {}.exp_avg_sq", s.name))?;
            if m.dims() != s.m.dims() || v.dims() != s.v.dims() {
                bail!("optimizer state for {} has the wrong shape", s.name);
            }
            s.m = m.to_device(s.m.device())?.to_dtype(DType::F32)?;
            s.v = v.to_device(s.v.device())?.to_dtype(DType::F32)?;
        }
        self.step = step;
        Ok(())
    }
}
