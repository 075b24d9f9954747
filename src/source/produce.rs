//! `spoke produce`: publish events to a Kafka topic (synthetic stream or a file).

use super::kafka::{await_delivery, create_producer, send_with_retry, KafkaConfig};
use super::synthetic::{synthetic_payload, SyntheticConfig};
use anyhow::{bail, Context, Result};
use rdkafka::producer::{DeliveryFuture, FutureRecord};
use std::collections::{BTreeMap, VecDeque};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How records are keyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyMode {
    /// The record's index in the stream (spreads records over partitions by hash).
    Index,
    /// No key (librdkafka's partitioner chooses).
    None,
}

/// Arguments of `spoke produce`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProduceArgs {
    /// Bootstrap servers [default: kafka.brokers of --config, else 127.0.0.1:9092].
    #[arg(long)]
    pub brokers: Option<String>,
    /// Topic to publish to [default: the first of kafka.topics, else spoke.preferences].
    #[arg(long)]
    pub topic: Option<String>,
    /// Number of records: from the synthetic stream (default 1000), or at most this many
    /// lines/rows of --input (default all).
    #[arg(long)]
    pub count: Option<u64>,
    /// Share of deliberately malformed records in the synthetic stream (for testing
    /// dead-lettering), in [0, 1].
    #[arg(long, default_value_t = 0.0)]
    pub malformed_share: f64,
    /// Publish at most this many records per second (0: as fast as the broker takes them).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Publish the records of this file instead of the synthetic stream: JSON lines (each
    /// non-empty line verbatim) or Parquet (`.parquet`; each row as a JSON object).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Seed of the synthetic stream (record i depends only on seed and i).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Index of the first synthetic record (to continue a stream without repeating ids).
    #[arg(long, default_value_t = 0)]
    pub start: u64,
    /// How records are keyed.
    #[arg(long, value_enum, default_value_t = KeyMode::Index)]
    pub key: KeyMode,
    /// Publish every record to this partition (default: by key).
    #[arg(long)]
    pub partition: Option<i32>,
    /// Take brokers, topic and librdkafka settings ([kafka.client], [kafka.producer]) from
    /// this spoke configuration file.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Extra librdkafka producer property KEY=VALUE (repeatable), e.g. -X linger.ms=20.
    #[arg(short = 'X', value_name = "KEY=VALUE")]
    pub client: Vec<String>,
    /// Do not draw a progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// What `spoke produce` did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ProduceReport {
    pub topic: String,
    pub produced: u64,
    pub malformed: u64,
    pub bytes: u64,
    pub seconds: f64,
    /// Delivered records per partition.
    pub partitions: BTreeMap<i32, u64>,
}

impl std::fmt::Display for ProduceReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "produced {} records ({} malformed, {} bytes) to {} in {:.1} s ({:.0} records/s)",
            self.produced,
            self.malformed,
            self.bytes,
            self.topic,
            self.seconds,
            self.produced as f64 / self.seconds.max(1e-9)
        )?;
        let parts: Vec<String> = self
            .partitions
            .iter()
            .map(|(p, n)| format!("{p}: {n}"))
            .collect();
        write!(f, "per partition: {}", parts.join(", "))
    }
}

/// Records to publish: (payload, malformed?).
enum Input {
    Synthetic {
        cfg: SyntheticConfig,
        next: u64,
        end: u64,
    },
    Lines {
        reader: std::io::BufReader<std::fs::File>,
        path: PathBuf,
        left: u64,
    },
    Rows {
        rows: std::vec::IntoIter<Vec<u8>>,
    },
}

impl Input {
    fn len_hint(&self) -> Option<u64> {
        match self {
            Input::Synthetic { next, end, .. } => Some(end - next),
            Input::Lines { .. } => None,
            Input::Rows { rows } => Some(rows.len() as u64),
        }
    }

