//! Kafka source (rdkafka consumer group) and dead-letter topic sink.
//!
//! # Consumer
//! A dedicated thread owns the polling of one librdkafka [`BaseConsumer`] (the rebalance
//! callback runs on it) and hands records to the pipeline in batches of what librdkafka has
//! already fetched (up to 512) through a channel; [`Source::next`] reads that channel, so it
//! is cancel-safe.
//!
//! * Offsets are never committed automatically (`enable.auto.commit=false`,
//!   `enable.auto.offset.store=false`): the pipeline calls [`Source::commit`] after the snapshot
//!   covering them is durable. Only partitions this member currently owns are committed, so a
//!   stale snapshot can never move another member's progress backwards.
//! * On assignment each partition starts from `max(snapshot offset, group's committed offset)`
//!   when the latest durable snapshot (the resumed one, or one passed to `commit` since)
//!   recorded it (the snapshot can be ahead of the group after a crash between snapshot and
//!   commit, or a failed commit; the group can be ahead when another member trained the
//!   partition meanwhile), else from the committed offset, else per `auto.offset.reset`.
//! * On revocation the callback queues [`SourceItem::Revoked`] behind the records already
//!   handed over and blocks the rebalance until the pipeline acknowledges (it snapshots and
//!   commits first), at most `revoke_timeout_ms`. Records of revoked partitions still queued
//!   are discarded (they were not covered by any commit; the new owner reads them). If the
//!   pipeline did not answer in time (e.g. it was committing through a broker outage) and the
//!   partitions come back to this member, the assignment waits for that answer first (again at
//!   most `revoke_timeout_ms`), so they resume after what the pipeline trained from them.
//! * Backpressure: at most `queue_capacity` records wait in the hand-over. When it is full
//!   the thread stops taking records (librdkafka's prefetch, bounded by
//!   `queued.max.messages.kbytes`, 16 MiB by default, stays in place); if it stays full for
//!   500 ms (a stalled pipeline) the thread pauses all assigned partitions and keeps polling
//!   (rebalances and heartbeats go on), resuming at half capacity. [`Source::set_paused`]
//!   pauses on the pipeline's behalf the same way.
//! * Broker outages: librdkafka reconnects by itself; errors are counted in
//!   `spoke_source_errors_total{source="kafka"}`, logged at most every few seconds, and the
//!   thread backs off (up to 1 s) between polls. Nothing is committed that was not trained.
//!
//! # Configuration
//! `[kafka.client]` goes verbatim to every librdkafka client spoke creates (SASL/SSL, tuning);
//! keys librdkafka documents as consumer-only (producer-only) are not passed to producers
//! (the consumer), so neither warns. `[kafka.consumer]` and `[kafka.producer]` apply to one
//! kind only and win over `[kafka.client]`. Values are never logged; errors that could echo a
//! value have configured values masked.

use super::{DeadLetterSink, Offsets, Position, Source, SourceItem, SourceRecord};
use crate::metrics::Metrics;
use anyhow::{anyhow, bail, Context as _, Result};
use async_trait::async_trait;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// `[kafka]`
#[derive(Clone, Serialize, Deserialize, PartialEq)]
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
    /// Passed to the consumer only (wins over `client`).
    pub consumer: BTreeMap<String, String>,
    /// Passed to producers only (dead-letter sink, `spoke produce`; wins over `client`).
    pub producer: BTreeMap<String, String>,
    /// Records queued between the polling thread and the pipeline before the consumer pauses.
    pub queue_capacity: usize,
    /// How long a revocation waits for the pipeline to snapshot and commit before the
    /// rebalance goes on anyway (0: 80% of min(session.timeout.ms, max.poll.interval.ms)).
    pub revoke_timeout_ms: u64,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topics: vec!["spoke.preferences".into()],
            group: "spoke".into(),
            dead_letter_topic: "spoke.preferences.dlq".into(),
            client: BTreeMap::new(),
            consumer: BTreeMap::new(),
            producer: BTreeMap::new(),
            queue_capacity: 4096,
            revoke_timeout_ms: 0,
        }
    }
}

