//! `spoke bench synthetic`: the SPO paper's simulation (Kallus 2025, causalml/spo
//! `synthetic/`), reimplemented with a candle MLP policy.
//!
//! Protocol (matching the paper's code): contexts x ~ N(0, I_20), k = 10 actions, uniform
//! reference; a teacher MLP (20→32→32→10, ReLU, PyTorch `nn.Linear` init) defines
//! r*(x, y) = ν·log(π_teacher(y|x)/π_ref(y)), ν = 10; y0, y1 uniform; z ~ Bernoulli(Ψ_s(r*(x,y1) −
//! r*(x,y0))) with Ψ_s(u) = ½σ((u − s)/τ) + ½σ((u + s)/τ). A learner MLP of the same shape is
//! trained on n pairs with Adam (lr 2e-3, batch 128, the last partial batch kept); the index is
//! the log-ratio difference t = log π(y1)/π_ref(y1) − log π(y0)/π_ref(y0) and every loss uses it
//! with β = 1 (DPO's β only enters at evaluation, as in the paper's code):
//! - DPO: softplus(−s), s = (2z − 1)t, `epochs` epochs;
//! - RSPO: mean over all B² pairs (i = j included) of softplus(−(s_i + s_j)), `epochs` epochs;
//! - OSPO: `ospo_warm` DPO epochs, then `epochs` epochs with a Nadaraya–Watson link refitted at
//!   the start of each epoch on the detached index of all n pairs (Gaussian kernel, bandwidth
//!   c·n^(−1/5)·std(t) + 1e-6, each pair left out of its own estimate), clamped to
//!   [1e-6, 1 − 1e-6], in the Bernoulli likelihood; at evaluation the index's sign is aligned by
//!   cov(t, z) on the training pairs;
//! - PSPO: `pspo_warm` DPO epochs, then `pspo_outer` rounds of (isotonic fit on the detached
//!   index of all pairs, knots at the distinct t, clipped to [1e-4, 1 − 1e-4], linear
//!   interpolation with knot gaps floored at 1e-6; `pspo_inner` epochs of the Bernoulli
//!   likelihood).
//!
//! The paper's code (causalml/spo, `synthetic/`) run on the same setup agrees with these numbers
//! within seed noise: `spoke bench compare` puts the two `results.csv` side by side
//! (BENCHMARKS.md). Beside the paper protocol, a variant study runs spoke's own PSPO, whose
//! isotonic curve has one knot per PAVA block (as the pipeline's [`RecursiveLink`]), so that
//! every pair gets a gradient (`variants.csv`).
//!
//! Evaluation on fresh contexts: π_β ∝ π_ref^(1−1/β)·π_θ^(1/β) for β on the paper's grid, the
//! average true reward E Σ_y π_β r* and KL(π_β‖π_ref); the reward at a KL budget κ is
//! interpolated along the β scan (linear in KL between the neighbours, clamped at the ends).
//!
//! Budget sweep: every method's schedule is run to the largest budget and evaluated after E
//! epochs for each E (PSPO continues with further rounds of refit + `pspo_inner` epochs; OSPO
//! counts its warm-up epochs), which is exactly the method trained for E epochs on the same data.
//! Streaming: the n events arrive once, in order, in minibatches of `stream_batch`, through
//! [`crate::learner::update_on_index`] with the configured [`Objective`], a [`RecursiveLink`]
//! and the pipeline's [`ReplayBuffer`] (each step also trains on `ratio` × batch pairs drawn from
//! the most recent ones), as the pipeline's learner does; one run per replay ratio.

#[path = "mlp.rs"]
pub mod mlp;

use crate::learner::replay::{ReplayBuffer, ReplayConfig};
use crate::learner::update_on_index;
use crate::link::{isotonic_fit, sigmoid, Knots, LinkConfig, PiecewiseLinear, RecursiveLink};
use crate::objective::{
    bernoulli_nll, cov_sign, dpo_loss, index, kernel_link, rspo_loss, std_floor, Divergence,
    Objective, ObjectiveConfig, ObjectiveKind,
};
use crate::optim::{AdamW, OptimConfig};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use mlp::Mlp;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Context dimension.
pub const D: usize = 20;
/// Number of actions.
pub const K: usize = 10;
/// Hidden layer sizes of teacher and learner.
pub const HIDDEN: [usize; 2] = [32, 32];
/// The paper's β grid for the evaluation scan.
pub const BETA_GRID: [f64; 23] = [
    0.2, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 10.0, 15.0, 20.0, 30.0, 50.0, 80.0, 100.0,
    150.0, 200.0, 300.0, 500.0, 800.0, 1000.0,
];

/// Arguments of `spoke bench synthetic`.
#[derive(Debug, Clone, clap::Args)]
pub struct SyntheticBenchArgs {
    /// Output directory.
    #[arg(long, default_value = "bench-out")]
    pub out: std::path::PathBuf,
    /// Seeds: `a..b` (b excluded), `a..=b`, or a comma list.
    #[arg(long, default_value = "0..20")]
    pub seeds: String,
    /// Grid of link shifts s (comma list).
    #[arg(long = "s", default_value = "0,0.75,1.5")]
    pub s: String,
    /// Link temperature τ.
    #[arg(long, default_value_t = 0.25)]
    pub tau: f64,
    /// Number of training pairs.
    #[arg(long, default_value_t = 1000)]
    pub n: u32,
    /// Number of fresh evaluation contexts.
    #[arg(long, default_value_t = 2000)]
    pub eval_contexts: u32,
    /// Methods (comma list of dpo, pspo, ospo, rspo).
    #[arg(long, default_value = "dpo,pspo,ospo,rspo")]
    pub methods: String,
    /// Worker threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: u32,
    /// Matched training budgets in epochs (comma list; empty to skip the sweep).
    #[arg(long, default_value = "1,3,11,30,100")]
    pub epochs_budget: String,
    /// Epochs of DPO and RSPO, and of OSPO after its warm-up.
    #[arg(long, default_value_t = 100)]
    pub epochs: u32,
    /// OSPO DPO warm-up epochs.
    #[arg(long, default_value_t = 2)]
    pub ospo_warm: u32,
    /// OSPO bandwidth constant c.
    #[arg(long, default_value_t = 1.0)]
    pub ospo_bandwidth: f64,
    /// PSPO DPO warm-up epochs.
    #[arg(long, default_value_t = 3)]
    pub pspo_warm: u32,
    /// PSPO rounds of (isotonic refit, inner epochs).
    #[arg(long, default_value_t = 4)]
    pub pspo_outer: u32,
    /// PSPO epochs per round.
    #[arg(long, default_value_t = 2)]
    pub pspo_inner: u32,
    /// Knots of PSPO's isotonic link: `points` (one per pair, the paper's code) or `blocks`
    /// (one per PAVA block, at its centre: a gradient for every pair).
    #[arg(long, default_value = "points", value_parser = parse_knots)]
    pub pspo_knots: Knots,
    /// Minibatch size.
    #[arg(long, default_value_t = 128)]
    pub batch_size: u32,
    /// Adam learning rate.
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Reward scale ν.
    #[arg(long, default_value_t = 10.0)]
    pub nu: f64,
    /// KL budget κ of the summary.
    #[arg(long, default_value_t = 0.2)]
    pub kappa: f64,
    /// Minibatch size of the streaming mode.
    #[arg(long, default_value_t = 8)]
    pub stream_batch: u32,
    /// Replay ratios of the streaming study (comma list; replayed pairs per fresh pair, drawn
    /// from the pipeline's replay buffer; 0: each event trained on exactly once).
    #[arg(long, default_value = "0,1,4")]
    pub stream_replay: String,
    /// Capacity of the streaming study's replay buffer (most recent pairs).
    #[arg(long, default_value_t = 1024)]
    pub stream_replay_capacity: u32,
    /// Skip the streaming study.
    #[arg(long)]
    pub no_streaming: bool,
    /// Skip the study of spoke's PSPO (block knots) beside the paper protocol's.
    #[arg(long)]
    pub no_variants: bool,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

fn parse_knots(s: &str) -> Result<Knots, String> {
    match s {
        "points" => Ok(Knots::Points),
        "blocks" => Ok(Knots::Blocks),
        _ => Err(format!("expected `points` or `blocks`, got {s:?}")),
    }
}

/// Parses `a..b`, `a..=b` or `a,b,c`.
pub fn parse_seeds(s: &str) -> Result<Vec<u64>> {
    let s = s.trim();
    if let Some((a, b)) = s.split_once("..=") {
        let (a, b): (u64, u64) = (a.trim().parse()?, b.trim().parse()?);
        anyhow::ensure!(a <= b, "--seeds {s}: empty range");
        return Ok((a..=b).collect());
    }
    if let Some((a, b)) = s.split_once("..") {
        let (a, b): (u64, u64) = (
            a.trim().parse().with_context(|| format!("--seeds {s}"))?,
            b.trim().parse().with_context(|| format!("--seeds {s}"))?,
        );
        anyhow::ensure!(a < b, "--seeds {s}: empty range (the end is excluded)");
        return Ok((a..b).collect());
    }
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| {
            x.trim()
                .parse::<u64>()
                .with_context(|| format!("--seeds: {x:?} is not a seed"))
        })
        .collect()
}