    fn next(&mut self) -> Result<Option<(Vec<u8>, bool)>> {
        match self {
            Input::Synthetic { cfg, next, end } => {
                if *next >= *end {
                    return Ok(None);
                }
                let r = synthetic_payload(cfg, *next);
                *next += 1;
                Ok(Some(r))
            }
            Input::Lines { reader, path, left } => loop {
                if *left == 0 {
                    return Ok(None);
                }
                let mut buf = Vec::new();
                let n = reader
                    .read_until(b'\n', &mut buf)
                    .with_context(|| format!("reading {}", path.display()))?;
                if n == 0 {
                    return Ok(None);
                }
                while matches!(buf.last(), Some(b'\n' | b'\r')) {
                    buf.pop();
                }
                if buf.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                *left -= 1;
                return Ok(Some((buf, false)));
            },
            Input::Rows { rows } => Ok(rows.next().map(|r| (r, false))),
        }
    }
}

fn is_parquet(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

/// Every row of a Parquet file as a JSON object (at most `limit` rows).
pub fn parquet_rows_as_json(path: &Path, limit: u64) -> Result<Vec<Vec<u8>>> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(f)
        .with_context(|| format!("{}: not a readable Parquet file", path.display()))?
        .build()?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.with_context(|| format!("reading {}", path.display()))?;
        let schema = batch.schema();
        for row in 0..batch.num_rows() {
            if out.len() as u64 >= limit {
                return Ok(out);
            }
            let mut obj = serde_json::Map::new();
            for (i, field) in schema.fields().iter().enumerate() {
                let v = json_value(batch.column(i).as_ref(), row)
                    .with_context(|| format!("{}: column {:?}", path.display(), field.name()))?;
                if !v.is_null() {
                    obj.insert(field.name().clone(), v);
                }
            }
            out.push(serde_json::to_vec(&serde_json::Value::Object(obj))?);
        }
    }
    Ok(out)
}

fn json_value(col: &dyn arrow::array::Array, row: usize) -> Result<serde_json::Value> {
    use arrow::array::*;
    use arrow::datatypes::DataType as D;
    use serde_json::Value as V;
    if col.is_null(row) {
        return Ok(V::Null);
    }
    macro_rules! num {
        ($t:ty) => {
            serde_json::json!(col.as_any().downcast_ref::<$t>().expect("type").value(row))
        };
    }
    Ok(match col.data_type() {
        D::Utf8 => V::String(col.as_string::<i32>().value(row).to_string()),
        D::LargeUtf8 => V::String(col.as_string::<i64>().value(row).to_string()),
        D::Utf8View => V::String(col.as_string_view().value(row).to_string()),
        D::Boolean => V::Bool(col.as_boolean().value(row)),
        D::Int8 => num!(Int8Array),
        D::Int16 => num!(Int16Array),
        D::Int32 => num!(Int32Array),
        D::Int64 => num!(Int64Array),
        D::UInt8 => num!(UInt8Array),
        D::UInt16 => num!(UInt16Array),
        D::UInt32 => num!(UInt32Array),
        D::UInt64 => num!(UInt64Array),
        D::Float32 => num!(Float32Array),
        D::Float64 => num!(Float64Array),
        D::Timestamp(_, _) | D::Date32 | D::Date64 => {
            let f = arrow::util::display::ArrayFormatter::try_new(col, &Default::default())?;
            V::String(f.value(row).to_string())
        }
        other => bail!("unsupported Parquet column type {other} (expected strings, numbers, booleans or timestamps)"),
    })
}

/// Parse `KEY=VALUE`.
fn kv(s: &str) -> Result<(String, String)> {
    let (k, v) = s
        .split_once('=')
        .with_context(|| format!("-X {s:?}: expected KEY=VALUE"))?;
    Ok((k.trim().to_string(), v.to_string()))
}

