//! A tiny run of `spoke bench synthetic` through the real binary: output files, their
//! columns and row counts, and sanity of the measured curves.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

fn read(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines();
    let header = lines.next().unwrap().split(',').map(String::from).collect();
    let rows = lines
        .map(|l| l.split(',').map(String::from).collect())
        .collect();
    (header, rows)
}

const COLS: [&str; 8] = [
    "seed",
    "n",
    "s",
    "tau",
    "method",
    "beta",
    "avg_reward",
    "avg_kl",
];

/// Checks one study's rows: 23 β per (seed, s, method[, extra]), KL ≥ 0 and falling in β,
/// and every method near the same reward at β = 1000 (π_β ≈ π_ref there).
fn check_rows(rows: &[Vec<String>], ncols: usize, expect_groups: usize) {
    let mut groups: BTreeMap<Vec<String>, Vec<(f64, f64, f64)>> = BTreeMap::new();
    for r in rows {
        assert_eq!(r.len(), ncols, "row {r:?}");
        assert_eq!(r[1], "200");
        assert_eq!(r[3], "0.25");
        assert!(
            ["dpo", "pspo", "ospo", "rspo"].contains(&r[4].as_str()),
            "{r:?}"
        );
        let mut key = vec![r[0].clone(), r[2].clone(), r[4].clone()];
        key.extend(r[8..].iter().cloned());
        let b: f64 = r[5].parse().unwrap();
        let rw: f64 = r[6].parse().unwrap();
        let kl: f64 = r[7].parse().unwrap();
        assert!(rw.is_finite() && kl.is_finite());
        assert!(kl >= -1e-9, "negative KL {kl} in {r:?}");
        groups.entry(key).or_default().push((b, rw, kl));
    }
    assert_eq!(groups.len(), expect_groups);
    let mut at_ref: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (k, mut v) in groups {
        assert_eq!(v.len(), 23, "{k:?}");
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert_eq!(v[0].0, 0.2);
        assert_eq!(v[22].0, 1000.0);
        for w in v.windows(2) {
            assert!(
                w[1].2 <= w[0].2 + 1e-9,
                "KL must fall as β grows: {k:?} {w:?}"
            );
        }
        assert!(v[22].2 < 1e-3, "π_1000 is nearly π_ref: {k:?}");
        at_ref
            .entry(format!("{}/{}", k[0], k[1]))
            .or_default()
            .push(v[22].1);
    }
    for (k, v) in at_ref {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |a, x| (a.0.min(*x), a.1.max(*x)));
        assert!(hi - lo < 0.05, "{k}: rewards at β = 1000 differ: {v:?}");
    }
}

