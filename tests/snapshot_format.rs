//! Snapshot format: contents, manifest vs its JSON Schema, Parquet files, verification of
//! corruption, the non-finite guard, background writing, retention and the CLI.

use candle_core::{Device, Tensor};
use serde_json::Value;
use spoke::link::LinkCurve;
use spoke::model::WeightExport;
use spoke::snapshot::writer::BackgroundWriter;
use spoke::snapshot::{
    list, parquet_io, verify, write_snapshot, Evaluation, EventRecord, SnapshotConfig,
    SnapshotContent, StepRecord,
};
use spoke::source::Offsets;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

fn tensor(vals: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(vals.to_vec(), shape, &Device::Cpu).unwrap()
}

/// Four trained pairs, as the learner's replay buffer holds them.
fn replay_batch() -> arrow::record_batch::RecordBatch {
    let rows: Vec<_> = (0..4)
        .map(|i| {
            (
                spoke::source::PreferenceEvent {
                    event_id: format!("syn-0-{i}"),
                    ts: None,
                    prompt: format!("prompt {i}"),
                    response_0: "a".into(),
                    response_1: "b".into(),
                    label: (i % 2) as u8,
                    weight: None,
                    annotator: None,
                    policy_version: None,
                    ref_logp_0: Some(-1.5 - i as f64),
                    ref_logp_1: Some(-2.5),
                },
                spoke::source::Position {
                    stream: "synthetic".into(),
                    partition: 0,
                    offset: i,
                },
            )
        })
        .collect();
    spoke::buffer::to_batch(&rows).unwrap()
}

fn content(step: u64, w: f32) -> SnapshotContent {
    let mut offsets = Offsets::default();
    offsets.set("synthetic", 0, step as i64 * 4);
    let n = 9;
    let t: Vec<f64> = (0..n).map(|i| i as f64 - 4.0).collect();
    let curve = LinkCurve {
        psi: t.iter().map(|t| 1.0 / (1.0 + (-t).exp())).collect(),
        dpsi: t.iter().map(|t| 0.25 / (1.0 + t * t)).collect(),
        mass: vec![1.5; n],
        logistic: t.iter().map(|t| 1.0 / (1.0 + (-0.9 * t).exp())).collect(),
        t,
    };
    SnapshotContent {
        step,
        events_seen: step * 4,
        objective: "dpo".into(),
        config_hash: "ab".repeat(32),
        parent: None,
        weights: WeightExport {
            tensor_file: "model.safetensors".into(),
            tensors: vec![
                ("model.embed_tokens.weight".into(), tensor(&[w; 6], &[2, 3])),
                ("lm_head.weight".into(), tensor(&[0.5, -w], &[2])),
            ],
            side_files: vec![("config.json".into(), br#"{"model_type":"llama"}"#.to_vec())],
        },
        optimizer: vec![
            ("lm_head.weight.exp_avg".into(), tensor(&[0.1, 0.2], &[2])),
            (
                "lm_head.weight.exp_avg_sq".into(),
                tensor(&[0.01, 0.02], &[2]),
            ),
        ],
        optimizer_step: step,
        learner_state: serde_json::json!({"step": step, "link": null, "objective": null}),
        offsets,
        metrics: (1..=step)
            .map(|s| StepRecord {
                step: s,
                time_ms: 1_700_000_000_000 + s as i64,
                objective: "dpo".into(),
                loss: 0.69 - s as f64 * 0.01,
                pairs: 4,
                replayed: 4,
                grad_norm: 0.3,
                index_mean: 0.0,
                index_std: 0.1,
                batch_accuracy: 0.5,
                step_seconds: 0.01,
                link_drift_sup: 0.02,
                link_drift_l2: 0.01,
                applied: s != 2,
            })
            .collect(),
        events: (0..step * 4)
            .map(|i| EventRecord {
                event_id: format!("syn-0-{i}"),
                stream: "synthetic".into(),
                partition: 0,
                offset: i as i64,
                role: if i % 5 == 0 { "holdout" } else { "train" }.into(),
                step: (i % 5 != 0).then_some(i / 4 + 1),
                weight: 1.0,
            })
            .collect(),
        link_curve: curve,
        replay: Some(replay_batch()),
        eval: Some(Evaluation {
            n: 40,
            accuracy: 0.6,
            auc: 0.65,
            dpo_loss: 0.68,
            spo_nll: 0.67,
            kl: f64::NAN,
        }),
    }
}

/// Minimal JSON Schema check (type, required, properties, additionalProperties, enum, oneOf,
/// minimum) — enough for our own schema files.
fn check(schema: &Value, v: &Value, path: &str) -> Result<(), String> {
    if let Some(one) = schema.get("oneOf").and_then(Value::as_array) {
        let ok = one.iter().filter(|s| check(s, v, path).is_ok()).count();
        return if ok == 1 {
            Ok(())
        } else {
            Err(format!("{path}: matches {ok} of oneOf"))
        };
    }
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let is = |ty: &str| match ty {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            _ => false,
        };
        if !types.iter().any(|t| is(t)) {
            return Err(format!("{path}: expected {types:?}, got {v}"));
        }
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return Err(format!("{path}: {v} not in enum"));
        }
    }
    if let (Some(m), Some(x)) = (schema.get("minimum").and_then(Value::as_f64), v.as_f64()) {
        if x < m {
            return Err(format!("{path}: {x} < minimum {m}"));
        }
    }
    if let Some(o) = v.as_object() {
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let r = r.as_str().unwrap();
            if !o.contains_key(r) {
                return Err(format!("{path}: missing required key {r}"));
            }
        }
        let props = schema.get("properties").and_then(Value::as_object);
        for (k, val) in o {
            let sub = format!("{path}.{k}");
            match props.and_then(|p| p.get(k)) {
                Some(s) => check(s, val, &sub)?,
                None => match schema.get("additionalProperties") {
                    Some(Value::Bool(false)) => return Err(format!("{sub}: not allowed")),
                    Some(s @ Value::Object(_)) => check(s, val, &sub)?,
                    _ => {}
                },
            }
        }
    }
    Ok(())
}

