//! Snapshots: durable, verifiable directories with weights, optimiser and link state, source
//! offsets and Parquet records of what happened since the previous snapshot.
//!
//! Layout: `<data_dir>/snapshots/<step:010>-<short id>/` written into a temporary sibling,
//! every file fsynced, then renamed into place and the parent directory fsynced; the
//! `manifest.json` (written last) carries the sha256 of every other file.

pub mod bench;
pub mod cli;
pub mod parquet_io;
pub mod resume;
pub mod retention;
pub mod writer;

use crate::link::LinkCurve;
use crate::model::WeightExport;
use crate::source::Offsets;
use crate::util::{fsync_dir, safetensors_bytes, sha256_hex, write_durable};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Snapshot format version written into manifests.
pub const FORMAT_VERSION: u32 = 1;

/// `[snapshot]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotConfig {
    /// Write a snapshot every this many learner steps (and at shutdown).
    pub every_steps: u64,
    /// Keep the last K snapshots (promoted ones are always kept).
    pub keep_last: usize,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            every_steps: 50,
            keep_last: 5,
        }
    }
}

/// One learner step, as recorded in `metrics.parquet`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: i64,
    pub objective: String,
    pub loss: f64,
    /// Fresh pairs in the step.
    pub pairs: u32,
    /// Pairs drawn from the replay buffer and trained on beside the fresh ones.
    #[serde(default)]
    pub replayed: u32,
    pub grad_norm: f64,
    pub index_mean: f64,
    pub index_std: f64,
    /// Share of pairs in the batch whose index sign agrees with the label.
    pub batch_accuracy: f64,
    pub step_seconds: f64,
    pub link_drift_sup: f64,
    pub link_drift_l2: f64,
    /// Whether the update was applied (false: non-finite, rejected).
    pub applied: bool,
}

/// What happened to one consumed record, as recorded in `events.parquet`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventRecord {
    pub event_id: String,
    pub stream: String,
    pub partition: i32,
    pub offset: i64,
    /// `train`, `holdout` or `dead_letter`.
    pub role: String,
    /// The learner step that trained it (train only).
    pub step: Option<u64>,
    pub weight: f64,
}

/// Held-out evaluation of the policy a snapshot holds (recorded in its manifest; promotion
/// gates read it). Non-finite values are written as JSON `null` and read back as NaN.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Evaluation {
    /// Held-out pairs evaluated.
    pub n: usize,
    /// Share of pairs whose index sign agrees with the label.
    #[serde(with = "nan_as_null")]
    pub accuracy: f64,
    /// AUC of the index for z = 1 against z = 0 (link-free).
    #[serde(with = "nan_as_null")]
    pub auc: f64,
    /// Mean DPO loss.
    #[serde(with = "nan_as_null")]
    pub dpo_loss: f64,
    /// Mean negative log-likelihood under the learned link (SPO likelihood).
    #[serde(with = "nan_as_null")]
    pub spo_nll: f64,
    /// Estimated KL(policy ‖ reference) on held-out prompts (NaN: not available).
    #[serde(with = "nan_as_null", default = "nan")]
    pub kl: f64,
}

fn nan() -> f64 {
    f64::NAN
}

impl Evaluation {
    /// From the learner's held-out report, with a KL estimate if one is available.
    pub fn from_report(r: &crate::learner::EvalReport, kl: Option<f64>) -> Self {
        Self {
            n: r.n,
            accuracy: r.accuracy,
            auc: r.auc,
            dpo_loss: r.dpo_loss,
            spo_nll: r.spo_nll,
            kl: kl.unwrap_or(f64::NAN),
        }
    }
}

/// Serialize non-finite f64 as `null`, read `null` back as NaN.
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// Everything one snapshot holds, copied out of the learner.
pub struct SnapshotContent {
    pub step: u64,
    pub events_seen: u64,
    pub objective: String,
    pub config_hash: String,
    /// Parent snapshot name. A [`writer::BackgroundWriter`] uses it for the first snapshot it
    /// writes and chains later ones to the previous one it wrote.
    pub parent: Option<String>,
    pub weights: WeightExport,
    pub optimizer: Vec<(String, Tensor)>,
    pub optimizer_step: u64,
    /// Learner state that is not tensors: link estimator, objective memory, RNG, counters.
    pub learner_state: serde_json::Value,
    pub offsets: Offsets,
    pub metrics: Vec<StepRecord>,
    pub events: Vec<EventRecord>,
    /// The learned link on its grid (`link.parquet`).
    pub link_curve: LinkCurve,
    /// The learner's replay buffer, oldest first (`replay.parquet`; None: empty).
    pub replay: Option<arrow::record_batch::RecordBatch>,
    /// Held-out evaluation of these weights (None: not evaluated, never auto-promoted).
    pub eval: Option<Evaluation>,
}

