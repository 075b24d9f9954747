//! Periodic promotion of good snapshots.
//!
//! Each snapshot carries a held-out [`Evaluation`] in its manifest (written by the pipeline
//! right before the snapshot). Every `promote.every_steps` steps (or `every_seconds`), the
//! best candidate written since the last decision that passes the gates is promoted:
//!
//! - no NaN: accuracy, AUC, DPO loss and SPO NLL are finite, and at least `min_holdout`
//!   held-out pairs were evaluated;
//! - AUC: not below `min_auc`, and not below the currently promoted snapshot's AUC minus
//!   `auc_tolerance`;
//! - KL: with `max_kl > 0`, the KL estimate from the reference must be finite and `<= max_kl`
//!   (a snapshot without a KL estimate is then rejected); with `max_kl = 0` KL is recorded
//!   only.
//!
//! Promotion is atomic: `<data_dir>/promoted/PROMOTED.json` (the pointer, with a copy of the
//! manifest inside) is replaced via temp file + fsync + rename + directory fsync, after the
//! snapshot has been verified; `promoted/manifest.json` is a plain copy of the promoted
//! manifest and `<data_dir>/promotions.parquet` gets one row per promotion with the reason.
//! (Publishing a promotion event to Kafka is future work.)

use crate::snapshot::parquet_io::{promotions_parquet, read_promotions, PromotionRow};
use crate::snapshot::{verify, Evaluation, Manifest, SnapshotInfo};
use crate::util::write_atomic;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// `[promote]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PromoteConfig {
    /// Consider promotion every this many learner steps (0: not by steps).
    pub every_steps: u64,
    /// Consider promotion every this many seconds (0: not by time).
    pub every_seconds: f64,
    /// A candidate's held-out AUC may be at most this much below the promoted one's.
    pub auc_tolerance: f64,
    /// A candidate's held-out AUC must be at least this.
    pub min_auc: f64,
    /// Maximum KL(policy ‖ reference) estimate (0: KL is not gated).
    pub max_kl: f64,
    /// Minimum number of held-out pairs the evaluation must have used.
    pub min_holdout: usize,
    /// Held-out prompts (most recent) used for the KL(policy ‖ reference) estimate at each
    /// evaluated snapshot (0: no KL estimate; it is then recorded as NaN).
    pub kl_prompts: usize,
    /// Tokens sampled per prompt for the KL estimate.
    pub kl_max_new_tokens: usize,
}

impl Default for PromoteConfig {
    fn default() -> Self {
        Self {
            every_steps: 100,
            every_seconds: 0.0,
            auc_tolerance: 0.01,
            min_auc: 0.5,
            max_kl: 0.0,
            min_holdout: 200,
            kl_prompts: 16,
            kl_max_new_tokens: 16,
        }
    }
}

impl PromoteConfig {
    /// Check values; errors start with the dotted key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.every_seconds >= 0.0 && self.every_seconds.is_finite()) {
            return Err(format!(
                "promote.every_seconds: must be >= 0, got {}",
                self.every_seconds
            ));
        }
        if !(self.auc_tolerance >= 0.0 && self.auc_tolerance.is_finite()) {
            return Err(format!(
                "promote.auc_tolerance: must be >= 0, got {}",
                self.auc_tolerance
            ));
        }
        if !(0.0..=1.0).contains(&self.min_auc) {
            return Err(format!(
                "promote.min_auc: must be in [0, 1], got {}",
                self.min_auc
            ));
        }
        if !(self.max_kl >= 0.0 && self.max_kl.is_finite()) {
            return Err(format!("promote.max_kl: must be >= 0, got {}", self.max_kl));
        }
        Ok(())
    }

    /// Whether automatic promotion is on.
    pub fn enabled(&self) -> bool {
        self.every_steps > 0 || self.every_seconds > 0.0
    }
}

/// KL(policy ‖ reference) estimated on up to `cfg.kl_prompts` of the given (held-out)
/// prompts, the most recent ones, with a fixed seed. `None` when disabled, when there are no
/// prompts, or when the policy cannot estimate it (logged).
pub fn estimate_kl<'a>(
    policy: &dyn crate::model::Policy,
    prompts: impl DoubleEndedIterator<Item = &'a str>,
    cfg: &PromoteConfig,
    seed: u64,
) -> Option<f64> {
    if cfg.kl_prompts == 0 || cfg.kl_max_new_tokens == 0 {
        return None;
    }
    let mut p: Vec<&str> = prompts.rev().take(cfg.kl_prompts).collect();
    p.reverse();
    if p.is_empty() {
        return None;
    }
    match policy.kl_estimate(&p, cfg.kl_max_new_tokens, seed) {
        Ok(kl) => Some(kl),
        Err(e) => {
            tracing::debug!("No KL estimate: {e:#}.");
            None
        }
    }
}