fn schema() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/snapshot_manifest.schema.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn snapshot_contents_manifest_schema_and_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let info = write_snapshot(dir.path(), content(3, 0.25)).unwrap();
    assert!(info.name.starts_with("0000000003-"), "{}", info.name);
    let mut names: Vec<String> = std::fs::read_dir(&info.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "config.json",
            "events.parquet",
            "link.parquet",
            "manifest.json",
            "metrics.parquet",
            "model.safetensors",
            "optimizer.safetensors",
            "replay.parquet",
            "state.json"
        ]
    );
    // The manifest on disk matches the schema, and the checksums match the files.
    let raw: Value =
        serde_json::from_slice(&std::fs::read(info.path.join("manifest.json")).unwrap()).unwrap();
    check(&schema(), &raw, "manifest").unwrap();
    assert!(raw["eval"]["kl"].is_null(), "NaN KL is written as null");
    let m = verify(&info.path).unwrap();
    assert_eq!(m.files.len(), 8);
    for (f, sum) in &m.files {
        let bytes = std::fs::read(info.path.join(f)).unwrap();
        assert_eq!(&spoke::util::sha256_hex(&bytes), sum, "{f}");
        assert_eq!(m.sizes[f], bytes.len() as u64, "{f}");
    }
    assert_eq!(m.offsets.get("synthetic", 0), Some(12));
    assert!(m.eval.unwrap().kl.is_nan());
    // A schema violation is caught by the checker (so the check above can fail).
    let mut bad = raw.clone();
    bad["step"] = Value::String("3".into());
    assert!(check(&schema(), &bad, "manifest").is_err());
    bad = raw.clone();
    bad.as_object_mut().unwrap().remove("offsets");
    assert!(check(&schema(), &bad, "manifest").is_err());

    // The weights round-trip with HF metadata.
    let st = std::fs::read(info.path.join("model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&st).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .unwrap()
            .get("format")
            .map(String::as_str),
        Some("pt")
    );
    let w =
        candle_core::safetensors::load(info.path.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(
        w["lm_head.weight"].to_vec1::<f32>().unwrap(),
        vec![0.5, -0.25]
    );

    // Parquet: zstd, schema version, the documented columns, row counts, values.
    for (file, cols, rows) in [
        (
            "link.parquet",
            vec!["t", "psi", "dpsi", "mass", "logistic"],
            9,
        ),
        (
            "metrics.parquet",
            vec![
                "step",
                "time_ms",
                "objective",
                "loss",
                "pairs",
                "replayed",
                "grad_norm",
                "index_mean",
                "index_std",
                "batch_accuracy",
                "step_seconds",
                "link_drift_sup",
                "link_drift_l2",
                "applied",
            ],
            3,
        ),
        (
            "events.parquet",
            vec![
                "event_id",
                "stream",
                "partition",
                "offset",
                "role",
                "step",
                "weight",
            ],
            12,
        ),
        (
            "replay.parquet",
            spoke::buffer::schema()
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect(),
            4,
        ),
    ] {
        let path = info.path.join(file);
        let r =
            parquet::file::reader::SerializedFileReader::new(std::fs::File::open(&path).unwrap())
                .unwrap();
        use parquet::file::reader::FileReader;
        let md = r.metadata();
        for rg in md.row_groups() {
            for c in rg.columns() {
                assert!(
                    matches!(c.compression(), parquet::basic::Compression::ZSTD(_)),
                    "{file} column {} not zstd",
                    c.column_path()
                );
            }
        }
        let kv = md.file_metadata().key_value_metadata().unwrap();
        assert!(kv
            .iter()
            .any(|k| k.key == "spoke.schema_version" && k.value.as_deref() == Some("1")));
        let b = parquet_io::read_parquet(&path).unwrap();
        let got: Vec<String> = b
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(got, cols, "{file}");
        assert_eq!(b.num_rows(), rows, "{file}");
        // Every documented column appears in the schema doc.
        let doc_name = file.replace(".parquet", "_parquet.md");
        let doc = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("schemas")
                .join(&doc_name),
        )
        .unwrap();
        for c in &cols {
            assert!(doc.contains(&format!("`{c}`")), "{doc_name} lacks {c}");
        }
    }
    let link = parquet_io::read_parquet(&info.path.join("link.parquet")).unwrap();
    let psi = link
        .column_by_name("psi")
        .unwrap()
        .as_any()
        .downcast_ref::<arrow::array::Float64Array>()
        .unwrap();
    assert!((psi.value(4) - 0.5).abs() < 1e-12);
    let s = parquet_io::summarize_metrics(&info.path.join("metrics.parquet")).unwrap();
    assert_eq!((s.rows, s.rejected_steps, s.last_step), (3, 1, Some(3)));
    let roles = parquet_io::count_event_roles(&info.path.join("events.parquet")).unwrap();
    assert_eq!(roles["holdout"], 3);
    assert_eq!(roles["train"], 9);

    pyarrow_check(&info.path);
}