/// Resolve the Kafka settings of `spoke produce`.
fn kafka_settings(args: &ProduceArgs) -> Result<(KafkaConfig, String)> {
    let mut k = match &args.config {
        Some(p) => crate::config::Config::load(Some(p), &[])?.kafka,
        None => KafkaConfig::default(),
    };
    if let Some(b) = &args.brokers {
        k.brokers = b.clone();
    }
    for s in &args.client {
        let (key, v) = kv(s)?;
        k.producer.insert(key, v);
    }
    let topic = args
        .topic
        .clone()
        .or_else(|| k.topics.first().cloned())
        .unwrap_or_else(|| "spoke.preferences".into());
    if topic.trim().is_empty() {
        bail!("--topic: must not be empty");
    }
    Ok((k, topic))
}

/// Publish the records and wait for every delivery acknowledgement.
pub async fn produce_report(args: &ProduceArgs) -> Result<ProduceReport> {
    if !(0.0..=1.0).contains(&args.malformed_share) {
        bail!(
            "--malformed-share: must be in [0, 1], got {}",
            args.malformed_share
        );
    }
    if !(args.rate >= 0.0 && args.rate.is_finite()) {
        bail!("--rate: must be >= 0, got {}", args.rate);
    }
    let (kcfg, topic) = kafka_settings(args)?;
    let mut input = match &args.input {
        None => {
            let cfg = SyntheticConfig {
                seed: args.seed,
                malformed_share: args.malformed_share,
                ..SyntheticConfig::default()
            };
            Input::Synthetic {
                cfg,
                next: args.start,
                end: args.start.saturating_add(args.count.unwrap_or(1000)),
            }
        }
        Some(p) if is_parquet(p) => Input::Rows {
            rows: parquet_rows_as_json(p, args.count.unwrap_or(u64::MAX))?.into_iter(),
        },
        Some(p) => Input::Lines {
            reader: std::io::BufReader::new(
                std::fs::File::open(p).with_context(|| format!("--input {}", p.display()))?,
            ),
            path: p.clone(),
            left: args.count.unwrap_or(u64::MAX),
        },
    };
    if args.input.is_some() && args.malformed_share > 0.0 {
        bail!("--malformed-share applies to the synthetic stream only, not to --input");
    }
    let producer = create_producer(&kcfg)?;
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let b = match input.len_hint() {
            Some(n) => indicatif::ProgressBar::new(n),
            None => indicatif::ProgressBar::new_spinner(),
        };
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg} [{elapsed_precise}] {wide_bar} {pos}/{len} ({per_sec})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_message(format!("producing to {topic}"));
        b
    };
    let started = Instant::now();
    let mut report = ProduceReport {
        topic: topic.clone(),
        ..Default::default()
    };
    let mut pending: VecDeque<DeliveryFuture> = VecDeque::new();
    let mut index: u64 = match &input {
        Input::Synthetic { next, .. } => *next,
        _ => 0,
    };
    let mut sent: u64 = 0;
    while let Some((payload, malformed)) = input.next()? {
        if args.rate > 0.0 {
            let due = started + Duration::from_secs_f64(sent as f64 / args.rate);
            let now = Instant::now();
            if due > now {
                tokio::time::sleep(due - now).await;
            }
        }
        let key = index.to_string();
        let mut rec: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&topic).payload(payload.as_slice());
        if args.key == KeyMode::Index {
            rec = rec.key(key.as_bytes());
        }
        if let Some(p) = args.partition {
            rec = rec.partition(p);
        }
        pending.push_back(send_with_retry(&producer, rec).await?);
        report.bytes += payload.len() as u64;
        report.malformed += u64::from(malformed);
        sent += 1;
        index += 1;
        while pending.len() >= 20_000 {
            let (p, _) = await_delivery(pending.pop_front().expect("non-empty"), &topic).await?;
            *report.partitions.entry(p).or_default() += 1;
            report.produced += 1;
            bar.inc(1);
        }
    }
    while let Some(f) = pending.pop_front() {
        let (p, _) = await_delivery(f, &topic).await?;
        *report.partitions.entry(p).or_default() += 1;
        report.produced += 1;
        bar.inc(1);
    }
    bar.finish_and_clear();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

pub async fn produce(args: ProduceArgs) -> Result<()> {
    let report = produce_report(&args).await?;
    println!("{report}");
    Ok(())
}