/// `manifest.json` (described by `schemas/snapshot_manifest.schema.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format_version: u32,
    pub name: String,
    pub step: u64,
    pub events_seen: u64,
    pub objective: String,
    pub config_hash: String,
    pub parent: Option<String>,
    /// RFC 3339 UTC time the snapshot was written.
    pub created: String,
    /// Next offset to read per stream and partition: covers exactly the accounted events.
    pub offsets: Offsets,
    /// File name → sha256 (hex) of every other file in the directory.
    pub files: BTreeMap<String, String>,
    /// File name → size in bytes of every other file in the directory.
    #[serde(default)]
    pub sizes: BTreeMap<String, u64>,
    /// The weight file: `model.safetensors` or `adapter_model.safetensors`.
    #[serde(default)]
    pub weights_file: String,
    /// Held-out evaluation of the weights, if one was made.
    #[serde(default)]
    pub eval: Option<Evaluation>,
}

/// A written snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub name: String,
    pub path: PathBuf,
    pub manifest: Manifest,
    /// Set when the background writer promoted this snapshot right after writing it.
    pub promoted: Option<crate::promote::PromotionRecord>,
}

/// Files of a snapshot that are not the weights' side files (state, records, manifest).
pub const BOOKKEEPING_FILES: &[&str] = &[
    "optimizer.safetensors",
    "state.json",
    "link.parquet",
    "metrics.parquet",
    "events.parquet",
    "replay.parquet",
    "manifest.json",
];

/// Directory that holds the snapshots of a data directory.
pub fn snapshots_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("snapshots")
}

/// Prefix of the temporary directories snapshots are written into.
pub const TMP_PREFIX: &str = ".tmp-";

/// Check that every tensor is finite (no NaN, no ±inf); the error names the first bad one.
pub fn ensure_finite(what: &str, tensors: &[(String, Tensor)]) -> Result<()> {
    for (name, t) in tensors {
        if !t.dtype().is_float() {
            continue;
        }
        // x - x is 0 for finite x and NaN for NaN/±inf; the sum of zeros is exactly 0.
        let s = t
            .flatten_all()?
            .to_dtype(DType::F32)?
            .sub(&t.flatten_all()?.to_dtype(DType::F32)?)?
            .sum_all()?
            .to_scalar::<f32>()?;
        if s != 0.0 {
            bail!(
                "refusing to write a snapshot: {what} tensor `{name}` is not finite (NaN or inf)"
            );
        }
    }
    Ok(())
}

/// Write one snapshot durably and atomically. Returns once it is on disk.
///
/// Refuses (writes nothing) if a weight or optimizer tensor is not finite.
pub fn write_snapshot(data_dir: &Path, content: SnapshotContent) -> Result<SnapshotInfo> {
    ensure_finite("weight", &content.weights.tensors)?;
    ensure_finite("optimizer", &content.optimizer)?;
    let root = snapshots_dir(data_dir);
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let id_seed = format!(
        "{}/{}/{}/{}/{}",
        content.step,
        content.events_seen,
        content.config_hash,
        std::process::id(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
    );
    let short = &sha256_hex(id_seed.as_bytes())[..8];
    let name = format!("{:010}-{short}", content.step);
    let tmp = root.join(format!("{TMP_PREFIX}{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;

    let result = (|| -> Result<Manifest> {
        let mut files = BTreeMap::new();
        let mut sizes = BTreeMap::new();
        let mut put = |fname: &str, bytes: &[u8]| -> Result<()> {
            if fname == "manifest.json" || files.contains_key(fname) {
                bail!("snapshot file {fname} written twice");
            }
            write_durable(&tmp.join(fname), bytes)?;
            files.insert(fname.to_string(), sha256_hex(bytes));
            sizes.insert(fname.to_string(), bytes.len() as u64);
            Ok(())
        };
        put(
            &content.weights.tensor_file,
            &safetensors_bytes(&content.weights.tensors)
                .with_context(|| format!("serialising {}", content.weights.tensor_file))?,
        )?;
        for (fname, bytes) in &content.weights.side_files {
            put(fname, bytes)?;
        }
        put(
            "optimizer.safetensors",
            &safetensors_bytes(&content.optimizer).context("serialising optimizer state")?,
        )?;
        let state = serde_json::json!({
            "format_version": FORMAT_VERSION,
            "step": content.step,
            "optimizer_step": content.optimizer_step,
            "learner": content.learner_state,
        });
        put(
            "state.json",
            serde_json::to_string_pretty(&state)?.as_bytes(),
        )?;
        put(
            "link.parquet",
            &parquet_io::link_parquet(&content.link_curve)?,
        )?;
        put(
            "metrics.parquet",
            &parquet_io::steps_parquet(&content.metrics)?,
        )?;
        put(
            "events.parquet",
            &parquet_io::events_parquet(&content.events)?,
        )?;
        if let Some(r) = &content.replay {
            put("replay.parquet", &parquet_io::batch_to_parquet(r)?)?;
        }
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            name: name.clone(),
            step: content.step,
            events_seen: content.events_seen,
            objective: content.objective,
            config_hash: content.config_hash,
            parent: content.parent,
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            offsets: content.offsets,
            files,
            sizes,
            weights_file: content.weights.tensor_file.clone(),
            eval: content.eval,
        };
        write_durable(
            &tmp.join("manifest.json"),
            serde_json::to_string_pretty(&manifest)?.as_bytes(),
        )?;
        fsync_dir(&tmp)?;
        Ok(manifest)
    })();
    let manifest = match result {
        Ok(m) => m,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e.context(format!("writing snapshot {name}")));
        }
    };
    let dest = root.join(&name);
    std::fs::rename(&tmp, &dest)
        .with_context(|| format!("renaming {} into place", tmp.display()))?;
    fsync_dir(&root)?;
    Ok(SnapshotInfo {
        name,
        path: dest,
        manifest,
        promoted: None,
    })
}