/// The atomic pointer `promoted/PROMOTED.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PromotedPointer {
    /// Snapshot name (directory under `<data_dir>/snapshots/`).
    pub name: String,
    /// Path of the snapshot directory relative to the data directory.
    pub path: String,
    pub step: u64,
    /// RFC 3339 UTC time of the promotion.
    pub promoted_at: String,
    /// `auto` or `manual`.
    pub kind: String,
    pub reason: String,
    pub previous: Option<String>,
    /// The promoted snapshot's manifest.
    pub manifest: Manifest,
}

/// A promotion that happened.
#[derive(Debug, Clone, PartialEq)]
pub struct PromotionRecord {
    pub name: String,
    pub step: u64,
    pub kind: String,
    pub reason: String,
    pub previous: Option<String>,
}

/// `<data_dir>/promoted`.
pub fn promoted_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("promoted")
}

/// `<data_dir>/promotions.parquet`.
pub fn promotions_path(data_dir: &Path) -> PathBuf {
    data_dir.join("promotions.parquet")
}

/// The current promotion pointer, if any.
pub fn current(data_dir: &Path) -> Result<Option<PromotedPointer>> {
    let p = promoted_dir(data_dir).join("PROMOTED.json");
    if !p.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| {
        format!("{}: not a valid promotion pointer", p.display())
    })?))
}

/// Names of every snapshot ever promoted (history and current pointer): retention keeps them.
pub fn promoted_names(data_dir: &Path) -> Result<BTreeSet<String>> {
    let mut s: BTreeSet<String> = read_promotions(&promotions_path(data_dir))?
        .into_iter()
        .map(|r| r.name)
        .collect();
    if let Some(p) = current(data_dir)? {
        s.insert(p.name);
    }
    Ok(s)
}

/// Apply the gates to a candidate evaluation. `Ok(reason)` if it may be promoted over the
/// currently promoted evaluation `current`, `Err(why not)` otherwise.
pub fn gate(
    cfg: &PromoteConfig,
    cand: Option<&Evaluation>,
    current: Option<&Evaluation>,
) -> std::result::Result<String, String> {
    let Some(e) = cand else {
        return Err("no held-out evaluation".into());
    };
    for (k, v) in [
        ("accuracy", e.accuracy),
        ("auc", e.auc),
        ("dpo_loss", e.dpo_loss),
        ("spo_nll", e.spo_nll),
    ] {
        if !v.is_finite() {
            return Err(format!("held-out {k} is not finite ({v})"));
        }
    }
    if e.n < cfg.min_holdout {
        return Err(format!(
            "only {} held-out pairs evaluated (promote.min_holdout = {})",
            e.n, cfg.min_holdout
        ));
    }
    if e.auc < cfg.min_auc {
        return Err(format!(
            "AUC {:.4} below promote.min_auc {:.4}",
            e.auc, cfg.min_auc
        ));
    }
    let mut reason = format!("AUC {:.4} (n = {})", e.auc, e.n);
    if let Some(c) = current {
        if c.auc.is_finite() && e.auc < c.auc - cfg.auc_tolerance {
            return Err(format!(
                "AUC {:.4} below the promoted one's {:.4} minus tolerance {:.4}",
                e.auc, c.auc, cfg.auc_tolerance
            ));
        }
        if c.auc.is_finite() {
            reason.push_str(&format!(
                " vs promoted {:.4} (tolerance {:.4})",
                c.auc, cfg.auc_tolerance
            ));
        }
    } else {
        reason.push_str(", first promotion");
    }
    if cfg.max_kl > 0.0 {
        if !e.kl.is_finite() {
            return Err(format!(
                "KL estimate unavailable ({}) while promote.max_kl = {} is set",
                e.kl, cfg.max_kl
            ));
        }
        if e.kl > cfg.max_kl {
            return Err(format!(
                "KL {:.4} above promote.max_kl {:.4}",
                e.kl, cfg.max_kl
            ));
        }
        reason.push_str(&format!(", KL {:.4} <= {:.4}", e.kl, cfg.max_kl));
    } else if e.kl.is_finite() {
        reason.push_str(&format!(", KL {:.4}", e.kl));
    }
    Ok(reason)
}

