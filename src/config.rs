//! Configuration: `configs/default.toml` (also built in), a `--config FILE`, and
//! `--set dotted.key=value` overrides, in that order. Unknown keys and bad values are errors
//! that name the key.

use crate::learner::replay::ReplayConfig;
use crate::link::LinkConfig;
use crate::model::ModelConfig;
use crate::objective::ObjectiveConfig;
use crate::optim::OptimConfig;
use crate::promote::PromoteConfig;
use crate::snapshot::SnapshotConfig;
use crate::source::file::FileConfig;
use crate::source::kafka::KafkaConfig;
use crate::source::synthetic::SyntheticConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The embedded default configuration (same file as `configs/default.toml`).
pub const DEFAULT_TOML: &str = include_str!("../configs/default.toml");

/// Which source feeds the pipeline.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    #[default]
    Synthetic,
    Kafka,
    File,
}

/// `[source]`
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    pub kind: SourceKind,
    pub synthetic: SyntheticConfig,
    pub file: FileConfig,
}

/// `[run]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Where snapshots, dead letters and the tiny model live.
    pub data_dir: PathBuf,
    /// Stop after this many consumed records, valid or not (0: run until stopped).
    pub max_events: u64,
    /// Seed of the learner (initialisation, dropout, shuffling).
    pub seed: u64,
    /// Preference pairs per minibatch.
    pub batch_size: usize,
    /// Share of events (by hash of event_id) held out from training for evaluation.
    pub holdout_fraction: f64,
    /// How many held-out events are kept for evaluation (most recent).
    pub holdout_capacity: usize,
    /// Records buffered between source and learner before the source is paused.
    pub buffer_capacity: usize,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./spoke-data"),
            max_events: 4000,
            seed: 0,
            batch_size: 16,
            holdout_fraction: 0.1,
            holdout_capacity: 1000,
            buffer_capacity: 4096,
        }
    }
}

/// `[dead_letter]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterConfig {
    /// JSON-lines file for rejected events (relative paths are under the data directory).
    pub path: PathBuf,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("dead-letters.jsonl"),
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve Prometheus metrics at http://ADDR/metrics (empty: off).
    pub addr: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:9464".into(),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub run: RunConfig,
    pub source: SourceConfig,
    pub kafka: KafkaConfig,
    pub dead_letter: DeadLetterConfig,
    pub model: ModelConfig,
    pub objective: ObjectiveConfig,
    pub link: LinkConfig,
    pub optim: OptimConfig,
    pub snapshot: SnapshotConfig,
    pub promote: PromoteConfig,
    pub replay: ReplayConfig,
    pub metrics: MetricsConfig,
}

fn parse_toml(text: &str, origin: &str) -> Result<toml::Table> {
    text.parse::<toml::Table>()
        .map_err(|e| anyhow::anyhow!("{origin}: invalid TOML: {e}"))
}

/// Merge `over` into `base` (tables recursively, everything else replaced).
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Parse a `--set` value: TOML syntax if it parses (numbers, booleans, arrays, quoted
/// strings), else a bare string.
fn parse_value(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(raw.into())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

/// Apply one `dotted.key=value` override.
pub fn apply_set(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, raw) = assignment
        .split_once('=')
        .with_context(|| format!("--set {assignment:?}: expected dotted.key=value"))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(|p| p.is_empty()) {
        bail!("--set {assignment:?}: bad key {key:?}");
    }
    let parts: Vec<&str> = key.split('.').collect();
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        let entry = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match entry {
            toml::Value::Table(t) => t,
            _ => bail!("--set {assignment:?}: `{p}` is not a table"),
        };
    }
    cur.insert(parts[parts.len() - 1].to_string(), parse_value(raw.trim()));
    Ok(())
}