fn parse_list<T: std::str::FromStr>(what: &str, s: &str) -> Result<Vec<T>>
where
    T::Err: std::fmt::Display,
{
    s.split(',')
        .filter(|x| !x.trim().is_empty())
        .map(|x| {
            x.trim()
                .parse::<T>()
                .map_err(|e| anyhow::anyhow!("{what}: {x:?}: {e}"))
        })
        .collect()
}

/// The paper's misspecified link: ½σ((u − s)/τ) + ½σ((u + s)/τ).
pub fn shifted_logistic_mixture(u: f64, s: f64, tau: f64) -> f64 {
    0.5 * sigmoid((u - s) / tau) + 0.5 * sigmoid((u + s) / tau)
}

fn stream_seed(seed: u64, stream: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(stream.wrapping_mul(0xD1B5_4A32_D192_ED03))
        ^ 0x0053_504F_4B45
}

/// Everything drawn once per seed (shared by every s and method: common random numbers).
pub struct SeedData {
    pub seed: u64,
    pub n: usize,
    /// Training contexts `[n, D]`.
    pub x: Tensor,
    /// Evaluation contexts `[m, D]`.
    pub x_eval: Tensor,
    pub y0: Vec<usize>,
    pub y1: Vec<usize>,
    /// Uniforms for the labels: z = 1{u < Ψ(Δ)}.
    pub u: Vec<f64>,
    /// True reward differences Δ = r*(x, y1) − r*(x, y0).
    pub delta: Vec<f64>,
    /// True rewards r*(x_eval, ·), `[m][K]`.
    pub r_eval: Vec<Vec<f64>>,
    /// One-hot(y1) − one-hot(y0), `[n, K]`.
    pub dmat: Tensor,
}

impl SeedData {
    pub fn generate(seed: u64, n: usize, m: usize, nu: f64) -> Result<Self> {
        let dev = Device::Cpu;
        let mut rng = ChaCha8Rng::seed_from_u64(stream_seed(seed, 1));
        let normal = rand_distr::StandardNormal;
        let mut gauss = |rows: usize| -> Vec<f32> {
            (0..rows * D)
                .map(|_| rng.sample::<f64, _>(normal) as f32)
                .collect()
        };
        let x = Tensor::from_vec(gauss(n), (n, D), &dev)?;
        let x_eval = Tensor::from_vec(gauss(m), (m, D), &dev)?;
        let y0: Vec<usize> = (0..n).map(|_| rng.random_range(0..K)).collect();
        let y1: Vec<usize> = (0..n).map(|_| rng.random_range(0..K)).collect();
        let u: Vec<f64> = (0..n).map(|_| rng.random::<f64>()).collect();
        let mut trng = ChaCha8Rng::seed_from_u64(stream_seed(seed, 2));
        let teacher = Mlp::new(&dims(), &mut trng, &dev)?;
        Self::from_parts(seed, x, x_eval, y0, y1, u, &teacher, nu)
    }

    /// A seed's data from given contexts, actions, label uniforms and teacher (e.g. another
    /// implementation's draws, to replay its run).
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        seed: u64,
        x: Tensor,
        x_eval: Tensor,
        y0: Vec<usize>,
        y1: Vec<usize>,
        u: Vec<f64>,
        teacher: &Mlp,
        nu: f64,
    ) -> Result<Self> {
        let n = y0.len();
        anyhow::ensure!(
            y1.len() == n && u.len() == n && x.dims2()? == (n, D) && x_eval.dims2()?.1 == D,
            "inconsistent synthetic data shapes"
        );
        anyhow::ensure!(
            y0.iter().chain(&y1).all(|y| *y < K),
            "actions must be < {K}"
        );
        let lp = teacher.log_probs_host(&x)?;
        let delta: Vec<f64> = (0..n).map(|i| nu * (lp[i][y1[i]] - lp[i][y0[i]])).collect();
        let lref = -(K as f64).ln();
        let r_eval: Vec<Vec<f64>> = teacher
            .log_probs_host(&x_eval)?
            .into_iter()
            .map(|row| row.into_iter().map(|l| nu * (l - lref)).collect())
            .collect();
        let mut dm = vec![0f32; n * K];
        for i in 0..n {
            dm[i * K + y1[i]] += 1.0;
            dm[i * K + y0[i]] -= 1.0;
        }
        let dev = x.device().clone();
        Ok(Self {
            seed,
            n,
            x,
            x_eval,
            y0,
            y1,
            u,
            delta,
            r_eval,
            dmat: Tensor::from_vec(dm, (n, K), &dev)?,
        })
    }

    /// Labels under the link with shift s.
    pub fn labels(&self, s: f64, tau: f64) -> Vec<f64> {
        self.delta
            .iter()
            .zip(&self.u)
            .map(|(d, u)| (*u < shifted_logistic_mixture(*d, s, tau)) as u8 as f64)
            .collect()
    }

    /// A fresh learner with this seed's initialisation (same for every method).
    pub fn learner(&self) -> Result<Mlp> {
        let mut rng = ChaCha8Rng::seed_from_u64(stream_seed(self.seed, 3));
        Mlp::new(&dims(), &mut rng, &Device::Cpu)
    }
}

fn dims() -> Vec<usize> {
    let mut d = vec![D];
    d.extend(HIDDEN);
    d.push(K);
    d
}

/// (KL(π_β‖π_ref), average true reward) for each β, from the learner's log-probs on the
/// evaluation contexts; `zeta` flips the index orientation (OSPO's sign alignment).
pub fn evaluate(lp: &[Vec<f64>], r: &[Vec<f64>], zeta: f64, betas: &[f64]) -> Vec<(f64, f64)> {
    let lref = -(K as f64).ln();
    let m = lp.len().max(1) as f64;
    betas
        .iter()
        .map(|beta| {
            let (mut rw, mut kl) = (0.0, 0.0);
            for (row, rr) in lp.iter().zip(r) {
                let a: Vec<f64> = row.iter().map(|l| zeta * (l - lref) / beta).collect();
                let mx = a.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = mx + a.iter().map(|v| (v - mx).exp()).sum::<f64>().ln();
                for y in 0..row.len() {
                    let lpb = a[y] - lse;
                    let p = lpb.exp();
                    rw += p * rr[y];
                    kl += p * (lpb - lref);
                }
            }
            (kl / m, rw / m)
        })
        .collect()
}

