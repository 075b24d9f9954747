//! kill -9 during snapshot writes: the real binary on the synthetic stream is SIGKILLed at
//! different moments (while a snapshot is being written, i.e. a `.tmp-*` directory exists;
//! right after a snapshot appears; at arbitrary times). After every kill each snapshot
//! directory verifies, a restarted run resumes only from a verified snapshot (the newest),
//! and finally a restarted run finishes normally.

use spoke::snapshot::{list, snapshots_dir, verify};
use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn start(data: &Path, max_events: u64) -> Child {
    Command::new(env!("CARGO_BIN_EXE_spoke"))
        .args(["run", "-q", "--data-dir", data.to_str().unwrap()])
        .args(["--max-events", &max_events.to_string()])
        .args([
            "--set",
            "metrics.addr=\"\"",
            "--set",
            "snapshot.every_steps=1",
            "--set",
            "snapshot.keep_last=3",
            "--set",
            "run.batch_size=4",
            "--set",
            "promote.every_steps=2",
            "--set",
            "promote.min_holdout=1",
            "--set",
            "promote.min_auc=0",
        ])
        .env("SPOKE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning spoke")
}

fn tmp_names(data: &Path) -> BTreeSet<String> {
    std::fs::read_dir(snapshots_dir(data))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with(".tmp-"))
                .collect()
        })
        .unwrap_or_default()
}

fn tmp_dirs(data: &Path) -> usize {
    tmp_names(data).len()
}

fn snapshot_count(data: &Path) -> usize {
    list(data).map(|v| v.len()).unwrap_or(0)
}

/// Every snapshot directory left verifies; returns the newest one's name.
fn all_verify(data: &Path, when: &str) -> Option<String> {
    let snaps = list(data).unwrap();
    for s in &snaps {
        if let Err(e) = verify(s) {
            panic!("after {when}: torn or corrupted snapshot left behind: {e:#}");
        }
    }
    if let Some(p) = spoke::promote::current(data).unwrap() {
        // The pointer is whole and points at a verifying snapshot (promoted ones are kept).
        verify(&data.join(&p.path))
            .unwrap_or_else(|e| panic!("after {when}: promoted snapshot invalid: {e:#}"));
    }
    snaps
        .last()
        .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
}

fn kill(mut child: Child) -> String {
    child.kill().unwrap(); // SIGKILL on Unix
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn resumed_from(stderr: &str) -> Option<String> {
    stderr
        .lines()
        .find_map(|l| l.split("Resumed from snapshot ").nth(1))
        .map(|r| r.split_whitespace().next().unwrap().to_string())
}

/// Wait until `cond` holds (polling fast) or the deadline passes.
fn wait_for(child: &mut Child, secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        if cond() {
            return true;
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("spoke exited early: {st}");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    false
}

#[test]
fn kill_9_never_leaves_a_torn_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut newest: Option<String> = None;
    let mut during_write = 0;
    // Moments: 0 = during a write (a .tmp dir exists), 1 = right after a new snapshot
    // appears, 2 = after an arbitrary delay.
    let plan = [0, 0, 1, 2, 0, 1, 0, 2];
    for (round, moment) in plan.iter().enumerate() {
        let mut child = start(&data, 1_000_000);
        let before = snapshot_count(&data);
        match moment {
            0 => {
                // A temporary directory this run is writing (not one left by the last kill).
                let stale = tmp_names(&data);
                if wait_for(&mut child, 60, || {
                    tmp_names(&data).difference(&stale).next().is_some()
                }) {
                    during_write += 1;
                }
            }
            1 => {
                let base = newest.clone();
                assert!(
                    wait_for(&mut child, 60, || {
                        list(&data)
                            .unwrap()
                            .last()
                            .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
                            != base
                    }),
                    "no new snapshot appeared (had {before})"
                );
            }
            _ => std::thread::sleep(Duration::from_millis(300 + 170 * round as u64)),
        }
        let stderr = kill(child);
        let when = format!("kill {round} (moment {moment})");
        // The run resumed from the newest snapshot left by the previous kill (which verified).
        if let Some(prev) = &newest {
            if let Some(r) = resumed_from(&stderr) {
                assert_eq!(&r, prev, "{when}: resumed from {r}, expected {prev}");
            }
        }
        newest = all_verify(&data, &when).or(newest);
        eprintln!(
            "{when}: {} snapshots, newest {newest:?}, {} tmp, resumed from {:?}",
            snapshot_count(&data),
            tmp_dirs(&data),
            resumed_from(&stderr)
        );
    }
    assert!(
        during_write >= 2,
        "only {during_write} kills landed while a snapshot was being written"
    );
    assert!(newest.is_some(), "no snapshot survived");
    // Periodic promotion ran (every 2 steps) and its pointer survived the kills.
    let promoted = spoke::promote::current(&data)
        .unwrap()
        .expect("a promotion");
    verify(&data.join(&promoted.path)).unwrap();

    // Corrupt the newest snapshot: the next run must skip it and resume from the previous.
    let snaps = list(&data).unwrap();
    assert!(snaps.len() >= 2);
    let last = snaps.last().unwrap();
    let f = last.join("state.json");
    let mut b = std::fs::read(&f).unwrap();
    b[0] ^= 0x20;
    std::fs::write(&f, b).unwrap();
    let expect = snaps[snaps.len() - 2]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    let prev_manifest = verify(&snaps[snaps.len() - 2]).unwrap();

    // A restarted run finishes normally (it stops after a few more records).
    let out = Command::new(env!("CARGO_BIN_EXE_spoke"))
        .args(["run", "-q", "--data-dir", data.to_str().unwrap()])
        .args([
            "--max-events",
            &(prev_manifest.events_seen + 40).to_string(),
        ])
        .args([
            "--set",
            "metrics.addr=\"\"",
            "--set",
            "snapshot.every_steps=5",
            "--set",
            "run.batch_size=4",
        ])
        .env("SPOKE_LOG", "info")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "restarted run failed: {stderr}");
    assert!(
        stderr.contains("Skipping snapshot") && stderr.contains("checksum mismatch"),
        "{stderr}"
    );
    assert_eq!(
        resumed_from(&stderr).as_deref(),
        Some(expect.as_str()),
        "{stderr}"
    );
    assert_eq!(
        tmp_dirs(&data),
        0,
        "stale temporary directories were not collected"
    );
    let final_snap = list(&data).unwrap().into_iter().last().unwrap();
    let m = verify(&final_snap).unwrap();
    assert!(
        m.step > prev_manifest.step,
        "{} <= {}",
        m.step,
        prev_manifest.step
    );
    assert_eq!(m.events_seen, prev_manifest.events_seen + 40);
}