/// Debug output masks every librdkafka value (they may hold passwords or keys).
impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = |m: &BTreeMap<String, String>| {
            m.keys()
                .map(|k| format!("{k}=***"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topics", &self.topics)
            .field("group", &self.group)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("client", &keys(&self.client))
            .field("consumer", &keys(&self.consumer))
            .field("producer", &keys(&self.producer))
            .field("queue_capacity", &self.queue_capacity)
            .field("revoke_timeout_ms", &self.revoke_timeout_ms)
            .finish()
    }
}

/// Keys spoke sets itself on the consumer: the offset semantics depend on them.
const OWNED_CONSUMER_KEYS: &[&str] =
    &["group.id", "enable.auto.commit", "enable.auto.offset.store"];

/// Consumer-only librdkafka properties (CONFIGURATION.md, "C" rows) commonly set in a shared
/// table; they are not passed to producers.
const CONSUMER_ONLY: &[&str] = &[
    "group.id",
    "group.instance.id",
    "group.protocol",
    "group.protocol.type",
    "group.remote.assignor",
    "partition.assignment.strategy",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "coordinator.query.interval.ms",
    "max.poll.interval.ms",
    "enable.auto.commit",
    "auto.commit.interval.ms",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "queued.min.messages",
    "queued.max.messages.kbytes",
    "fetch.wait.max.ms",
    "fetch.queue.backoff.ms",
    "fetch.message.max.bytes",
    "max.partition.fetch.bytes",
    "fetch.max.bytes",
    "fetch.min.bytes",
    "fetch.error.backoff.ms",
    "isolation.level",
    "enable.partition.eof",
    "statistics.interval.ms",
    "check.crcs",
    "consume.callback.max.messages",
];

/// Producer-only librdkafka properties ("P" rows); not passed to the consumer.
const PRODUCER_ONLY: &[&str] = &[
    "transactional.id",
    "transaction.timeout.ms",
    "enable.idempotence",
    "enable.gapless.guarantee",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "queue.buffering.max.ms",
    "linger.ms",
    "message.send.max.retries",
    "retries",
    "retry.backoff.ms",
    "queue.buffering.backpressure.threshold",
    "compression.codec",
    "compression.type",
    "compression.level",
    "batch.num.messages",
    "batch.size",
    "delivery.report.only.error",
    "sticky.partitioning.linger.ms",
    "request.required.acks",
    "acks",
    "request.timeout.ms",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "partitioner",
];

/// Mask every configured value that occurs in `text` (librdkafka errors may quote values).
fn mask_values(text: &str, cfg: &KafkaConfig) -> String {
    let mut out = text.to_string();
    for v in cfg
        .client
        .values()
        .chain(cfg.consumer.values())
        .chain(cfg.producer.values())
    {
        if v.len() >= 3 {
            out = out.replace(v.as_str(), "***");
        }
    }
    out
}

fn base_config(cfg: &KafkaConfig) -> Result<ClientConfig> {
    if cfg.brokers.trim().is_empty() {
        bail!("kafka.brokers: must not be empty");
    }
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", cfg.brokers.trim());
    c.set("client.id", "spoke");
    c.set_log_level(RDKafkaLogLevel::Warning);
    Ok(c)
}

/// The effective consumer configuration.
pub fn consumer_config(cfg: &KafkaConfig) -> Result<ClientConfig> {
    if cfg.topics.is_empty() || cfg.topics.iter().any(|t| t.trim().is_empty()) {
        bail!("kafka.topics: needs at least one non-empty topic name");
    }
    if cfg.group.trim().is_empty() {
        bail!("kafka.group: must not be empty");
    }
    let mut c = base_config(cfg)?;
    // Defaults spoke chooses; [kafka.client]/[kafka.consumer] may override them.
    c.set("auto.offset.reset", "earliest");
    c.set("queued.max.messages.kbytes", "16384");
    // librdkafka's own default, set explicitly: a lower one (10,000 was tried) made each
    // partition's fetcher idle until its queue ran low, and ingest wait on broker round trips
    // (19.7k against 360k events/s in `spoke bench ingest`). Memory is bounded by the kbytes.
    c.set("queued.min.messages", "100000");
    c.set("statistics.interval.ms", "5000");
    c.set("enable.partition.eof", "false");
    for (k, v) in &cfg.client {
        if !PRODUCER_ONLY.contains(&k.as_str()) {
            c.set(k, v);
        }
    }
    for (k, v) in &cfg.consumer {
        c.set(k, v);
    }
    for k in OWNED_CONSUMER_KEYS {
        let user = cfg.consumer.get(*k).or_else(|| cfg.client.get(*k));
        if let Some(v) = user {
            let ours = match *k {
                "group.id" => cfg.group.as_str(),
                _ => "false",
            };
            if v != ours {
                tracing::warn!(
                    "kafka client setting `{k}` is ignored: spoke sets it itself (offsets are committed only after a durable snapshot; use kafka.group for the group id)."
                );
            }
        }
    }
    c.set("group.id", cfg.group.trim());
    c.set("enable.auto.commit", "false");
    c.set("enable.auto.offset.store", "false");
    Ok(c)
}

/// The effective producer configuration (dead-letter sink, `spoke produce`).
pub fn producer_config(cfg: &KafkaConfig) -> Result<ClientConfig> {
    let mut c = base_config(cfg)?;
    c.set("acks", "all");
    c.set("linger.ms", "5");
    for (k, v) in &cfg.client {
        if !CONSUMER_ONLY.contains(&k.as_str()) {
            c.set(k, v);
        }
    }
    for (k, v) in &cfg.producer {
        c.set(k, v);
    }
    Ok(c)
}

fn parse_ms(c: &ClientConfig, key: &str, default: u64) -> u64 {
    c.get(key)
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(default)
}

/// Log at most once per `every` (per call site), so outages do not flood the log.
struct RateLimit {
    last: Mutex<Option<Instant>>,
    every: Duration,
}

impl RateLimit {
    fn new(every: Duration) -> Self {
        Self {
            last: Mutex::new(None),
            every,
        }
    }
    fn ready(&self) -> bool {
        let mut l = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if l.is_none_or(|t| now.duration_since(t) >= self.every) {
            *l = Some(now);
            true
        } else {
            false
        }
    }
}

type Tp = (String, i32);

/// Per assigned partition.
struct PartState {
    /// Generation of this assignment; records polled under another one are stale.
    epoch: u64,
    /// Next offset after the last record handed to the pipeline.
    delivered_next: Option<i64>,
}

#[derive(Default)]
struct State {
    parts: HashMap<Tp, PartState>,
    /// Partitions being revoked: still committable until the rebalance completes.
    revoking: HashSet<Tp>,
    epoch: u64,
    /// Offsets of the latest durable snapshot: the resumed one, then each one the pipeline
    /// commits.
    resume: Offsets,
    /// Revocations the pipeline did not acknowledge in time. It still snapshots and commits
    /// what it trained from them when it gets to them; a later assignment of the same
    /// partitions to this member waits for that first, so it starts after those events.
    unacked: Vec<(Vec<Tp>, oneshot::Receiver<()>)>,
}

/// What the polling thread hands to [`KafkaSource::next`].
enum Msg {
    /// Records in poll order, each with the assignment generation it was polled under.
    Records(Vec<(SourceRecord, u64)>),
    Revoked(Vec<Tp>, oneshot::Sender<()>),
    Fatal(String),
}

/// Most records the polling thread gathers into one hand-over.
const HANDOVER_BATCH: usize = 512;
/// How long the hand-over may stay full before the polling thread pauses the partitions (which
/// makes librdkafka drop its prefetched records). A learner that keeps taking records never
/// waits this long, so the prefetch survives; a stalled one does, and polling goes on paused.
const PAUSE_AFTER: Duration = Duration::from_millis(500);

struct Shared {
    /// Unbounded: records are bounded by `queued` (backpressure), control items are few.
    tx: mpsc::UnboundedSender<Msg>,
    /// Records handed over and not yet taken by [`KafkaSource::next`].
    queued: AtomicUsize,
    state: Mutex<State>,
    metrics: Arc<Metrics>,
    closing: AtomicBool,
    stop: AtomicBool,
    /// Pause requested by the pipeline.
    paused_external: AtomicBool,
    /// Pause currently applied to the consumer.
    paused_applied: AtomicBool,
    revoke_timeout: Duration,
    error_log: RateLimit,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count_error(&self, what: &str, err: &dyn std::fmt::Display) {
        self.metrics
            .source_errors
            .with_label_values(&["kafka"])
            .inc();
        if self.error_log.ready() {
            tracing::warn!("Kafka {what}: {err} (retrying; further errors counted in spoke_source_errors_total).");
        }
    }
}

/// Wait until the pipeline acknowledges a revocation, at most until `deadline`. True when it
/// did (or can no longer: the source is closed).
fn wait_ack(ack_rx: &mut oneshot::Receiver<()>, deadline: Instant) -> bool {
    loop {
        match ack_rx.try_recv() {
            Ok(()) | Err(oneshot::error::TryRecvError::Closed) => return true,
            Err(oneshot::error::TryRecvError::Empty) => {}
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// librdkafka callbacks (run on the polling thread, or librdkafka's own threads for logs).
struct Ctx {
    shared: Arc<Shared>,
}

impl ClientContext for Ctx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        log_librdkafka(level, fac, msg);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.shared
            .count_error("client error", &format!("{error}: {reason}"));
    }

    fn stats_raw(&self, statistics: &[u8]) {
        // Lag = high watermark - next offset the pipeline gets, never negative. Parsed leniently:
        // some Kafka-compatible brokers report odd watermarks or omit fields.
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(statistics) else {
            return;
        };
        let st = self.shared.lock();
        for ((topic, p), ps) in &st.parts {
            let part = &v["topics"][topic.as_str()]["partitions"][p.to_string().as_str()];
            let hi = part["hi_offset"].as_i64().unwrap_or(-1);
            let pos = ps
                .delivered_next
                .or_else(|| part["app_offset"].as_i64().filter(|o| *o >= 0))
                .or_else(|| part["committed_offset"].as_i64().filter(|o| *o >= 0));
            if let (true, Some(pos)) = (hi >= 0, pos) {
                self.shared
                    .metrics
                    .kafka_lag
                    .with_label_values(&[topic.as_str(), &p.to_string()])
                    .set((hi - pos).max(0));
            }
        }
    }
}

fn log_librdkafka(level: RDKafkaLogLevel, fac: &str, msg: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(target: "rdkafka", "librdkafka {fac}: {msg}"),
        RDKafkaLogLevel::Warning => tracing::warn!(target: "rdkafka", "librdkafka {fac}: {msg}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "rdkafka", "librdkafka {fac}: {msg}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "rdkafka", "librdkafka {fac}: {msg}"),
    }
}

fn tpl_parts(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

impl ConsumerContext for Ctx {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.on_assign(consumer, tpl, cooperative)
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.on_revoke(consumer, tpl, cooperative)
            }
            other => {
                let code: RDKafkaErrorCode = other.into();
                self.shared
                    .metrics
                    .kafka_rebalances
                    .with_label_values(&["error"])
                    .inc();
                self.shared.count_error("rebalance error", &code);
                // As librdkafka's default handler does: drop the assignment.
                let r = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = r {
                    self.shared
                        .count_error("unassign after a rebalance error", &e);
                }
                let mut st = self.shared.lock();
                st.parts.clear();
            }
        }
    }
}

