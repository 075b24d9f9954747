//! `spoke bench ingest`: events per second from Kafka into Arrow batches (consume, decode,
//! validate, buffer, `RecordBatch`), learner disconnected, on one core; next to the raw
//! consume rate of librdkafka-based consumers on the same broker and data in the same run:
//! `kcat -C -e -o beginning` when installed, and always a minimal rdkafka loop that only
//! counts bytes.

use crate::buffer::EventBuffer;
use crate::metrics::Metrics;
use crate::source::kafka::{KafkaConfig, KafkaSource};
use crate::source::produce::{produce_report, KeyMode, ProduceArgs};
use crate::source::{decode_event, Offsets, Source, SourceItem};
use anyhow::{bail, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// Arguments of `spoke bench ingest`.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestBenchArgs {
    /// Output directory (ingest.json).
    #[arg(long, default_value = "bench-out")]
    pub out: PathBuf,
    /// Broker to use; default: start a private one with scripts/kafka-broker.sh (run from the
    /// repository root).
    #[arg(long)]
    pub brokers: Option<String>,
    /// Events to produce and consume.
    #[arg(long, default_value_t = 200_000)]
    pub count: u64,
    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Events per Arrow batch.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// CPU core the consumers are pinned to (-1: no pinning).
    #[arg(long, default_value_t = 0)]
    pub core: i32,
    /// kafka.queue_capacity of spoke's consumer.
    #[arg(long, default_value_t = 4096)]
    pub queue_capacity: usize,
    /// Extra librdkafka consumer property KEY=VALUE for spoke's consumer (repeatable).
    #[arg(short = 'X', value_name = "KEY=VALUE")]
    pub client: Vec<String>,
    /// Repetitions of each measurement (the best is reported).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
struct Measure {
    name: String,
    events: u64,
    bytes: u64,
    seconds: f64,
    events_per_s: f64,
    mb_per_s: f64,
}

impl Measure {
    fn new(name: &str, events: u64, bytes: u64, seconds: f64) -> Self {
        Self {
            name: name.into(),
            events,
            bytes,
            seconds,
            events_per_s: events as f64 / seconds.max(1e-9),
            mb_per_s: bytes as f64 / 1e6 / seconds.max(1e-9),
        }
    }
}

fn pin_current_thread(core: i32) {
    if core < 0 {
        return;
    }
    // SAFETY: plain libc call on a zeroed cpu_set_t for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core as usize, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::warn!("Could not pin the benchmark to core {core}; running unpinned.");
        }
    }
}

/// Run `f` on a fresh thread pinned to `core` (threads it creates, e.g. librdkafka's,
/// inherit the pinning).
fn on_core<T: Send + 'static>(core: i32, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    std::thread::spawn(move || {
        pin_current_thread(core);
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("benchmark thread panicked"))
}

/// spoke's ingest path: consumer group source → decode/validate → Arrow batches.
fn spoke_ingest(cfg: KafkaConfig, n: u64, batch_size: usize) -> Result<Measure> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut src = KafkaSource::new(&cfg, Metrics::new())?;
        src.start(&Offsets::default()).await?;
        let mut buf = EventBuffer::new();
        let (mut got, mut bytes, mut rows, mut invalid) = (0u64, 0u64, 0usize, 0u64);
        let mut t0: Option<Instant> = None;
        let deadline = Instant::now() + Duration::from_secs(300);
        while got < n {
            if Instant::now() > deadline {
                bail!("spoke ingest: only {got} of {n} events within 300 s");
            }
            match src.next().await? {
                Some(SourceItem::Record(r)) => {
                    // Timed from the first record: the group join is not ingest work.
                    t0.get_or_insert_with(Instant::now);
                    got += 1;
                    bytes += r.payload.len() as u64;
                    match decode_event(&r.payload, &r.position.fallback_id()) {
                        Ok(e) => buf.push(e, r.position),
                        Err(_) => invalid += 1,
                    }
                    if buf.len() >= batch_size {
                        rows += buf.take(batch_size)?.num_rows();
                    }
                }
                Some(SourceItem::Revoked { ack, .. }) => {
                    if let Some(a) = ack {
                        let _ = a.send(());
                    }
                }
                Some(SourceItem::Idle) => {}
                None => break,
            }
        }
        if !buf.is_empty() {
            rows += buf.take(buf.len())?.num_rows();
        }
        let secs = t0.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
        src.close().await?;
        if rows as u64 + invalid != got {
            bail!("spoke ingest: {rows} rows + {invalid} invalid != {got} consumed");
        }
        Ok(Measure::new(
            "spoke (decode + validate + Arrow)",
            got,
            bytes,
            secs,
        ))
    })
}

