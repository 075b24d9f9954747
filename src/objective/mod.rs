//! Objectives on the index t: DPO (logistic link), PSPO (profiled, plug-in link), OSPO
//! (orthogonalised, kernel link), RSPO (link-free ranking).
//!
//! All losses are weighted means over the minibatch and differentiable in `t`. With the
//! signed index s = (2z − 1)·t:
//! - DPO: softplus(−β s);
//! - PSPO: −[z log ψ + (1 − z) log(1 − ψ)], ψ = (1 − m)·Ψ̂(t) + m·σ(β t), Ψ̂ the recursive link
//!   estimate (piecewise linear, so the loss has a gradient in t), m a small logistic mix;
//! - OSPO: the same likelihood with Ψ̂ replaced by a Nadaraya–Watson estimate from a memory of
//!   recent detached (t, z) pairs (Gaussian kernel, bandwidth c·std(t_mem)·m^(−1/5));
//! - RSPO: Σ_ij w_i w_j softplus(−β (s_i + s_j)) / (Σ w)² over all pairs of the minibatch.
//!
//! PSPO and OSPO train with DPO for `warmup_steps` steps (and while they have no link yet).

pub mod index;

use crate::link::RecursiveLink;
use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

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
    pub const ALL: [ObjectiveKind; 4] = [Self::Dpo, Self::Pspo, Self::Ospo, Self::Rspo];
}

/// `[objective.pspo]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PspoConfig {
    /// Weight of the logistic σ(β t) mixed into Ψ̂ to keep gradients alive on flat pieces.
    pub mix: f64,
}

impl Default for PspoConfig {
    fn default() -> Self {
        Self { mix: 0.05 }
    }
}

/// `[objective.ospo]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OspoConfig {
    /// Number of recent detached (t, z) pairs kept for the kernel link.
    pub memory: usize,
    /// Bandwidth constant c in h = c·std(t_mem)·m^(−1/5).
    pub bandwidth: f64,
    /// Weight of the logistic σ(β t) mixed into the kernel estimate.
    pub mix: f64,
    /// The kernel estimate is used once the memory holds at least this many pairs.
    pub min_memory: usize,
}

