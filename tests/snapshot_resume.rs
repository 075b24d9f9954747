//! Resume continues exactly: N steps straight vs N/2 + snapshot + fresh learner + resume +
//! N/2 give bit-identical weights, optimizer state and learner state; a corrupted newest
//! snapshot is skipped on resume in favour of the previous good one.

mod snapshot_support;
use snapshot_support::*;
use spoke::objective::ObjectiveKind;
use spoke::snapshot::{resume, write_snapshot};

const N: u64 = 16;

#[test]
fn resume_is_bit_exact_for_every_objective() {
    for kind in [
        ObjectiveKind::Dpo,
        ObjectiveKind::Pspo,
        ObjectiveKind::Ospo,
        ObjectiveKind::Rspo,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = base_config(dir.path());
        cfg.objective.kind = kind;
        cfg.objective.warmup_steps = 3;

        let mut straight = learner(&cfg, 7);
        train(&mut straight, &cfg, 0, N, false);

        let mut first = learner(&cfg, 7);
        train(&mut first, &cfg, 0, N / 2, false);
        let info = write_snapshot(dir.path(), content(&first, &cfg, None)).unwrap();
        drop(first);

        // A fresh process: new learner from the initial weights, then resume.
        let mut resumed = learner(&cfg, 7);
        let r = resume::load_latest(dir.path(), &mut resumed)
            .unwrap()
            .expect("a snapshot to resume from");
        assert_eq!(r.name, info.name);
        assert_eq!(resumed.step_count(), N / 2);
        assert_eq!(
            r.manifest.offsets.get("synthetic", 0),
            Some((N / 2 * 8) as i64)
        );
        train(&mut resumed, &cfg, N / 2, N / 2, false);

        assert_eq!(resumed.step_count(), straight.step_count());
        assert!(
            weight_bytes(&resumed) == weight_bytes(&straight),
            "{kind:?}: weights differ after resume"
        );
        assert!(
            optimizer_bytes(&resumed) == optimizer_bytes(&straight),
            "{kind:?}: optimizer state differs after resume"
        );
        assert_eq!(
            serde_json::to_string(&resumed.state()).unwrap(),
            serde_json::to_string(&straight.state()).unwrap(),
            "{kind:?}: learner state (link, objective memory) differs"
        );
        // The weights really moved (the comparison is not trivially equal).
        assert!(weight_bytes(&straight) != weight_bytes(&learner(&cfg, 7)));
    }
}

#[test]
fn corrupted_newest_snapshot_is_skipped_and_resume_still_exact() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = base_config(dir.path());
    let mut straight = learner(&cfg, 3);
    train(&mut straight, &cfg, 0, N, false);

    let mut l = learner(&cfg, 3);
    train(&mut l, &cfg, 0, N / 4, false);
    let good = write_snapshot(dir.path(), content(&l, &cfg, None)).unwrap();
    train(&mut l, &cfg, N / 4, N / 4, false);
    let newest = write_snapshot(dir.path(), content(&l, &cfg, None)).unwrap();
    drop(l);
    // Corrupt the newest: one flipped byte in the optimizer state.
    let f = newest.path.join("optimizer.safetensors");
    let mut b = std::fs::read(&f).unwrap();
    let k = b.len() / 2;
    b[k] ^= 0x01;
    std::fs::write(&f, b).unwrap();
    let err = format!("{:#}", spoke::snapshot::verify(&newest.path).unwrap_err());
    assert!(
        err.contains("checksum mismatch for optimizer.safetensors"),
        "{err}"
    );

    let mut resumed = learner(&cfg, 3);
    let r = resume::load_latest(dir.path(), &mut resumed)
        .unwrap()
        .unwrap();
    assert_eq!(r.name, good.name);
    assert_eq!(r.skipped, vec![newest.name.clone()]);
    assert_eq!(resumed.step_count(), N / 4);
    train(&mut resumed, &cfg, N / 4, N - N / 4, false);
    assert!(weight_bytes(&resumed) == weight_bytes(&straight));

    // With every snapshot corrupted there is nothing to resume from.
    std::fs::write(good.path.join("state.json"), b"{}").unwrap();
    let mut fresh = learner(&cfg, 3);
    assert!(resume::load_latest(dir.path(), &mut fresh)
        .unwrap()
        .is_none());
    assert_eq!(fresh.step_count(), 0);
}