impl Ctx {
    fn on_assign(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList, coop: bool) {
        let sh = &self.shared;
        sh.metrics
            .kafka_rebalances
            .with_label_values(&["assign"])
            .inc();
        let parts = tpl_parts(tpl);
        // A revocation of some of these partitions the pipeline has not acknowledged yet (it
        // was busy, e.g. committing through a broker outage): let it snapshot and commit what
        // it trained from them first, so they start after it and nothing is trained twice.
        let waiting: Vec<(Vec<Tp>, oneshot::Receiver<()>)> = {
            let mut st = sh.lock();
            let (hit, keep) = std::mem::take(&mut st.unacked)
                .into_iter()
                .partition(|(ps, _)| ps.iter().any(|tp| parts.contains(tp)));
            st.unacked = keep;
            hit
        };
        let deadline = Instant::now() + sh.revoke_timeout;
        for (ps, mut ack_rx) in waiting {
            if !sh.closing.load(Ordering::SeqCst) && !wait_ack(&mut ack_rx, deadline) {
                tracing::warn!(
                    "The pipeline still has not acknowledged the revocation of {ps:?}; assigning again without it (events it trained since its last snapshot may be trained twice)."
                );
            }
        }
        // Partitions the resumed snapshot knows: start at max(snapshot, committed).
        let resume = sh.lock().resume.clone();
        let known: Vec<(Tp, i64)> = parts
            .iter()
            .filter_map(|(t, p)| resume.get(t, *p).map(|o| ((t.clone(), *p), o)))
            .collect();
        let mut starts: Vec<(Tp, i64, &'static str)> = vec![];
        if !known.is_empty() {
            let mut q = TopicPartitionList::new();
            for ((t, p), _) in &known {
                q.add_partition(t, *p);
            }
            let committed = match consumer.committed_offsets(q, Duration::from_secs(10)) {
                Ok(c) => c.to_topic_map(),
                Err(e) => {
                    sh.count_error(
                        "reading committed offsets on assignment (using the snapshot's)",
                        &e,
                    );
                    HashMap::new()
                }
            };
            for ((t, p), snap) in known {
                let com = match committed.get(&(t.clone(), p)) {
                    Some(Offset::Offset(o)) => Some(*o),
                    _ => None,
                };
                let (start, why) = match com {
                    Some(c) if c > snap => (c, "group's committed offset, ahead of the snapshot"),
                    _ => (snap, "snapshot"),
                };
                if let Err(e) = tpl.set_partition_offset(&t, p, Offset::Offset(start)) {
                    sh.count_error("setting a start offset", &e);
                }
                starts.push(((t, p), start, why));
            }
        }
        let r = if coop {
            consumer.incremental_assign(tpl)
        } else {
            consumer.assign(tpl)
        };
        if let Err(e) = r {
            sh.count_error("assigning partitions", &e);
        }
        {
            let mut st = sh.lock();
            for tp in &parts {
                st.epoch += 1;
                let epoch = st.epoch;
                st.revoking.remove(tp);
                st.parts.insert(
                    tp.clone(),
                    PartState {
                        epoch,
                        delivered_next: None,
                    },
                );
            }
        }
        // librdkafka keeps a partition's pause flag across unassign/assign, so set it
        // explicitly either way.
        let r = if sh.paused_applied.load(Ordering::SeqCst) {
            consumer.pause(tpl)
        } else {
            consumer.resume(tpl)
        };
        if let Err(e) = r {
            sh.count_error("pausing/resuming newly assigned partitions", &e);
        }
        let described: Vec<String> = parts
            .iter()
            .map(
                |(t, p)| match starts.iter().find(|(tp, _, _)| tp.0 == *t && tp.1 == *p) {
                    Some((_, o, why)) => format!("{t}/{p}@{o} ({why})"),
                    None => format!("{t}/{p} (committed offset, else auto.offset.reset)"),
                },
            )
            .collect();
        tracing::info!("Kafka partitions assigned: {}.", described.join(", "));
    }

    fn on_revoke(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList, coop: bool) {
        let sh = &self.shared;
        let lost = consumer.assignment_lost();
        sh.metrics
            .kafka_rebalances
            .with_label_values(&[if lost { "lost" } else { "revoke" }])
            .inc();
        let parts = tpl_parts(tpl);
        let closing = sh.closing.load(Ordering::SeqCst);
        // Make records of these partitions still in the hand-over stale (`next` drops them),
        // then queue the revocation behind the records already handed over.
        let ack_rx = {
            let mut st = sh.lock();
            for tp in &parts {
                st.parts.remove(tp);
                if !lost {
                    st.revoking.insert(tp.clone());
                }
            }
            if closing {
                None
            } else {
                let (ack_tx, ack_rx) = oneshot::channel();
                sh.tx
                    .send(Msg::Revoked(parts.clone(), ack_tx))
                    .ok()
                    .map(|()| ack_rx)
            }
        };
        for (t, p) in &parts {
            let _ = sh
                .metrics
                .kafka_lag
                .remove_label_values(&[t.as_str(), &p.to_string()]);
        }
        if let Some(mut ack_rx) = ack_rx {
            tracing::info!(
                "Kafka partitions revoked{}: {:?}; waiting for the pipeline to snapshot and commit.",
                if lost { " (assignment lost)" } else { "" },
                parts
            );
            if !wait_ack(&mut ack_rx, Instant::now() + sh.revoke_timeout) {
                tracing::warn!(
                    "The pipeline did not acknowledge the revocation of {:?} within {:?}; letting the rebalance proceed (if another member gets these partitions, events in flight may be trained again; if this one does, it waits for the acknowledgement first).",
                    parts,
                    sh.revoke_timeout
                );
                sh.lock().unacked.push((parts.clone(), ack_rx));
            }
        }
        let r = if coop {
            consumer.incremental_unassign(tpl)
        } else {
            consumer.unassign()
        };
        if let Err(e) = r {
            sh.count_error("unassigning partitions", &e);
        }
        let mut st = sh.lock();
        for tp in &parts {
            st.revoking.remove(tp);
        }
    }
}

type KConsumer = BaseConsumer<Ctx>;

/// The Kafka consumer-group source.
pub struct KafkaSource {
    cfg: KafkaConfig,
    consumer: Option<Arc<KConsumer>>,
    shared: Arc<Shared>,
    rx: mpsc::UnboundedReceiver<Msg>,
    /// Records taken from the hand-over and not yet delivered, in order (also those held
    /// back while paused: control items are still delivered then).
    ready: VecDeque<(SourceRecord, u64)>,
    thread: Option<std::thread::JoinHandle<()>>,
    poll_interval: Duration,
}

/// Build the Kafka consumer-group source.
pub fn build_source(
    cfg: &KafkaConfig,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Box<dyn super::Source>> {
    Ok(Box::new(KafkaSource::new(cfg, metrics)?))
}

impl KafkaSource {
    pub fn new(cfg: &KafkaConfig, metrics: Arc<Metrics>) -> Result<Self> {
        let cc = consumer_config(cfg)?;
        let session = parse_ms(&cc, "session.timeout.ms", 45_000);
        let max_poll = parse_ms(&cc, "max.poll.interval.ms", 300_000);
        let revoke_timeout = if cfg.revoke_timeout_ms > 0 {
            Duration::from_millis(cfg.revoke_timeout_ms)
        } else {
            Duration::from_millis(session.min(max_poll) * 4 / 5)
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            tx,
            queued: AtomicUsize::new(0),
            state: Mutex::new(State::default()),
            metrics,
            closing: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            paused_external: AtomicBool::new(false),
            paused_applied: AtomicBool::new(false),
            revoke_timeout,
            error_log: RateLimit::new(Duration::from_secs(5)),
        });
        let consumer: KConsumer = cc
            .create_with_context(Ctx {
                shared: shared.clone(),
            })
            .map_err(|e| {
                anyhow!(
                    "creating the Kafka consumer (kafka.brokers/kafka.client): {}",
                    mask_values(&e.to_string(), cfg)
                )
            })?;
        Ok(Self {
            cfg: cfg.clone(),
            consumer: Some(Arc::new(consumer)),
            shared,
            rx,
            ready: VecDeque::new(),
            thread: None,
            poll_interval: Duration::from_millis(100),
        })
    }

    fn consumer(&self) -> Result<&Arc<KConsumer>> {
        self.consumer
            .as_ref()
            .ok_or_else(|| anyhow!("the Kafka consumer is closed"))
    }

    /// Partitions currently owned (assigned or being revoked).
    pub fn owned_partitions(&self) -> Vec<(String, i32)> {
        let st = self.shared.lock();
        let mut v: Vec<Tp> = st.parts.keys().chain(st.revoking.iter()).cloned().collect();
        v.sort();
        v.dedup();
        v
    }

    /// Records the polling thread has handed over that [`Source::next`] has not taken yet
    /// (at most `kafka.queue_capacity`).
    pub fn queued_records(&self) -> usize {
        self.shared.queued.load(Ordering::SeqCst)
    }

    /// A record still belongs to the current assignment of its partition.
    fn fresh(&self, r: &SourceRecord, epoch: u64) -> bool {
        let mut st = self.shared.lock();
        match st
            .parts
            .get_mut(&(r.position.stream.clone(), r.position.partition))
        {
            Some(ps) if ps.epoch == epoch => {
                ps.delivered_next = Some(r.position.offset + 1);
                true
            }
            _ => false,
        }
    }

    /// Take one message off the hand-over: records join `ready`; a control item is returned.
    fn take(&mut self, m: Msg) -> Result<Option<SourceItem>> {
        Ok(match m {
            Msg::Records(v) => {
                self.shared.queued.fetch_sub(v.len(), Ordering::SeqCst);
                self.ready.extend(v);
                None
            }
            Msg::Revoked(partitions, ack) => Some(SourceItem::Revoked {
                partitions,
                ack: Some(ack),
            }),
            Msg::Fatal(e) => bail!("Kafka consumer failed: {e}"),
        })
    }

    /// The next ready record that still belongs to its partition's current assignment.
    fn next_ready(&mut self) -> Option<SourceItem> {
        while let Some((r, epoch)) = self.ready.pop_front() {
            if self.fresh(&r, epoch) {
                return Some(SourceItem::Record(r));
            }
        }
        None
    }
}

/// An owned copy of a polled message (payload, key, headers, position).
pub fn to_record(m: &rdkafka::message::BorrowedMessage<'_>) -> SourceRecord {
    let headers = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|x| (x.key.to_string(), x.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default();
    SourceRecord {
        payload: m.payload().unwrap_or_default().to_vec(),
        key: m.key().map(<[u8]>::to_vec),
        headers,
        position: Position {
            stream: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
        },
    }
}

fn poll_loop(consumer: Arc<KConsumer>, shared: Arc<Shared>, capacity: usize) {
    let mut backoff = Duration::ZERO;
    // Paused for a full hand-over (as opposed to on the pipeline's behalf).
    let mut internal = false;
    let mut full_since: Option<Instant> = None;
    'outer: while !shared.stop.load(Ordering::SeqCst) {
        // Backpressure, in records: when the hand-over is full, stop taking records and wait
        // for the pipeline; pause the partitions only if it stays full for PAUSE_AFTER, and
        // resume once it is down to half.
        let queued = shared.queued.load(Ordering::SeqCst);
        let room = capacity.saturating_sub(queued);
        if room == 0 {
            let since = *full_since.get_or_insert_with(Instant::now);
            if !internal && since.elapsed() >= PAUSE_AFTER {
                internal = true;
            }
        } else {
            full_since = None;
            if internal && queued <= capacity / 2 {
                internal = false;
            }
        }
        let want = internal || shared.paused_external.load(Ordering::SeqCst);
        if want != shared.paused_applied.load(Ordering::SeqCst) {
            match consumer.assignment() {
                Ok(a) => {
                    let r = if want {
                        consumer.pause(&a)
                    } else {
                        consumer.resume(&a)
                    };
                    match r {
                        Ok(()) => {
                            shared.paused_applied.store(want, Ordering::SeqCst);
                            shared.metrics.kafka_paused.set(i64::from(
                                shared.paused_external.load(Ordering::SeqCst) || want,
                            ));
                        }
                        Err(e) => shared.count_error("pausing/resuming partitions", &e),
                    }
                }
                Err(e) => shared.count_error("reading the assignment", &e),
            }
        }
        if room == 0 && !internal {
            // Full, not paused yet: the pipeline usually takes records within milliseconds.
            // (Not polling meanwhile delays rebalance callbacks by at most PAUSE_AFTER.)
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        // Gather up to a batch: wait for the first record, then take what is already fetched.
        // While paused for a full hand-over, come back soon to resume once it drained.
        let limit = room.clamp(1, HANDOVER_BATCH);
        let mut batch: Vec<(SourceRecord, u64)> = Vec::new();
        let mut failure = None;
        let mut wait = Duration::from_millis(if internal { 5 } else { 100 });
        while batch.len() < limit {
            match consumer.poll(wait) {
                None => break,
                Some(Ok(m)) => {
                    let key = (m.topic().to_string(), m.partition());
                    // Not (or no longer) ours: the owner reads it.
                    if let Some(epoch) = shared.lock().parts.get(&key).map(|ps| ps.epoch) {
                        batch.push((to_record(&m), epoch));
                    }
                }
                Some(Err(e)) => {
                    failure = Some(e);
                    break;
                }
            }
            wait = Duration::ZERO;
        }
        if !batch.is_empty() {
            backoff = Duration::ZERO;
            shared.queued.fetch_add(batch.len(), Ordering::SeqCst);
            if shared.tx.send(Msg::Records(batch)).is_err() {
                break 'outer; // the source was closed
            }
        }
        match failure {
            None => backoff = Duration::ZERO,
            Some(e) => {
                if matches!(e, KafkaError::MessageConsumptionFatal(_)) {
                    let reason = consumer
                        .client()
                        .fatal_error()
                        .map(|(c, s)| format!("{c}: {s}"))
                        .unwrap_or_else(|| e.to_string());
                    let _ = shared.tx.send(Msg::Fatal(reason));
                    break;
                }
                shared.count_error("consume error", &e);
                backoff = (backoff * 2).clamp(Duration::from_millis(50), Duration::from_secs(1));
                std::thread::sleep(backoff);
            }
        }
    }
    // Revocations from here on do not wait for the pipeline; dropping the last reference
    // to the consumer leaves the group (rdkafka closes the queue and polls until closed).
    shared.closing.store(true, Ordering::SeqCst);
}

#[async_trait]
impl Source for KafkaSource {
    fn kind(&self) -> &'static str {
        "kafka"
    }

    async fn start(&mut self, resume: &Offsets) -> Result<()> {
        if self.thread.is_some() {
            bail!("the Kafka source was started twice");
        }
        self.shared.lock().resume = resume.clone();
        let consumer = self.consumer()?.clone();
        let topics: Vec<&str> = self.cfg.topics.iter().map(|t| t.trim()).collect();
        consumer
            .subscribe(&topics)
            .with_context(|| format!("subscribing to kafka.topics {:?}", self.cfg.topics))?;
        tracing::info!(
            "Kafka consumer: group {:?}, topics {:?}, brokers {}.",
            self.cfg.group,
            self.cfg.topics,
            self.cfg.brokers
        );
        let shared = self.shared.clone();
        let cap = self.cfg.queue_capacity.max(1);
        self.thread = Some(
            std::thread::Builder::new()
                .name("spoke-kafka-poll".into())
                .spawn(move || poll_loop(consumer, shared, cap))
                .context("spawning the Kafka polling thread")?,
        );
        Ok(())
    }

    async fn next(&mut self) -> Result<Option<SourceItem>> {
        loop {
            if self.shared.paused_external.load(Ordering::SeqCst) {
                // Paused: hold records back, but still deliver revocations (the pipeline must
                // answer them) and failures.
                while let Ok(m) = self.rx.try_recv() {
                    if let Some(item) = self.take(m)? {
                        return Ok(Some(item));
                    }
                }
                tokio::time::sleep(self.poll_interval).await;
                return Ok(Some(SourceItem::Idle));
            }
            if let Some(item) = self.next_ready() {
                return Ok(Some(item));
            }
            // Fast path: a hand-over is usually waiting; only arm a timer when none is.
            if let Ok(m) = self.rx.try_recv() {
                if let Some(item) = self.take(m)? {
                    return Ok(Some(item));
                }
                continue;
            }
            match tokio::time::timeout(self.poll_interval, self.rx.recv()).await {
                Err(_) => return Ok(Some(SourceItem::Idle)),
                Ok(None) => {
                    if self.thread.is_none() {
                        bail!("the Kafka source was not started");
                    }
                    bail!("the Kafka polling thread stopped unexpectedly");
                }
                Ok(Some(m)) => {
                    if let Some(item) = self.take(m)? {
                        return Ok(Some(item));
                    }
                }
            }
        }
    }

    async fn commit(&mut self, offsets: &Offsets) -> Result<()> {
        let consumer = self.consumer()?.clone();
        let mut tpl = TopicPartitionList::new();
        let mut entries = vec![];
        let mut skipped = vec![];
        {
            let mut st = self.shared.lock();
            for (t, p, o) in offsets.iter() {
                // These offsets are in a durable snapshot now: if the commit below fails
                // (e.g. the assignment was lost in an outage), a later assignment of the
                // partition still starts no earlier than this.
                if st.resume.get(t, p).is_none_or(|r| r < o) {
                    st.resume.set(t, p, o);
                }
                let tp = (t.to_string(), p);
                if st.parts.contains_key(&tp) || st.revoking.contains(&tp) {
                    tpl.add_partition_offset(t, p, Offset::Offset(o))
                        .with_context(|| format!("commit offset {t}/{p}@{o}"))?;
                    entries.push((t.to_string(), p, o));
                } else {
                    skipped.push(format!("{t}/{p}"));
                }
            }
        }
        if !skipped.is_empty() {
            tracing::debug!("Not committing partitions this member does not own: {skipped:?}.");
        }
        if entries.is_empty() {
            return Ok(());
        }
        let mut delay = Duration::from_millis(100);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let c = consumer.clone();
            let t = tpl.clone();
            let r = tokio::task::spawn_blocking(move || c.commit(&t, CommitMode::Sync))
                .await
                .context("Kafka commit task panicked")?;
            match r {
                Ok(()) => break,
                Err(e) if attempt < 5 => {
                    self.shared.count_error("offset commit", &e);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) => {
                    // The snapshot holds these offsets (a restart resumes from it); the group
                    // catches up at the next commit.
                    self.shared
                        .count_error("offset commit (giving up for now)", &e);
                    tracing::warn!("Kafka offset commit failed after {attempt} attempts: {e}; the durable snapshot still records the offsets.");
                    return Ok(());
                }
            }
        }
        for (t, p, o) in entries {
            self.shared
                .metrics
                .kafka_committed_offset
                .with_label_values(&[t.as_str(), &p.to_string()])
                .set(o);
        }
        Ok(())
    }

