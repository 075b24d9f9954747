//! Shared helpers of the Kafka tests: a real broker, topics, producing with the real `spoke`
//! binary, reading topics back, and reading the per-event accounting of a snapshot chain.
//!
//! Broker: `SPOKE_TEST_BROKERS=host:port` (set by the test command, e.g. `.ci/run`, after
//! `scripts/kafka-broker.sh start`) is used when present; otherwise each test starts a private
//! tansu broker through `scripts/kafka-broker.sh` (installing it on first use) and stops it
//! when the test ends, so plain `cargo test` works too. Tests that freeze the broker always
//! start their own. Topic and group names are unique per test.
#![allow(dead_code)]

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const SPOKE: &str = env!("CARGO_BIN_EXE_spoke");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Log spoke's tracing output in tests (`SPOKE_LOG=debug` for more).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPOKE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A broker to test against.
pub struct Broker {
    pub addr: String,
    /// State dir of a broker this test started (stopped on drop).
    own: Option<tempfile::TempDir>,
}

impl Broker {
    /// The shared broker of the test command, or a private one.
    pub fn get() -> Broker {
        match std::env::var("SPOKE_TEST_BROKERS") {
            Ok(a) if !a.trim().is_empty() => Broker {
                addr: a.trim().to_string(),
                own: None,
            },
            _ => Broker::private(),
        }
    }

    /// A broker of this test alone, started through scripts/kafka-broker.sh.
    pub fn private() -> Broker {
        let dir = tempfile::Builder::new()
            .prefix("spoke-broker-")
            .tempdir()
            .expect("tempdir");
        let out = Command::new(repo().join("scripts/kafka-broker.sh"))
            .arg("start")
            .arg(dir.path())
            .env("SPOKE_BROKER_WATCH_PID", std::process::id().to_string())
            .output()
            .expect("running scripts/kafka-broker.sh");
        assert!(
            out.status.success(),
            "scripts/kafka-broker.sh start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let addr = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(addr.contains(':'), "unexpected broker address {addr:?}");
        Broker {
            addr,
            own: Some(dir),
        }
    }

    /// Pid of a broker this test started.
    pub fn pid(&self) -> Option<i32> {
        let dir = self.own.as_ref()?;
        std::fs::read_to_string(dir.path().join("broker.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(dir) = &self.own {
            let _ = Command::new(repo().join("scripts/kafka-broker.sh"))
                .arg("stop")
                .arg(dir.path())
                .status();
        }
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name unique to this test run.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        % 1_000_000_000;
    format!("{prefix}-{}-{t}-{n}", std::process::id())
}

/// Test-friendly consumer timings (tansu's group joins wait for the rebalance timeout).
pub const SESSION_TIMEOUT_MS: u64 = 6000;
pub const MAX_POLL_INTERVAL_MS: u64 = 10000;

/// A Kafka source configuration for tests: one topic and group, with the short group timeouts
/// above so joins and expiries happen in seconds.
pub fn source_config(addr: &str, topic: &str, group: &str) -> spoke::source::kafka::KafkaConfig {
    let mut c = spoke::source::kafka::KafkaConfig {
        brokers: addr.into(),
        topics: vec![topic.into()],
        group: group.into(),
        dead_letter_topic: String::new(),
        ..Default::default()
    };
    c.client
        .insert("session.timeout.ms".into(), SESSION_TIMEOUT_MS.to_string());
    c.client.insert(
        "max.poll.interval.ms".into(),
        MAX_POLL_INTERVAL_MS.to_string(),
    );
    c
}

/// Offsets per partition, in the order the records came.
pub fn by_partition(records: &[spoke::source::SourceRecord]) -> BTreeMap<i32, Vec<i64>> {
    let mut m: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    for r in records {
        m.entry(r.position.partition)
            .or_default()
            .push(r.position.offset);
    }
    m
}

pub fn client_config(addr: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", addr);
    c
}

/// Create a topic (waits until its metadata shows every partition).
pub fn create_topic(addr: &str, name: &str, partitions: i32) {
    // On a thread of its own: callers may be inside a tokio runtime.
    let (a, n) = (addr.to_string(), name.to_string());
    std::thread::spawn(move || create_topic_blocking(&a, &n, partitions))
        .join()
        .expect("create_topic panicked");
}

fn create_topic_blocking(addr: &str, name: &str, partitions: i32) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let admin: AdminClient<DefaultClientContext> = client_config(addr).create().unwrap();
    let r = rt.block_on(admin.create_topics(
        &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
    ));
    let r = r.expect("create_topics");
    for x in r {
        if let Err((t, e)) = x {
            panic!("creating topic {t}: {e}");
        }
    }
    let c: BaseConsumer = client_config(addr).create().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(m) = c.fetch_metadata(Some(name), Duration::from_secs(5)) {
            if m.topics()
                .iter()
                .any(|t| t.name() == name && t.partitions().len() == partitions as usize)
            {
                return;
            }
        }
        assert!(Instant::now() < deadline, "topic {name} did not appear");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `spoke produce` with these extra arguments; returns its stdout.
pub fn spoke_produce(addr: &str, topic: &str, args: &[&str]) -> String {
    let out = Command::new(SPOKE)
        .args(["produce", "--quiet", "--brokers", addr, "--topic", topic])
        .args(args)
        .output()
        .expect("running spoke produce");
    assert!(
        out.status.success(),
        "spoke produce failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One record read back from a topic.
#[derive(Debug, Clone)]
pub struct ReadRecord {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, Vec<u8>>,
}

impl ReadRecord {
    pub fn header(&self, k: &str) -> Option<String> {
        self.headers
            .get(k)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

/// Read every partition of `topic` from the beginning (no group) until `expected` records
/// arrived and nothing more comes for a moment, or `timeout` passes.
pub fn read_topic(addr: &str, topic: &str, expected: usize, timeout: Duration) -> Vec<ReadRecord> {
    let c: BaseConsumer = client_config(addr)
        .set("enable.auto.commit", "false")
        .set("group.id", unique("reader"))
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .unwrap();
        }
    }
    c.assign(&tpl).unwrap();
    let mut out = vec![];
    let deadline = Instant::now() + timeout;
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                quiet_since = Instant::now();
                let r = spoke::source::kafka::to_record(&m);
                out.push(ReadRecord {
                    partition: r.position.partition,
                    offset: r.position.offset,
                    key: r.key,
                    payload: r.payload,
                    headers: r.headers.into_iter().collect(),
                });
            }
            Some(Err(e)) => eprintln!("read_topic: {e}"),
            None => {
                if out.len() >= expected && quiet_since.elapsed() > Duration::from_millis(500) {
                    break;
                }
            }
        }
    }
    out
}

/// One row of a snapshot's events.parquet.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub event_id: String,
    pub stream: String,
    pub partition: i32,
    pub offset: i64,
    pub role: String,
    pub step: Option<u64>,
    pub snapshot: String,
}

/// The manifests of a data directory by name.
pub fn manifests(data_dir: &Path) -> HashMap<String, serde_json::Value> {
    let mut out = HashMap::new();
    let Ok(rd) = std::fs::read_dir(data_dir.join("snapshots")) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !e.path().is_dir() {
            continue;
        }
        if let Ok(text) = std::fs::read_to_string(e.path().join("manifest.json")) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                out.insert(name, v);
            }
        }
    }
    out
}

