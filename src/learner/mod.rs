//! The learner: receives Arrow batches of validated events, computes the index of each pair
//! with the policy and its frozen reference, the configured objective with the current link
//! estimate, and takes an AdamW step. It never sees a consumer or a source. Each step also
//! trains on a few recent pairs drawn from its replay buffer ([`replay`]).

pub mod replay;

use crate::buffer::BatchView;
use crate::config::Config;
use crate::link::RecursiveLink;
use crate::model::{Policy, WeightExport};
use crate::objective::{index, Divergence, Objective};
use crate::optim::AdamW;
use crate::snapshot::StepRecord;
use crate::source::{Position, PreferenceEvent};
use anyhow::{Context, Result};
use arrow::array::{ArrayRef, Float64Array};
use arrow::record_batch::RecordBatch;
use candle_core::{DType, Tensor};
use replay::{ReplayBuffer, ReplayRngState};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// One trained event, for per-event accounting.
#[derive(Debug, Clone)]
pub struct TrainedEvent {
    pub event_id: String,
    pub position: Position,
    pub weight: f64,
}

/// Weights, optimiser state tensors and optimiser step count, copied out for a snapshot.
pub type Exported = (WeightExport, Vec<(String, Tensor)>, u64);

/// Result of one step.
pub struct StepReport {
    pub record: StepRecord,
    pub trained: Vec<TrainedEvent>,
    /// Pairs held in the replay buffer after the step.
    pub replay_pairs: usize,
}

/// Held-out evaluation of the index against labels (link-free) and under the links.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct EvalReport {
    pub n: usize,
    /// Share of pairs where sign(t) agrees with the label (ties count half).
    pub accuracy: f64,
    /// Area under the ROC curve of t for z = 1 versus z = 0.
    pub auc: f64,
    /// Mean DPO loss −log σ(β s).
    pub dpo_loss: f64,
    /// Mean negative log-likelihood of labels under the learned link Ψ̂(t).
    pub spo_nll: f64,
}

/// Learner state that is not tensors (saved in snapshots as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LearnerState {
    pub step: u64,
    pub link: RecursiveLink,
    pub objective: serde_json::Value,
    /// Position of the replay sampling stream (the items are in `replay.parquet`).
    #[serde(default)]
    pub replay_rng: Option<ReplayRngState>,
    /// The policy's own random state (the LoRA dropout stream), if it has one.
    #[serde(default)]
    pub policy_rng: Option<serde_json::Value>,
}

pub struct Learner {
    policy: Box<dyn Policy>,
    objective: Objective,
    link: RecursiveLink,
    opt: AdamW,
    divergence: Divergence,
    beta: f64,
    step: u64,
    /// Recent trained pairs as one-row batches with their reference log-probs filled in.
    replay: ReplayBuffer<RecordBatch>,
}

/// `batch` with its reference log-prob columns replaced by `r0`, `r1`.
fn with_refs(batch: &RecordBatch, r0: &[f32], r1: &[f32]) -> Result<RecordBatch> {
    let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
    let schema = batch.schema();
    for (name, r) in [("ref_logp_0", r0), ("ref_logp_1", r1)] {
        let (i, _) = schema
            .column_with_name(name)
            .with_context(|| format!("batch has no column {name}"))?;
        cols[i] = Arc::new(Float64Array::from_iter_values(r.iter().map(|v| *v as f64)));
    }
    Ok(RecordBatch::try_new(schema, cols)?)
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let m = v.iter().sum::<f64>() / v.len() as f64;
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64;
    (m, var.sqrt())
}

/// Pairwise accuracy of sign(t) against labels; ties count half.
pub fn pairwise_accuracy(t: &[f64], z: &[f64]) -> f64 {
    if t.is_empty() {
        return 0.5;
    }
    let s: f64 = t
        .iter()
        .zip(z)
        .map(|(t, z)| {
            if *t == 0.0 {
                0.5
            } else if (*t > 0.0) == (*z > 0.5) {
                1.0
            } else {
                0.0
            }
        })
        .sum();
    s / t.len() as f64
}

