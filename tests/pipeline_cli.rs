//! The command line as a user meets it: help texts, config errors that name the key.

use std::process::Command;

fn spoke(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_spoke"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_explains_the_options() {
    let (ok, out, _) = spoke(&["--help"]);
    assert!(ok);
    for cmd in ["run", "produce", "score", "bench", "snapshot"] {
        assert!(out.contains(cmd), "{out}");
    }
    let (ok, out, _) = spoke(&["run", "--help"]);
    assert!(ok);
    for flag in [
        "--config",
        "--set",
        "--data-dir",
        "--max-events",
        "--objective",
        "--metrics-addr",
        "--brokers",
        "--topic",
        "--group",
        "--dead-letter-topic",
        "--fresh",
    ] {
        assert!(out.contains(flag), "run --help lacks {flag}");
    }
}

#[test]
fn config_errors_name_the_key() {
    let (ok, _, err) = spoke(&["config", "--set", "run.max_eventz=3"]);
    assert!(!ok);
    assert!(err.contains("max_eventz"), "{err}");
    let (ok, _, err) = spoke(&["config", "--set", "objective.kind=ppo"]);
    assert!(!ok);
    assert!(err.contains("objective.kind"), "{err}");
    let (ok, _, err) = spoke(&["run", "--metrics-addr", "nonsense", "--max-events", "1"]);
    assert!(!ok);
    assert!(err.contains("metrics.addr"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[run]\nbatch_size = \"big\"\n").unwrap();
    let (ok, _, err) = spoke(&["config", "--config", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("run.batch_size"), "{err}");
    let (ok, _, err) = spoke(&["config", "--set", "replay.ratio=-1"]);
    assert!(!ok);
    assert!(err.contains("replay.ratio"), "{err}");
    let (ok, out, _) = spoke(&["config", "--set", "objective.kind=pspo"]);
    assert!(ok);
    assert!(out.contains("kind = \"pspo\""), "{out}");
}