/// Read a snapshot's manifest without checking the files.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: no readable manifest.json", dir.display()))?;
    let m: Manifest = serde_json::from_str(&text)
        .with_context(|| format!("{}: manifest.json is not valid", dir.display()))?;
    if m.format_version > FORMAT_VERSION {
        bail!(
            "{}: snapshot format_version {} is newer than this spoke supports ({FORMAT_VERSION})",
            dir.display(),
            m.format_version
        );
    }
    Ok(m)
}

/// Read and verify a snapshot: manifest, the size and sha256 of every file it lists, and no
/// unlisted files. Any mismatch is an error naming the snapshot and the file.
pub fn verify(dir: &Path) -> Result<Manifest> {
    let m = read_manifest(dir)?;
    if m.files.is_empty() {
        bail!("{}: manifest.json lists no files", dir.display());
    }
    for (f, sum) in &m.files {
        if f.contains('/') || f.contains('\\') || f.starts_with('.') {
            bail!("{}: manifest lists a bad file name {f:?}", dir.display());
        }
        let path = dir.join(f);
        let meta = std::fs::metadata(&path)
            .with_context(|| format!("{}: missing file {f}", dir.display()))?;
        if let Some(size) = m.sizes.get(f) {
            if meta.len() != *size {
                bail!(
                    "{}: size mismatch for {f} (manifest {size} bytes, file {} bytes)",
                    dir.display(),
                    meta.len()
                );
            }
        }
        let got = crate::util::sha256_file(&path)
            .with_context(|| format!("{}: cannot read {f}", dir.display()))?;
        if &got != sum {
            bail!(
                "{}: checksum mismatch for {f} (manifest {sum}, file {got})",
                dir.display()
            );
        }
    }
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        let n = e.file_name().to_string_lossy().to_string();
        if n != "manifest.json" && !m.files.contains_key(&n) {
            bail!(
                "{}: unexpected file {n} not listed in manifest.json",
                dir.display()
            );
        }
    }
    if !m.weights_file.is_empty() && !m.files.contains_key(&m.weights_file) {
        bail!(
            "{}: weights file {} is not in the manifest",
            dir.display(),
            m.weights_file
        );
    }
    Ok(m)
}

/// Step encoded in a snapshot directory name (`<step:010>-<id>`).
pub fn step_of_name(name: &str) -> Option<u64> {
    name.split('-').next()?.parse().ok()
}

/// Snapshot directories of a data directory, oldest first by creation time (from the
/// manifest; then step, then name). Creation order, not step order, so that after a run with
/// `--fresh` (steps restart from 0) or a fallback resume past a corrupted snapshot, the
/// newest lineage is what resume and retention treat as the latest. Directories whose
/// manifest cannot be read sort first (oldest).
pub fn list(data_dir: &Path) -> Result<Vec<PathBuf>> {
    let root = snapshots_dir(data_dir);
    if !root.exists() {
        return Ok(vec![]);
    }
    let mut v: Vec<((String, u64, String), PathBuf)> = std::fs::read_dir(&root)
        .with_context(|| format!("listing {}", root.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| !n.starts_with('.'))
        })
        .map(|p| {
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            let step = step_of_name(&name).unwrap_or(0);
            let created = read_manifest(&p)
                .ok()
                .and_then(|m| chrono::DateTime::parse_from_rfc3339(&m.created).ok())
                .map(|t| {
                    t.with_timezone(&chrono::Utc)
                        .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
                })
                .unwrap_or_default();
            ((created, step, name), p)
        })
        .collect();
    v.sort();
    Ok(v.into_iter().map(|(_, p)| p).collect())
}
