//! The broker frozen (SIGSTOP) for 10 s in the middle of a run, then thawed (SIGCONT): the run
//! completes with exact accounting. Uses a private broker (it is frozen).

#[path = "common/kafka.rs"]
mod kafka_common;

use kafka_common::*;
use std::time::Duration;

#[test]
fn a_frozen_broker_loses_and_repeats_nothing() {
    init_logging();
    let broker = Broker::private();
    let pid = broker.pid().expect("broker pid");
    let n = 12_000usize;
    let (topic, dlq, contents) = seeded_topics(&broker.addr, "outage", n, 13);
    let dir = tempfile::tempdir().unwrap();
    let spec = RunSpec {
        addr: broker.addr.clone(),
        topic: topic.clone(),
        group: unique("g"),
        dlq: dlq.clone(),
        data_dir: dir.path().join("data"),
        max_events: n as u64,
        every_steps: 5,
    };
    let mut child = spec.spawn();
    wait_for(Duration::from_secs(120), || {
        (chain_events(&spec.data_dir).len() > 500).then_some(())
    })
    .unwrap_or_else(|| panic!("no progress before the outage:\n{}", spec.log_tail()));
    let before = chain_events(&spec.data_dir).len();
    unsafe {
        libc::kill(pid, libc::SIGSTOP);
    }
    std::thread::sleep(Duration::from_secs(10));
    unsafe {
        libc::kill(pid, libc::SIGCONT);
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "spoke run exited during the outage:\n{}",
        spec.log_tail()
    );
    spec.wait_ok(&mut child, Duration::from_secs(300));
    eprintln!("{}", spec.log_tail());
    assert!(
        before < n,
        "the outage came after the run had consumed everything"
    );
    let rows = chain_events(&spec.data_dir);
    assert_exact_accounting(&rows, &contents);
    let dead = read_topic(
        &broker.addr,
        &dlq,
        contents.malformed.len(),
        Duration::from_secs(60),
    );
    let mut got: Vec<(i32, i64)> = dead
        .iter()
        .map(|d| {
            (
                d.header("spoke.source.partition").unwrap().parse().unwrap(),
                d.header("spoke.source.offset").unwrap().parse().unwrap(),
            )
        })
        .collect();
    got.sort();
    got.dedup();
    let want: Vec<(i32, i64)> = contents.malformed.keys().copied().collect();
    assert_eq!(got, want, "dead-letter topic misses malformed records");
}

/// The source alone through the same outage: the group session expires while the broker is
/// frozen, and the "pipeline" (this test) answers the revocation only after the partitions were
/// given back to this member. The new assignment waits for that answer, so it starts after the
/// offsets the late snapshot recorded, not at the older ones: nothing is read twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_revocation_answer_moves_the_restart_offset() {
    use spoke::metrics::Metrics;
    use spoke::source::kafka::KafkaSource;
    use spoke::source::{Offsets, Source, SourceItem};
    use std::time::Instant;

    init_logging();
    let broker = Broker::private();
    let pid = broker.pid().expect("broker pid");
    let topic = unique("late");
    create_topic(&broker.addr, &topic, 1);
    spoke_produce(&broker.addr, &topic, &["--count", "300", "--seed", "5"]);
    let mut cfg = source_config(&broker.addr, &topic, &unique("g"));
    cfg.revoke_timeout_ms = 2000;
    let metrics = Metrics::new();
    let mut src = KafkaSource::new(&cfg, metrics.clone()).unwrap();
    src.start(&Offsets::default()).await.unwrap();

    // "Train" the first 100 records.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut offsets = vec![];
    while offsets.len() < 100 {
        assert!(Instant::now() < deadline, "only {} records", offsets.len());
        if let Some(SourceItem::Record(r)) = src.next().await.unwrap() {
            offsets.push(r.position.offset);
        }
    }
    assert_eq!(offsets, (0..100).collect::<Vec<i64>>());
    let assigns = || {
        metrics
            .kafka_rebalances
            .with_label_values(&["assign"])
            .get()
    };
    let assigned_before = assigns();

    // Freeze the broker past the session timeout.
    unsafe {
        libc::kill(pid, libc::SIGSTOP);
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    unsafe {
        libc::kill(pid, libc::SIGCONT);
    }
    // The revocation arrives; hold its answer until the partitions are being assigned again.
    let deadline = Instant::now() + Duration::from_secs(60);
    let ack = loop {
        assert!(Instant::now() < deadline, "no revocation after the outage");
        match src.next().await.unwrap() {
            Some(SourceItem::Revoked { ack, .. }) => break ack.expect("an ack to answer"),
            Some(SourceItem::Record(r)) => panic!("record {:?} before the revocation", r.position),
            _ => {}
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while assigns() == assigned_before {
        assert!(
            Instant::now() < deadline,
            "no new assignment after the outage"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Now "snapshot" what was trained and answer, as the pipeline does.
    let mut trained = Offsets::default();
    trained.set(&topic, 0, 100);
    src.commit(&trained).await.unwrap();
    let _ = ack.send(());

    let deadline = Instant::now() + Duration::from_secs(60);
    let first = loop {
        assert!(
            Instant::now() < deadline,
            "no record after the new assignment"
        );
        if let Some(SourceItem::Record(r)) = src.next().await.unwrap() {
            break r.position.offset;
        }
    };
    assert_eq!(
        first, 100,
        "the new assignment must start after what was trained"
    );
    src.close().await.unwrap();
}
