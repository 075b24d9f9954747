//! The buffer between source and learner: validated events as Arrow record batches
//! (schema in `schemas/preference_batch.md`). The learner receives these batches and never
//! talks to a source.

use crate::source::{Position, PreferenceEvent};
use anyhow::{Context, Result};
use arrow::array::{
    Array, ArrayRef, Float64Array, Int32Array, Int64Array, StringArray, UInt8Array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

/// The Arrow schema of buffered events.
pub fn schema() -> SchemaRef {
    static S: OnceLock<SchemaRef> = OnceLock::new();
    S.get_or_init(|| {
        Arc::new(Schema::new(vec![
            Field::new("event_id", DataType::Utf8, false),
            Field::new("prompt", DataType::Utf8, false),
            Field::new("response_0", DataType::Utf8, false),
            Field::new("response_1", DataType::Utf8, false),
            Field::new("label", DataType::UInt8, false),
            Field::new("weight", DataType::Float64, false),
            Field::new("ref_logp_0", DataType::Float64, true),
            Field::new("ref_logp_1", DataType::Float64, true),
            Field::new("ts", DataType::Utf8, true),
            Field::new("annotator", DataType::Utf8, true),
            Field::new("policy_version", DataType::Utf8, true),
            Field::new("stream", DataType::Utf8, false),
            Field::new("partition", DataType::Int32, false),
            Field::new("offset", DataType::Int64, false),
        ]))
    })
    .clone()
}

/// Build a record batch from events and their positions.
pub fn to_batch(rows: &[(PreferenceEvent, Position)]) -> Result<RecordBatch> {
    let s = |f: fn(&PreferenceEvent) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|(e, _)| f(e)),
        ))
    };
    let os = |f: fn(&PreferenceEvent) -> Option<&str>| -> ArrayRef {
        Arc::new(StringArray::from_iter(rows.iter().map(|(e, _)| f(e))))
    };
    let cols: Vec<ArrayRef> = vec![
        s(|e| &e.event_id),
        s(|e| &e.prompt),
        s(|e| &e.response_0),
        s(|e| &e.response_1),
        Arc::new(UInt8Array::from_iter_values(
            rows.iter().map(|(e, _)| e.label),
        )),
        Arc::new(Float64Array::from_iter_values(
            rows.iter().map(|(e, _)| e.weight_or_one()),
        )),
        Arc::new(Float64Array::from_iter(
            rows.iter().map(|(e, _)| e.ref_logp_0),
        )),
        Arc::new(Float64Array::from_iter(
            rows.iter().map(|(e, _)| e.ref_logp_1),
        )),
        os(|e| e.ts.as_deref()),
        os(|e| e.annotator.as_deref()),
        os(|e| e.policy_version.as_deref()),
        Arc::new(StringArray::from_iter_values(
            rows.iter().map(|(_, p)| p.stream.as_str()),
        )),
        Arc::new(Int32Array::from_iter_values(
            rows.iter().map(|(_, p)| p.partition),
        )),
        Arc::new(Int64Array::from_iter_values(
            rows.iter().map(|(_, p)| p.offset),
        )),
    ];
    Ok(RecordBatch::try_new(schema(), cols)?)
}

/// Typed, borrowed view of a batch's columns.
pub struct BatchView<'a> {
    pub event_id: &'a StringArray,
    pub prompt: &'a StringArray,
    pub response_0: &'a StringArray,
    pub response_1: &'a StringArray,
    pub label: &'a UInt8Array,
    pub weight: &'a Float64Array,
    pub ref_logp_0: &'a Float64Array,
    pub ref_logp_1: &'a Float64Array,
    pub stream: &'a StringArray,
    pub partition: &'a Int32Array,
    pub offset: &'a Int64Array,
}

fn col<'a, T: 'static>(b: &'a RecordBatch, name: &str) -> Result<&'a T> {
    b.column_by_name(name)
        .with_context(|| format!("batch has no column {name}"))?
        .as_any()
        .downcast_ref::<T>()
        .with_context(|| format!("batch column {name} has the wrong type"))
}

impl<'a> BatchView<'a> {
    pub fn new(b: &'a RecordBatch) -> Result<Self> {
        Ok(Self {
            event_id: col(b, "event_id")?,
            prompt: col(b, "prompt")?,
            response_0: col(b, "response_0")?,
            response_1: col(b, "response_1")?,
            label: col(b, "label")?,
            weight: col(b, "weight")?,
            ref_logp_0: col(b, "ref_logp_0")?,
            ref_logp_1: col(b, "ref_logp_1")?,
            stream: col(b, "stream")?,
            partition: col(b, "partition")?,
            offset: col(b, "offset")?,
        })
    }
    pub fn len(&self) -> usize {
        self.event_id.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn position(&self, i: usize) -> Position {
        Position {
            stream: self.stream.value(i).to_string(),
            partition: self.partition.value(i),
            offset: self.offset.value(i),
        }
    }
    /// Cached reference log-probs of row i, if the event carried or was given them.
    pub fn cached_ref(&self, i: usize) -> Option<(f64, f64)> {
        if self.ref_logp_0.is_null(i) || self.ref_logp_1.is_null(i) {
            None
        } else {
            Some((self.ref_logp_0.value(i), self.ref_logp_1.value(i)))
        }
    }
}

/// A FIFO of validated events waiting to be trained on, bounded by its owner.
#[derive(Default)]
pub struct EventBuffer {
    rows: VecDeque<(PreferenceEvent, Position)>,
}

impl EventBuffer {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn push(&mut self, e: PreferenceEvent, p: Position) {
        self.rows.push_back((e, p));
    }
    pub fn len(&self) -> usize {
        self.rows.len()
    }
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
    /// Remove the oldest `n` events as one record batch.
    pub fn take(&mut self, n: usize) -> Result<RecordBatch> {
        let n = n.min(self.rows.len());
        let rows: Vec<_> = self.rows.drain(..n).collect();
        to_batch(&rows)
    }
    /// Drop every buffered event of these stream-partitions (after a rebalance took them).
    pub fn drop_partitions(&mut self, parts: &[(String, i32)]) -> usize {
        let before = self.rows.len();
        self.rows.retain(|(_, p)| {
            !parts
                .iter()
                .any(|(s, q)| *s == p.stream && *q == p.partition)
        });
        before - self.rows.len()
    }
    /// Positions of the buffered (untrained) events.
    pub fn positions(&self) -> impl Iterator<Item = &Position> {
        self.rows.iter().map(|(_, p)| p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::synthetic::{synthetic_event, SyntheticConfig};

    #[test]
    fn roundtrip_through_arrow() {
        let cfg = SyntheticConfig::default();
        let mut b = EventBuffer::new();
        for i in 0..5 {
            let mut e = synthetic_event(&cfg, i).event;
            if i == 2 {
                e.ref_logp_0 = Some(-1.5);
                e.ref_logp_1 = Some(-2.5);
            }
            b.push(
                e,
                Position {
                    stream: "t".into(),
                    partition: (i % 2) as i32,
                    offset: i as i64,
                },
            );
        }
        assert_eq!(b.drop_partitions(&[("t".into(), 1)]), 2);
        let batch = b.take(10).unwrap();
        let v = BatchView::new(&batch).unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(v.offset.value(1), 2);
        assert_eq!(v.cached_ref(1), Some((-1.5, -2.5)));
        assert_eq!(v.cached_ref(0), None);
        assert!(b.is_empty());
    }
}
