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