/// Reward at KL budget κ along a β scan of (avg_kl, avg_reward): linear interpolation between
/// the neighbours in KL, clamped to the end values (as the paper's analysis).
pub fn reward_at_kl(points: &[(f64, f64)], kappa: f64) -> f64 {
    let mut p = points.to_vec();
    p.sort_by(|a, b| a.0.total_cmp(&b.0));
    if p.is_empty() {
        return f64::NAN;
    }
    if kappa <= p[0].0 {
        return p[0].1;
    }
    if kappa >= p[p.len() - 1].0 {
        return p[p.len() - 1].1;
    }
    let hi = p.iter().position(|x| x.0 >= kappa).unwrap_or(p.len() - 1);
    let lo = hi.saturating_sub(1);
    if p[hi].0 == p[lo].0 {
        return p[hi].1;
    }
    let w = (kappa - p[lo].0) / (p[hi].0 - p[lo].0);
    p[lo].1 + w * (p[hi].1 - p[lo].1)
}

/// What a training epoch optimises.
enum Phase<'a> {
    Dpo,
    Rspo,
    Ospo { t_mem: &'a [f64], h: f64 },
    Pspo { iso: &'a PiecewiseLinear },
}

struct Trainer<'a> {
    data: &'a SeedData,
    z: Vec<f64>,
    zt: Tensor,
    model: Mlp,
    opt: AdamW,
    batch: usize,
    shuffle: ChaCha8Rng,
    /// Epoch orders to use instead of the seeded shuffle (replaying another run).
    orders: std::collections::VecDeque<Vec<usize>>,
}

fn adam(lr: f64) -> OptimConfig {
    OptimConfig {
        lr,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        max_grad_norm: 0.0,
    }
}

impl<'a> Trainer<'a> {
    fn new(data: &'a SeedData, z: Vec<f64>, args: &SyntheticBenchArgs) -> Result<Self> {
        let model = data.learner()?;
        let opt = AdamW::new(model.vars(), adam(args.lr))?;
        let zt = Tensor::from_vec(
            z.iter().map(|v| *v as f32).collect::<Vec<_>>(),
            z.len(),
            &Device::Cpu,
        )?;
        Ok(Self {
            data,
            z,
            zt,
            model,
            opt,
            batch: (args.batch_size as usize).max(1),
            shuffle: ChaCha8Rng::seed_from_u64(stream_seed(data.seed, 4)),
            orders: Default::default(),
        })
    }

    /// Index t of the pairs `idx` (differentiable).
    fn index_of(&self, idx: &Tensor) -> Result<Tensor> {
        let xb = self.data.x.index_select(idx, 0)?;
        let db = self.data.dmat.index_select(idx, 0)?;
        let lp = self.model.log_probs(&xb)?;
        Ok((lp * db)?.sum(1)?)
    }

    /// Detached index of all n training pairs.
    fn index_all(&self) -> Result<Vec<f64>> {
        let lp = self.model.log_probs(&self.data.x)?.detach();
        let t = (lp * &self.data.dmat)?.sum(1)?;
        Ok(t.to_dtype(DType::F64)?.to_vec1::<f64>()?)
    }

    fn epoch(&mut self, phase: &Phase) -> Result<()> {
        let n = self.data.n;
        let perm = match self.orders.pop_front() {
            Some(p) => p,
            None => {
                let mut p: Vec<usize> = (0..n).collect();
                p.shuffle(&mut self.shuffle);
                p
            }
        };
        for chunk in perm.chunks(self.batch) {
            let idx = Tensor::from_vec(
                chunk.iter().map(|i| *i as u32).collect::<Vec<_>>(),
                chunk.len(),
                &Device::Cpu,
            )?;
            let t = self.index_of(&idx)?;
            let zb = self.zt.index_select(&idx, 0)?;
            let w = Tensor::ones(chunk.len(), DType::F32, &Device::Cpu)?;
            let loss = match phase {
                Phase::Dpo => dpo_loss(&t, &zb, &w, 1.0)?,
                Phase::Rspo => rspo_loss(&t, &zb, &w, 1.0)?,
                Phase::Ospo { t_mem, h } => {
                    let p = kernel_link(&t, t_mem, &self.z, *h, Some(chunk))?;
                    bernoulli_nll(&p, &zb, &w)?
                }
                Phase::Pspo { iso } => {
                    let p = iso.apply_tensor(&t)?;
                    bernoulli_nll(&p, &zb, &w)?
                }
            };
            let grads = loss.backward()?;
            self.opt.step(&grads)?;
        }
        Ok(())
    }
}

/// One β scan: (avg_kl, avg_reward) per β of [`BETA_GRID`].
pub type Curve = Vec<(f64, f64)>;

/// Epochs of a method's paper schedule.
pub fn main_epochs(method: ObjectiveKind, a: &SyntheticBenchArgs) -> usize {
    match method {
        ObjectiveKind::Dpo | ObjectiveKind::Rspo => a.epochs as usize,
        ObjectiveKind::Ospo => (a.ospo_warm + a.epochs) as usize,
        ObjectiveKind::Pspo => (a.pspo_warm + a.pspo_outer * a.pspo_inner) as usize,
    }
}

/// Trains one method on one seed's data with labels z and evaluates after each epoch count in
/// `checkpoints` (sorted). Returns (epochs, curve) per checkpoint.
fn train_offline(
    data: &SeedData,
    z: Vec<f64>,
    method: ObjectiveKind,
    knots: Knots,
    checkpoints: &BTreeSet<usize>,
    a: &SyntheticBenchArgs,
) -> Result<Vec<(usize, Curve)>> {
    run_schedule(Trainer::new(data, z, a)?, method, knots, checkpoints, a)
}

/// Replays one run of another implementation: `method` trained on `data` with labels `z`
/// from the initial weights `init`, each epoch visiting the pairs in the order `orders` gives
/// (one permutation of 0..n per epoch, warm-up epochs included), on the paper schedule.
/// Returns the β scan after the last epoch.
pub fn replay_run(
    data: &SeedData,
    z: Vec<f64>,
    method: ObjectiveKind,
    init: Mlp,
    orders: Vec<Vec<usize>>,
    a: &SyntheticBenchArgs,
) -> Result<Curve> {
    let epochs = main_epochs(method, a);
    anyhow::ensure!(
        orders.len() == epochs,
        "{} epoch orders given for {epochs} epochs",
        orders.len()
    );
    for o in &orders {
        let mut seen = vec![false; data.n];
        for &i in o {
            anyhow::ensure!(
                i < data.n && !seen[i],
                "an epoch order is not a permutation"
            );
            seen[i] = true;
        }
        anyhow::ensure!(o.len() == data.n, "an epoch order is not a permutation");
    }
    let mut tr = Trainer::new(data, z, a)?;
    tr.opt = AdamW::new(init.vars(), adam(a.lr))?;
    tr.model = init;
    tr.orders = orders.into();
    let cps = BTreeSet::from([epochs]);
    let mut out = run_schedule(tr, method, a.pspo_knots, &cps, a)?;
    Ok(out.pop().map(|(_, c)| c).unwrap_or_default())
}