/// A minimal rdkafka consumer that only counts records and bytes (assign from the beginning,
/// no group, no decoding).
fn raw_rdkafka(brokers: &str, topic: &str, partitions: i32, n: u64) -> Result<Measure> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "spoke-bench-raw")
        .set("enable.auto.commit", "false")
        .set("queued.max.messages.kbytes", "16384")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    let (mut got, mut bytes) = (0u64, 0u64);
    let mut t0: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    while got < n {
        if Instant::now() > deadline {
            bail!("raw rdkafka: only {got} of {n} events within 300 s");
        }
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            let m = m?;
            t0.get_or_insert_with(Instant::now);
            got += 1;
            bytes += m.payload_len() as u64;
        }
    }
    let secs = t0.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
    Ok(Measure::new(
        "rdkafka loop (count bytes only)",
        got,
        bytes,
        secs,
    ))
}

/// `kcat -C -e -o beginning` to /dev/null, wall time of the whole process (connection and
/// metadata included, which flatters spoke slightly).
fn kcat(brokers: &str, topic: &str, n: u64, core: i32, bytes: u64) -> Option<Result<Measure>> {
    let exe = ["kcat", "kafkacat"]
        .into_iter()
        .find(|e| Command::new(e).arg("-V").output().is_ok())?;
    let mut cmd = if core >= 0 && Command::new("taskset").arg("-V").output().is_ok() {
        let mut c = Command::new("taskset");
        c.args(["-c", &core.to_string(), exe]);
        c
    } else {
        Command::new(exe)
    };
    cmd.args([
        "-C",
        "-b",
        brokers,
        "-t",
        topic,
        "-e",
        "-o",
        "beginning",
        "-q",
    ])
    .args(["-f", "%o\n"])
    .stderr(std::process::Stdio::null());
    let t0 = Instant::now();
    let out = match cmd.output() {
        Ok(o) => o,
        Err(e) => return Some(Err(e.into())),
    };
    let secs = t0.elapsed().as_secs_f64();
    if !out.status.success() {
        return Some(Err(anyhow::anyhow!("{exe} failed: {}", out.status)));
    }
    let lines = out.stdout.iter().filter(|b| **b == b'\n').count() as u64;
    if lines != n {
        return Some(Err(anyhow::anyhow!("{exe} read {lines} of {n} records")));
    }
    Some(Ok(Measure::new(
        &format!("{exe} -C -e -o beginning"),
        n,
        bytes,
        secs,
    )))
}

struct PrivateBroker(PathBuf);

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = Command::new("scripts/kafka-broker.sh")
            .arg("stop")
            .arg(&self.0)
            .status();
    }
}

fn create_topic(brokers: &str, topic: &str, partitions: i32) -> Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let r = rt.block_on(admin.create_topics(
        &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
    ))?;
    for x in r {
        if let Err((t, e)) = x {
            bail!("creating topic {t}: {e}");
        }
    }
    Ok(())
}