impl Config {
    /// Load: built-in defaults, then `file` (if any), then `sets`, then validation.
    pub fn load(file: Option<&Path>, sets: &[String]) -> Result<Config> {
        let mut table = parse_toml(DEFAULT_TOML, "built-in default config")?;
        if let Some(f) = file {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("reading config file {}", f.display()))?;
            merge(&mut table, parse_toml(&text, &f.display().to_string())?);
        }
        for s in sets {
            apply_set(&mut table, s)?;
        }
        Self::from_table(table)
    }

    /// Deserialize and validate; errors name the dotted key.
    pub fn from_table(table: toml::Table) -> Result<Config> {
        let de = toml::Value::Table(table);
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            anyhow::anyhow!("config key `{path}`: {}", e.inner())
        })?;
        cfg.validate()
            .map_err(|e| anyhow::anyhow!("config key {e}"))?;
        Ok(cfg)
    }

    /// Check values that types alone do not constrain. Errors start with the dotted key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let r = &self.run;
        if r.batch_size == 0 {
            return Err("run.batch_size: must be >= 1".into());
        }
        if !(0.0..1.0).contains(&r.holdout_fraction) {
            return Err(format!(
                "run.holdout_fraction: must be in [0, 1), got {}",
                r.holdout_fraction
            ));
        }
        if r.buffer_capacity < r.batch_size {
            return Err(format!(
                "run.buffer_capacity: must be >= run.batch_size ({}), got {}",
                r.batch_size, r.buffer_capacity
            ));
        }
        self.source.synthetic.validate()?;
        if self.source.kind == SourceKind::File && self.source.file.path.is_none() {
            return Err("source.file.path: required when source.kind = \"file\"".into());
        }
        if self.source.kind == SourceKind::Kafka {
            if self.kafka.brokers.trim().is_empty() {
                return Err("kafka.brokers: must not be empty".into());
            }
            if self.kafka.topics.is_empty() {
                return Err("kafka.topics: at least one topic is required".into());
            }
            if self.kafka.group.trim().is_empty() {
                return Err("kafka.group: must not be empty".into());
            }
        }
        self.optim.validate()?;
        self.promote.validate()?;
        self.replay.validate()?;
        self.objective.validate()?;
        if self.link.bins < 4 {
            return Err(format!("link.bins: must be >= 4, got {}", self.link.bins));
        }
        if !(self.link.forgetting > 0.0 && self.link.forgetting <= 1.0) {
            return Err(format!(
                "link.forgetting: must be in (0, 1], got {}",
                self.link.forgetting
            ));
        }
        if self.snapshot.every_steps == 0 {
            return Err("snapshot.every_steps: must be >= 1".into());
        }
        if !self.metrics.addr.is_empty()
            && self.metrics.addr.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(format!(
                "metrics.addr: not a HOST:PORT socket address: {:?}",
                self.metrics.addr
            ));
        }
        Ok(())
    }

    /// Hex SHA-256 of the canonical JSON form (recorded in snapshot manifests).
    pub fn hash(&self) -> String {
        crate::util::sha256_hex(serde_json::to_string(self).unwrap_or_default().as_bytes())
    }

    /// A path under the data directory (absolute paths are kept).
    pub fn data_path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.run.data_dir.join(p)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_loads() {
        let c = Config::load(None, &[]).unwrap();
        assert_eq!(c.metrics.addr, "127.0.0.1:9464");
    }

    #[test]
    fn set_overrides_and_types() {
        let c = Config::load(
            None,
            &["run.max_events=77".into(), "objective.kind=rspo".into()],
        )
        .unwrap();
        assert_eq!(c.run.max_events, 77);
        assert_eq!(c.objective.kind, crate::objective::ObjectiveKind::Rspo);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::load(None, &["run.max_eventz=1".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("run") && e.contains("max_eventz"), "{e}");
    }

    #[test]
    fn bad_value_is_named() {
        let e = Config::load(None, &["run.batch_size=-3".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("run.batch_size"), "{e}");
        let e = Config::load(None, &["run.holdout_fraction=2".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("run.holdout_fraction"), "{e}");
        let e = Config::load(None, &["objective.kind=ppo".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("objective.kind"), "{e}");
    }
}
