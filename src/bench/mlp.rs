//! The small MLP policy of the SPO paper's synthetic experiment: x ∈ R^d → logits over k
//! actions through ReLU hidden layers, initialised like PyTorch's `nn.Linear` default
//! (weights and biases U(−1/√fan_in, 1/√fan_in)). candle, f32, differentiable primitives only.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;

/// One affine layer `y = x Wᵀ + b`, W `[out, in]`.
pub struct Linear {
    pub w: Var,
    pub b: Var,
}

/// Multi-layer perceptron with ReLU between layers.
pub struct Mlp {
    pub layers: Vec<Linear>,
    pub dims: Vec<usize>,
}

impl Mlp {
    /// `dims` = [d, hidden..., k]. Every weight and bias ~ U(−1/√fan_in, 1/√fan_in).
    pub fn new<R: Rng>(dims: &[usize], rng: &mut R, dev: &Device) -> Result<Self> {
        anyhow::ensure!(dims.len() >= 2, "mlp: need at least input and output sizes");
        let mut layers = Vec::with_capacity(dims.len() - 1);
        for win in dims.windows(2) {
            let (fan_in, fan_out) = (win[0], win[1]);
            let bound = 1.0 / (fan_in as f64).sqrt();
            let mut u = |n: usize| -> Vec<f32> {
                (0..n)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect()
            };
            let w = Tensor::from_vec(u(fan_out * fan_in), (fan_out, fan_in), dev)?;
            let b = Tensor::from_vec(u(fan_out), fan_out, dev)?;
            layers.push(Linear {
                w: Var::from_tensor(&w)?,
                b: Var::from_tensor(&b)?,
            });
        }
        Ok(Self {
            layers,
            dims: dims.to_vec(),
        })
    }

    /// Named trainable variables (for the optimiser).
    pub fn vars(&self) -> Vec<(String, candle_core::Var)> {
        let mut v = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            v.push((format!("layer{i}.weight"), l.w.clone()));
            v.push((format!("layer{i}.bias"), l.b.clone()));
        }
        v
    }

    /// Logits `[n, k]` for inputs `[n, d]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        let last = self.layers.len() - 1;
        for (i, l) in self.layers.iter().enumerate() {
            h = h
                .matmul(&l.w.as_tensor().t()?)?
                .broadcast_add(l.b.as_tensor())
                .with_context(|| format!("mlp layer {i}"))?;
            if i < last {
                h = h.relu()?;
            }
        }
        Ok(h)
    }

    /// Log-probabilities `[n, k]`.
    pub fn log_probs(&self, x: &Tensor) -> Result<Tensor> {
        log_softmax(&self.forward(x)?)
    }

    /// Log-probabilities as host f64 rows (no gradient).
    pub fn log_probs_host(&self, x: &Tensor) -> Result<Vec<Vec<f64>>> {
        Ok(self
            .log_probs(&x.detach())?
            .detach()
            .to_dtype(DType::F64)?
            .to_vec2::<f64>()?)
    }
}

/// Row-wise log-softmax from differentiable primitives (the shift by the row max is detached;
/// it cancels mathematically).
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.detach().max_keepdim(1)?;
    let d = x.broadcast_sub(&max)?;
    let lse = d.exp()?.sum_keepdim(1)?.log()?;
    Ok(d.broadcast_sub(&lse)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn init_bounds_and_shapes() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let m = Mlp::new(&[20, 32, 32, 10], &mut rng, &Device::Cpu).unwrap();
        for (l, fan_in) in m.layers.iter().zip([20usize, 32, 32]) {
            let b = 1.0 / (fan_in as f32).sqrt();
            let w =
                l.w.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
            assert!(w.iter().all(|v| v.abs() <= b));
            // Roughly uniform: variance near b²/3.
            let var = w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32;
            assert!((var / (b * b / 3.0) - 1.0).abs() < 0.2, "{var}");
        }
        let x = Tensor::zeros((5, 20), DType::F32, &Device::Cpu).unwrap();
        let lp = m.log_probs_host(&x).unwrap();
        assert_eq!((lp.len(), lp[0].len()), (5, 10));
        let s: f64 = lp[0].iter().map(|v| v.exp()).sum();
        assert!((s - 1.0).abs() < 1e-5);
    }

    #[test]
    fn log_softmax_gradient() {
        let x = Var::new(&[[0.3f64, -1.2, 2.0]], &Device::Cpu).unwrap();
        let y = log_softmax(x.as_tensor()).unwrap();
        // d/dx of log p_0 = e_0 − p
        let l = y.narrow(1, 0, 1).unwrap().sum_all().unwrap();
        let g = l.backward().unwrap();
        let g = g.get(x.as_tensor()).unwrap().to_vec2::<f64>().unwrap();
        let e: Vec<f64> = [0.3f64, -1.2, 2.0].iter().map(|v| v.exp()).collect();
        let z: f64 = e.iter().sum();
        for j in 0..3 {
            let want = (j == 0) as u8 as f64 - e[j] / z;
            assert!((g[0][j] - want).abs() < 1e-12);
        }
    }
}