impl Default for OspoConfig {
    fn default() -> Self {
        Self {
            memory: 1024,
            bandwidth: 1.0,
            mix: 0.05,
            min_memory: 32,
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
    pub pspo: PspoConfig,
    pub ospo: OspoConfig,
}

impl Default for ObjectiveConfig {
    fn default() -> Self {
        Self {
            kind: ObjectiveKind::Dpo,
            beta: 0.1,
            divergence: Divergence::default(),
            warmup_steps: 20,
            pspo: PspoConfig::default(),
            ospo: OspoConfig::default(),
        }
    }
}

impl ObjectiveConfig {
    /// Checks values (names the offending key).
    pub fn validate(&self) -> Result<(), String> {
        if !(self.beta > 0.0 && self.beta.is_finite()) {
            return Err(format!("objective.beta: must be > 0, got {}", self.beta));
        }
        self.divergence.validate()?;
        if !(0.0..=1.0).contains(&self.pspo.mix) {
            return Err(format!(
                "objective.pspo.mix: must be in [0, 1], got {}",
                self.pspo.mix
            ));
        }
        if !(0.0..=1.0).contains(&self.ospo.mix) {
            return Err(format!(
                "objective.ospo.mix: must be in [0, 1], got {}",
                self.ospo.mix
            ));
        }
        if self.ospo.memory < 2 {
            return Err(format!(
                "objective.ospo.memory: must be >= 2, got {}",
                self.ospo.memory
            ));
        }
        if !(self.ospo.bandwidth > 0.0 && self.ospo.bandwidth.is_finite()) {
            return Err(format!(
                "objective.ospo.bandwidth: must be > 0, got {}",
                self.ospo.bandwidth
            ));
        }
        Ok(())
    }
}

/// Numerically stable softplus(x) = log(1 + e^x).
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    // softplus(x) = relu(x) + log1p(exp(-|x|))
    let relu = x.relu()?;
    let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((relu + tail)?)
}

/// Weighted mean Σ w·l / Σ w.
fn wmean(l: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(((l * w)?.sum_all()? / w.sum_all()?)?)
}

/// Signed index s = (2z − 1)·t.
pub fn signed(t: &Tensor, z: &Tensor) -> Result<Tensor> {
    let sign = ((z * 2.0)? - 1.0)?;
    Ok((t * sign)?)
}

/// Weighted DPO loss: mean of softplus(−β s).
pub fn dpo_loss(t: &Tensor, z: &Tensor, w: &Tensor, beta: f64) -> Result<Tensor> {
    let s = signed(t, z)?;
    wmean(&softplus(&(s * -beta)?)?, w)
}

/// Weighted RSPO loss over all ordered pairs (i, j) of the batch, i = j included:
/// Σ w_i w_j softplus(−β (s_i + s_j)) / (Σ w)².
pub fn rspo_loss(t: &Tensor, z: &Tensor, w: &Tensor, beta: f64) -> Result<Tensor> {
    let n = t.dim(0)?;
    let s = signed(t, z)?;
    let si = s.reshape((n, 1))?;
    let sj = s.reshape((1, n))?;
    let m = si.broadcast_add(&sj)?;
    let l = softplus(&(m * -beta)?)?;
    let wi = w.reshape((n, 1))?;
    let wj = w.reshape((1, n))?;
    let ww = wi.broadcast_mul(&wj)?;
    let tot = w.sum_all()?;
    Ok(((l * ww)?.sum_all()? / (&tot * &tot)?)?)
}

/// Weighted Bernoulli negative log-likelihood of labels z under probabilities p (clamped to
/// [1e-6, 1 − 1e-6]).
pub fn bernoulli_nll(p: &Tensor, z: &Tensor, w: &Tensor) -> Result<Tensor> {
    let p = p.clamp(1e-6, 1.0 - 1e-6)?;
    let one_minus = p.affine(-1.0, 1.0)?;
    let l = ((z * p.log()?)? + (z.affine(-1.0, 1.0)? * one_minus.log()?)?)?.neg()?;
    wmean(&l, w)
}

/// (1 − mix)·p + mix·σ(β t).
fn logistic_mix(p: &Tensor, t: &Tensor, beta: f64, mix: f64) -> Result<Tensor> {
    if mix == 0.0 {
        return Ok(p.clone());
    }
    let s = candle_nn::ops::sigmoid(&(t * beta)?)?;
    Ok(((p * (1.0 - mix))? + (s * mix)?)?)
}

/// Unbiased standard deviation, floored at 1e-3 (as the paper's code does).
pub fn std_floor(v: &[f64]) -> f64 {
    let n = v.len();
    if n < 2 {
        return 1e-3;
    }
    let m = v.iter().sum::<f64>() / n as f64;
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1) as f64;
    var.sqrt().max(1e-3)
}

/// Nadaraya–Watson estimate of P(z = 1 | t) at the (differentiable) queries `t` `[n]` from a
/// detached memory (t_mem, z_mem), Gaussian kernel with bandwidth `h`:
/// Σ_j K((t − t_j)/h) z_j / (Σ_j K + 1e-6). `exclude[i]`, when given, is the memory position
/// left out of query i's estimate (leave-one-out), or `usize::MAX` for none.
pub fn kernel_link(
    t: &Tensor,
    t_mem: &[f64],
    z_mem: &[f64],
    h: f64,
    exclude: Option<&[usize]>,
) -> Result<Tensor> {
    let n = t.dim(0)?;
    let m = t_mem.len();
    let dev = t.device();
    let dt = t.dtype();
    let tm = Tensor::from_vec(t_mem.to_vec(), (1, m), dev)?.to_dtype(dt)?;
    let zm = Tensor::from_vec(z_mem.to_vec(), (1, m), dev)?.to_dtype(dt)?;
    let u = (t.reshape((n, 1))?.broadcast_sub(&tm)? / h)?;
    let mut k = (u.sqr()? * -0.5)?.exp()?;
    if let Some(ex) = exclude {
        anyhow::ensure!(
            ex.len() == n,
            "kernel_link: exclude has {} entries for {n} queries",
            ex.len()
        );
        let mut keep = vec![1f32; n * m];
        for (i, &j) in ex.iter().enumerate() {
            if j < m {
                keep[i * m + j] = 0.0;
            }
        }
        let keep = Tensor::from_vec(keep, (n, m), dev)?.to_dtype(dt)?;
        k = (k * keep)?;
    }
    let num = k.broadcast_mul(&zm)?.sum(1)?;
    let den = (k.sum(1)? + 1e-6)?;
    Ok((num / den)?)
}

