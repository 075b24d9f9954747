//! kill -9 of `spoke run` at several moments (mid-training, during a snapshot write, right
//! after a snapshot became durable, during the group join), restart, finish: along the
//! snapshot chain every event is accounted exactly once and each valid one trained or held
//! out exactly once.

#[path = "common/kafka.rs"]
mod kafka_common;

use kafka_common::*;
use std::path::Path;
use std::time::{Duration, Instant};

fn snapshot_names(data_dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(data_dir.join("snapshots"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn kill9(child: &mut std::process::Child) {
    unsafe {
        libc::kill(child.id() as i32, libc::SIGKILL);
    }
    let _ = child.wait();
}

#[test]
fn kill_9_at_any_moment_loses_and_repeats_nothing() {
    init_logging();
    let broker = Broker::get();
    let n = 12_000usize;
    let (topic, dlq, contents) = seeded_topics(&broker.addr, "crash", n, 5);
    let dir = tempfile::tempdir().unwrap();
    let spec = RunSpec {
        addr: broker.addr.clone(),
        topic: topic.clone(),
        group: unique("g"),
        dlq,
        data_dir: dir.path().join("data"),
        max_events: n as u64,
        every_steps: 3,
    };
    let snaps = || snapshot_names(&spec.data_dir);
    let durable = |v: &[String]| v.iter().filter(|n| !n.starts_with('.')).count();
    let mut moments = vec![];

    // 1. Mid-training, between snapshots.
    let mut child = spec.spawn();
    wait_for(Duration::from_secs(120), || {
        (durable(&snaps()) >= 2).then_some(())
    })
    .unwrap_or_else(|| panic!("no snapshots:\n{}", spec.log_tail()));
    std::thread::sleep(Duration::from_millis(150));
    kill9(&mut child);
    moments.push("mid-training");

    // 2. During a snapshot write: a `.tmp-` directory exists (retried a few times: the
    //    write of the tiny model is quick).
    let mut caught = false;
    for _ in 0..4 {
        let mut child = spec.spawn();
        let before = durable(&snaps());
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            if snaps().iter().any(|n| n.starts_with(".tmp-")) {
                kill9(&mut child);
                caught = true;
                break;
            }
            if child.try_wait().unwrap().is_some() {
                panic!("spoke run ended early:\n{}", spec.log_tail());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        if caught {
            // A half-written snapshot is left behind and ignored on restart.
            assert!(snaps().iter().any(|n| n.starts_with(".tmp-")));
            break;
        }
        kill9(&mut child);
        assert!(
            durable(&snaps()) > before,
            "no progress:\n{}",
            spec.log_tail()
        );
    }
    assert!(caught, "never caught a snapshot write in progress");
    moments.push("during a snapshot write");

    // 3. Right after a snapshot became durable (before or while its offsets are committed).
    let mut child = spec.spawn();
    let before = durable(&snaps());
    wait_for(Duration::from_secs(90), || {
        (durable(&snaps()) > before).then_some(())
    })
    .unwrap_or_else(|| panic!("no new snapshot:\n{}", spec.log_tail()));
    kill9(&mut child);
    moments.push("right after a snapshot");

    // 4. While joining the group, before anything is consumed.
    let mut child = spec.spawn();
    std::thread::sleep(Duration::from_millis(1500));
    kill9(&mut child);
    moments.push("during the group join");

    // Finish.
    let mut child = spec.spawn();
    spec.wait_ok(&mut child, Duration::from_secs(300));
    let log = std::fs::read_to_string(spec.log_path()).unwrap();
    assert!(log.contains("resumed from"), "the final run did not resume");
    eprintln!("killed at: {moments:?}");

    let rows = chain_events(&spec.data_dir);
    assert_exact_accounting(&rows, &contents);
    // Each valid event trained at most once (exactness above covers "at least").
    let mut trained = std::collections::HashSet::new();
    for r in rows.iter().filter(|r| r.role == "train") {
        assert!(
            trained.insert(r.event_id.clone()),
            "{} trained twice",
            r.event_id
        );
    }
}