/// Promote a snapshot directory now (after verifying it): atomic pointer swap, manifest copy,
/// a row in `promotions.parquet`.
pub fn promote(data_dir: &Path, dir: &Path, kind: &str, reason: &str) -> Result<PromotionRecord> {
    let manifest = verify(dir).context("refusing to promote a snapshot that does not verify")?;
    let snaps = crate::snapshot::snapshots_dir(data_dir);
    let canon_dir = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    let in_data_dir = snaps
        .canonicalize()
        .map(|s| canon_dir.parent() == Some(s.as_path()))
        .unwrap_or(false);
    if !in_data_dir {
        bail!(
            "{}: only snapshots under {} can be promoted",
            dir.display(),
            snaps.display()
        );
    }
    let previous = current(data_dir)?.map(|p| p.name);
    let pdir = promoted_dir(data_dir);
    std::fs::create_dir_all(&pdir).with_context(|| format!("creating {}", pdir.display()))?;
    let now = chrono::Utc::now();
    let pointer = PromotedPointer {
        name: manifest.name.clone(),
        path: format!("snapshots/{}", manifest.name),
        step: manifest.step,
        promoted_at: now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        kind: kind.to_string(),
        reason: reason.to_string(),
        previous: previous.clone(),
        manifest: manifest.clone(),
    };
    write_atomic(
        &pdir.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    write_atomic(
        &pdir.join("PROMOTED.json"),
        serde_json::to_string_pretty(&pointer)?.as_bytes(),
    )?;
    let path = promotions_path(data_dir);
    let mut rows = read_promotions(&path)?;
    let e = manifest.eval.unwrap_or(Evaluation {
        n: 0,
        accuracy: f64::NAN,
        auc: f64::NAN,
        dpo_loss: f64::NAN,
        spo_nll: f64::NAN,
        kl: f64::NAN,
    });
    rows.push(PromotionRow {
        time_ms: now.timestamp_millis(),
        name: manifest.name.clone(),
        step: manifest.step as i64,
        kind: kind.to_string(),
        reason: reason.to_string(),
        previous: previous.clone(),
        auc: e.auc,
        accuracy: e.accuracy,
        dpo_loss: e.dpo_loss,
        spo_nll: e.spo_nll,
        kl: e.kl,
        holdout_n: e.n as i64,
    });
    write_atomic(&path, &promotions_parquet(&rows)?)?;
    tracing::info!(
        "Promoted snapshot {} (step {}): {reason}.",
        manifest.name,
        manifest.step
    );
    Ok(PromotionRecord {
        name: manifest.name,
        step: manifest.step,
        kind: kind.to_string(),
        reason: reason.to_string(),
        previous,
    })
}

struct Candidate {
    name: String,
    path: PathBuf,
    step: u64,
    eval: Option<Evaluation>,
}

/// Periodic promotion decisions over the snapshots written by one run.
pub struct Promoter {
    data_dir: PathBuf,
    cfg: PromoteConfig,
    candidates: Vec<Candidate>,
    last_decision_step: Option<u64>,
    last_decision_time: Instant,
}

impl Promoter {
    pub fn new(data_dir: &Path, cfg: PromoteConfig) -> Self {
        Self {
            data_dir: data_dir.to_path_buf(),
            cfg,
            candidates: vec![],
            last_decision_step: None,
            last_decision_time: Instant::now(),
        }
    }

    /// Snapshots waiting for the next decision (retention must keep them).
    pub fn pending_names(&self) -> impl Iterator<Item = &str> {
        self.candidates.iter().map(|c| c.name.as_str())
    }

    /// Record a freshly written snapshot; if a decision is due, promote the best candidate
    /// that passes the gates (and log why the others did not).
    pub fn consider(&mut self, info: &SnapshotInfo) -> Result<Option<PromotionRecord>> {
        if !self.cfg.enabled() {
            return Ok(None);
        }
        self.candidates.push(Candidate {
            name: info.name.clone(),
            path: info.path.clone(),
            step: info.manifest.step,
            eval: info.manifest.eval,
        });
        let step = info.manifest.step;
        let base = match self.last_decision_step {
            Some(s) => s,
            None => {
                // Count from the promoted snapshot's step if it is older than this run.
                let p = current(&self.data_dir).ok().flatten().map(|p| p.step);
                let first = self.candidates.first().map(|c| c.step).unwrap_or(step);
                let b = p.filter(|p| *p <= first).unwrap_or(0);
                self.last_decision_step = Some(b);
                b
            }
        };
        let due_steps = self.cfg.every_steps > 0 && step >= base + self.cfg.every_steps;
        let due_time = self.cfg.every_seconds > 0.0
            && self.last_decision_time.elapsed().as_secs_f64() >= self.cfg.every_seconds;
        if !(due_steps || due_time) {
            return Ok(None);
        }
        self.decide(step)
    }

    /// Decide now among the pending candidates.
    pub fn decide(&mut self, step: u64) -> Result<Option<PromotionRecord>> {
        self.last_decision_step = Some(step);
        self.last_decision_time = Instant::now();
        let cands = std::mem::take(&mut self.candidates);
        let cur = current(&self.data_dir)?;
        let cur_eval = cur.as_ref().and_then(|p| p.manifest.eval);
        let mut best: Option<(&Candidate, String)> = None;
        for c in &cands {
            if cur.as_ref().is_some_and(|p| p.name == c.name) {
                continue;
            }
            match gate(&self.cfg, c.eval.as_ref(), cur_eval.as_ref()) {
                Ok(reason) => {
                    let better = match &best {
                        None => true,
                        Some((b, _)) => {
                            let (ba, ca) = (b.eval.map(|e| e.auc), c.eval.map(|e| e.auc));
                            ca >= ba
                        }
                    };
                    if better {
                        best = Some((c, reason));
                    }
                }
                Err(why) => tracing::info!("Snapshot {} not promoted: {why}.", c.name),
            }
        }
        let Some((c, reason)) = best else {
            return Ok(None);
        };
        if !c.path.exists() {
            tracing::warn!("Snapshot {} vanished before promotion.", c.name);
            return Ok(None);
        }
        promote(&self.data_dir, &c.path, "auto", &reason).map(Some)
    }
}