/// The chain head: the snapshot no other snapshot names as parent (the newest such one).
pub fn chain_head(data_dir: &Path) -> Option<String> {
    let ms = manifests(data_dir);
    let parents: std::collections::HashSet<String> = ms
        .values()
        .filter_map(|m| m["parent"].as_str().map(str::to_string))
        .collect();
    let mut heads: Vec<(&String, &serde_json::Value)> =
        ms.iter().filter(|(n, _)| !parents.contains(*n)).collect();
    heads.sort_by_key(|(n, m)| {
        (
            m["step"].as_u64(),
            m["created"].as_str().map(str::to_string),
            (*n).clone(),
        )
    });
    heads.last().map(|(n, _)| (*n).clone())
}

/// Snapshot names from the chain head back to the first snapshot.
pub fn chain(data_dir: &Path) -> Vec<String> {
    // A snapshot may be renamed into place while the directory is listed; list again then.
    for _ in 0..20 {
        if let Some(c) = try_chain(data_dir) {
            return c;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let names: Vec<String> = manifests(data_dir).into_keys().collect();
    panic!("broken snapshot chain in {}: {names:?}", data_dir.display());
}

fn try_chain(data_dir: &Path) -> Option<Vec<String>> {
    let ms = manifests(data_dir);
    let mut out = vec![];
    let mut cur = chain_head(data_dir);
    while let Some(n) = cur {
        let m = ms.get(&n)?;
        out.push(n.clone());
        cur = m["parent"].as_str().map(str::to_string);
        assert!(out.len() < 1_000_000, "parent cycle");
    }
    Some(out)
}

/// The per-event accounting along the snapshot chain.
pub fn chain_events(data_dir: &Path) -> Vec<EventRow> {
    use arrow::array::{AsArray, Int32Array, Int64Array};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let mut rows = vec![];
    for name in chain(data_dir) {
        let path = data_dir
            .join("snapshots")
            .join(&name)
            .join("events.parquet");
        let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let reader = ParquetRecordBatchReaderBuilder::try_new(f)
            .unwrap()
            .build()
            .unwrap();
        for b in reader {
            let b = b.unwrap();
            let col = |n: &str| b.column(b.schema().index_of(n).unwrap()).clone();
            let ids = col("event_id");
            let streams = col("stream");
            let parts = col("partition");
            let offs = col("offset");
            let roles = col("role");
            // The step's integer type is the snapshot format's business: read it as i64.
            let steps = arrow::compute::cast(&col("step"), &arrow::datatypes::DataType::Int64)
                .expect("step column is an integer");
            let ids = ids.as_string::<i32>();
            let streams = streams.as_string::<i32>();
            let roles = roles.as_string::<i32>();
            let parts = parts.as_any().downcast_ref::<Int32Array>().unwrap();
            let offs = offs.as_any().downcast_ref::<Int64Array>().unwrap();
            let steps = steps.as_any().downcast_ref::<Int64Array>().unwrap();
            for i in 0..b.num_rows() {
                rows.push(EventRow {
                    event_id: ids.value(i).to_string(),
                    stream: streams.value(i).to_string(),
                    partition: parts.value(i),
                    offset: offs.value(i),
                    role: roles.value(i).to_string(),
                    step: if arrow::array::Array::is_null(steps, i) {
                        None
                    } else {
                        Some(steps.value(i) as u64)
                    },
                    snapshot: name.clone(),
                });
            }
        }
    }
    rows
}

/// Counts by role and the positions that appear more than once.
pub struct Accounting {
    pub train: usize,
    pub holdout: usize,
    pub dead_letter: usize,
    pub duplicates: Vec<(String, i32, i64)>,
    pub positions: std::collections::BTreeSet<(String, i32, i64)>,
}

pub fn account(rows: &[EventRow]) -> Accounting {
    let mut seen: HashMap<(String, i32, i64), usize> = HashMap::new();
    let (mut train, mut holdout, mut dead_letter) = (0, 0, 0);
    for r in rows {
        match r.role.as_str() {
            "train" => train += 1,
            "holdout" => holdout += 1,
            "dead_letter" => dead_letter += 1,
            other => panic!("unknown role {other}"),
        }
        *seen
            .entry((r.stream.clone(), r.partition, r.offset))
            .or_default() += 1;
    }
    let mut duplicates: Vec<_> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| k.clone())
        .collect();
    duplicates.sort();
    Accounting {
        train,
        holdout,
        dead_letter,
        duplicates,
        positions: seen.into_keys().collect(),
    }
}

/// Poll `f` until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Settings of one `spoke run` against Kafka.
pub struct RunSpec {
    pub addr: String,
    pub topic: String,
    pub group: String,
    pub dlq: String,
    pub data_dir: PathBuf,
    /// 0: until stopped.
    pub max_events: u64,
    pub every_steps: u64,
}

/// configs/kafka.toml with test-friendly consumer timings, written next to the data dir.
pub fn test_config(dir: &Path) -> PathBuf {
    let text =
        std::fs::read_to_string(repo().join("configs/kafka.toml")).expect("configs/kafka.toml");
    let mut t: toml::Table = text.parse().expect("configs/kafka.toml parses");
    let client = t["kafka"]["client"].as_table().cloned().unwrap_or_default();
    let mut client = client;
    client.insert(
        "session.timeout.ms".into(),
        SESSION_TIMEOUT_MS.to_string().into(),
    );
    client.insert("heartbeat.interval.ms".into(), "1000".into());
    client.insert(
        "max.poll.interval.ms".into(),
        MAX_POLL_INTERVAL_MS.to_string().into(),
    );
    client.insert("statistics.interval.ms".into(), "1000".into());
    t.get_mut("kafka")
        .and_then(|k| k.as_table_mut())
        .expect("[kafka]")
        .insert("client".into(), toml::Value::Table(client));
    let path = dir.join("kafka-test.toml");
    std::fs::write(&path, toml::to_string(&t).unwrap()).unwrap();
    path
}

impl RunSpec {
    pub fn command(&self) -> Command {
        let cfg = test_config(self.data_dir.parent().expect("data dir has a parent"));
        let mut c = Command::new(SPOKE);
        c.arg("run")
            .arg("--config")
            .arg(cfg)
            .args([
                "--brokers",
                &self.addr,
                "--topic",
                &self.topic,
                "--group",
                &self.group,
            ])
            .args(["--dead-letter-topic", &self.dlq])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--max-events", &self.max_events.to_string()])
            .args(["--metrics-addr", ""])
            .arg("-q");
        for s in [
            "run.batch_size=64".to_string(),
            "run.buffer_capacity=256".into(),
            "run.holdout_capacity=64".into(),
            format!("snapshot.every_steps={}", self.every_steps),
            "snapshot.keep_last=1000000".into(),
            // The smallest Llama the embedded model allows: the tests are about accounting.
            "model.tiny.hidden_size=16".into(),
            "model.tiny.intermediate_size=32".into(),
            "model.tiny.num_hidden_layers=1".into(),
            "model.tiny.num_attention_heads=2".into(),
            "model.tiny.num_key_value_heads=1".into(),
            "model.max_prompt_tokens=32".into(),
            "model.max_response_tokens=32".into(),
        ] {
            c.arg("--set").arg(s);
        }
        c.env("RAYON_NUM_THREADS", "1").env(
            "SPOKE_LOG",
            std::env::var("SPOKE_LOG").unwrap_or_else(|_| "info".into()),
        );
        c
    }

    /// Start it with stderr going to `<data_dir>.log`.
    pub fn spawn(&self) -> std::process::Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        self.command()
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning spoke run")
    }

    pub fn log_path(&self) -> PathBuf {
        self.data_dir.with_extension("log")
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Wait for the process to exit successfully within `timeout`.
    pub fn wait_ok(&self, child: &mut std::process::Child, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                assert!(
                    st.success(),
                    "spoke run failed ({st}):\n{}",
                    self.log_tail()
                );
                return;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!(
                    "spoke run did not finish within {timeout:?}:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// What the topic holds: every position, and the malformed ones with their payloads.
pub struct TopicContents {
    pub all: std::collections::BTreeSet<(String, i32, i64)>,
    pub malformed: BTreeMap<(i32, i64), Vec<u8>>,
    pub ids: HashMap<(i32, i64), String>,
}

pub fn topic_contents(addr: &str, topic: &str, expected: usize) -> TopicContents {
    let recs = read_topic(addr, topic, expected, Duration::from_secs(60));
    assert_eq!(
        recs.len(),
        expected,
        "topic {topic} holds {} records",
        recs.len()
    );
    let mut out = TopicContents {
        all: Default::default(),
        malformed: Default::default(),
        ids: Default::default(),
    };
    for r in recs {
        out.all.insert((topic.to_string(), r.partition, r.offset));
        let fallback = format!("{topic}/{}/{}", r.partition, r.offset);
        match spoke::source::decode_event(&r.payload, &fallback) {
            Ok(e) => {
                out.ids.insert((r.partition, r.offset), e.event_id);
            }
            Err(_) => {
                out.malformed.insert((r.partition, r.offset), r.payload);
            }
        }
    }
    out
}

/// Check the accounting of `rows` (one or more chains) against the topic: every position
/// exactly once, malformed ones dead-lettered, valid ones trained or held out.
pub fn assert_exact_accounting(rows: &[EventRow], topic: &TopicContents) {
    let acc = account(rows);
    assert!(
        acc.duplicates.is_empty(),
        "{} positions accounted more than once, e.g. {:?}",
        acc.duplicates.len(),
        &acc.duplicates[..acc.duplicates.len().min(5)]
    );
    let missing: Vec<_> = topic.all.difference(&acc.positions).take(5).collect();
    let extra: Vec<_> = acc.positions.difference(&topic.all).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "accounting differs from the topic: {} of {} accounted; missing e.g. {missing:?}, extra e.g. {extra:?}",
        acc.positions.len(),
        topic.all.len()
    );
    assert_eq!(acc.train + acc.holdout + acc.dead_letter, topic.all.len());
    assert_eq!(acc.dead_letter, topic.malformed.len());
    for r in rows {
        let key = (r.partition, r.offset);
        if r.role == "dead_letter" {
            assert!(
                topic.malformed.contains_key(&key),
                "valid event dead-lettered at {key:?}"
            );
        } else {
            assert_eq!(
                topic.ids.get(&key),
                Some(&r.event_id),
                "event id at {key:?} differs"
            );
            if r.role == "train" {
                assert!(r.step.is_some(), "trained event without a step at {key:?}");
            }
        }
    }
}

/// The fixture every end-to-end Kafka test starts from: a fresh 4-partition topic holding `n`
/// synthetic events (1% malformed, seeded) and a fresh 1-partition dead-letter topic.
/// Returns (topic, dead-letter topic, what the topic holds).
#[allow(dead_code)]
pub fn seeded_topics(
    addr: &str,
    prefix: &str,
    n: usize,
    seed: u64,
) -> (String, String, TopicContents) {
    let topic = unique(prefix);
    let dlq = unique(&format!("{prefix}-dlq"));
    create_topic(addr, &topic, 4);
    create_topic(addr, &dlq, 1);
    let out = spoke_produce(
        addr,
        &topic,
        &[
            "--count",
            &n.to_string(),
            "--malformed-share",
            "0.01",
            "--seed",
            &seed.to_string(),
        ],
    );
    eprintln!("{out}");
    let contents = topic_contents(addr, &topic, n);
    (topic, dlq, contents)
}
