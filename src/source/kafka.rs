//! Kafka source (rdkafka consumer group) and dead-letter topic sink.
//! (Filled in by the Kafka ingestion work; the config shape is fixed here.)

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `[kafka]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port...]`.
    pub brokers: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// Consumer group id.
    pub group: String,
    /// Topic for events that fail validation (empty: no dead-letter topic, use the file).
    pub dead_letter_topic: String,
    /// Passed verbatim to librdkafka (SASL/SSL and tuning); values never logged.
    pub client: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topics: vec!["spoke.preferences".into()],
            group: "spoke".into(),
            dead_letter_topic: "spoke.preferences.dlq".into(),
            client: BTreeMap::new(),
        }
    }
}

use crate::metrics::Metrics;
use std::sync::Arc;

/// Build the Kafka consumer-group source.
pub fn build_source(
    _cfg: &KafkaConfig,
    _metrics: Arc<Metrics>,
) -> anyhow::Result<Box<dyn super::Source>> {
    anyhow::bail!("the Kafka source is not implemented yet")
}

/// Build the dead-letter topic sink.
pub fn build_dead_letters(
    _cfg: &KafkaConfig,
    _metrics: Arc<Metrics>,
) -> anyhow::Result<Box<dyn super::DeadLetterSink>> {
    anyhow::bail!("the Kafka dead-letter sink is not implemented yet")
}