fn run_schedule(
    mut tr: Trainer,
    method: ObjectiveKind,
    knots: Knots,
    checkpoints: &BTreeSet<usize>,
    a: &SyntheticBenchArgs,
) -> Result<Vec<(usize, Curve)>> {
    let data = tr.data;
    let last = checkpoints.iter().next_back().copied().unwrap_or(0);
    let mut out = Vec::new();
    let mut iso = PiecewiseLinear::default();
    let n = data.n as f64;
    let eval = |tr: &Trainer| -> Result<Curve> {
        let zeta = if method == ObjectiveKind::Ospo {
            cov_sign(&tr.index_all()?, &tr.z)
        } else {
            1.0
        };
        let lp = tr.model.log_probs_host(&data.x_eval)?;
        Ok(evaluate(&lp, &data.r_eval, zeta, &BETA_GRID))
    };
    if checkpoints.contains(&0) {
        out.push((0, eval(&tr)?));
    }
    for e in 0..last {
        match method {
            ObjectiveKind::Dpo => tr.epoch(&Phase::Dpo)?,
            ObjectiveKind::Rspo => tr.epoch(&Phase::Rspo)?,
            ObjectiveKind::Ospo => {
                if e < a.ospo_warm as usize {
                    tr.epoch(&Phase::Dpo)?
                } else {
                    let t_mem = tr.index_all()?;
                    let h = a.ospo_bandwidth * n.powf(-0.2) * std_floor(&t_mem) + 1e-6;
                    tr.epoch(&Phase::Ospo { t_mem: &t_mem, h })?
                }
            }
            ObjectiveKind::Pspo => {
                if e < a.pspo_warm as usize {
                    tr.epoch(&Phase::Dpo)?
                } else {
                    if (e - a.pspo_warm as usize) % (a.pspo_inner as usize).max(1) == 0 {
                        iso = isotonic_fit(&tr.index_all()?, &tr.z, 1e-4, knots);
                    }
                    tr.epoch(&Phase::Pspo { iso: &iso })?
                }
            }
        }
        if checkpoints.contains(&(e + 1)) {
            out.push((e + 1, eval(&tr)?));
        }
    }
    Ok(out)
}

/// Streaming: every event once, in order, through the pipeline's learner core.
fn train_streaming(
    data: &SeedData,
    z: &[f64],
    method: ObjectiveKind,
    replay_ratio: f64,
    a: &SyntheticBenchArgs,
) -> Result<(Curve, f64)> {
    let dev = Device::Cpu;
    let model = data.learner()?;
    let mut opt = AdamW::new(model.vars(), adam(a.lr))?;
    let bs = (a.stream_batch as usize).max(1);
    let steps = data.n.div_ceil(bs) as u64;
    let mut obj = Objective::new(ObjectiveConfig {
        kind: method,
        beta: 1.0,
        divergence: Divergence::Kl,
        warmup_steps: (steps / 5).max(1),
        ..Default::default()
    });
    let mut link = RecursiveLink::new(LinkConfig::default());
    // The pipeline's replay buffer, holding pair indices instead of Arrow rows.
    let mut replay = ReplayBuffer::new(
        ReplayConfig {
            capacity: a.stream_replay_capacity as usize,
            ratio: replay_ratio,
        },
        stream_seed(data.seed, 5),
    );
    let lref = -(K as f64).ln() as f32;
    let mut step = 0u64;
    for start in (0..data.n).step_by(bs) {
        let end = (start + bs).min(data.n);
        let mut rows: Vec<usize> = (start..end).collect();
        rows.extend(replay.draw(end - start));
        let b = rows.len();
        let idx = Tensor::from_vec(rows.iter().map(|i| *i as u32).collect::<Vec<_>>(), b, &dev)?;
        let lp = model.log_probs(&data.x.index_select(&idx, 0)?)?;
        let oh = |ys: &[usize]| -> Result<Tensor> {
            let mut v = vec![0f32; b * K];
            for (k, i) in rows.iter().enumerate() {
                v[k * K + ys[*i]] = 1.0;
            }
            Ok(Tensor::from_vec(v, (b, K), &dev)?)
        };
        let lp1 = (&lp * oh(&data.y1)?)?.sum(1)?;
        let lp0 = (&lp * oh(&data.y0)?)?.sum(1)?;
        let rf = Tensor::full(lref, b, &dev)?;
        let t = index(Divergence::Kl, &lp1, &rf, &lp0, &rf)?;
        let zb: Vec<f32> = rows.iter().map(|i| z[*i] as f32).collect();
        let core = update_on_index(&mut obj, &mut link, &mut opt, &t, &zb, &vec![1.0; b], step)?;
        if core.applied {
            step += 1;
            replay.extend(start..end);
        }
    }
    let zeta = obj.index_sign();
    let lp = model.log_probs_host(&data.x_eval)?;
    Ok((
        evaluate(&lp, &data.r_eval, zeta, &BETA_GRID),
        link.drift().sup,
    ))
}

#[derive(Clone, Copy)]
struct Job {
    seed_ix: usize,
    s: f64,
    method: ObjectiveKind,
    /// Streaming with this replay ratio (None: offline).
    streaming: Option<f64>,
    /// PSPO's isotonic knots for this job (the variant study differs from `--pspo-knots`).
    knots: Knots,
}

impl Job {
    fn cost(&self, a: &SyntheticBenchArgs, last: usize) -> f64 {
        if let Some(r) = self.streaming {
            return 1.0 + r;
        }
        let e = last.max(main_epochs(self.method, a)) as f64;
        match self.method {
            ObjectiveKind::Ospo => 4.0 * e,
            ObjectiveKind::Rspo => 1.5 * e,
            _ => e,
        }
    }
}

enum JobOut {
    Offline {
        seed: u64,
        s: f64,
        method: ObjectiveKind,
        knots: Knots,
        curves: Vec<(usize, Curve)>,
    },
    Stream {
        seed: u64,
        s: f64,
        method: ObjectiveKind,
        replay: f64,
        curve: Curve,
        drift_sup: f64,
    },
}

/// One row of the output CSVs.
#[derive(Debug, Clone)]
pub struct Row {
    pub seed: u64,
    pub s: f64,
    pub method: ObjectiveKind,
    pub curve: Curve,
}

/// Everything the benchmark measured.
pub struct Outcome {
    pub results: Vec<Row>,
    pub budget: Vec<(usize, Row)>,
    /// spoke's PSPO (block knots) at the paper schedule and at each budget: (epochs, row).
    pub variants: Vec<(usize, Row)>,
    /// (replay ratio, row, link drift sup at the end).
    pub streaming: Vec<(f64, Row, f64)>,
    pub seconds: f64,
}

/// Keep the many short-lived ~0.5 MB kernel buffers (OSPO: batch × n) on the heap instead of
/// mmap/munmap per allocation: glibc's default dynamic threshold made the benchmark spend more
/// time in page faults than in arithmetic (measured: sys 2.5 s → 0 per OSPO job, wall ÷3).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc allocator parameters; called before worker threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
}