    async fn set_paused(&mut self, paused: bool) -> Result<()> {
        self.shared.paused_external.store(paused, Ordering::SeqCst);
        self.shared.metrics.kafka_paused.set(i64::from(
            paused || self.shared.paused_applied.load(Ordering::SeqCst),
        ));
        Ok(())
    }

    async fn close(&mut self) -> Result<()> {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.shared.stop.store(true, Ordering::SeqCst);
        // Unblock a revocation that may wait for an answer nobody will give.
        self.rx.close();
        while self.rx.try_recv().is_ok() {}
        self.ready.clear();
        self.shared.queued.store(0, Ordering::SeqCst);
        if let Some(h) = self.thread.take() {
            tokio::task::spawn_blocking(move || h.join())
                .await
                .context("joining the Kafka polling thread")?
                .map_err(|_| anyhow!("the Kafka polling thread panicked"))?;
        }
        if let Some(c) = self.consumer.take() {
            tokio::task::spawn_blocking(move || drop(c))
                .await
                .context("closing the Kafka consumer")?;
        }
        Ok(())
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

/// Producer callbacks: librdkafka logs go to tracing.
pub struct ProducerCtx;

impl ClientContext for ProducerCtx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, msg: &str) {
        log_librdkafka(level, fac, msg);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(target: "rdkafka", "Kafka producer: {error}: {reason}");
    }
    fn stats_raw(&self, _statistics: &[u8]) {}
}