#[test]
fn tiny_synthetic_benchmark_writes_consistent_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench");
    let status = Command::new(env!("CARGO_BIN_EXE_spoke"))
        .args([
            "bench",
            "synthetic",
            "--seeds",
            "3..4",
            "--s",
            "0,1.5",
            "--n",
            "200",
            "--eval-contexts",
            "200",
            "--epochs",
            "4",
            "--ospo-warm",
            "1",
            "--pspo-warm",
            "1",
            "--pspo-outer",
            "2",
            "--pspo-inner",
            "1",
            "--epochs-budget",
            "1,3",
            "--stream-batch",
            "16",
            "--threads",
            "2",
            "--no-progress",
            "--out",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());

    let (h, rows) = read(&out.join("results.csv"));
    assert_eq!(h, COLS);
    check_rows(&rows, 8, 2 * 4);
    let methods: BTreeSet<&str> = rows.iter().map(|r| r[4].as_str()).collect();
    assert_eq!(methods.len(), 4);

    let (h, rows) = read(&out.join("budget.csv"));
    assert_eq!(h[..8], COLS);
    assert_eq!(h[8], "epochs");
    let epochs: BTreeSet<&str> = rows.iter().map(|r| r[8].as_str()).collect();
    assert_eq!(epochs, BTreeSet::from(["1", "3"]));
    check_rows(&rows, 9, 2 * 4 * 2);
    // After one epoch DPO and PSPO (1 warm-up epoch) are both one epoch of DPO from the same
    // initialisation on the same minibatches: identical curves.
    let curve = |m: &str| -> Vec<String> {
        rows.iter()
            .filter(|r| r[8] == "1" && r[2] == "1.5" && r[4] == m)
            .map(|r| format!("{} {}", r[6], r[7]))
            .collect()
    };
    assert_eq!(curve("dpo"), curve("pspo"));
    assert_ne!(curve("dpo"), curve("rspo"));

    // spoke's PSPO (block knots): at the paper schedule (3 epochs) and each budget.
    let (h, vrows) = read(&out.join("variants.csv"));
    assert_eq!(h[..8], COLS);
    assert_eq!(h[8..], ["epochs", "knots"]);
    assert!(vrows.iter().all(|r| r[4] == "pspo" && r[9] == "blocks"));
    check_rows(&vrows, 10, 2 * 2);
    let vcurve = |e: &str| -> Vec<String> {
        vrows
            .iter()
            .filter(|r| r[8] == e && r[2] == "1.5")
            .map(|r| format!("{} {}", r[6], r[7]))
            .collect()
    };
    // One warm-up epoch is DPO for both knot placements; after the isotonic rounds they differ.
    assert_eq!(vcurve("1"), curve("dpo"));
    let pspo3: Vec<String> = rows
        .iter()
        .filter(|r| r[8] == "3" && r[2] == "1.5" && r[4] == "pspo")
        .map(|r| format!("{} {}", r[6], r[7]))
        .collect();
    assert_eq!(pspo3.len(), 23);
    assert_ne!(vcurve("3"), pspo3);

    // Streaming, one run per replay ratio (0, 1, 4 by default).
    let (h, rows) = read(&out.join("streaming.csv"));
    assert_eq!(h[..8], COLS);
    assert_eq!(h[8], "mode");
    let modes: BTreeSet<&str> = rows.iter().map(|r| r[8].as_str()).collect();
    assert_eq!(
        modes,
        BTreeSet::from(["stream_replay0", "stream_replay1", "stream_replay4"])
    );
    check_rows(&rows, 9, 2 * 4 * 3);
    let scurve = |mode: &str| -> Vec<String> {
        rows.iter()
            .filter(|r| r[8] == mode && r[2] == "0" && r[4] == "dpo")
            .map(|r| format!("{} {}", r[6], r[7]))
            .collect()
    };
    assert_ne!(scurve("stream_replay0"), scurve("stream_replay1"));

    // Comparing a run with itself: every cell agrees, exactly.
    let o = Command::new(env!("CARGO_BIN_EXE_spoke"))
        .args(["bench", "compare", "--check", "--ours"])
        .arg(out.join("results.csv"))
        .arg("--reference")
        .arg(out.join("results.csv"))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{table}");
    assert_eq!(table.matches("| yes |").count(), 2 * 4, "{table}");
    assert!(table.contains("| 1.5 | ospo | 1/1 |"), "{table}");

    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    for m in [
        "dpo",
        "pspo",
        "ospo",
        "rspo",
        "paired gain",
        "Matched budgets",
        "one knot per PAVA block",
        "Streaming",
        "Replay ratio 4",
    ] {
        assert!(md.contains(m), "summary.md lacks {m}");
    }
    // The at-a-glance table: one row per s, DPO's level as in the paper-protocol table, then a
    // gain for PSPO, OSPO, RSPO and spoke's PSPO (block knots).
    let glance: Vec<&str> = md
        .split("## At a glance")
        .nth(1)
        .expect("summary.md has the at-a-glance table")
        .lines()
        .filter(|l| l.starts_with("| 0 |") || l.starts_with("| 1.5 |"))
        .take_while(|l| l.matches('|').count() == 7)
        .collect();
    assert_eq!(glance.len(), 2, "{md}");
    for row in glance {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let dpo_row = format!("| {} | dpo | {} |", cells[1], cells[2]);
        assert!(
            md.contains(&dpo_row),
            "{dpo_row} not in the paper table:\n{md}"
        );
        for g in &cells[3..7] {
            assert!(
                g.parse::<f64>().is_ok_and(f64::is_finite),
                "gain {g:?} in {row}"
            );
        }
    }
    for png in [
        "reward_kl_s0.png",
        "reward_kl_s1.5.png",
        "reward_vs_s.png",
        "budget_s1.5.png",
    ] {
        let b = std::fs::read(out.join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert!(b.len() > 1000 && b.starts_with(b"\x89PNG"), "{png}");
    }

    // Bad input fails with a message, not a panic.
    let o = Command::new(env!("CARGO_BIN_EXE_spoke"))
        .args(["bench", "synthetic", "--methods", "ppo", "--out"])
        .arg(dir.path().join("bad"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("ppo"));
}