/// AUC of scores t for positives (z = 1) against negatives, ties counting half.
pub fn auc(t: &[f64], z: &[f64]) -> f64 {
    let mut idx: Vec<usize> = (0..t.len()).collect();
    idx.sort_by(|a, b| t[*a].total_cmp(&t[*b]));
    // Average ranks with ties.
    let mut ranks = vec![0.0; t.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && t[idx[j + 1]] == t[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            ranks[idx[k]] = r;
        }
        i = j + 1;
    }
    let n1 = z.iter().filter(|z| **z > 0.5).count() as f64;
    let n0 = z.len() as f64 - n1;
    if n1 == 0.0 || n0 == 0.0 {
        return 0.5;
    }
    let r1: f64 = ranks
        .iter()
        .zip(z)
        .filter(|(_, z)| **z > 0.5)
        .map(|(r, _)| *r)
        .sum();
    (r1 - n1 * (n1 + 1.0) / 2.0) / (n1 * n0)
}

fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// Result of [`update_on_index`].
pub struct CoreStep {
    pub loss: f64,
    /// Detached index values of the batch.
    pub t: Vec<f64>,
    pub grad_norm: f64,
    /// False when the loss or a gradient was not finite: nothing was changed.
    pub applied: bool,
}

/// The policy-independent part of a learner step, shared by every policy (the LM pipeline
/// and the MLP of `spoke bench synthetic`): objective on the index with the current link
/// estimate, backward, AdamW step, then the link estimate and the objective's memory are
/// updated with the detached (t, z, w). `t` must be differentiable w.r.t. the optimiser's vars.
pub fn update_on_index(
    objective: &mut Objective,
    link: &mut RecursiveLink,
    opt: &mut AdamW,
    t: &Tensor,
    z: &[f32],
    w: &[f32],
    step: u64,
) -> Result<CoreStep> {
    let n = z.len();
    let dev = t.device().clone();
    let zt = Tensor::from_vec(z.to_vec(), n, &dev)?;
    let wt = Tensor::from_vec(w.to_vec(), n, &dev)?;
    let loss = objective
        .loss(t, &zt, &wt, link, step)
        .context("computing the objective")?;
    let loss_v = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let t_v: Vec<f64> = t.detach().to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let mut applied = false;
    let mut grad_norm = f64::NAN;
    if loss_v.is_finite() {
        let grads = loss.backward()?;
        let info = opt.step(&grads)?;
        grad_norm = info.grad_norm;
        applied = info.finite;
    }
    if applied {
        let z64: Vec<f64> = z.iter().map(|x| *x as f64).collect();
        let w64: Vec<f64> = w.iter().map(|x| *x as f64).collect();
        link.update(&t_v, &z64, &w64);
        objective.observe(&t_v, &z64);
    }
    Ok(CoreStep {
        loss: loss_v,
        t: t_v,
        grad_norm,
        applied,
    })
}