/// Create a producer from the `[kafka]` settings.
pub fn create_producer(cfg: &KafkaConfig) -> Result<FutureProducer<ProducerCtx>> {
    producer_config(cfg)?
        .create_with_context(ProducerCtx)
        .map_err(|e| {
            anyhow!(
                "creating the Kafka producer (kafka.brokers/kafka.client): {}",
                mask_values(&e.to_string(), cfg)
            )
        })
}

/// Enqueue one record, waiting while librdkafka's queue is full.
pub async fn send_with_retry(
    producer: &FutureProducer<ProducerCtx>,
    mut record: FutureRecord<'_, [u8], [u8]>,
) -> Result<DeliveryFuture> {
    loop {
        match producer.send_result(record) {
            Ok(f) => return Ok(f),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, r)) => bail!("producing to topic {}: {e}", r.topic),
        }
    }
}

/// Wait for one delivery report.
pub async fn await_delivery(f: DeliveryFuture, topic: &str) -> Result<(i32, i64)> {
    match f.await {
        Ok(Ok(d)) => Ok((d.partition, d.offset)),
        Ok(Err((e, _))) => bail!("delivery to topic {topic} failed: {e}"),
        Err(_) => bail!("delivery to topic {topic} was cancelled (producer closed)"),
    }
}