/// Recent detached (t, z) pairs (OSPO memory).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct Memory {
    t: VecDeque<f64>,
    z: VecDeque<f64>,
}

/// Serialised objective state.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct ObjectiveState {
    kind: String,
    memory: Memory,
    observed: u64,
}

/// The configured objective with whatever state it keeps between steps.
pub struct Objective {
    pub cfg: ObjectiveConfig,
    memory: Memory,
    observed: u64,
}

impl Objective {
    pub fn new(cfg: ObjectiveConfig) -> Self {
        Self {
            cfg,
            memory: Memory::default(),
            observed: 0,
        }
    }

    /// Whether PSPO/OSPO are still in their DPO warm-up at `step`.
    pub fn in_warmup(&self, link: &RecursiveLink, step: u64) -> bool {
        match self.cfg.kind {
            ObjectiveKind::Dpo | ObjectiveKind::Rspo => false,
            ObjectiveKind::Pspo => step < self.cfg.warmup_steps || !link.is_fitted(),
            ObjectiveKind::Ospo => {
                step < self.cfg.warmup_steps
                    || self.memory.t.len() < self.cfg.ospo.min_memory.max(2)
            }
        }
    }

    /// OSPO bandwidth for the current memory: c·std(t_mem)·m^(−1/5).
    pub fn ospo_bandwidth(&self) -> f64 {
        let tm: Vec<f64> = self.memory.t.iter().copied().collect();
        let m = tm.len().max(1) as f64;
        self.cfg.ospo.bandwidth * std_floor(&tm) * m.powf(-0.2) + 1e-6
    }

    /// Weighted mean loss for a minibatch. `t`: index (differentiable), `z`: labels in {0,1},
    /// `w`: event weights, all `[n]` (same float dtype).
    pub fn loss(
        &mut self,
        t: &Tensor,
        z: &Tensor,
        w: &Tensor,
        link: &RecursiveLink,
        step: u64,
    ) -> Result<Tensor> {
        anyhow::ensure!(
            t.dims() == z.dims() && t.dims() == w.dims() && t.rank() == 1,
            "objective: t, z, w must be [n] (t {:?}, z {:?}, w {:?})",
            t.dims(),
            z.dims(),
            w.dims()
        );
        anyhow::ensure!(t.dim(0)? > 0, "objective: empty minibatch");
        let z = z.to_dtype(t.dtype())?;
        let w = w.to_dtype(t.dtype())?;
        let beta = self.cfg.beta;
        if self.in_warmup(link, step) {
            return dpo_loss(t, &z, &w, beta);
        }
        match self.cfg.kind {
            ObjectiveKind::Dpo => dpo_loss(t, &z, &w, beta),
            ObjectiveKind::Rspo => rspo_loss(t, &z, &w, beta),
            ObjectiveKind::Pspo => {
                let p = link.psi_tensor(t).context("PSPO: evaluating the link")?;
                let p = logistic_mix(&p, t, beta, self.cfg.pspo.mix)?;
                bernoulli_nll(&p, &z, &w)
            }
            ObjectiveKind::Ospo => {
                let tm: Vec<f64> = self.memory.t.iter().copied().collect();
                let zm: Vec<f64> = self.memory.z.iter().copied().collect();
                let h = self.ospo_bandwidth();
                let p = kernel_link(t, &tm, &zm, h, None)?;
                let p = logistic_mix(&p, t, beta, self.cfg.ospo.mix)?;
                bernoulli_nll(&p, &z, &w)
            }
        }
    }

    /// Record the detached index values of a finished step (OSPO memory).
    pub fn observe(&mut self, t: &[f64], z: &[f64]) {
        self.observed += t.len() as u64;
        if self.cfg.kind != ObjectiveKind::Ospo {
            return;
        }
        let cap = self.cfg.ospo.memory.max(2);
        for (t, z) in t.iter().zip(z) {
            if !t.is_finite() {
                continue;
            }
            self.memory.t.push_back(*t);
            self.memory.z.push_back(*z);
            while self.memory.t.len() > cap {
                self.memory.t.pop_front();
                self.memory.z.pop_front();
            }
        }
    }

    /// Sign that aligns the index with the labels: sign of cov(t, z) over the OSPO memory
    /// (the kernel likelihood does not identify the orientation); 1 for the other objectives.
    pub fn index_sign(&self) -> f64 {
        if self.cfg.kind != ObjectiveKind::Ospo || self.memory.t.len() < 2 {
            return 1.0;
        }
        cov_sign(
            &self.memory.t.iter().copied().collect::<Vec<_>>(),
            &self.memory.z.iter().copied().collect::<Vec<_>>(),
        )
    }

