//! A JSON-lines file as a bounded source (one event per line). Position: (path, 0, line index).

use super::{Offsets, Position, Source, SourceItem, SourceRecord};
use anyhow::{Context, Result};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::io::BufRead;
use std::path::PathBuf;

/// `[source.file]`
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    /// Path of a JSON-lines file of events.
    pub path: Option<PathBuf>,
}

pub struct FileSource {
    path: PathBuf,
    reader: Option<std::io::BufReader<std::fs::File>>,
    next: i64,
    skip_to: i64,
}

impl FileSource {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            reader: None,
            next: 0,
            skip_to: 0,
        }
    }
    fn stream(&self) -> String {
        self.path.display().to_string()
    }
}

#[async_trait]
impl Source for FileSource {
    fn kind(&self) -> &'static str {
        "file"
    }
    async fn start(&mut self, resume: &Offsets) -> Result<()> {
        let f = std::fs::File::open(&self.path)
            .with_context(|| format!("source.file.path: cannot open {}", self.path.display()))?;
        self.reader = Some(std::io::BufReader::new(f));
        self.skip_to = resume.get(&self.stream(), 0).unwrap_or(0);
        Ok(())
    }
    async fn next(&mut self) -> Result<Option<SourceItem>> {
        let stream = self.stream();
        let reader = self.reader.as_mut().context("file source not started")?;
        loop {
            // Raw bytes: lines that are not valid UTF-8 reach the decoder (and the dead-letter
            // sink) exactly as they are.
            let mut payload = Vec::new();
            if reader.read_until(b'\n', &mut payload)? == 0 {
                return Ok(None);
            }
            while payload.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                payload.pop();
            }
            let i = self.next;
            self.next += 1;
            if i < self.skip_to || payload.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            return Ok(Some(SourceItem::Record(SourceRecord {
                payload,
                key: None,
                headers: vec![],
                position: Position {
                    stream,
                    partition: 0,
                    offset: i,
                },
            })));
        }
    }
    async fn commit(&mut self, _offsets: &Offsets) -> Result<()> {
        Ok(())
    }
}
