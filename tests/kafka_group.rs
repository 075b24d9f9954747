//! Two `spoke run` processes in one consumer group split the partitions; one leaves
//! (SIGTERM: final snapshot + commit), the other takes its partitions over: across both
//! snapshot chains no event is lost or accounted twice.

#[path = "common/kafka.rs"]
mod kafka_common;

use kafka_common::*;
use std::collections::BTreeSet;
use std::time::Duration;

fn partitions_trained(rows: &[EventRow]) -> BTreeSet<i32> {
    rows.iter()
        .filter(|r| r.role == "train")
        .map(|r| r.partition)
        .collect()
}

fn sigterm(child: &std::process::Child) {
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
}

#[test]
fn a_member_leaves_and_the_other_takes_over_exactly() {
    init_logging();
    let broker = Broker::get();
    let n = 16_000usize;
    let (topic, dlq, contents) = seeded_topics(&broker.addr, "grp", n, 9);
    let group = unique("g");
    let dir = tempfile::tempdir().unwrap();
    let spec = |name: &str, max_events: u64| RunSpec {
        addr: broker.addr.clone(),
        topic: topic.clone(),
        group: group.clone(),
        dlq: dlq.clone(),
        data_dir: dir.path().join(name),
        max_events,
        every_steps: 3,
    };
    let a = spec("a", 0);
    let b = spec("b", 0);

    // A alone owns every partition.
    let mut ca = a.spawn();
    wait_for(Duration::from_secs(120), || {
        (!chain_events(&a.data_dir).is_empty()).then_some(())
    })
    .unwrap_or_else(|| panic!("A made no snapshot:\n{}", a.log_tail()));
    // B joins: the group splits the partitions; both train.
    let mut cb = b.spawn();
    let split = wait_for(Duration::from_secs(120), || {
        let pb = partitions_trained(&chain_events(&b.data_dir));
        (!pb.is_empty()).then_some(pb)
    })
    .unwrap_or_else(|| {
        panic!(
            "B never trained:\nA:\n{}\nB:\n{}",
            a.log_tail(),
            b.log_tail()
        )
    });
    assert!(
        split.len() < 4,
        "B got every partition while A was still a member: {split:?}"
    );
    assert!(
        std::fs::read_to_string(a.log_path())
            .unwrap()
            .contains("revoked"),
        "A saw no revocation"
    );

    // A leaves cleanly; B takes over A's partitions.
    sigterm(&ca);
    a.wait_ok(&mut ca, Duration::from_secs(60));
    let a_rows = chain_events(&a.data_dir);
    let a_parts = partitions_trained(&a_rows);
    wait_for(Duration::from_secs(180), || {
        let pb = partitions_trained(&chain_events(&b.data_dir));
        let covered = a_rows.len() + chain_events(&b.data_dir).len();
        (pb.len() == 4 && covered + 4 * 64 * 2 >= n).then_some(())
    })
    .unwrap_or_else(|| panic!("B did not take over:\n{}", b.log_tail()));
    sigterm(&cb);
    b.wait_ok(&mut cb, Duration::from_secs(60));

    // No event twice across the two members.
    let b_rows = chain_events(&b.data_dir);
    let mut both = a_rows.clone();
    both.extend(b_rows.iter().cloned());
    let acc = account(&both);
    assert!(
        acc.duplicates.is_empty(),
        "accounted twice: {:?}",
        &acc.duplicates[..acc.duplicates.len().min(5)]
    );
    // A's former partitions continued in B.
    assert!(partitions_trained(&b_rows).is_superset(&a_parts));

    // What neither accounted for is still in Kafka past the group's committed offsets: a
    // final run of B consumes exactly that and the union is then the whole topic.
    let remaining = (n - acc.positions.len()) as u64;
    let b_seen = manifests(&b.data_dir)[&chain_head(&b.data_dir).unwrap()]["events_seen"]
        .as_u64()
        .unwrap();
    let b2 = RunSpec {
        max_events: b_seen + remaining,
        ..spec("b", 0)
    };
    let mut cb2 = b2.spawn();
    b2.wait_ok(&mut cb2, Duration::from_secs(180));
    let mut both = a_rows;
    both.extend(chain_events(&b.data_dir));
    assert_exact_accounting(&both, &contents);
}