/// If Python with pyarrow is installed, read every Parquet file with it too (the CI image may
/// not have it; then the parquet-crate checks above are what runs).
fn pyarrow_check(dir: &Path) {
    let probe = Command::new("python3")
        .args(["-c", "import pyarrow"])
        .output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        eprintln!("pyarrow not installed: skipping the pyarrow read check");
        return;
    }
    let script = r#"
import sys, pyarrow.parquet as pq
d = sys.argv[1]
for f, n in [("link.parquet", 9), ("metrics.parquet", 3), ("events.parquet", 12)]:
    t = pq.read_table(f"{d}/{f}")
    assert t.num_rows == n, (f, t.num_rows)
    md = pq.ParquetFile(f"{d}/{f}").metadata
    assert md.row_group(0).column(0).compression == "ZSTD", f
print("pyarrow ok")
"#;
    let o = Command::new("python3")
        .args(["-c", script, dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "pyarrow check failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn verify_detects_corruption_and_non_finite_weights_are_never_written() {
    let dir = tempfile::tempdir().unwrap();
    let info = write_snapshot(dir.path(), content(2, 1.0)).unwrap();
    verify(&info.path).unwrap();

    // Flip one byte in the weights: checksum mismatch naming the file.
    let f = info.path.join("model.safetensors");
    let orig = std::fs::read(&f).unwrap();
    let mut bytes = orig.clone();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&f, &bytes).unwrap();
    let e = format!("{:#}", verify(&info.path).unwrap_err());
    assert!(e.contains("checksum mismatch for model.safetensors"), "{e}");
    // Truncate: size mismatch.
    std::fs::write(&f, &orig[..orig.len() - 3]).unwrap();
    let e = format!("{:#}", verify(&info.path).unwrap_err());
    assert!(e.contains("size mismatch for model.safetensors"), "{e}");
    std::fs::write(&f, &orig).unwrap();
    verify(&info.path).unwrap();
    // An extra file, a missing file, a broken manifest.
    std::fs::write(info.path.join("extra.bin"), b"x").unwrap();
    let e = format!("{:#}", verify(&info.path).unwrap_err());
    assert!(e.contains("unexpected file extra.bin"), "{e}");
    std::fs::remove_file(info.path.join("extra.bin")).unwrap();
    std::fs::remove_file(info.path.join("link.parquet")).unwrap();
    let e = format!("{:#}", verify(&info.path).unwrap_err());
    assert!(e.contains("missing file link.parquet"), "{e}");
    std::fs::write(info.path.join("manifest.json"), b"{\"format_version\": 1").unwrap();
    let e = format!("{:#}", verify(&info.path).unwrap_err());
    assert!(e.contains("manifest.json is not valid"), "{e}");

    // Non-finite weights: refused, nothing left behind.
    let dir2 = tempfile::tempdir().unwrap();
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut c = content(5, 0.1);
        c.weights.tensors[0].1 = tensor(&[0.1, 0.2, bad, 0.3, 0.4, 0.5], &[2, 3]);
        let e = format!("{:#}", write_snapshot(dir2.path(), c).unwrap_err());
        assert!(
            e.contains("model.embed_tokens.weight") && e.contains("not finite"),
            "{e}"
        );
    }
    let mut c = content(5, 0.1);
    c.optimizer[1].1 = tensor(&[f32::NAN, 0.0], &[2]);
    let e = format!("{:#}", write_snapshot(dir2.path(), c).unwrap_err());
    assert!(e.contains("lm_head.weight.exp_avg_sq"), "{e}");
    let left: Vec<_> = std::fs::read_dir(dir2.path().join("snapshots"))
        .map(|d| d.collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "nothing may be written: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_writer_retention_and_tmp_gc() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    // A stale temporary directory from a crashed writer is removed at startup.
    let stale = data.join("snapshots/.tmp-0000000009-deadbeef");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), b"partial").unwrap();
    let cfg = SnapshotConfig {
        every_steps: 1,
        keep_last: 2,
    };
    let mut w = BackgroundWriter::new(data, cfg.clone()).unwrap();
    assert!(!stale.exists());
    // First snapshot: the "resumed-from" one, protected.
    w.submit(content(1, 0.1)).unwrap();
    let first = w.wait_idle().await;
    assert_eq!(first.len(), 1);
    let first = first.into_iter().next().unwrap().unwrap();
    w.protect(&first.name);
    for s in 2..=6 {
        w.submit(content(s, s as f32)).unwrap();
    }
    let done = w.wait_idle().await;
    assert_eq!(done.len(), 5);
    let infos: Vec<_> = done.into_iter().map(|r| r.unwrap()).collect();
    let steps: Vec<u64> = infos.iter().map(|i| i.manifest.step).collect();
    assert_eq!(steps, [2, 3, 4, 5, 6], "completions in submission order");
    // Parents chain through the writer.
    assert_eq!(
        infos[0].manifest.parent.as_deref(),
        Some(first.name.as_str())
    );
    for k in 1..infos.len() {
        assert_eq!(
            infos[k].manifest.parent.as_deref(),
            Some(infos[k - 1].name.as_str())
        );
    }
    let kept: BTreeSet<u64> = list(data)
        .unwrap()
        .iter()
        .map(|p| verify(p).unwrap().step)
        .collect();
    assert_eq!(kept, BTreeSet::from([1, 5, 6]));
    assert!(w.try_completed().is_empty());

    // A promoted snapshot survives retention.
    let five = infos[3].path.clone();
    spoke::promote::promote(data, &five, "manual", "test").unwrap();
    drop(w);
    let mut w = BackgroundWriter::new(data, cfg).unwrap();
    for s in 7..=9 {
        w.submit(content(s, 0.5)).unwrap();
    }
    for r in w.wait_idle().await {
        r.unwrap();
    }
    let kept: BTreeSet<u64> = list(data)
        .unwrap()
        .iter()
        .map(|p| verify(p).unwrap().step)
        .collect();
    // 1 is no longer protected by this writer; 5 is promoted; 8, 9 are the last two.
    assert_eq!(kept, BTreeSet::from([5, 8, 9]));

    // Creation order, not step order: a fresh lineage (steps from 1 again) is the newest.
    w.submit(content(1, 0.7)).unwrap();
    let fresh = w.wait_idle().await.pop().unwrap().unwrap();
    let all = list(data).unwrap();
    assert_eq!(all.last().unwrap(), &fresh.path);
    assert!(verify(&all[all.len() - 2]).unwrap().step == 9);

    // A refused write comes back as an error and the writer keeps going.
    let mut bad = content(10, 0.5);
    bad.weights.tensors[1].1 = tensor(&[f32::NAN, 1.0], &[2]);
    w.submit(bad).unwrap();
    w.submit(content(11, 0.5)).unwrap();
    let r = w.wait_idle().await;
    assert!(r[0].is_err() && r[1].is_ok());
}

