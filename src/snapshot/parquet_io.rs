//! Parquet files of snapshots (zstd, plain snake_case columns, signed integer types so every
//! reader maps them the same way; see `schemas/*_parquet.md`).

use super::{EventRecord, StepRecord};
use crate::link::LinkCurve;
use anyhow::{Context, Result};
use arrow::array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int32Array, Int64Array, StringArray,
};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use std::path::Path;
use std::sync::Arc;

/// Version of the Parquet column layouts, stored in each file's key-value metadata under
/// `spoke.schema_version`. Columns are only ever added; a rename or retype bumps it.
pub const SCHEMA_VERSION: &str = "1";

/// Writer properties shared by every Parquet file spoke writes.
pub fn writer_props() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).expect("level 3")))
        .set_created_by(format!("spoke {}", env!("CARGO_PKG_VERSION")))
        .set_key_value_metadata(Some(vec![KeyValue::new(
            "spoke.schema_version".to_string(),
            SCHEMA_VERSION.to_string(),
        )]))
        .build()
}

/// Encode one record batch as Parquet bytes.
pub fn batch_to_parquet(batch: &RecordBatch) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut w = ArrowWriter::try_new(&mut buf, batch.schema(), Some(writer_props()))?;
    w.write(batch)?;
    w.close()?;
    Ok(buf)
}

/// Read a whole Parquet file into one record batch (empty files give an empty batch).
pub fn read_parquet(path: &Path) -> Result<RecordBatch> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let b = ParquetRecordBatchReaderBuilder::try_new(f)
        .with_context(|| format!("{}: not a Parquet file", path.display()))?;
    let schema = b.schema().clone();
    let batches = b
        .build()?
        .collect::<std::result::Result<Vec<_>, _>>()
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(arrow::compute::concat_batches(&schema, &batches)?)
}

fn f64_col(rows: impl Iterator<Item = f64>) -> ArrayRef {
    Arc::new(Float64Array::from_iter_values(rows))
}

/// `metrics.parquet` (see `schemas/metrics_parquet.md`).
pub fn steps_parquet(rows: &[StepRecord]) -> Result<Vec<u8>> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("step", DataType::Int64, false),
        Field::new("time_ms", DataType::Int64, false),
        Field::new("objective", DataType::Utf8, false),
        Field::new("loss", DataType::Float64, false),
        Field::new("pairs", DataType::Int32, false),
        Field::new("replayed", DataType::Int32, false),
        Field::new("grad_norm", DataType::Float64, false),
        Field::new("index_mean", DataType::Float64, false),
        Field::new("index_std", DataType::Float64, false),
        Field::new("batch_accuracy", DataType::Float64, false),
        Field::new("step_seconds", DataType::Float64, false),
        Field::new("link_drift_sup", DataType::Float64, false),
        Field::new("link_drift_l2", DataType::Float64, false),
        Field::new("applied", DataType::Boolean, false),
    ]));
    let f = |g: fn(&StepRecord) -> f64| f64_col(rows.iter().map(g));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| r.step as i64),
        )),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.time_ms))),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.objective.as_str()),
        )),
        f(|r| r.loss),
        Arc::new(Int32Array::from_iter_values(
            rows.iter().map(|r| r.pairs as i32),
        )),
        Arc::new(Int32Array::from_iter_values(
            rows.iter().map(|r| r.replayed as i32),
        )),
        f(|r| r.grad_norm),
        f(|r| r.index_mean),
        f(|r| r.index_std),
        f(|r| r.batch_accuracy),
        f(|r| r.step_seconds),
        f(|r| r.link_drift_sup),
        f(|r| r.link_drift_l2),
        Arc::new(BooleanArray::from_iter(
            rows.iter().map(|r| Some(r.applied)),
        )),
    ];
    batch_to_parquet(&RecordBatch::try_new(schema, cols)?)
}