    /// Number of pairs currently in the OSPO memory.
    pub fn memory_len(&self) -> usize {
        self.memory.t.len()
    }

    /// Serializable state for snapshots (the OSPO memory, exactly).
    pub fn state(&self) -> serde_json::Value {
        serde_json::to_value(ObjectiveState {
            kind: self.cfg.kind.as_str().to_string(),
            memory: self.memory.clone(),
            observed: self.observed,
        })
        .unwrap_or(serde_json::Value::Null)
    }

    /// Restore [`Objective::state`]. `null` (older snapshots) resets to an empty memory.
    pub fn load_state(&mut self, v: &serde_json::Value) -> Result<()> {
        if v.is_null() {
            self.memory = Memory::default();
            self.observed = 0;
            return Ok(());
        }
        let s: ObjectiveState = serde_json::from_value(v.clone())
            .context("objective state in the snapshot is malformed")?;
        anyhow::ensure!(
            s.memory.t.len() == s.memory.z.len(),
            "objective state: memory has {} indices but {} labels",
            s.memory.t.len(),
            s.memory.z.len()
        );
        self.memory = s.memory;
        self.observed = s.observed;
        Ok(())
    }
}

/// +1 if cov(t, z) ≥ 0, else −1.
pub fn cov_sign(t: &[f64], z: &[f64]) -> f64 {
    let n = t.len().min(z.len());
    if n == 0 {
        return 1.0;
    }
    let mt = t[..n].iter().sum::<f64>() / n as f64;
    let mz = z[..n].iter().sum::<f64>() / n as f64;
    let c: f64 = (0..n).map(|i| (t[i] - mt) * (z[i] - mz)).sum();
    if c >= 0.0 {
        1.0
    } else {
        -1.0
    }
}

