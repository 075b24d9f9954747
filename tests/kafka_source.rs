//! The Kafka source and dead-letter sink driven directly against a real broker (tansu or
//! Kafka; see tests/common/kafka.rs): offsets, commits, resume, revocation hand-over, pause,
//! dead-letter headers, and `spoke produce` from files.

#[path = "common/kafka.rs"]
mod kafka_common;

use kafka_common::*;
use spoke::metrics::Metrics;
use spoke::source::kafka::{KafkaConfig, KafkaDeadLetters, KafkaSource};
use spoke::source::{DeadLetterSink, Offsets, Position, Source, SourceItem, SourceRecord};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn kcfg(addr: &str, topic: &str, group: &str) -> KafkaConfig {
    let mut c = source_config(addr, topic, group);
    c.queue_capacity = 256;
    c.client
        .insert("statistics.interval.ms".into(), "1000".into());
    c
}

/// Read records until `n` arrived (revocations are acknowledged at once).
async fn take(src: &mut KafkaSource, n: usize, timeout: Duration) -> Vec<SourceRecord> {
    let deadline = Instant::now() + timeout;
    let mut out = vec![];
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} records within {timeout:?}",
            out.len()
        );
        match src.next().await.expect("next") {
            Some(SourceItem::Record(r)) => out.push(r),
            Some(SourceItem::Revoked { ack, .. }) => {
                if let Some(a) = ack {
                    let _ = a.send(());
                }
            }
            Some(SourceItem::Idle) => {}
            None => panic!("the Kafka source ended"),
        }
    }
    out
}