/// `events.parquet` (see `schemas/events_parquet.md`).
pub fn events_parquet(rows: &[EventRecord]) -> Result<Vec<u8>> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("event_id", DataType::Utf8, false),
        Field::new("stream", DataType::Utf8, false),
        Field::new("partition", DataType::Int32, false),
        Field::new("offset", DataType::Int64, false),
        Field::new("role", DataType::Utf8, false),
        Field::new("step", DataType::Int64, true),
        Field::new("weight", DataType::Float64, false),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.event_id.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.stream.as_str()),
        )),
        Arc::new(Int32Array::from_iter_values(
            rows.iter().map(|r| r.partition),
        )),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.offset))),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.role.as_str()),
        )),
        Arc::new(Int64Array::from_iter(
            rows.iter().map(|r| r.step.map(|s| s as i64)),
        )),
        f64_col(rows.iter().map(|r| r.weight)),
    ];
    batch_to_parquet(&RecordBatch::try_new(schema, cols)?)
}

/// `link.parquet` (see `schemas/link_parquet.md`): one row per grid point.
pub fn link_parquet(c: &LinkCurve) -> Result<Vec<u8>> {
    let n = c.t.len();
    for (col, len) in [
        ("psi", c.psi.len()),
        ("dpsi", c.dpsi.len()),
        ("mass", c.mass.len()),
        ("logistic", c.logistic.len()),
    ] {
        anyhow::ensure!(
            len == n,
            "link curve column {col} has {len} values, t has {n}"
        );
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("t", DataType::Float64, false),
        Field::new("psi", DataType::Float64, false),
        Field::new("dpsi", DataType::Float64, false),
        Field::new("mass", DataType::Float64, false),
        Field::new("logistic", DataType::Float64, false),
    ]));
    let cols: Vec<ArrayRef> = vec![
        f64_col(c.t.iter().copied()),
        f64_col(c.psi.iter().copied()),
        f64_col(c.dpsi.iter().copied()),
        f64_col(c.mass.iter().copied()),
        f64_col(c.logistic.iter().copied()),
    ];
    batch_to_parquet(&RecordBatch::try_new(schema, cols)?)
}

/// One row of `promotions.parquet`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PromotionRow {
    /// Milliseconds since the Unix epoch.
    pub time_ms: i64,
    pub name: String,
    pub step: i64,
    /// `auto` (gates passed) or `manual` (`spoke snapshot promote`).
    pub kind: String,
    pub reason: String,
    pub previous: Option<String>,
    pub auc: f64,
    pub accuracy: f64,
    pub dpo_loss: f64,
    pub spo_nll: f64,
    pub kl: f64,
    pub holdout_n: i64,
}

fn promotions_schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("time_ms", DataType::Int64, false),
        Field::new("name", DataType::Utf8, false),
        Field::new("step", DataType::Int64, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("previous", DataType::Utf8, true),
        Field::new("auc", DataType::Float64, false),
        Field::new("accuracy", DataType::Float64, false),
        Field::new("dpo_loss", DataType::Float64, false),
        Field::new("spo_nll", DataType::Float64, false),
        Field::new("kl", DataType::Float64, false),
        Field::new("holdout_n", DataType::Int64, false),
    ]))
}

/// `promotions.parquet` (see `schemas/promotions_parquet.md`).
pub fn promotions_parquet(rows: &[PromotionRow]) -> Result<Vec<u8>> {
    let s = |g: fn(&PromotionRow) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(g)))
    };
    let f = |g: fn(&PromotionRow) -> f64| f64_col(rows.iter().map(g));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.time_ms))),
        s(|r| &r.name),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.step))),
        s(|r| &r.kind),
        s(|r| &r.reason),
        Arc::new(StringArray::from_iter(
            rows.iter().map(|r| r.previous.as_deref()),
        )),
        f(|r| r.auc),
        f(|r| r.accuracy),
        f(|r| r.dpo_loss),
        f(|r| r.spo_nll),
        f(|r| r.kl),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|r| r.holdout_n),
        )),
    ];
    batch_to_parquet(&RecordBatch::try_new(promotions_schema(), cols)?)
}

fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> Result<&'a T> {
    b.column_by_name(name)
        .with_context(|| format!("Parquet file lacks column {name}"))?
        .as_any()
        .downcast_ref::<T>()
        .with_context(|| format!("Parquet column {name} has an unexpected type"))
}

/// Read `promotions.parquet` back (missing file: no rows).
pub fn read_promotions(path: &Path) -> Result<Vec<PromotionRow>> {
    if !path.exists() {
        return Ok(vec![]);
    }
    let b = read_parquet(path)?;
    let time = col::<Int64Array>(&b, "time_ms")?;
    let name = col::<StringArray>(&b, "name")?;
    let step = col::<Int64Array>(&b, "step")?;
    let kind = col::<StringArray>(&b, "kind")?;
    let reason = col::<StringArray>(&b, "reason")?;
    let previous = col::<StringArray>(&b, "previous")?;
    let f = |n: &str| col::<Float64Array>(&b, n);
    let (auc, acc, dpo, nll, kl) = (
        f("auc")?,
        f("accuracy")?,
        f("dpo_loss")?,
        f("spo_nll")?,
        f("kl")?,
    );
    let hn = col::<Int64Array>(&b, "holdout_n")?;
    Ok((0..b.num_rows())
        .map(|i| PromotionRow {
            time_ms: time.value(i),
            name: name.value(i).to_string(),
            step: step.value(i),
            kind: kind.value(i).to_string(),
            reason: reason.value(i).to_string(),
            previous: (!previous.is_null(i)).then(|| previous.value(i).to_string()),
            auc: auc.value(i),
            accuracy: acc.value(i),
            dpo_loss: dpo.value(i),
            spo_nll: nll.value(i),
            kl: kl.value(i),
            holdout_n: hn.value(i),
        })
        .collect())
}

/// Summary of a `metrics.parquet` file, for `spoke snapshot inspect`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MetricsSummary {
    pub rows: usize,
    pub first_step: Option<i64>,
    pub last_step: Option<i64>,
    pub rejected_steps: usize,
    pub mean_loss: f64,
    pub last_loss: f64,
    pub mean_step_seconds: f64,
    pub last_link_drift_sup: f64,
}

/// Summarise a `metrics.parquet` file.
pub fn summarize_metrics(path: &Path) -> Result<MetricsSummary> {
    let b = read_parquet(path)?;
    let n = b.num_rows();
    if n == 0 {
        return Ok(MetricsSummary::default());
    }
    let step = col::<Int64Array>(&b, "step")?;
    let loss = col::<Float64Array>(&b, "loss")?;
    let secs = col::<Float64Array>(&b, "step_seconds")?;
    let drift = col::<Float64Array>(&b, "link_drift_sup")?;
    let applied = col::<BooleanArray>(&b, "applied")?;
    let mean = |a: &Float64Array| a.values().iter().sum::<f64>() / n as f64;
    Ok(MetricsSummary {
        rows: n,
        first_step: Some(step.value(0)),
        last_step: Some(step.value(n - 1)),
        rejected_steps: (0..n).filter(|i| !applied.value(*i)).count(),
        mean_loss: mean(loss),
        last_loss: loss.value(n - 1),
        mean_step_seconds: mean(secs),
        last_link_drift_sup: drift.value(n - 1),
    })
}

/// Count of `events.parquet` rows per role.
pub fn count_event_roles(path: &Path) -> Result<std::collections::BTreeMap<String, usize>> {
    let b = read_parquet(path)?;
    let mut out = std::collections::BTreeMap::new();
    if b.num_rows() == 0 {
        return Ok(out);
    }
    let role = col::<StringArray>(&b, "role")?;
    for i in 0..b.num_rows() {
        *out.entry(role.value(i).to_string()).or_insert(0) += 1;
    }
    Ok(out)
}