/// Detached f64 copy of a `[n]` tensor.
pub fn to_f64_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::LinkConfig;
    use candle_core::{Device, Var};

    fn sp(x: f64) -> f64 {
        x.max(0.0) + (-x.abs()).exp().ln_1p()
    }
    fn v(x: &[f64]) -> Tensor {
        Tensor::new(x, &Device::Cpu).unwrap()
    }
    fn cfg(kind: ObjectiveKind, beta: f64) -> ObjectiveConfig {
        ObjectiveConfig {
            kind,
            beta,
            warmup_steps: 0,
            ..Default::default()
        }
    }
    fn scalar(t: &Tensor) -> f64 {
        t.to_scalar::<f64>().unwrap()
    }

    fn fitted_link() -> RecursiveLink {
        let mut l = RecursiveLink::new(LinkConfig {
            bins: 16,
            forgetting: 1.0,
            eps: 1e-3,
        });
        // A smooth increasing set of label means: z = 1 with frequency rising in t.
        let t: Vec<f64> = (0..400).map(|i| -4.0 + 8.0 * i as f64 / 399.0).collect();
        let z: Vec<f64> = (0..400)
            .map(|i| ((i * 7919) % 400 < i) as u8 as f64)
            .collect();
        l.update(&t, &z, &vec![1.0; 400]);
        l
    }

    #[test]
    fn hand_computed_values() {
        let link = RecursiveLink::new(LinkConfig::default());
        let (t, z, w) = (v(&[1.0, -2.0]), v(&[1.0, 1.0]), v(&[1.0, 1.0]));
        let mut o = Objective::new(cfg(ObjectiveKind::Dpo, 1.0));
        let l = scalar(&o.loss(&t, &z, &w, &link, 0).unwrap());
        assert!((l - (sp(-1.0) + sp(2.0)) / 2.0).abs() < 1e-12);
        // β and weights: β = 0.5, z = [1, 0] -> s = [1, 2]; w = [3, 1]
        let mut o = Objective::new(cfg(ObjectiveKind::Dpo, 0.5));
        let l = scalar(
            &o.loss(&t, &v(&[1.0, 0.0]), &v(&[3.0, 1.0]), &link, 0)
                .unwrap(),
        );
        assert!((l - (3.0 * sp(-0.5) + sp(-1.0)) / 4.0).abs() < 1e-12);
        // RSPO on s = [1, −2]: pairs (1+1), (1−2) twice, (−2−2).
        let mut o = Objective::new(cfg(ObjectiveKind::Rspo, 1.0));
        let l = scalar(&o.loss(&t, &z, &w, &link, 0).unwrap());
        let want = (sp(-2.0) + 2.0 * sp(1.0) + sp(4.0)) / 4.0;
        assert!((l - want).abs() < 1e-12, "{l} {want}");
        // PSPO with a two-knot link through (−1, eps) and (1, 1 − eps), no mix: Ψ̂(0) = 1/2.
        let mut link2 = RecursiveLink::new(LinkConfig {
            bins: 8,
            forgetting: 1.0,
            eps: 1e-3,
        });
        link2.update(&[-1.0, 1.0], &[0.0, 1.0], &[1.0, 1.0]);
        let mut c = cfg(ObjectiveKind::Pspo, 1.0);
        c.pspo.mix = 0.0;
        let mut o = Objective::new(c.clone());
        let l = scalar(
            &o.loss(&v(&[0.0]), &v(&[1.0]), &v(&[1.0]), &link2, 0)
                .unwrap(),
        );
        assert!((l - 2f64.ln()).abs() < 1e-12);
        // Ψ̂(0.5) = 0.5 + 0.5·(1 − 2eps)/2 ; z = 0
        let p: f64 = 0.5 + 0.25 * (1.0 - 2e-3);
        let l = scalar(
            &o.loss(&v(&[0.5]), &v(&[0.0]), &v(&[1.0]), &link2, 0)
                .unwrap(),
        );
        assert!((l + (1.0 - p).ln()).abs() < 1e-12);
        // Warm-up: PSPO is DPO before warmup_steps.
        c.warmup_steps = 5;
        let mut o = Objective::new(c);
        let l = scalar(
            &o.loss(&v(&[0.5]), &v(&[0.0]), &v(&[1.0]), &link2, 4)
                .unwrap(),
        );
        assert!((l - sp(0.5)).abs() < 1e-12);
        // OSPO: memory (0, 0), (2, 1); the query t = 1 is equidistant: ĝ = 1/2 (up to 1e-6).
        let mut c = cfg(ObjectiveKind::Ospo, 1.0);
        c.ospo.mix = 0.0;
        c.ospo.min_memory = 2;
        let mut o = Objective::new(c);
        o.observe(&[0.0, 2.0], &[0.0, 1.0]);
        let l = scalar(
            &o.loss(&v(&[1.0]), &v(&[1.0]), &v(&[1.0]), &link, 0)
                .unwrap(),
        );
        assert!((l - 2f64.ln()).abs() < 1e-5, "{l}");
        // Bandwidth: std([0, 2]) = √2, m = 2.
        let h = o.ospo_bandwidth();
        assert!((h - 2f64.sqrt() * 2f64.powf(-0.2)).abs() < 1e-5);
        // Query t = 0: weights 1 and exp(−0.5 (2/h)²).
        let k = (-0.5 * (2.0 / h).powi(2)).exp();
        let g = k / (1.0 + k + 1e-6);
        let l = scalar(
            &o.loss(&v(&[0.0]), &v(&[0.0]), &v(&[1.0]), &link, 0)
                .unwrap(),
        );
        assert!((l + (1.0 - g).ln()).abs() < 1e-9);
    }

    /// Central finite differences of the loss against the autograd gradient.
    fn grad_check(o: &mut Objective, link: &RecursiveLink, t0: &[f64], z: &[f64], w: &[f64]) {
        let tv = Var::new(t0, &Device::Cpu).unwrap();
        let l = o.loss(tv.as_tensor(), &v(z), &v(w), link, 100).unwrap();
        let g = l.backward().unwrap();
        let g = g.get(tv.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        let h = 1e-6;
        let mut nonzero = 0;
        for i in 0..t0.len() {
            let mut a = t0.to_vec();
            a[i] += h;
            let mut b = t0.to_vec();
            b[i] -= h;
            let fa = scalar(&o.loss(&v(&a), &v(z), &v(w), link, 100).unwrap());
            let fb = scalar(&o.loss(&v(&b), &v(z), &v(w), link, 100).unwrap());
            let fd = (fa - fb) / (2.0 * h);
            assert!(
                (fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                "{:?} t[{i}]: fd {fd} vs autograd {}",
                o.cfg.kind,
                g[i]
            );
            if g[i].abs() > 1e-8 {
                nonzero += 1;
            }
        }
        assert!(nonzero > 0, "{:?}: gradient vanished", o.cfg.kind);
    }

    #[test]
    fn gradient_checks() {
        let link = fitted_link();
        let t0 = [-2.31, -0.77, 0.13, 0.52, 1.91, 3.3];
        let z = [0.0, 1.0, 0.0, 1.0, 1.0, 0.0];
        let w = [1.0, 2.0, 0.5, 1.0, 1.5, 1.0];
        for kind in ObjectiveKind::ALL {
            let mut o = Objective::new(cfg(kind, 0.7));
            if kind == ObjectiveKind::Ospo {
                let tm: Vec<f64> = (0..64).map(|i| -3.0 + 0.1 * i as f64).collect();
                let zm: Vec<f64> = (0..64).map(|i| ((i * 13) % 64 < i) as u8 as f64).collect();
                o.observe(&tm, &zm);
                assert!(!o.in_warmup(&link, 100));
            }
            grad_check(&mut o, &link, &t0, &z, &w);
        }
        // Leave-one-out kernel link has a gradient too.
        let tv = Var::new(&[0.3f64, -0.4][..], &Device::Cpu).unwrap();
        let p = kernel_link(
            tv.as_tensor(),
            &[0.3, -0.4, 1.0],
            &[1.0, 0.0, 1.0],
            0.5,
            Some(&[0, 1]),
        )
        .unwrap();
        let pv = p.to_vec1::<f64>().unwrap();
        // Query 0 sees (−0.4, 0) and (1, 1) only.
        let (k1, k2) = (
            (-0.5f64 * (0.7f64 / 0.5).powi(2)).exp(),
            (-0.5f64 * (0.7f64 / 0.5).powi(2)).exp(),
        );
        assert!((pv[0] - k2 / (k1 + k2 + 1e-6)).abs() < 1e-9);
        assert!(pv[1] > 0.0 && pv[1] < 1.0);
    }

    #[test]
    fn ospo_memory_is_bounded_and_state_round_trips() {
        let mut c = cfg(ObjectiveKind::Ospo, 1.0);
        c.ospo.memory = 10;
        let mut o = Objective::new(c.clone());
        let t: Vec<f64> = (0..25).map(|i| i as f64 * 0.1).collect();
        let z: Vec<f64> = (0..25).map(|i| (i % 2) as f64).collect();
        o.observe(&t, &z);
        assert_eq!(o.memory_len(), 10);
        let st = o.state();
        let js = serde_json::to_string(&st).unwrap();
        let mut o2 = Objective::new(c);
        o2.load_state(&serde_json::from_str(&js).unwrap()).unwrap();
        assert_eq!(o2.state(), st);
        let link = RecursiveLink::new(LinkConfig::default());
        let q = v(&[0.7, 1.9]);
        let (zq, wq) = (v(&[1.0, 0.0]), v(&[1.0, 1.0]));
        let a = scalar(&o.loss(&q, &zq, &wq, &link, 50).unwrap());
        let b = scalar(&o2.loss(&q, &zq, &wq, &link, 50).unwrap());
        assert_eq!(a.to_bits(), b.to_bits());
        assert!(o2.load_state(&serde_json::json!({"kind": 3})).is_err());
        o2.load_state(&serde_json::Value::Null).unwrap();
        assert_eq!(o2.memory_len(), 0);
        // Labels that fall with t flip the sign.
        let mut o3 = Objective::new(cfg(ObjectiveKind::Ospo, 1.0));
        o3.observe(&[0.0, 1.0, 2.0], &[1.0, 1.0, 0.0]);
        assert_eq!(o3.index_sign(), -1.0);
    }

    #[test]
    fn config_serde_and_validation() {
        let c: ObjectiveConfig = toml::from_str(
            "kind = \"ospo\"\nbeta = 1.0\n[divergence]\nkind = \"kl\"\n[ospo]\nmemory = 256\n",
        )
        .unwrap();
        assert_eq!(c.kind, ObjectiveKind::Ospo);
        assert_eq!(c.ospo.memory, 256);
        assert_eq!(c.pspo, PspoConfig::default());
        assert!(c.validate().is_ok());
        let mut bad = c.clone();
        bad.ospo.mix = 2.0;
        assert!(bad.validate().unwrap_err().contains("objective.ospo.mix"));
        assert!(toml::from_str::<ObjectiveConfig>("[pspo]\nmixx = 1\n").is_err());
    }
}