#[test]
fn cli_list_inspect_verify_promote_export() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let a = write_snapshot(data, content(1, 0.1)).unwrap();
    let b = write_snapshot(data, content(2, 0.2)).unwrap();
    let spoke = env!("CARGO_BIN_EXE_spoke");
    let run = |args: &[&str]| {
        Command::new(spoke)
            .args(["snapshot", "--data-dir", data.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap()
    };
    let o = run(&["verify", &a.name]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&["promote", &b.name, "--reason", "looks good"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&["list"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    let line_b = out.lines().find(|l| l.starts_with(&b.name)).unwrap();
    assert!(
        line_b.contains("current") && line_b.contains("0.6500"),
        "{out}"
    );
    let line_a = out.lines().find(|l| l.starts_with(&a.name)).unwrap();
    assert!(!line_a.contains("current"), "{out}");
    let o = run(&["inspect", b.path.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        out.contains("verify: ok") && out.contains("metrics: 2 steps"),
        "{out}"
    );
    assert!(out.contains("2 holdout, 6 train"), "{out}");
    let p = spoke::promote::current(data).unwrap().unwrap();
    assert_eq!(
        (p.name.as_str(), p.kind.as_str()),
        (b.name.as_str(), "manual")
    );

    // Export: weights and side files only.
    let to = data.join("export");
    let o = run(&["export", "promoted", "--to", to.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut files: Vec<String> = std::fs::read_dir(&to)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    files.sort();
    assert_eq!(files, ["config.json", "model.safetensors"]);
    assert_eq!(
        std::fs::read(to.join("model.safetensors")).unwrap(),
        std::fs::read(b.path.join("model.safetensors")).unwrap()
    );
    // Export into a non-empty directory is refused.
    let o = run(&["export", &b.name, "--to", to.to_str().unwrap()]);
    assert!(!o.status.success());

    // Corrupt a: verify exits non-zero with a clear message; promote refuses it.
    let f = a.path.join("optimizer.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&f, bytes).unwrap();
    let o = run(&["verify", &a.name]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("checksum mismatch for optimizer.safetensors"),
        "{err}"
    );
    let o = run(&["promote", &a.name]);
    assert!(!o.status.success());
    assert_eq!(spoke::promote::current(data).unwrap().unwrap().name, b.name);
    let o = run(&["verify", "no-such-snapshot"]);
    assert_eq!(o.status.code(), Some(1));
}
