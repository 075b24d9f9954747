//! Parquet files of snapshots (zstd, plain snake_case columns; see `schemas/`).

use super::{EventRecord, StepRecord};
use anyhow::Result;
use arrow::array::{
    ArrayRef, BooleanArray, Float64Array, Int32Array, Int64Array, StringArray, UInt32Array,
    UInt64Array,
};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use std::sync::Arc;

/// Writer properties shared by every Parquet file spoke writes.
pub fn writer_props() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).expect("level 3")))
        .set_created_by(format!("spoke {}", env!("CARGO_PKG_VERSION")))
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

pub fn steps_parquet(rows: &[StepRecord]) -> Result<Vec<u8>> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("step", DataType::UInt64, false),
        Field::new("time_ms", DataType::Int64, false),
        Field::new("objective", DataType::Utf8, false),
        Field::new("loss", DataType::Float64, false),
        Field::new("pairs", DataType::UInt32, false),
        Field::new("grad_norm", DataType::Float64, false),
        Field::new("index_mean", DataType::Float64, false),
        Field::new("index_std", DataType::Float64, false),
        Field::new("batch_accuracy", DataType::Float64, false),
        Field::new("step_seconds", DataType::Float64, false),
        Field::new("link_drift_sup", DataType::Float64, false),
        Field::new("link_drift_l2", DataType::Float64, false),
        Field::new("applied", DataType::Boolean, false),
    ]));
    let f = |g: fn(&StepRecord) -> f64| -> ArrayRef {
        Arc::new(Float64Array::from_iter_values(rows.iter().map(g)))
    };
    let cols: Vec<ArrayRef> = vec![
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.step))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.time_ms))),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|r| r.objective.as_str()),
        )),
        f(|r| r.loss),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.pairs))),
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

pub fn events_parquet(rows: &[EventRecord]) -> Result<Vec<u8>> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("event_id", DataType::Utf8, false),
        Field::new("stream", DataType::Utf8, false),
        Field::new("partition", DataType::Int32, false),
        Field::new("offset", DataType::Int64, false),
        Field::new("role", DataType::Utf8, false),
        Field::new("step", DataType::UInt64, true),
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
        Arc::new(UInt64Array::from_iter(rows.iter().map(|r| r.step))),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|r| r.weight),
        )),
    ];
    batch_to_parquet(&RecordBatch::try_new(schema, cols)?)
}
