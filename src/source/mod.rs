//! Sources: where preference events come from (Kafka, the built-in synthetic stream, files),
//! and where the ones that fail validation go (dead-letter sinks).
//!
//! A [`Source`] yields raw records with their [`Position`]; decoding and validation happen in
//! [`event`], in the pipeline, so every source gets the same contract. After a snapshot that
//! covers some positions is durable, the pipeline calls [`Source::commit`] with them.

pub mod event;
pub mod file;
pub mod kafka;
pub mod produce;
pub mod synthetic;

use anyhow::Result;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

pub use event::{decode_event, DecodeError, PreferenceEvent};

/// Where a record sits in its stream: a Kafka topic-partition-offset, or the equivalent for
/// the synthetic stream (`synthetic`, 0, index) and files (path, 0, line number).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    pub stream: String,
    pub partition: i32,
    pub offset: i64,
}

impl Position {
    /// A deterministic id for events that carry none (e.g. the TRL form).
    pub fn fallback_id(&self) -> String {
        format!("{}/{}/{}", self.stream, self.partition, self.offset)
    }
}

/// Per stream-partition, the next offset to read. This is what a snapshot records and what a
/// source resumes from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offsets(pub BTreeMap<String, BTreeMap<i32, i64>>);

impl Offsets {
    pub fn get(&self, stream: &str, partition: i32) -> Option<i64> {
        self.0.get(stream).and_then(|m| m.get(&partition)).copied()
    }
    pub fn set(&mut self, stream: &str, partition: i32, next: i64) {
        self.0
            .entry(stream.to_string())
            .or_default()
            .insert(partition, next);
    }
    /// Flat list of (stream, partition, next_offset).
    pub fn iter(&self) -> impl Iterator<Item = (&str, i32, i64)> {
        self.0
            .iter()
            .flat_map(|(s, m)| m.iter().map(move |(p, o)| (s.as_str(), *p, *o)))
    }
    pub fn is_empty(&self) -> bool {
        self.0.values().all(|m| m.is_empty())
    }
}

/// A raw record as read from a source, before decoding.
#[derive(Debug, Clone)]
pub struct SourceRecord {
    pub payload: Vec<u8>,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub position: Position,
}

/// What a source yields.
#[derive(Debug)]
pub enum SourceItem {
    /// One record.
    Record(SourceRecord),
    /// The group took these partitions away (Kafka rebalance). The pipeline drops their
    /// untrained buffered events, makes a snapshot covering what it trained durable, commits,
    /// then answers on `ack` so the source can let the revocation proceed.
    Revoked {
        partitions: Vec<(String, i32)>,
        ack: Option<tokio::sync::oneshot::Sender<()>>,
    },
    /// Nothing arrived within the source's poll interval; lets the pipeline do timed work.
    Idle,
}

/// A stream of preference records.
#[async_trait]
pub trait Source: Send {
    /// A short name for logs and metric labels (`synthetic`, `kafka`, `file`).
    fn kind(&self) -> &'static str;
    /// Called once before the first `next`, with the offsets of the snapshot being resumed
    /// (empty on a fresh start).
    async fn start(&mut self, resume: &Offsets) -> Result<()>;
    /// The next item; `None` when the stream has ended (bounded sources). Must be
    /// cancel-safe: the pipeline may drop the future on shutdown.
    async fn next(&mut self) -> Result<Option<SourceItem>>;
    /// Positions up to (not including) these offsets are covered by a durable snapshot.
    async fn commit(&mut self, offsets: &Offsets) -> Result<()>;
    /// Backpressure: stop (true) or restart (false) fetching. Callers keep calling `next`
    /// while paused (it returns `Idle`), so a consumer stays in its group.
    async fn set_paused(&mut self, _paused: bool) -> Result<()> {
        Ok(())
    }
    /// Stop consuming (leave the consumer group); called once at shutdown.
    async fn close(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Where invalid events go, with the reason. Never drops silently.
#[async_trait]
pub trait DeadLetterSink: Send {
    async fn send(&mut self, record: &SourceRecord, reason: &str) -> Result<()>;
    /// Make everything sent so far durable/acknowledged.
    async fn flush(&mut self) -> Result<()>;
}

/// One line of the file dead-letter sink.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeadLetterLine {
    /// Why the event was rejected.
    pub reason: String,
    /// A short category (`missing_field`, `wrong_type`, ...).
    pub category: String,
    pub stream: String,
    pub partition: i32,
    pub offset: i64,
    /// The original bytes, base-16 encoded (they may not be valid UTF-8).
    pub payload_hex: String,
    /// The original bytes as text, when they are valid UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    pub at: String,
}

/// Dead letters as JSON lines in a file (appended; fsynced on flush).
pub struct FileDeadLetters {
    path: PathBuf,
    file: std::fs::File,
}

impl FileDeadLetters {
    pub fn open(path: PathBuf) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("opening dead-letter file {}: {e}", path.display()))?;
        Ok(Self { path, file })
    }
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

#[async_trait]
impl DeadLetterSink for FileDeadLetters {
    async fn send(&mut self, record: &SourceRecord, reason: &str) -> Result<()> {
        let line = DeadLetterLine {
            reason: reason.to_string(),
            category: DecodeError(reason.to_string()).category().to_string(),
            stream: record.position.stream.clone(),
            partition: record.position.partition,
            offset: record.position.offset,
            payload_hex: hex::encode(&record.payload),
            payload: std::str::from_utf8(&record.payload)
                .ok()
                .map(str::to_string),
            at: chrono::Utc::now().to_rfc3339(),
        };
        let mut s = serde_json::to_string(&line)?;
        s.push('\n');
        self.file.write_all(s.as_bytes())?;
        Ok(())
    }
    async fn flush(&mut self) -> Result<()> {
        self.file.flush()?;
        self.file.sync_data()?;
        Ok(())
    }
}
