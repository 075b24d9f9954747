//! `spoke score` end to end: the binary reproduces the HF fixture's cases.jsonl (compared in
//! Rust, and with the fixture's compare_logprobs.py when python3 is available), and scores a
//! LoRA snapshot written by `export()` as a PEFT adapter directory exactly as the policy does.

use spoke::model::{load_lm, LmPolicy, LoraConfig, ModelConfig, Policy, TrainMode};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/hf-tiny-llama")
}

fn read_jsonl(p: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn spoke(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_spoke"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "spoke {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn score_reproduces_the_fixture() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("scored.jsonl");
    let cases = fixture().join("cases.jsonl");
    spoke(&[
        "score",
        "--model",
        fixture().to_str().unwrap(),
        "--input",
        cases.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--batch-size",
        "7",
    ]);
    let expected = read_jsonl(&cases);
    let actual = read_jsonl(&out);
    assert_eq!(actual.len(), expected.len());
    let by_key: HashMap<(String, String), &serde_json::Value> = actual
        .iter()
        .map(|a| {
            (
                (
                    a["prompt"].as_str().unwrap().to_string(),
                    a["response"].as_str().unwrap().to_string(),
                ),
                a,
            )
        })
        .collect();
    let mut worst = 0f64;
    for (i, e) in expected.iter().enumerate() {
        // Output keeps the input order and every input field.
        assert_eq!(actual[i]["prompt"], e["prompt"]);
        let key = (
            e["prompt"].as_str().unwrap().to_string(),
            e["response"].as_str().unwrap().to_string(),
        );
        let a = by_key.get(&key).expect("case missing from the output");
        let d = (a["logp"].as_f64().unwrap() - e["logp"].as_f64().unwrap()).abs();
        worst = worst.max(d);
        assert!(d <= 1e-3, "case {i}: diff {d}");
        assert_eq!(a["n_response_tokens"], e["n_response_tokens"]);
    }
    eprintln!("spoke score vs transformers: max abs diff {worst:.3e}");
    // The fixture's own checker (standard library only), when python3 is installed.
    let py = Command::new("python3").arg("--version").output();
    if py.map(|o| o.status.success()).unwrap_or(false) {
        let st = Command::new("python3")
            .arg(fixture().join("compare_logprobs.py"))
            .arg(&cases)
            .arg(&out)
            .status()
            .unwrap();
        assert!(st.success(), "compare_logprobs.py rejected the output");
    } else {
        eprintln!("python3 not found: skipped compare_logprobs.py");
    }
}

#[test]
fn score_applies_a_lora_snapshot_like_the_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let cfg = ModelConfig {
        train: TrainMode::Lora,
        lora: LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
        },
        ..Default::default()
    };
    let mut policy = load_lm(&cfg, &data).unwrap();
    // Non-zero B so that the adapter changes the log-probs.
    let mut m = HashMap::new();
    for (name, v) in policy.trainable() {
        let t = if name.contains("lora_B") {
            candle_core::Tensor::randn(0f32, 0.2, v.dims(), v.device()).unwrap()
        } else {
            v.as_tensor().copy().unwrap()
        };
        m.insert(name, t);
    }
    policy.load_trainable(&m).unwrap();
    // Write the export as a snapshot directory would.
    let exp = policy.export().unwrap();
    assert_eq!(exp.tensor_file, "adapter_model.safetensors");
    let adir = tmp.path().join("adapter");
    std::fs::create_dir_all(&adir).unwrap();
    spoke::util::save_safetensors(&adir.join(&exp.tensor_file), &exp.tensors).unwrap();
    for (name, bytes) in &exp.side_files {
        std::fs::write(adir.join(name), bytes).unwrap();
    }
    let prompts = [
        "Once upon a time",
        "The answer is ",
        "Question: why?\nAnswer:",
    ];
    let responses = [" there was a bird.", "42.", " Because the river is cold."];
    let input = tmp.path().join("in.jsonl");
    let lines: Vec<String> = prompts
        .iter()
        .zip(&responses)
        .map(|(p, r)| serde_json::json!({"prompt": p, "response": r, "id": 7}).to_string())
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let model_dir = data.join("model");
    let run = |adapter: Option<&Path>| -> Vec<f64> {
        let mut args = vec![
            "score".to_string(),
            "--model".into(),
            model_dir.display().to_string(),
            "--input".into(),
            input.display().to_string(),
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter".into(), a.display().to_string()]);
        }
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let out = spoke(&a);
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                assert_eq!(v["id"], 7);
                v["logp"].as_f64().unwrap()
            })
            .collect()
    };
    let with = run(Some(&adir));
    let without = run(None);
    let (pol, _) = policy.score(&prompts, &responses, false).unwrap();
    let (reference, _) = policy.score(&prompts, &responses, true).unwrap();
    for i in 0..3 {
        assert!(
            (with[i] - pol[i] as f64).abs() < 1e-4,
            "{} vs {}",
            with[i],
            pol[i]
        );
        assert!((without[i] - reference[i] as f64).abs() < 1e-4);
        assert!(
            (with[i] - without[i]).abs() > 1e-2,
            "the adapter changed nothing"
        );
    }
    // A fresh LoRA policy restored from the written file gives the same numbers.
    let tensors =
        candle_core::safetensors::load(adir.join(&exp.tensor_file), &candle_core::Device::Cpu)
            .unwrap();
    let mut fresh = LmPolicy::load(&model_dir, &cfg, None).unwrap();
    fresh.load_trainable(&tensors).unwrap();
    let (again, _) = fresh.score(&prompts, &responses, false).unwrap();
    assert_eq!(again, pol);
}