/// The real binary on the deterministic synthetic stream: 256 records straight vs 128, stop,
/// resume to 256. The final weights, optimizer state and learner state are bit-identical.
/// Runs the binary straight to 256 events, and stopped at 128 then resumed to 256, with the
/// extra `--set`s; asserts the two final snapshots are identical and returns them.
fn straight_vs_resumed(
    dir: &std::path::Path,
    extra: &[&str],
) -> (std::path::PathBuf, std::path::PathBuf) {
    let run = |data: &std::path::Path, max: u64| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_spoke"));
        c.args(["run", "-q", "--data-dir", data.to_str().unwrap()])
            .args(["--max-events", &max.to_string()])
            .args([
                "--set",
                "metrics.addr=\"\"",
                "--set",
                "run.batch_size=16",
                "--set",
                "run.holdout_fraction=0",
                "--set",
                "snapshot.every_steps=3",
                "--set",
                "objective.warmup_steps=2",
            ]);
        for e in extra {
            c.args(["--set", e]);
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let a = dir.join("straight");
    let b = dir.join("stopped");
    run(&a, 256);
    run(&b, 128);
    let mid = spoke::snapshot::list(&b).unwrap().pop().unwrap();
    assert_eq!(spoke::snapshot::verify(&mid).unwrap().step, 8);
    let log = run(&b, 256);
    assert!(log.contains("Resumed from snapshot"), "{log}");
    let last = |d: &std::path::Path| spoke::snapshot::list(d).unwrap().pop().unwrap();
    let (sa, sb) = (last(&a), last(&b));
    let (ma, mb) = (
        spoke::snapshot::verify(&sa).unwrap(),
        spoke::snapshot::verify(&sb).unwrap(),
    );
    assert_eq!((ma.step, ma.events_seen), (16, 256));
    assert_eq!((mb.step, mb.events_seen), (16, 256));
    assert_eq!(ma.offsets, mb.offsets);
    for f in [
        ma.weights_file.as_str(),
        "optimizer.safetensors",
        "replay.parquet",
    ] {
        assert!(
            std::fs::read(sa.join(f)).unwrap() == std::fs::read(sb.join(f)).unwrap(),
            "{f} differs between the straight and the resumed run ({extra:?})"
        );
    }
    let state = |d: &std::path::Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(d.join("state.json")).unwrap()).unwrap()
    };
    assert_eq!(state(&sa), state(&sb));
    (sa, sb)
}

#[test]
fn lora_with_dropout_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (sa, _) = straight_vs_resumed(
        dir.path(),
        &["model.train=\"lora\"", "model.lora.dropout=0.1"],
    );
    assert!(sa.join("adapter_model.safetensors").exists());
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sa.join("state.json")).unwrap()).unwrap();
    assert!(
        st["learner"]["policy_rng"]["word_pos"].as_str().unwrap() != "0",
        "dropout drew no random numbers: {st}"
    );
}

#[test]
fn binary_stop_and_resume_matches_straight_run() {
    let dir = tempfile::tempdir().unwrap();
    let (_, sb) = straight_vs_resumed(dir.path(), &[]);
    let b = dir.path().join("stopped");
    // Export the resumed run's final snapshot as an HF model directory and load it back.
    let to = dir.path().join("export");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spoke"))
        .args(["snapshot", "--data-dir", b.to_str().unwrap(), "export"])
        .arg(sb.file_name().unwrap())
        .args(["--to", to.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in ["model.safetensors", "config.json", "tokenizer.json"] {
        assert!(to.join(f).exists(), "export lacks {f}");
    }
    assert!(!to.join("optimizer.safetensors").exists() && !to.join("state.json").exists());
    python_load_check(&to);
    // A fresh run over the same data directory ignores the snapshots.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spoke"))
        .args(["run", "-q", "--fresh", "--data-dir", b.to_str().unwrap()])
        .args(["--max-events", "16", "--set", "metrics.addr=\"\""])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(!log.contains("Resumed from snapshot"), "{log}");
}

/// The exported directory loads in Python: with `safetensors` (numpy) installed, every tensor
/// is read and checked finite; with `transformers` + `torch` too, the directory loads with
/// `AutoModelForCausalLM.from_pretrained` and runs a forward pass. Skipped (with a note)
/// when Python lacks them; the CI image may not have them.
fn python_load_check(dir: &std::path::Path) {
    let has = |m: &str| {
        std::process::Command::new("python3")
            .args(["-c", &format!("import {m}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    if !has("safetensors.numpy") {
        eprintln!("python safetensors/numpy not installed: skipping the Python load check");
        return;
    }
    let script = r#"
import sys, numpy as np
from safetensors.numpy import load_file
from safetensors import safe_open
d = sys.argv[1]
t = load_file(f"{d}/model.safetensors")
assert len(t) > 0 and all(np.isfinite(v).all() for v in t.values())
with safe_open(f"{d}/model.safetensors", "np") as f:
    assert f.metadata().get("format") == "pt", f.metadata()
try:
    import torch, transformers
except ImportError:
    print("transformers/torch not installed: safetensors check only"); sys.exit(0)
m = transformers.AutoModelForCausalLM.from_pretrained(d)
out = m(torch.tensor([[1, 2, 3]]))
assert torch.isfinite(out.logits).all()
print("transformers ok")
"#;
    let o = std::process::Command::new("python3")
        .args(["-c", script, dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "Python load check failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}