pub fn run(args: IngestBenchArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("--out: cannot create {}", args.out.display()))?;
    let mut _broker = None;
    let brokers = match &args.brokers {
        Some(b) => b.clone(),
        None => {
            let dir = args.out.join("broker");
            let out = Command::new("scripts/kafka-broker.sh")
                .arg("start")
                .arg(&dir)
                .output()
                .context("no --brokers given and scripts/kafka-broker.sh could not run (run from the repository root)")?;
            if !out.status.success() {
                bail!(
                    "scripts/kafka-broker.sh start failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            _broker = Some(PrivateBroker(dir));
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        }
    };
    let topic = format!(
        "spoke.bench.ingest.{}",
        chrono::Utc::now().timestamp_millis()
    );
    create_topic(&brokers, &topic, args.partitions)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let produced = rt.block_on(produce_report(&ProduceArgs {
        brokers: Some(brokers.clone()),
        topic: Some(topic.clone()),
        count: Some(args.count),
        malformed_share: 0.01,
        rate: 0.0,
        input: None,
        seed: 1,
        start: 0,
        key: KeyMode::Index,
        partition: None,
        config: None,
        client: vec![],
        quiet: true,
    }))?;
    eprintln!("{produced}");
    let n = produced.produced;

    let mut results: Vec<Measure> = vec![];
    let mut kcat_error: Option<String> = None;
    let mut best = |m: Measure| {
        eprintln!(
            "  {:<36} {:>10.0} events/s  {:>7.1} MB/s  ({} events in {:.2} s)",
            m.name, m.events_per_s, m.mb_per_s, m.events, m.seconds
        );
        match results.iter_mut().find(|r| r.name == m.name) {
            Some(r) if r.events_per_s >= m.events_per_s => {}
            Some(r) => *r = m,
            None => results.push(m),
        }
    };
    for rep in 0..args.repeat.max(1) {
        eprintln!("round {}:", rep + 1);
        match kcat(&brokers, &topic, n, args.core, produced.bytes) {
            Some(Ok(k)) => best(k),
            Some(Err(e)) => {
                if kcat_error.is_none() {
                    eprintln!("  kcat could not consume from this broker ({e:#}); the rdkafka loop is the baseline.");
                }
                kcat_error = Some(format!("{e:#}"));
            }
            None => kcat_error = Some("kcat is not installed".into()),
        }
        let (b, t, p) = (brokers.clone(), topic.clone(), args.partitions);
        best(on_core(args.core, move || raw_rdkafka(&b, &t, p, n))??);
        let cfg = KafkaConfig {
            brokers: brokers.clone(),
            topics: vec![topic.clone()],
            group: format!(
                "spoke-bench-{}-{rep}",
                chrono::Utc::now().timestamp_millis()
            ),
            dead_letter_topic: String::new(),
            client: [
                ("session.timeout.ms".to_string(), "6000".to_string()),
                ("max.poll.interval.ms".to_string(), "10000".to_string()),
            ]
            .into_iter()
            .chain(args.client.iter().filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            }))
            .collect(),
            queue_capacity: args.queue_capacity,
            ..KafkaConfig::default()
        };
        let bs = args.batch_size;
        best(on_core(args.core, move || spoke_ingest(cfg, n, bs))??);
    }
    let spoke = results
        .iter()
        .find(|m| m.name.starts_with("spoke"))
        .map(|m| m.events_per_s)
        .unwrap_or(0.0);
    let mut ratios = serde_json::Map::new();
    for m in &results {
        if !m.name.starts_with("spoke") {
            ratios.insert(m.name.clone(), serde_json::json!(spoke / m.events_per_s));
        }
    }
    println!(
        "ingest on core {} ({} events, best of {}):",
        args.core, n, args.repeat
    );
    for m in &results {
        println!(
            "  {:<36} {:>10.0} events/s  {:>7.1} MB/s",
            m.name, m.events_per_s, m.mb_per_s
        );
    }
    for (k, v) in &ratios {
        println!("  spoke / {k}: {:.2}", v.as_f64().unwrap_or(0.0));
    }
    let report = serde_json::json!({
        "events": n,
        "bytes": produced.bytes,
        "partitions": args.partitions,
        "batch_size": args.batch_size,
        "core": args.core,
        "repeat": args.repeat,
        "results": results,
        "spoke_over_baseline": ratios,
        "librdkafka_version": rdkafka::util::get_rdkafka_version().1,
        "kcat_error": kcat_error,
    });
    let path = args.out.join("ingest.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", path.display());
    Ok(())
}