/// Header names on dead-lettered records.
pub const HEADER_ERROR: &str = "spoke.error";
pub const HEADER_TOPIC: &str = "spoke.source.topic";
pub const HEADER_PARTITION: &str = "spoke.source.partition";
pub const HEADER_OFFSET: &str = "spoke.source.offset";

/// Dead letters to a Kafka topic: the original key, value and headers, plus `spoke.error`
/// (the reason) and `spoke.source.{topic,partition,offset}`.
pub struct KafkaDeadLetters {
    producer: FutureProducer<ProducerCtx>,
    topic: String,
    pending: VecDeque<DeliveryFuture>,
    metrics: Arc<Metrics>,
}

/// Build the dead-letter topic sink.
pub fn build_dead_letters(
    cfg: &KafkaConfig,
    metrics: Arc<Metrics>,
) -> anyhow::Result<Box<dyn super::DeadLetterSink>> {
    Ok(Box::new(KafkaDeadLetters::new(cfg, metrics)?))
}

impl KafkaDeadLetters {
    pub fn new(cfg: &KafkaConfig, metrics: Arc<Metrics>) -> Result<Self> {
        if cfg.dead_letter_topic.trim().is_empty() {
            bail!("kafka.dead_letter_topic: must not be empty for the Kafka dead-letter sink");
        }
        Ok(Self {
            producer: create_producer(cfg)?,
            topic: cfg.dead_letter_topic.trim().to_string(),
            pending: VecDeque::new(),
            metrics,
        })
    }
}