impl Learner {
    pub fn new(policy: Box<dyn Policy>, cfg: &Config) -> Result<Self> {
        let opt = AdamW::new(policy.trainable(), cfg.optim.clone())?;
        Ok(Self {
            objective: Objective::new(cfg.objective.clone()),
            link: RecursiveLink::new(cfg.link.clone()),
            divergence: cfg.objective.divergence,
            beta: cfg.objective.beta,
            opt,
            policy,
            step: 0,
            replay: ReplayBuffer::new(cfg.replay.clone(), cfg.run.seed),
        })
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }
    pub fn link(&self) -> &RecursiveLink {
        &self.link
    }
    pub fn policy(&self) -> &dyn Policy {
        self.policy.as_ref()
    }
    pub fn objective_name(&self) -> &'static str {
        self.objective.cfg.kind.as_str()
    }

    /// Reference log-probs for rows without cached ones (computed once per event).
    fn refs(&self, v: &BatchView) -> Result<(Vec<f32>, Vec<f32>)> {
        let n = v.len();
        let mut r0 = vec![0f32; n];
        let mut r1 = vec![0f32; n];
        let mut missing = Vec::new();
        for i in 0..n {
            match v.cached_ref(i) {
                Some((a, b)) => {
                    r0[i] = a as f32;
                    r1[i] = b as f32;
                }
                None => missing.push(i),
            }
        }
        if !missing.is_empty() {
            let prompts: Vec<&str> = missing
                .iter()
                .chain(missing.iter())
                .map(|&i| v.prompt.value(i))
                .collect();
            let resp: Vec<&str> = missing
                .iter()
                .map(|&i| v.response_0.value(i))
                .chain(missing.iter().map(|&i| v.response_1.value(i)))
                .collect();
            let lp = self.policy.ref_logps(&prompts, &resp)?;
            let m = missing.len();
            for (k, &i) in missing.iter().enumerate() {
                r0[i] = lp[k];
                r1[i] = lp[m + k];
            }
        }
        Ok((r0, r1))
    }

    /// The index t of every pair in the batch under the current policy.
    fn index_of(&self, v: &BatchView, train: bool) -> Result<Tensor> {
        let n = v.len();
        let (r0, r1) = self.refs(v)?;
        let dev = self.policy.device().clone();
        let prompts: Vec<&str> = (0..n).chain(0..n).map(|i| v.prompt.value(i)).collect();
        let resp: Vec<&str> = (0..n)
            .map(|i| v.response_0.value(i))
            .chain((0..n).map(|i| v.response_1.value(i)))
            .collect();
        let lp = self
            .policy
            .logps(&prompts, &resp, train)?
            .to_dtype(DType::F32)?;
        let lp0 = lp.narrow(0, 0, n)?;
        let lp1 = lp.narrow(0, n, n)?;
        let ref0 = Tensor::from_vec(r0, n, &dev)?;
        let ref1 = Tensor::from_vec(r1, n, &dev)?;
        index(self.divergence, &lp1, &ref1, &lp0, &ref0)
    }

    /// One optimiser step on a batch of fresh pairs, plus the pairs drawn from the replay
    /// buffer (`replay.ratio` per fresh pair). Only the fresh pairs are reported as trained.
    pub fn step(&mut self, batch: &RecordBatch) -> Result<StepReport> {
        let started = Instant::now();
        let n = batch.num_rows();
        anyhow::ensure!(n > 0, "empty batch");
        let fresh = {
            let v = BatchView::new(batch)?;
            let (r0, r1) = self.refs(&v)?;
            with_refs(batch, &r0, &r1)?
        };
        let replayed = self.replay.draw(n);
        let k = replayed.len();
        let all = if k == 0 {
            fresh.clone()
        } else {
            let parts: Vec<&RecordBatch> = std::iter::once(&fresh).chain(&replayed).collect();
            arrow::compute::concat_batches(&fresh.schema(), parts)
                .context("joining replayed pairs to the batch")?
        };
        let v = BatchView::new(&all)?;
        let t = self.index_of(&v, true)?;
        let z: Vec<f32> = (0..n + k).map(|i| v.label.value(i) as f32).collect();
        let w: Vec<f32> = (0..n + k).map(|i| v.weight.value(i) as f32).collect();
        let core = update_on_index(
            &mut self.objective,
            &mut self.link,
            &mut self.opt,
            &t,
            &z,
            &w,
            self.step,
        )?;
        let (loss_v, t_v, applied, grad_norm) = (core.loss, core.t, core.applied, core.grad_norm);
        let z64: Vec<f64> = z.iter().map(|x| *x as f64).collect();
        if applied {
            self.step += 1;
            self.replay.extend((0..n).map(|i| fresh.slice(i, 1)));
        }
        let t_v = &t_v[..n];
        let z64 = &z64[..n];
        let (m, s) = mean_std(t_v);
        let drift = self.link.drift();
        let trained = if applied {
            (0..n)
                .map(|i| TrainedEvent {
                    event_id: v.event_id.value(i).to_string(),
                    position: v.position(i),
                    weight: v.weight.value(i),
                })
                .collect()
        } else {
            vec![]
        };
        Ok(StepReport {
            record: StepRecord {
                step: self.step,
                time_ms: chrono::Utc::now().timestamp_millis(),
                objective: self.objective_name().to_string(),
                loss: loss_v,
                pairs: n as u32,
                replayed: k as u32,
                grad_norm,
                index_mean: m,
                index_std: s,
                batch_accuracy: pairwise_accuracy(t_v, z64),
                step_seconds: started.elapsed().as_secs_f64(),
                link_drift_sup: drift.sup,
                link_drift_l2: drift.l2,
                applied,
            },
            trained,
            replay_pairs: self.replay.len(),
        })
    }

    /// Evaluate on held-out events (no gradient). Fills in missing reference log-probs in
    /// place so that each event pays for the reference forward once.
    pub fn evaluate(&self, events: &mut [(PreferenceEvent, Position)]) -> Result<EvalReport> {
        if events.is_empty() {
            return Ok(EvalReport::default());
        }
        let mut ts = Vec::with_capacity(events.len());
        for chunk in events.chunks_mut(64) {
            let batch = crate::buffer::to_batch(chunk)?;
            let v = BatchView::new(&batch)?;
            let (r0, r1) = self.refs(&v)?;
            for (k, (e, _)) in chunk.iter_mut().enumerate() {
                e.ref_logp_0.get_or_insert(r0[k] as f64);
                e.ref_logp_1.get_or_insert(r1[k] as f64);
            }
            let batch = crate::buffer::to_batch(chunk)?;
            let v = BatchView::new(&batch)?;
            let t = self.index_of(&v, false)?.detach();
            ts.extend(t.to_dtype(DType::F64)?.to_vec1::<f64>()?);
        }
        let z: Vec<f64> = events.iter().map(|(e, _)| e.label as f64).collect();
        let n = ts.len() as f64;
        let dpo = ts
            .iter()
            .zip(&z)
            .map(|(t, z)| softplus(-self.beta * t * (2.0 * z - 1.0)))
            .sum::<f64>()
            / n;
        let nll = ts
            .iter()
            .zip(&z)
            .map(|(t, z)| {
                let p = self.link.psi(*t).clamp(1e-6, 1.0 - 1e-6);
                -(z * p.ln() + (1.0 - z) * (1.0 - p).ln())
            })
            .sum::<f64>()
            / n;
        Ok(EvalReport {
            n: ts.len(),
            accuracy: pairwise_accuracy(&ts, &z),
            auc: auc(&ts, &z),
            dpo_loss: dpo,
            spo_nll: nll,
        })
    }

    /// Non-tensor state for snapshots.
    pub fn state(&self) -> LearnerState {
        LearnerState {
            step: self.step,
            link: self.link.clone(),
            objective: self.objective.state(),
            replay_rng: Some(self.replay.rng_state()),
            policy_rng: self.policy.rng_state(),
        }
    }

    /// The replay buffer's pairs, oldest first, as one batch (None when empty).
    pub fn replay_batch(&self) -> Result<Option<RecordBatch>> {
        if self.replay.is_empty() {
            return Ok(None);
        }
        let parts: Vec<&RecordBatch> = self.replay.items().collect();
        Ok(Some(arrow::compute::concat_batches(
            &crate::buffer::schema(),
            parts,
        )?))
    }

    /// Pairs held for replay.
    pub fn replay_len(&self) -> usize {
        self.replay.len()
    }

    /// Copy out weights and optimiser state for a snapshot.
    pub fn export(&self) -> Result<Exported> {
        let w = self.policy.export()?;
        let (o, s) = self.opt.state()?;
        Ok((w, o, s))
    }

    /// Restore from snapshot contents.
    pub fn restore(
        &mut self,
        weights: &HashMap<String, Tensor>,
        optimizer: &HashMap<String, Tensor>,
        optimizer_step: u64,
        state: LearnerState,
        replay: Option<&RecordBatch>,
    ) -> Result<()> {
        self.policy.load_trainable(weights)?;
        self.opt = AdamW::new(self.policy.trainable(), self.opt_cfg())?;
        self.opt.load_state(optimizer, optimizer_step)?;
        self.step = state.step;
        self.link = state.link;
        self.objective.load_state(&state.objective)?;
        if let Some(r) = &state.policy_rng {
            self.policy.set_rng_state(r)?;
        }
        let items: Vec<RecordBatch> = match replay {
            Some(b) => {
                // Parquet may hand the columns back with its own schema metadata.
                let b = RecordBatch::try_new(crate::buffer::schema(), b.columns().to_vec())
                    .context("replay.parquet does not have the event batch schema")?;
                (0..b.num_rows()).map(|i| b.slice(i, 1)).collect()
            }
            None => vec![],
        };
        match &state.replay_rng {
            Some(r) => self.replay.restore(items, r)?,
            None if items.is_empty() => {}
            None => anyhow::bail!("replay.parquet present but state.json has no replay_rng"),
        }
        Ok(())
    }

    fn opt_cfg(&self) -> crate::optim::OptimConfig {
        self.opt.config().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_and_accuracy() {
        let t = [0.9, 0.1, -0.3, 0.5, -0.8];
        let z = [1.0, 0.0, 0.0, 1.0, 0.0];
        assert_eq!(auc(&t, &z), 1.0);
        assert!((pairwise_accuracy(&t, &z) - 0.8).abs() < 1e-12);
        let z2 = [0.0, 1.0, 1.0, 0.0, 1.0];
        assert_eq!(auc(&t, &z2), 0.0);
        assert_eq!(auc(&[1.0, 1.0], &[1.0, 0.0]), 0.5);
    }
}
