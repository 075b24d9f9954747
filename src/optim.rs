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
        if self.eps.is_nan() || self.eps <= 0.0 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Loss whose gradient is known: L = Σ c·p + ½ Σ p², so ∂L/∂p = c + p.
    fn grads_of(vars: &[(String, Var)], c: &[Vec<f32>]) -> GradStore {
        let mut loss: Option<Tensor> = None;
        for ((_, v), c) in vars.iter().zip(c) {
            let ct = Tensor::from_vec(c.clone(), c.len(), &Device::Cpu).unwrap();
            let p = v.as_tensor();
            let l = ((p * &ct).unwrap().sum_all().unwrap()
                + (p.sqr().unwrap().sum_all().unwrap() * 0.5).unwrap())
            .unwrap();
            loss = Some(match loss {
                None => l,
                Some(x) => (x + l).unwrap(),
            });
        }
        loss.unwrap().backward().unwrap()
    }

    fn vars(init: &[Vec<f32>]) -> Vec<(String, Var)> {
        init.iter()
            .enumerate()
            .map(|(i, v)| {
                (
                    format!("p{i}"),
                    Var::from_tensor(&Tensor::from_vec(v.clone(), v.len(), &Device::Cpu).unwrap())
                        .unwrap(),
                )
            })
            .collect()
    }

    /// The textbook (PyTorch) AdamW with global-norm clipping, in f64.
    struct Reference {
        p: Vec<Vec<f64>>,
        m: Vec<Vec<f64>>,
        v: Vec<Vec<f64>>,
        t: i32,
    }

    impl Reference {
        fn step(&mut self, cfg: &OptimConfig, c: &[Vec<f32>]) {
            let g: Vec<Vec<f64>> = self
                .p
                .iter()
                .zip(c)
                .map(|(p, c)| p.iter().zip(c).map(|(p, c)| *c as f64 + p).collect())
                .collect();
            let norm = g.iter().flatten().map(|x| x * x).sum::<f64>().sqrt();
            let coef = if cfg.max_grad_norm > 0.0 && norm > cfg.max_grad_norm {
                cfg.max_grad_norm / (norm + 1e-6)
            } else {
                1.0
            };
            self.t += 1;
            let bc1 = 1.0 - cfg.beta1.powi(self.t);
            let bc2 = 1.0 - cfg.beta2.powi(self.t);
            for k in 0..self.p.len() {
                for i in 0..self.p[k].len() {
                    let g = g[k][i] * coef;
                    self.m[k][i] = cfg.beta1 * self.m[k][i] + (1.0 - cfg.beta1) * g;
                    self.v[k][i] = cfg.beta2 * self.v[k][i] + (1.0 - cfg.beta2) * g * g;
                    let mh = self.m[k][i] / bc1;
                    let vh = self.v[k][i] / bc2;
                    self.p[k][i] *= 1.0 - cfg.lr * cfg.weight_decay;
                    self.p[k][i] -= cfg.lr * mh / (vh.sqrt() + cfg.eps);
                }
            }
        }
    }

    #[test]
    fn matches_the_textbook_update_with_decay_and_clipping() {
        let init = vec![vec![0.5f32, -1.5, 2.0], vec![3.0f32, -0.25]];
        let cs = [
            vec![vec![1.0f32, -2.0, 0.5], vec![4.0f32, 0.0]],
            vec![vec![-0.3f32, 0.2, 0.1], vec![0.05f32, -0.1]],
            vec![vec![10.0f32, 10.0, -10.0], vec![-5.0f32, 7.0]],
            vec![vec![0.0f32, 0.0, 0.0], vec![0.0f32, 0.0]],
        ];
        for (max_norm, wd) in [(1.0, 0.1), (0.0, 0.0), (100.0, 0.3)] {
            let cfg = OptimConfig {
                lr: 0.01,
                beta1: 0.9,
                beta2: 0.99,
                eps: 1e-8,
                weight_decay: wd,
                max_grad_norm: max_norm,
            };
            let vs = vars(&init);
            let mut opt = AdamW::new(vs.clone(), cfg.clone()).unwrap();
            let mut r = Reference {
                p: init
                    .iter()
                    .map(|v| v.iter().map(|x| *x as f64).collect())
                    .collect(),
                m: init.iter().map(|v| vec![0.0; v.len()]).collect(),
                v: init.iter().map(|v| vec![0.0; v.len()]).collect(),
                t: 0,
            };
            for c in &cs {
                let g = grads_of(&vs, c);
                let info = opt.step(&g).unwrap();
                assert!(info.finite);
                r.step(&cfg, c);
                for (k, (_, v)) in vs.iter().enumerate() {
                    let got = v.as_tensor().to_vec1::<f32>().unwrap();
                    for (a, b) in got.iter().zip(&r.p[k]) {
                        assert!(
                            (*a as f64 - b).abs() < 1e-5,
                            "max_norm {max_norm}, wd {wd}: {a} vs {b}"
                        );
                    }
                }
            }
            assert_eq!(opt.step_count(), cs.len() as u64);
            // Clipping really engaged in the first configuration (the third gradient is large).
            if max_norm == 1.0 {
                let g = grads_of(&vs, &cs[2]);
                assert!(opt.step(&g).unwrap().grad_norm > 1.0);
            }
        }
    }

    #[test]
    fn state_save_restore_continues_identically() {
        let init = vec![vec![0.1f32, 0.2, 0.3, 0.4], vec![-1.0f32]];
        let c = |k: usize| vec![vec![k as f32 * 0.3, -0.2, 0.7, 1.0], vec![0.5 - k as f32]];
        let cfg = OptimConfig {
            weight_decay: 0.05,
            ..OptimConfig::default()
        };
        let a = vars(&init);
        let mut oa = AdamW::new(a.clone(), cfg.clone()).unwrap();
        for k in 0..3 {
            oa.step(&grads_of(&a, &c(k))).unwrap();
        }
        let (state, step) = oa.state().unwrap();
        let state: HashMap<String, Tensor> = state.into_iter().collect();
        assert_eq!(step, 3);
        assert!(state.contains_key("p0.exp_avg") && state.contains_key("p1.exp_avg_sq"));
        // A fresh optimiser over vars holding the same weights, with the saved state.
        let b = vars(
            &a.iter()
                .map(|(_, v)| v.as_tensor().to_vec1::<f32>().unwrap())
                .collect::<Vec<_>>(),
        );
        let mut ob = AdamW::new(b.clone(), cfg.clone()).unwrap();
        ob.load_state(&state, step).unwrap();
        // Without the state the continuation differs (so the comparison below means something).
        let nostate = vars(
            &a.iter()
                .map(|(_, v)| v.as_tensor().to_vec1::<f32>().unwrap())
                .collect::<Vec<_>>(),
        );
        let mut on = AdamW::new(nostate.clone(), cfg).unwrap();
        for k in 3..6 {
            oa.step(&grads_of(&a, &c(k))).unwrap();
            ob.step(&grads_of(&b, &c(k))).unwrap();
            on.step(&grads_of(&nostate, &c(k))).unwrap();
        }
        for ((_, x), ((_, y), (_, z))) in a.iter().zip(b.iter().zip(&nostate)) {
            let (x, y, z) = (
                x.as_tensor().to_vec1::<f32>().unwrap(),
                y.as_tensor().to_vec1::<f32>().unwrap(),
                z.as_tensor().to_vec1::<f32>().unwrap(),
            );
            assert_eq!(
                x.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            assert_ne!(x, z);
        }
        assert_eq!(oa.step_count(), ob.step_count());

        // Bad state is refused with the tensor's name.
        let mut bad = state.clone();
        bad.remove("p1.exp_avg");
        let e = ob.load_state(&bad, 1).unwrap_err().to_string();
        assert!(e.contains("p1.exp_avg"), "{e}");
        let mut bad = state;
        bad.insert(
            "p0.exp_avg".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
        let e = ob.load_state(&bad, 1).unwrap_err().to_string();
        assert!(e.contains("wrong shape"), "{e}");
    }

    #[test]
    fn non_finite_gradients_skip_the_update() {
        let init = vec![vec![1.0f32, 2.0]];
        let vs = vars(&init);
        let mut opt = AdamW::new(vs.clone(), OptimConfig::default()).unwrap();
        let g = grads_of(&vs, &[vec![f32::NAN, 1.0]]);
        let info = opt.step(&g).unwrap();
        assert!(!info.finite);
        assert_eq!(opt.step_count(), 0);
        assert_eq!(
            vs[0].1.as_tensor().to_vec1::<f32>().unwrap(),
            vec![1.0, 2.0]
        );
        let (st, _) = opt.state().unwrap();
        for (n, t) in st {
            assert_eq!(t.to_vec1::<f32>().unwrap(), vec![0.0, 0.0], "{n}");
        }
    }
}