pub fn run(args: SyntheticBenchArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    tune_allocator();
    // Parallelism is across jobs: candle's own per-op thread pool (spin barriers) would only
    // oversubscribe the cores. The user's explicit setting wins.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let seeds = parse_seeds(&args.seeds)?;
    let s_grid: Vec<f64> = parse_list("--s", &args.s)?;
    let methods: Vec<ObjectiveKind> = parse_list("--methods", &args.methods)?;
    let budgets: Vec<usize> = parse_list("--epochs-budget", &args.epochs_budget)?;
    let replay_ratios: Vec<f64> = parse_list("--stream-replay", &args.stream_replay)?;
    if replay_ratios.iter().any(|r| !(*r >= 0.0 && *r <= 64.0)) {
        bail!("--stream-replay: ratios must be in [0, 64], got {replay_ratios:?}");
    }
    if seeds.is_empty() || s_grid.is_empty() || methods.is_empty() {
        bail!("--seeds, --s and --methods must each name at least one value");
    }
    if args.n < 2 || args.eval_contexts == 0 {
        bail!("--n must be >= 2 and --eval-contexts >= 1");
    }
    if args.tau.is_nan() || args.tau <= 0.0 {
        bail!("--tau must be > 0, got {}", args.tau);
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating output directory {}", args.out.display()))?;
    let threads = if args.threads == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        args.threads as usize
    };

    let data: Vec<SeedData> = seeds
        .iter()
        .map(|s| SeedData::generate(*s, args.n as usize, args.eval_contexts as usize, args.nu))
        .collect::<Result<_>>()?;
    let last_budget = budgets.iter().copied().max().unwrap_or(0);
    let mut jobs = Vec::new();
    for seed_ix in 0..data.len() {
        for &s in &s_grid {
            for &method in &methods {
                let job = Job {
                    seed_ix,
                    s,
                    method,
                    streaming: None,
                    knots: args.pspo_knots,
                };
                jobs.push(job);
                if !args.no_streaming {
                    for &r in &replay_ratios {
                        jobs.push(Job {
                            streaming: Some(r),
                            ..job
                        });
                    }
                }
                if method == ObjectiveKind::Pspo
                    && !args.no_variants
                    && args.pspo_knots != Knots::Blocks
                {
                    jobs.push(Job {
                        knots: Knots::Blocks,
                        ..job
                    });
                }
            }
        }
    }
    jobs.sort_by(|a, b| {
        b.cost(&args, last_budget)
            .total_cmp(&a.cost(&args, last_budget))
    });

    let pb = if args.no_progress {
        indicatif::ProgressBar::hidden()
    } else {
        let pb = indicatif::ProgressBar::new(jobs.len() as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} jobs (eta {eta}) {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        pb
    };
    let next = AtomicUsize::new(0);
    let outs: Mutex<Vec<Result<JobOut>>> = Mutex::new(Vec::with_capacity(jobs.len()));
    std::thread::scope(|sc| {
        for _ in 0..threads.min(jobs.len()).max(1) {
            sc.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(job) = jobs.get(i) else { break };
                let r = run_job(job, &data, &args, &budgets);
                pb.inc(1);
                outs.lock().unwrap_or_else(|e| e.into_inner()).push(r);
            });
        }
    });
    pb.finish_and_clear();
    let mut oc = Outcome {
        results: vec![],
        budget: vec![],
        variants: vec![],
        streaming: vec![],
        seconds: 0.0,
    };
    for r in outs.into_inner().unwrap_or_else(|e| e.into_inner()) {
        match r? {
            JobOut::Offline {
                seed,
                s,
                method,
                knots,
                curves,
            } => {
                let main = main_epochs(method, &args);
                for (e, c) in curves {
                    let row = Row {
                        seed,
                        s,
                        method,
                        curve: c,
                    };
                    if knots != args.pspo_knots {
                        oc.variants.push((e, row));
                        continue;
                    }
                    if e == main {
                        oc.results.push(row.clone());
                    }
                    if budgets.contains(&e) {
                        oc.budget.push((e, row));
                    }
                }
            }
            JobOut::Stream {
                seed,
                s,
                method,
                replay,
                curve,
                drift_sup,
            } => oc.streaming.push((
                replay,
                Row {
                    seed,
                    s,
                    method,
                    curve,
                },
                drift_sup,
            )),
        }
    }
    let key = |r: &Row| (r.s.to_bits(), r.seed, r.method as u8);
    oc.results.sort_by_key(key);
    oc.budget.sort_by_key(|(e, r)| (*e, key(r)));
    oc.variants.sort_by_key(|(e, r)| (*e, key(r)));
    oc.streaming
        .sort_by(|x, y| x.0.total_cmp(&y.0).then(key(&x.1).cmp(&key(&y.1))));
    oc.seconds = started.elapsed().as_secs_f64();
    write_outputs(&args, &oc, threads)?;
    println!(
        "spoke bench synthetic: {} seeds × {} s × {} methods in {:.1} s on {threads} threads; \
         wrote {}",
        seeds.len(),
        s_grid.len(),
        methods.len(),
        oc.seconds,
        args.out.display()
    );
    print!(
        "{}",
        std::fs::read_to_string(args.out.join("summary.md")).unwrap_or_default()
    );
    Ok(())
}

fn run_job(
    job: &Job,
    data: &[SeedData],
    a: &SyntheticBenchArgs,
    budgets: &[usize],
) -> Result<JobOut> {
    let d = &data[job.seed_ix];
    let z = d.labels(job.s, a.tau);
    let what = format!(
        "seed {} s {} method {}{}",
        d.seed,
        job.s,
        job.method.as_str(),
        match job.streaming {
            Some(r) => format!(" (streaming, replay ratio {r})"),
            None => String::new(),
        }
    );
    if let Some(replay) = job.streaming {
        let (curve, drift_sup) = train_streaming(d, &z, job.method, replay, a).context(what)?;
        return Ok(JobOut::Stream {
            seed: d.seed,
            s: job.s,
            method: job.method,
            replay,
            curve,
            drift_sup,
        });
    }
    let mut cps: BTreeSet<usize> = budgets.iter().copied().collect();
    cps.insert(main_epochs(job.method, a));
    let curves = train_offline(d, z, job.method, job.knots, &cps, a).context(what)?;
    Ok(JobOut::Offline {
        seed: d.seed,
        s: job.s,
        method: job.method,
        knots: job.knots,
        curves,
    })
}

fn csv_rows(out: &mut String, r: &Row, n: u32, tau: f64, extra: Option<&str>) {
    for (b, (kl, rw)) in BETA_GRID.iter().zip(&r.curve) {
        let _ = write!(
            out,
            "{},{},{},{},{},{},{},{}",
            r.seed,
            n,
            r.s,
            tau,
            r.method.as_str(),
            b,
            rw,
            kl
        );
        if let Some(e) = extra {
            let _ = write!(out, ",{e}");
        }
        out.push('\n');
    }
}

const HEADER: &str = "seed,n,s,tau,method,beta,avg_reward,avg_kl";

/// Mean, standard deviation (ddof 0) and standard error (ddof 1) of a sample.
pub(crate) fn stats(v: &[f64]) -> (f64, f64, f64) {
    let n = v.len() as f64;
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let m = v.iter().sum::<f64>() / n;
    let ss = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>();
    let sd0 = (ss / n).sqrt();
    let se = if v.len() > 1 {
        (ss / (n - 1.0)).sqrt() / n.sqrt()
    } else {
        f64::NAN
    };
    (m, sd0, se)
}

/// Mean and standard error of `x[seed] − base[seed]` over the seeds both have.
pub(crate) fn paired_gain(x: &BTreeMap<u64, f64>, base: &BTreeMap<u64, f64>) -> (f64, f64) {
    let d: Vec<f64> = x
        .iter()
        .filter_map(|(seed, r)| base.get(seed).map(|b| r - b))
        .collect();
    let (g, _, se) = stats(&d);
    (g, se)
}

/// Per (s, method): seed → reward at κ.
type AtKappa = BTreeMap<(u64, u8), BTreeMap<u64, f64>>;

fn at_kappa<'r>(rows: impl Iterator<Item = &'r Row>, kappa: f64) -> AtKappa {
    let mut m: AtKappa = BTreeMap::new();
    for r in rows {
        m.entry((r.s.to_bits(), r.method as u8))
            .or_default()
            .insert(r.seed, reward_at_kl(&r.curve, kappa));
    }
    m
}

fn kind_of(u: u8) -> ObjectiveKind {
    ObjectiveKind::ALL[u as usize]
}

/// Level and paired gain over DPO for every (s, method) of `ak`.
struct Cell {
    mean: f64,
    lo: f64,
    hi: f64,
    gain: f64,
    gain_se: f64,
}

fn cells(ak: &AtKappa) -> BTreeMap<(u64, u8), Cell> {
    let mut out = BTreeMap::new();
    for ((s, mth), seeds) in ak {
        let v: Vec<f64> = seeds.values().copied().collect();
        let (m, sd0, _) = stats(&v);
        let half = 1.645 * sd0 / (v.len() as f64).sqrt();
        let (gain, gain_se) = match ak.get(&(*s, ObjectiveKind::Dpo as u8)) {
            Some(dpo) => paired_gain(seeds, dpo),
            None => (f64::NAN, f64::NAN),
        };
        out.insert(
            (*s, *mth),
            Cell {
                mean: m,
                lo: m - half,
                hi: m + half,
                gain,
                gain_se,
            },
        );
    }
    out
}

fn fmt_gain(c: &Cell) -> String {
    if c.gain_se.is_nan() {
        format!("{:+.3}", c.gain)
    } else {
        format!("{:+.3} ± {:.3}", c.gain, c.gain_se)
    }
}