/// Produced records per partition, from `spoke produce`'s report line.
fn per_partition(report: &str) -> BTreeMap<i32, i64> {
    let line = report
        .lines()
        .find(|l| l.starts_with("per partition:"))
        .expect("per-partition line");
    line["per partition:".len()..]
        .split(',')
        .map(|kv| {
            let (p, n) = kv.trim().split_once(": ").unwrap();
            (p.parse().unwrap(), n.parse().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_commits_resume_and_pause() {
    init_logging();
    let broker = Broker::get();
    let topic = unique("src");
    let group = unique("g");
    create_topic(&broker.addr, &topic, 3);
    let report = spoke_produce(&broker.addr, &topic, &["--count", "3000", "--seed", "7"]);
    let counts = per_partition(&report);
    assert_eq!(counts.values().sum::<i64>(), 3000, "{report}");

    // 1. A fresh group reads every offset of every partition exactly once, from 0.
    let metrics = Metrics::new();
    let mut a = KafkaSource::new(&kcfg(&broker.addr, &topic, &group), metrics.clone()).unwrap();
    a.start(&Offsets::default()).await.unwrap();
    let first = take(&mut a, 3000, Duration::from_secs(60)).await;
    let seen = by_partition(&first);
    for r in &first {
        assert_eq!(r.position.stream, topic);
        let ev = spoke::source::decode_event(&r.payload, "x").expect("valid synthetic event");
        assert_eq!(
            r.key.as_deref(),
            ev.event_id.strip_prefix("syn-7-").map(str::as_bytes)
        );
    }
    for (p, offs) in &seen {
        let want: Vec<i64> = (0..counts[p]).collect();
        assert_eq!(
            offs, &want,
            "partition {p}: offsets out of order, missing or repeated"
        );
    }
    // Nothing more.
    for _ in 0..5 {
        match a.next().await.unwrap() {
            Some(SourceItem::Idle) => {}
            Some(SourceItem::Record(r)) => panic!("unexpected extra record {:?}", r.position),
            other => panic!("unexpected {other:?}"),
        }
    }

    // 2. Commit the first half of each partition; the metric follows.
    let mut half = Offsets::default();
    for (p, n) in &counts {
        half.set(&topic, *p, n / 2);
    }
    a.commit(&half).await.unwrap();
    for (p, n) in &counts {
        assert_eq!(
            metrics
                .kafka_committed_offset
                .with_label_values(&[topic.as_str(), &p.to_string()])
                .get(),
            n / 2
        );
    }
    // Lag is never negative (some brokers report odd watermarks).
    for line in metrics.render().lines() {
        if let Some(rest) = line.strip_prefix("spoke_kafka_consumer_lag{") {
            let v: f64 = rest.rsplit(' ').next().unwrap().parse().unwrap();
            assert!(v >= 0.0, "{line}");
        }
    }
    a.close().await.unwrap();

    // 3. A new member of the group without a snapshot resumes at the committed offsets; with
    //    a snapshot ahead of them (crash between snapshot and commit) at the snapshot's.
    let mut snap = Offsets::default();
    let mut expect_start: HashMap<i32, i64> = HashMap::new();
    for (i, (p, n)) in counts.iter().enumerate() {
        if i == 0 {
            expect_start.insert(*p, n / 2); // no snapshot offset: committed
        } else if i == 1 {
            snap.set(&topic, *p, n * 3 / 4); // ahead of committed: snapshot wins
            expect_start.insert(*p, n * 3 / 4);
        } else {
            snap.set(&topic, *p, n / 4); // behind committed (another member advanced): committed wins
            expect_start.insert(*p, n / 2);
        }
    }
    let remaining: i64 = counts.iter().map(|(p, n)| n - expect_start[p]).sum();
    let metrics = Metrics::new();
    let mut b = KafkaSource::new(&kcfg(&broker.addr, &topic, &group), metrics.clone()).unwrap();
    b.start(&snap).await.unwrap();
    // Pause right away: only Idle while paused.
    b.set_paused(true).await.unwrap();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        match b.next().await.unwrap() {
            Some(SourceItem::Idle) => {}
            other => panic!("expected Idle while paused, got {other:?}"),
        }
    }
    assert_eq!(metrics.kafka_paused.get(), 1);
    b.set_paused(false).await.unwrap();
    let second = take(&mut b, remaining as usize, Duration::from_secs(60)).await;
    let got = by_partition(&second);
    for (p, n) in &counts {
        let want: Vec<i64> = (expect_start[p]..*n).collect();
        assert_eq!(
            got.get(p).cloned().unwrap_or_default(),
            want,
            "partition {p}"
        );
    }
    assert_eq!(metrics.kafka_paused.get(), 0);
    assert!(
        metrics
            .kafka_rebalances
            .with_label_values(&["assign"])
            .get()
            >= 1
    );
    b.close().await.unwrap();
}

/// A reader that stops taking records: the hand-over holds at most `queue_capacity` records,
/// the partitions are paused once it has been full for a while (the consumer keeps polling),
/// and when reading resumes every record still arrives exactly once, in order per partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backpressure_bounds_the_hand_over_and_loses_nothing() {
    init_logging();
    let broker = Broker::get();
    let topic = unique("bp");
    create_topic(&broker.addr, &topic, 2);
    let report = spoke_produce(&broker.addr, &topic, &["--count", "2000", "--seed", "11"]);
    let counts = per_partition(&report);
    let mut cfg = kcfg(&broker.addr, &topic, &unique("g"));
    cfg.queue_capacity = 100;
    let metrics = Metrics::new();
    let mut src = KafkaSource::new(&cfg, metrics.clone()).unwrap();
    src.start(&Offsets::default()).await.unwrap();
    let mut got = take(&mut src, 1, Duration::from_secs(60)).await;
    // Stall: take nothing for 3 s while the polling thread runs.
    let t0 = Instant::now();
    let mut most = 0;
    while t0.elapsed() < Duration::from_secs(3) {
        most = most.max(src.queued_records());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(most <= 100, "{most} records queued, capacity 100");
    assert_eq!(most, 100, "the hand-over should have filled up");
    assert_eq!(metrics.kafka_paused.get(), 1, "a stalled reader pauses");
    got.extend(take(&mut src, 1999, Duration::from_secs(60)).await);
    let seen = by_partition(&got);
    for (p, n) in &counts {
        let want: Vec<i64> = (0..*n).collect();
        assert_eq!(seen.get(p), Some(&want), "partition {p}");
    }
    match src.next().await.unwrap() {
        Some(SourceItem::Idle) => {}
        other => panic!("expected nothing more, got {other:?}"),
    }
    assert_eq!(metrics.kafka_paused.get(), 0, "resumed once drained");
    src.close().await.unwrap();
}

/// Two members: when the second joins, the first gets `Revoked`, and the partitions move only
/// after it acknowledged (having committed what it consumed): no record is delivered twice
/// or lost across both members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_waits_for_the_ack_and_hands_over_exactly() {
    init_logging();
    let broker = Broker::get();
    let topic = unique("reb");
    let group = unique("g");
    create_topic(&broker.addr, &topic, 4);
    let total = 8000usize;
    spoke_produce(&broker.addr, &topic, &["--count", &total.to_string()]);

    let cfg = kcfg(&broker.addr, &topic, &group);
    let (done_tx, done_rx) = tokio::sync::watch::channel(false);
    let delivered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    type Seen = Vec<(i32, i64, Instant)>;
    let run_member = |name: &'static str,
                      slow_until_revoked: bool,
                      mut done: tokio::sync::watch::Receiver<bool>| {
        let cfg = cfg.clone();
        let delivered = delivered.clone();
        tokio::spawn(async move {
            let mut src = KafkaSource::new(&cfg, Metrics::new()).unwrap();
            src.start(&Offsets::default()).await.unwrap();
            let mut seen: Seen = vec![];
            let mut consumed_next: BTreeMap<(String, i32), i64> = BTreeMap::new();
            let mut revocations: Vec<(Vec<(String, i32)>, Instant)> = vec![];
            let mut slow = slow_until_revoked;
            while !*done.borrow_and_update() {
                match src.next().await.unwrap() {
                    Some(SourceItem::Record(r)) => {
                        let Position {
                            stream,
                            partition,
                            offset,
                        } = r.position;
                        seen.push((partition, offset, Instant::now()));
                        delivered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        consumed_next.insert((stream, partition), offset + 1);
                        if slow {
                            tokio::time::sleep(Duration::from_millis(4)).await;
                        }
                    }
                    Some(SourceItem::Revoked { partitions, ack }) => {
                        // What the pipeline does: make the consumed records durable, commit,
                        // then let go. Hold on a little to show the hand-over waits.
                        let mut o = Offsets::default();
                        for ((t, p), n) in &consumed_next {
                            o.set(t, *p, *n);
                        }
                        src.commit(&o).await.unwrap();
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                        let at = Instant::now();
                        for tp in &partitions {
                            consumed_next.remove(tp);
                        }
                        revocations.push((partitions, at));
                        ack.expect("ack").send(()).unwrap();
                        slow = false;
                    }
                    Some(SourceItem::Idle) => {}
                    None => break,
                }
            }
            // Leave cleanly (commit first, as the pipeline does at shutdown).
            let mut o = Offsets::default();
            for ((t, p), n) in &consumed_next {
                o.set(t, *p, *n);
            }
            src.commit(&o).await.unwrap();
            src.close().await.unwrap();
            eprintln!(
                "{name}: {} records, {} revocations",
                seen.len(),
                revocations.len()
            );
            (seen, revocations)
        })
    };
    let a = run_member("a", true, done_rx.clone());
    // Let A own every partition and start reading.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let b = run_member("b", false, done_rx.clone());
    // Wait until both together have read everything, then a little longer (a duplicate
    // delivery would show up then).
    let t0 = Instant::now();
    while delivered.load(std::sync::atomic::Ordering::SeqCst) < total
        && t0.elapsed() < Duration::from_secs(90)
        && !a.is_finished()
        && !b.is_finished()
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    done_tx.send(true).unwrap();
    let (sa, ra) = a.await.unwrap();
    let (sb, _rb) = b.await.unwrap();
    assert!(
        !ra.is_empty(),
        "the first member was never asked to give partitions up"
    );
    assert!(!sb.is_empty(), "the second member never got records");
    let mut all: Vec<(i32, i64)> = sa
        .iter()
        .chain(sb.iter())
        .map(|(p, o, _)| (*p, *o))
        .collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(n, all.len(), "{} records delivered twice", n - all.len());
    assert_eq!(all.len(), total, "records lost");
    // B saw no record of a partition A gave up before A acknowledged that revocation.
    let first_ack = ra[0].1;
    let revoked: BTreeSet<i32> = ra[0].0.iter().map(|(_, p)| *p).collect();
    for (p, _, at) in &sb {
        if revoked.contains(p) {
            assert!(
                *at >= first_ack,
                "partition {p} reached B before A acknowledged"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_keep_the_original_bytes_and_say_why() {
    init_logging();
    let broker = Broker::get();
    let dlq = unique("dlq");
    create_topic(&broker.addr, &dlq, 1);
    let mut cfg = kcfg(&broker.addr, "unused", "unused");
    cfg.dead_letter_topic = dlq.clone();
    let metrics = Metrics::new();
    let mut sink = KafkaDeadLetters::new(&cfg, metrics).unwrap();
    let recs = [
        SourceRecord {
            payload: b"{\"prompt\": 42}".to_vec(),
            key: Some(b"k1".to_vec()),
            headers: vec![("trace".into(), b"abc".to_vec())],
            position: Position {
                stream: "events".into(),
                partition: 3,
                offset: 17,
            },
        },
        SourceRecord {
            payload: vec![0xff, 0xfe, b'{'],
            key: None,
            headers: vec![],
            position: Position {
                stream: "events".into(),
                partition: 0,
                offset: 5,
            },
        },
    ];
    sink.send(&recs[0], "wrong_type: prompt must be a string")
        .await
        .unwrap();
    sink.send(&recs[1], "not_json: invalid UTF-8")
        .await
        .unwrap();
    sink.flush().await.unwrap();
    let got = read_topic(&broker.addr, &dlq, 2, Duration::from_secs(30));
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].payload, recs[0].payload);
    assert_eq!(got[0].key.as_deref(), Some(&b"k1"[..]));
    assert_eq!(got[0].header("trace").as_deref(), Some("abc"));
    assert_eq!(
        got[0].header("spoke.error").as_deref(),
        Some("wrong_type: prompt must be a string")
    );
    assert_eq!(
        got[0].header("spoke.source.topic").as_deref(),
        Some("events")
    );
    assert_eq!(
        got[0].header("spoke.source.partition").as_deref(),
        Some("3")
    );
    assert_eq!(got[0].header("spoke.source.offset").as_deref(), Some("17"));
    assert_eq!(got[1].payload, recs[1].payload);
    assert_eq!(got[1].key, None);
    assert_eq!(got[1].header("spoke.source.offset").as_deref(), Some("5"));
}

#[test]
fn produce_publishes_files_and_malformed_shares() {
    init_logging();
    let broker = Broker::get();
    let dir = tempfile::tempdir().unwrap();

    // JSON lines: each non-empty line verbatim.
    let topic = unique("jsonl");
    create_topic(&broker.addr, &topic, 2);
    let lines = [
        r#"{"prompt":"p1","response_0":"a","response_1":"b","label":1}"#,
        r#"{"prompt":"p2","chosen":"good","rejected":"bad"}"#,
        "not json at all",
    ];
    let path = dir.path().join("events.jsonl");
    std::fs::write(
        &path,
        format!("{}\n\n{}\r\n{}\n", lines[0], lines[1], lines[2]),
    )
    .unwrap();
    let out = spoke_produce(&broker.addr, &topic, &["--input", path.to_str().unwrap()]);
    assert!(out.contains("produced 3 records"), "{out}");
    let got = read_topic(&broker.addr, &topic, 3, Duration::from_secs(30));
    let payloads: BTreeSet<Vec<u8>> = got.iter().map(|r| r.payload.clone()).collect();
    let want: BTreeSet<Vec<u8>> = lines.iter().map(|l| l.as_bytes().to_vec()).collect();
    assert_eq!(payloads, want);

    // Parquet: each row as a JSON object that decodes as an event.
    use arrow::array::{ArrayRef, Int64Array, StringArray};
    use arrow::record_batch::RecordBatch;
    let cols: Vec<(&str, ArrayRef)> = vec![
        (
            "event_id",
            Arc::new(StringArray::from(vec!["e1", "e2"])) as ArrayRef,
        ),
        ("prompt", Arc::new(StringArray::from(vec!["hello", "tea?"]))),
        ("response_0", Arc::new(StringArray::from(vec!["hi", "no"]))),
        (
            "response_1",
            Arc::new(StringArray::from(vec!["hello there", "yes please"])),
        ),
        ("label", Arc::new(Int64Array::from(vec![1, 0]))),
    ];
    let batch = RecordBatch::try_from_iter(cols).unwrap();
    let ppath = dir.path().join("events.parquet");
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&ppath).unwrap(),
        batch.schema(),
        None,
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let topic = unique("pq");
    create_topic(&broker.addr, &topic, 1);
    spoke_produce(&broker.addr, &topic, &["--input", ppath.to_str().unwrap()]);
    let got = read_topic(&broker.addr, &topic, 2, Duration::from_secs(30));
    assert_eq!(got.len(), 2);
    let mut ids: Vec<String> = got
        .iter()
        .map(|r| {
            spoke::source::decode_event(&r.payload, "x")
                .expect("row decodes as an event")
                .event_id
        })
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["e1", "e2"]);

    // Synthetic with a malformed share: the report counts them and they fail validation.
    let topic = unique("mal");
    create_topic(&broker.addr, &topic, 2);
    let out = spoke_produce(
        &broker.addr,
        &topic,
        &[
            "--count",
            "2000",
            "--malformed-share",
            "0.05",
            "--seed",
            "3",
        ],
    );
    let malformed: u64 = out
        .split('(')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no malformed count in {out:?}"));
    assert!((50..=150).contains(&malformed), "{out}");
    let got = read_topic(&broker.addr, &topic, 2000, Duration::from_secs(30));
    assert_eq!(got.len(), 2000);
    let bad = got
        .iter()
        .filter(|r| spoke::source::decode_event(&r.payload, "x").is_err())
        .count() as u64;
    assert_eq!(bad, malformed);
}