#[async_trait]
impl DeadLetterSink for KafkaDeadLetters {
    async fn send(&mut self, record: &SourceRecord, reason: &str) -> Result<()> {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len() + 4);
        for (k, v) in &record.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let partition = record.position.partition.to_string();
        let offset = record.position.offset.to_string();
        for (k, v) in [
            (HEADER_ERROR, reason),
            (HEADER_TOPIC, record.position.stream.as_str()),
            (HEADER_PARTITION, partition.as_str()),
            (HEADER_OFFSET, offset.as_str()),
        ] {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut fr: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic)
            .payload(record.payload.as_slice())
            .headers(headers);
        if let Some(k) = &record.key {
            fr = fr.key(k.as_slice());
        }
        let f = send_with_retry(&self.producer, fr).await?;
        self.pending.push_back(f);
        // Bound the number of outstanding deliveries.
        if self.pending.len() >= 10_000 {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        while let Some(f) = self.pending.pop_front() {
            if let Err(e) = await_delivery(f, &self.topic).await {
                self.metrics
                    .source_errors
                    .with_label_values(&["kafka"])
                    .inc();
                return Err(e.context("dead-letter topic (kafka.dead_letter_topic)"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_masks_client_values() {
        let mut cfg = KafkaConfig::default();
        cfg.client
            .insert("sasl.password".into(), "hunter2-secret".into());
        let s = format!("{cfg:?}");
        assert!(s.contains("sasl.password=***"), "{s}");
        assert!(!s.contains("hunter2"), "{s}");
        assert_eq!(
            mask_values("bad value hunter2-secret for x", &cfg),
            "bad value *** for x"
        );
    }

    #[test]
    fn consumer_config_owns_offset_semantics() {
        let mut cfg = KafkaConfig::default();
        cfg.client
            .insert("enable.auto.commit".into(), "true".into());
        cfg.client
            .insert("session.timeout.ms".into(), "6000".into());
        cfg.client.insert("linger.ms".into(), "50".into());
        cfg.consumer
            .insert("auto.offset.reset".into(), "latest".into());
        let c = consumer_config(&cfg).unwrap();
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(c.get("group.id"), Some("spoke"));
        assert_eq!(c.get("session.timeout.ms"), Some("6000"));
        assert_eq!(c.get("auto.offset.reset"), Some("latest"));
        assert_eq!(c.get("linger.ms"), None);
        assert_eq!(c.get("queued.max.messages.kbytes"), Some("16384"));
        let p = producer_config(&cfg).unwrap();
        assert_eq!(p.get("session.timeout.ms"), None);
        assert_eq!(p.get("linger.ms"), Some("50"));
        assert_eq!(p.get("acks"), Some("all"));
    }

    #[test]
    fn config_errors_name_the_key() {
        let cfg = KafkaConfig {
            group: " ".into(),
            ..KafkaConfig::default()
        };
        let e = consumer_config(&cfg).unwrap_err().to_string();
        assert!(e.contains("kafka.group"), "{e}");
        let mut cfg = KafkaConfig::default();
        cfg.topics.clear();
        let e = consumer_config(&cfg).unwrap_err().to_string();
        assert!(e.contains("kafka.topics"), "{e}");
        let cfg = KafkaConfig {
            brokers: String::new(),
            ..KafkaConfig::default()
        };
        let e = producer_config(&cfg).unwrap_err().to_string();
        assert!(e.contains("kafka.brokers"), "{e}");
    }
}