fn methods_in(ak: &AtKappa) -> Vec<u8> {
    let set: BTreeSet<u8> = ak.keys().map(|k| k.1).collect();
    set.into_iter().collect()
}

fn s_in(ak: &AtKappa) -> Vec<f64> {
    let mut v: Vec<f64> = ak.keys().map(|k| f64::from_bits(k.0)).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v.dedup();
    v
}

fn gain_table(md: &mut String, ak: &AtKappa, kappa: f64, extra: Option<&BTreeMap<(u64, u8), f64>>) {
    let c = cells(ak);
    let ms = methods_in(ak);
    let _ = writeln!(
        md,
        "| s | method | reward at κ={kappa} (mean) | 90% interval | paired gain over DPO ± s.e. |{}",
        if extra.is_some() { " link drift sup |" } else { "" }
    );
    let _ = writeln!(
        md,
        "|---|---|---|---|---|{}",
        if extra.is_some() { "---|" } else { "" }
    );
    for s in s_in(ak) {
        for m in &ms {
            if let Some(x) = c.get(&(s.to_bits(), *m)) {
                let g = if *m == ObjectiveKind::Dpo as u8 {
                    "—".to_string()
                } else {
                    fmt_gain(x)
                };
                let _ = write!(
                    md,
                    "| {s} | {} | {:.3} | [{:.3}, {:.3}] | {g} |",
                    kind_of(*m).as_str(),
                    x.mean,
                    x.lo,
                    x.hi
                );
                if let Some(e) = extra {
                    let _ = write!(
                        md,
                        " {:.3} |",
                        e.get(&(s.to_bits(), *m)).copied().unwrap_or(f64::NAN)
                    );
                }
                md.push('\n');
            }
        }
    }
}

/// The acceptance view: one line per s with DPO's reward at κ and each SPO method's paired gain
/// over it (same seed, same data), spoke's PSPO (block knots) in the last column when it ran.
fn glance_table(md: &mut String, main: &AtKappa, variant: Option<&AtKappa>, kappa: f64) {
    let c = cells(main);
    let vc = variant.map(cells);
    let dpo = ObjectiveKind::Dpo as u8;
    let pspo = ObjectiveKind::Pspo as u8;
    let ms: Vec<u8> = methods_in(main).into_iter().filter(|m| *m != dpo).collect();
    let has_variant = vc.as_ref().is_some_and(|v| v.keys().any(|k| k.1 == pspo));
    let _ = write!(md, "| s | DPO reward at κ={kappa} |");
    for m in &ms {
        let _ = write!(md, " {} gain |", kind_of(*m).as_str());
    }
    if has_variant {
        let _ = write!(md, " {VARIANT_NAME} gain |");
    }
    md.push('\n');
    let cols = ms.len() + 2 + usize::from(has_variant);
    let _ = writeln!(md, "|{}", "---|".repeat(cols));
    let gain = |x: Option<&Cell>| x.map(fmt_gain).unwrap_or_else(|| "—".to_string());
    for s in s_in(main) {
        let level = c
            .get(&(s.to_bits(), dpo))
            .map(|x| format!("{:.3}", x.mean))
            .unwrap_or_else(|| "—".to_string());
        let _ = write!(md, "| {s} | {level} |");
        for m in &ms {
            let _ = write!(md, " {} |", gain(c.get(&(s.to_bits(), *m))));
        }
        if has_variant {
            let v = vc.as_ref().and_then(|v| v.get(&(s.to_bits(), pspo)));
            let _ = write!(md, " {} |", gain(v));
        }
        md.push('\n');
    }
}

fn write_outputs(a: &SyntheticBenchArgs, oc: &Outcome, threads: usize) -> Result<()> {
    let out = &a.out;
    let write = |name: &str, body: &str| -> Result<()> {
        let p = out.join(name);
        std::fs::write(&p, body).with_context(|| format!("writing {}", p.display()))
    };
    let mut csv = format!("{HEADER}\n");
    for r in &oc.results {
        csv_rows(&mut csv, r, a.n, a.tau, None);
    }
    write("results.csv", &csv)?;
    let mut csv = format!("{HEADER},epochs\n");
    for (e, r) in &oc.budget {
        csv_rows(&mut csv, r, a.n, a.tau, Some(&e.to_string()));
    }
    write("budget.csv", &csv)?;
    let mut csv = format!("{HEADER},mode\n");
    for (ratio, r, _) in &oc.streaming {
        csv_rows(
            &mut csv,
            r,
            a.n,
            a.tau,
            Some(&format!("stream_replay{ratio}")),
        );
    }
    write("streaming.csv", &csv)?;
    if !oc.variants.is_empty() {
        let mut csv = format!("{HEADER},epochs,knots\n");
        for (e, r) in &oc.variants {
            csv_rows(&mut csv, r, a.n, a.tau, Some(&format!("{e},blocks")));
        }
        write("variants.csv", &csv)?;
    }

    let kappa = a.kappa;
    let mut md = String::new();
    let nseeds = oc
        .results
        .iter()
        .map(|r| r.seed)
        .collect::<BTreeSet<_>>()
        .len();
    let _ = writeln!(md, "# spoke bench synthetic\n");
    let _ = writeln!(
        md,
        "{nseeds} seeds, n = {}, τ = {}, ν = {}, {} evaluation contexts, κ = {kappa}; \
         {:.1} s on {threads} threads.\n",
        a.n, a.tau, a.nu, a.eval_contexts, oc.seconds
    );
    let _ = writeln!(
        md,
        "Reward at KL budget κ (interpolated along the β scan). 90% interval: mean ± 1.645·sd/√seeds. \
         Paired gain: per-seed difference from DPO on the same data, mean ± standard error.\n"
    );
    let ak = at_kappa(oc.results.iter(), kappa);
    let main_pspo = main_epochs(ObjectiveKind::Pspo, a);
    // spoke's PSPO at the paper schedule, beside the DPO of the paper protocol.
    let ak_variant = (!oc.variants.is_empty()).then(|| {
        at_kappa(
            oc.results
                .iter()
                .filter(|r| r.method == ObjectiveKind::Dpo)
                .chain(
                    oc.variants
                        .iter()
                        .filter(|(e, _)| *e == main_pspo)
                        .map(|(_, r)| r),
                ),
            kappa,
        )
    });
    let _ = writeln!(
        md,
        "## At a glance: DPO's reward at κ = {kappa} and each SPO method's paired gain over it \
         (mean ± s.e. over seeds)\n"
    );
    glance_table(&mut md, &ak, ak_variant.as_ref(), kappa);
    let _ = writeln!(
        md,
        "\nThe first columns are the paper protocol (`results.csv`, as the paper's code runs it)."
    );
    if ak_variant.is_some() {
        let _ = writeln!(
            md,
            "The last column is spoke's PSPO on the same schedule: one isotonic knot per PAVA block \
             instead of one per pair (`variants.csv`, and below)."
        );
    }
    md.push('\n');
    let _ = writeln!(
        md,
        "## Paper protocol (DPO, RSPO {e} epochs; OSPO {ow}+{e}; PSPO {pw}+{po}×{pi})\n",
        e = a.epochs,
        ow = a.ospo_warm,
        pw = a.pspo_warm,
        po = a.pspo_outer,
        pi = a.pspo_inner
    );
    gain_table(&mut md, &ak, kappa, None);
    // Which SPO method gains most at the largest s.
    let c = cells(&ak);
    if let Some(smax) = s_in(&ak).last() {
        let best = methods_in(&ak)
            .into_iter()
            .filter(|m| *m != ObjectiveKind::Dpo as u8)
            .filter_map(|m| c.get(&(smax.to_bits(), m)).map(|x| (m, x.gain)))
            .filter(|(_, g)| g.is_finite())
            .max_by(|x, y| x.1.total_cmp(&y.1));
        if let Some((m, g)) = best {
            let _ = writeln!(
                md,
                "\nLargest paired gain over DPO at s = {smax}: **{}** ({g:+.3}).",
                kind_of(m).as_str()
            );
        }
    }
    if !oc.budget.is_empty() {
        let _ = writeln!(
            md,
            "\n## Matched budgets (every method trained for E epochs on the same data)\n"
        );
        let es: BTreeSet<usize> = oc.budget.iter().map(|(e, _)| *e).collect();
        for e in es {
            let _ = writeln!(md, "\n### E = {e} epochs\n");
            let ak = at_kappa(
                oc.budget.iter().filter(|(x, _)| *x == e).map(|(_, r)| r),
                kappa,
            );
            gain_table(&mut md, &ak, kappa, None);
        }
    }
    if !oc.variants.is_empty() {
        let main = main_pspo;
        let _ = writeln!(
            md,
            "\n## spoke's PSPO: isotonic link with one knot per PAVA block (`variants.csv`)\n\n\
             The paper's PSPO interpolates the isotonic fit through a knot at every pair's index: \
             the curve is flat across each PAVA block and jumps between blocks, so most pairs get \
             no gradient and a few get a very large one. spoke's PSPO (the pipeline's, and \
             `--pspo-knots blocks` here) puts one knot at each block's centre, so the curve rises \
             between blocks and every pair inside the range gets a gradient. Same data, schedule \
             and seeds as above; the paired gain is over the DPO of the table it sits beside.\n"
        );
        let _ = writeln!(
            md,
            "### Paper schedule (PSPO {main} epochs; DPO {} epochs as above)\n",
            a.epochs
        );
        if let Some(ak) = &ak_variant {
            gain_table(&mut md, ak, kappa, None);
        }
        let es: BTreeSet<usize> = oc.budget.iter().map(|(e, _)| *e).collect();
        for e in es {
            let _ = writeln!(md, "\n### E = {e} epochs (DPO also {e} epochs)\n");
            let ak = at_kappa(
                oc.budget
                    .iter()
                    .filter(|(x, r)| *x == e && r.method == ObjectiveKind::Dpo)
                    .chain(oc.variants.iter().filter(|(x, _)| *x == e))
                    .map(|(_, r)| r),
                kappa,
            );
            gain_table(&mut md, &ak, kappa, None);
        }
    }
    if !oc.streaming.is_empty() {
        let _ = writeln!(
            md,
            "\n## Streaming (each event arrives once, in order, in minibatches of {}, through \
             learner::update_on_index with the RecursiveLink and the pipeline's replay buffer of \
             the {} most recent pairs)\n\n\
             Replay ratio r: each step also trains on r × {} pairs drawn from the replay buffer; \
             r = 0 trains on every event exactly once.",
            a.stream_batch, a.stream_replay_capacity, a.stream_batch
        );
        let ratios: Vec<f64> = {
            let mut v: Vec<f64> = oc.streaming.iter().map(|x| x.0).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            v.dedup();
            v
        };
        for r in ratios {
            let _ = writeln!(md, "\n### Replay ratio {r}\n");
            let rows = || oc.streaming.iter().filter(move |x| x.0 == r);
            let ak = at_kappa(rows().map(|x| &x.1), kappa);
            let mut drift: BTreeMap<(u64, u8), Vec<f64>> = BTreeMap::new();
            for (_, row, d) in rows() {
                drift
                    .entry((row.s.to_bits(), row.method as u8))
                    .or_default()
                    .push(*d);
            }
            let drift: BTreeMap<(u64, u8), f64> =
                drift.into_iter().map(|(k, v)| (k, stats(&v).0)).collect();
            gain_table(&mut md, &ak, kappa, Some(&drift));
        }
    }
    let plots = plots(a, oc);
    let _ = writeln!(md, "\n## Plots\n");
    match plots {
        Ok(files) => {
            for f in files {
                let _ = writeln!(md, "- `{f}`");
            }
        }
        Err(e) => {
            let _ = writeln!(md, "(plots failed: {e:#})");
        }
    }
    write("summary.md", &md)?;
    Ok(())
}

