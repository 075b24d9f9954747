//! 50,000 events (1% malformed in varied ways) through `spoke run` with the Kafka config:
//! trained + held out + dead-lettered = produced, each offset exactly once along the snapshot
//! chain, and the dead-letter topic holds each malformed record with its reason.

#[path = "common/kafka.rs"]
mod kafka_common;

use kafka_common::*;
use std::time::Duration;

#[test]
fn every_event_is_trained_held_out_or_dead_lettered_exactly_once() {
    init_logging();
    let broker = Broker::get();
    let n = 50_000usize;
    let (topic, dlq, contents) = seeded_topics(&broker.addr, "acct", n, 11);
    assert!(
        (300..=700).contains(&contents.malformed.len()),
        "{} malformed",
        contents.malformed.len()
    );

    let dir = tempfile::tempdir().unwrap();
    let spec = RunSpec {
        addr: broker.addr.clone(),
        topic: topic.clone(),
        group: unique("g"),
        dlq: dlq.clone(),
        data_dir: dir.path().join("data"),
        max_events: n as u64,
        every_steps: 100,
    };
    let t0 = std::time::Instant::now();
    let mut child = spec.spawn();
    spec.wait_ok(&mut child, Duration::from_secs(600));
    eprintln!(
        "spoke run over {n} events took {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let log = std::fs::read_to_string(spec.log_path()).unwrap();
    assert!(
        log.contains(&format!("{n} consumed")),
        "{}",
        spec.log_tail()
    );

    let rows = chain_events(&spec.data_dir);
    assert_exact_accounting(&rows, &contents);
    let acc = account(&rows);
    assert!(
        acc.train > n / 2 && acc.holdout > 0,
        "train {} holdout {}",
        acc.train,
        acc.holdout
    );

    // The dead-letter topic: each malformed record once, original bytes, reason and source.
    let dead = read_topic(
        &broker.addr,
        &dlq,
        contents.malformed.len(),
        Duration::from_secs(60),
    );
    assert_eq!(dead.len(), contents.malformed.len());
    let mut reasons = std::collections::BTreeSet::new();
    let mut seen = std::collections::BTreeSet::new();
    for d in &dead {
        assert_eq!(
            d.header("spoke.source.topic").as_deref(),
            Some(topic.as_str())
        );
        let p: i32 = d.header("spoke.source.partition").unwrap().parse().unwrap();
        let o: i64 = d.header("spoke.source.offset").unwrap().parse().unwrap();
        let original = contents
            .malformed
            .get(&(p, o))
            .unwrap_or_else(|| panic!("dead letter for {p}/{o} is not a malformed record"));
        assert_eq!(
            &d.payload, original,
            "dead letter {p}/{o} changed the bytes"
        );
        let reason = d.header("spoke.error").expect("spoke.error header");
        assert!(!reason.is_empty());
        reasons.insert(reason.split(':').next().unwrap_or("").to_string());
        assert!(seen.insert((p, o)), "dead letter {p}/{o} twice");
    }
    assert!(
        reasons.len() >= 4,
        "malformed kinds not varied: {reasons:?}"
    );
}