const COLORS: [plotters::style::RGBColor; 4] = [
    plotters::style::RGBColor(31, 119, 180),
    plotters::style::RGBColor(255, 127, 14),
    plotters::style::RGBColor(44, 160, 44),
    plotters::style::RGBColor(214, 39, 40),
];
/// Colour of spoke's PSPO (block knots) beside the paper protocol's four methods.
const VARIANT_COLOR: plotters::style::RGBColor = plotters::style::RGBColor(148, 103, 189);
const VARIANT_NAME: &str = "pspo (block knots)";

/// Registers DejaVu Sans for plot text; false if no font is found.
fn register_font() -> bool {
    static FONT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FONT.get_or_init(|| {
        let candidates = [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
        ];
        for c in candidates {
            if let Ok(bytes) = std::fs::read(c) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font(
                    "sans-serif",
                    plotters::style::FontStyle::Normal,
                    bytes,
                )
                .is_ok()
                {
                    return true;
                }
            }
        }
        false
    })
}

struct Series {
    name: String,
    color: plotters::style::RGBColor,
    pts: Vec<(f64, f64)>,
    band: Option<Vec<(f64, f64, f64)>>,
}

fn line_plot(
    path: &Path,
    title: &str,
    xdesc: &str,
    ydesc: &str,
    series: &[Series],
    text: bool,
) -> Result<()> {
    use plotters::prelude::*;
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| {
            s.pts.iter().copied().chain(
                s.band
                    .iter()
                    .flatten()
                    .flat_map(|(x, lo, hi)| [(*x, *lo), (*x, *hi)]),
            )
        })
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    if all.is_empty() {
        bail!("nothing to plot in {}", path.display());
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in &all {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y0 = y0.min(*y);
        y1 = y1.max(*y);
    }
    let px = ((x1 - x0) * 0.05).max(1e-6);
    let py = ((y1 - y0) * 0.05).max(1e-6);
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    let e = |e: &dyn std::fmt::Display| anyhow::anyhow!("plotting {}: {e}", path.display());
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut b = ChartBuilder::on(&root);
    b.margin(20)
        .x_label_area_size(if text { 45 } else { 5 })
        .y_label_area_size(if text { 60 } else { 5 });
    if text {
        b.caption(title, ("sans-serif", 22));
    }
    let mut chart = b
        .build_cartesian_2d((x0 - px)..(x1 + px), (y0 - py)..(y1 + py))
        .map_err(|x| e(&x))?;
    {
        let mut mesh = chart.configure_mesh();
        if text {
            mesh.x_desc(xdesc).y_desc(ydesc);
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw().map_err(|x| e(&x))?;
    }
    for s in series {
        let color = s.color;
        if let Some(band) = &s.band {
            let mut poly: Vec<(f64, f64)> = band.iter().map(|(x, lo, _)| (*x, *lo)).collect();
            poly.extend(band.iter().rev().map(|(x, _, hi)| (*x, *hi)));
            chart
                .draw_series(std::iter::once(Polygon::new(
                    poly,
                    color.mix(0.15).filled(),
                )))
                .map_err(|x| e(&x))?;
        }
        let ann = chart
            .draw_series(LineSeries::new(s.pts.clone(), color.stroke_width(2)))
            .map_err(|x| e(&x))?;
        if text {
            ann.label(s.name.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        }
        chart
            .draw_series(s.pts.iter().map(|p| Circle::new(*p, 3, color.filled())))
            .map_err(|x| e(&x))?;
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

fn plot(path: &Path, title: &str, xd: &str, yd: &str, series: &[Series]) -> Result<()> {
    let text = register_font();
    match line_plot(path, title, xd, yd, series, text) {
        Ok(()) => Ok(()),
        Err(_) if text => line_plot(path, title, xd, yd, series, false),
        Err(e) => Err(e),
    }
}

/// Mean reward–KL curve per method (averaged over seeds at each β).
fn mean_curves(rows: &[&Row]) -> BTreeMap<u8, Vec<(f64, f64)>> {
    let mut acc: BTreeMap<u8, (Vec<(f64, f64)>, usize)> = BTreeMap::new();
    for r in rows {
        let e = acc
            .entry(r.method as u8)
            .or_insert_with(|| (vec![(0.0, 0.0); r.curve.len()], 0));
        for (i, (kl, rw)) in r.curve.iter().enumerate() {
            e.0[i].0 += kl;
            e.0[i].1 += rw;
        }
        e.1 += 1;
    }
    acc.into_iter()
        .map(|(m, (v, c))| {
            let mut pts: Vec<(f64, f64)> = v
                .into_iter()
                .map(|(k, r)| (k / c as f64, r / c as f64))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            (m, pts)
        })
        .collect()
}

fn plots(a: &SyntheticBenchArgs, oc: &Outcome) -> Result<Vec<String>> {
    let mut files = Vec::new();
    let s_vals: Vec<f64> = {
        let mut v: Vec<f64> = oc.results.iter().map(|r| r.s).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v.dedup();
        v
    };
    for s in &s_vals {
        let rows: Vec<&Row> = oc.results.iter().filter(|r| r.s == *s).collect();
        let series: Vec<Series> = mean_curves(&rows)
            .into_iter()
            .map(|(m, pts)| Series {
                name: kind_of(m).as_str().to_string(),
                color: COLORS[m as usize % 4],
                pts,
                band: None,
            })
            .collect();
        let name = format!("reward_kl_s{s}.png");
        plot(
            &a.out.join(&name),
            &format!("Reward vs KL (s = {s}, τ = {}, n = {})", a.tau, a.n),
            "average KL(π_β ‖ π_ref)",
            "average true reward",
            &series,
        )?;
        files.push(name);
    }
    let level_series = |rows: Vec<&Row>, variant: bool| -> Vec<Series> {
        let ak = at_kappa(rows.into_iter(), a.kappa);
        let c = cells(&ak);
        methods_in(&ak)
            .into_iter()
            .map(|m| {
                let pts: Vec<(f64, f64, f64, f64)> = s_in(&ak)
                    .into_iter()
                    .filter_map(|s| c.get(&(s.to_bits(), m)).map(|x| (s, x.mean, x.lo, x.hi)))
                    .collect();
                Series {
                    name: if variant {
                        VARIANT_NAME.to_string()
                    } else {
                        kind_of(m).as_str().to_string()
                    },
                    color: if variant {
                        VARIANT_COLOR
                    } else {
                        COLORS[m as usize % 4]
                    },
                    pts: pts.iter().map(|p| (p.0, p.1)).collect(),
                    band: Some(pts.iter().map(|p| (p.0, p.2, p.3)).collect()),
                }
            })
            .collect()
    };
    let pspo_main = main_epochs(ObjectiveKind::Pspo, a);
    let mut series = level_series(oc.results.iter().collect(), false);
    series.extend(level_series(
        oc.variants
            .iter()
            .filter(|(e, _)| *e == pspo_main)
            .map(|(_, r)| r)
            .collect(),
        true,
    ));
    let name = "reward_vs_s.png".to_string();
    plot(
        &a.out.join(&name),
        &format!("Reward at KL = {} vs link shift s (90% interval)", a.kappa),
        "link shift s",
        &format!("reward at KL = {}", a.kappa),
        &series,
    )?;
    files.push(name);
    if !oc.budget.is_empty() {
        if let Some(smax) = s_vals.last() {
            let budgets: BTreeSet<usize> = oc.budget.iter().map(|(e, _)| *e).collect();
            // Key: method, or 255 for spoke's PSPO variant.
            let rows = oc
                .budget
                .iter()
                .map(|(e, r)| (*e, r, r.method as u8))
                .chain(
                    oc.variants
                        .iter()
                        .filter(|(e, _)| budgets.contains(e))
                        .map(|(e, r)| (*e, r, u8::MAX)),
                )
                .filter(|(_, r, _)| r.s == *smax);
            let mut by: BTreeMap<u8, BTreeMap<usize, Vec<f64>>> = BTreeMap::new();
            for (e, r, key) in rows {
                by.entry(key)
                    .or_default()
                    .entry(e)
                    .or_default()
                    .push(reward_at_kl(&r.curve, a.kappa));
            }
            let series: Vec<Series> = by
                .into_iter()
                .map(|(m, es)| Series {
                    name: if m == u8::MAX {
                        VARIANT_NAME.to_string()
                    } else {
                        kind_of(m).as_str().to_string()
                    },
                    color: if m == u8::MAX {
                        VARIANT_COLOR
                    } else {
                        COLORS[m as usize % 4]
                    },
                    pts: es
                        .iter()
                        .map(|(e, v)| ((*e as f64).max(1.0).log10(), stats(v).0))
                        .collect(),
                    band: None,
                })
                .collect();
            let name = format!("budget_s{smax}.png");
            plot(
                &a.out.join(&name),
                &format!("Reward at KL = {} vs training epochs (s = {smax})", a.kappa),
                "log10(epochs)",
                &format!("reward at KL = {}", a.kappa),
                &series,
            )?;
            files.push(name);
        }
    }
    Ok(files)
}

/// Reads a CSV written by this benchmark (for tests and tools): header and rows.
pub fn read_csv(path: &Path) -> Result<(Vec<String>, Vec<Vec<String>>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()
        .with_context(|| format!("{} is empty", path.display()))?
        .split(',')
        .map(String::from)
        .collect();
    let rows = lines
        .map(|l| l.split(',').map(String::from).collect())
        .collect();
    Ok((header, rows))
}

/// Output directory helper for callers.
pub fn out_file(a: &SyntheticBenchArgs, name: &str) -> PathBuf {
    a.out.join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_parse() {
        assert_eq!(parse_seeds("0..3").unwrap(), vec![0, 1, 2]);
        assert_eq!(parse_seeds("2..=4").unwrap(), vec![2, 3, 4]);
        assert_eq!(parse_seeds("5,7").unwrap(), vec![5, 7]);
        assert!(parse_seeds("3..3").is_err());
        assert!(parse_seeds("x").is_err());
    }

    #[test]
    fn reward_interpolation() {
        let p = [(0.0, 1.0), (0.1, 2.0), (0.3, 4.0), (1.0, 5.0)];
        assert!((reward_at_kl(&p, 0.2) - 3.0).abs() < 1e-12);
        assert_eq!(reward_at_kl(&p, 5.0), 5.0);
        assert_eq!(reward_at_kl(&p, -1.0), 1.0);
    }

    #[test]
    fn evaluation_limits() {
        // A policy equal to the reference: KL 0 and the mean reward at every β.
        let lp = vec![vec![-(K as f64).ln(); K]; 3];
        let r: Vec<Vec<f64>> = (0..3)
            .map(|j| (0..K).map(|y| (j * K + y) as f64).collect())
            .collect();
        for (kl, rw) in evaluate(&lp, &r, 1.0, &[0.5, 1.0, 10.0]) {
            assert!(kl.abs() < 1e-12);
            let mean = r.iter().flatten().sum::<f64>() / (3 * K) as f64;
            assert!((rw - mean).abs() < 1e-9);
        }
        // A peaked policy: KL decreases with β.
        let mut lp = vec![vec![-5.0; K]; 1];
        lp[0][9] = -0.01;
        let c = evaluate(&lp, &r[..1], 1.0, &[0.5, 1.0, 10.0]);
        assert!(c[0].0 > c[1].0 && c[1].0 > c[2].0 && c[2].0 > 0.0);
        assert!(c[0].1 > c[2].1);
    }

    #[test]
    fn link_mixture_at_zero_is_logistic_scaled() {
        assert!((shifted_logistic_mixture(0.3, 0.0, 0.25) - sigmoid(1.2)).abs() < 1e-12);
        assert!((shifted_logistic_mixture(0.0, 1.5, 0.25) - 0.5).abs() < 1e-12);
    }
}
