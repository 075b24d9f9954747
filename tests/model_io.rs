//! Loading and writing models: the embedded tiny model (created once, reused, safetensors with
//! HF metadata), HF config variants (transformers 4 and 5 keys, sharded weights), clear errors,
//! full and LoRA exports (HF directory / PEFT names) and their round trip.

use spoke::model::{load_lm, load_policy, LmPolicy, LoraConfig, ModelConfig, Policy, TrainMode};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/hf-tiny-llama")
}

const P: [&str; 2] = ["The old man said that the river", "Once upon a time"];
const R: [&str; 2] = [
    " was cold and the light was good.",
    " there was a small bird.",
];

fn safetensors_metadata(p: &Path) -> serde_json::Value {
    let b = std::fs::read(p).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let h: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    h["__metadata__"].clone()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn cfg_for(dir: &Path) -> ModelConfig {
    ModelConfig {
        path: Some(dir.to_path_buf()),
        ..Default::default()
    }
}

#[test]
fn tiny_model_is_created_once_and_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = ModelConfig::default();
    let a = load_policy(&cfg, tmp.path()).unwrap();
    let dir = tmp.path().join("model");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    assert_eq!(
        safetensors_metadata(&dir.join("model.safetensors"))["format"],
        "pt"
    );
    let conf: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(conf["hidden_size"], 64);
    assert_eq!(conf["num_key_value_heads"], 2);
    let before = std::fs::read(dir.join("model.safetensors")).unwrap();
    let b = load_policy(&cfg, tmp.path()).unwrap();
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        before
    );
    assert_eq!(a.ref_logps(&P, &R).unwrap(), b.ref_logps(&P, &R).unwrap());
    // Same seed in another directory: the same weights (seeded init).
    let tmp2 = tempfile::tempdir().unwrap();
    load_policy(&cfg, tmp2.path()).unwrap();
    assert_eq!(
        std::fs::read(tmp2.path().join("model/model.safetensors")).unwrap(),
        before
    );
    // Other [model.tiny] settings against the existing directory: a clear error.
    let mut other = cfg.clone();
    other.tiny.seed = 5;
    let err = load_policy(&other, tmp.path()).err().unwrap().to_string();
    assert!(err.contains("spoke_tiny_seed"), "{err}");
    // A too-small vocabulary for the shipped tokenizer.
    let mut small = ModelConfig::default();
    small.tiny.vocab_size = 100;
    let err = load_policy(&small, tempfile::tempdir().unwrap().path())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("vocab_size"), "{err}");
    // Natural init scale: the untrained tiny model is close to uniform over 512 tokens.
    let lp = a.ref_logps(&["a"], &["b"]).unwrap()[0];
    assert!((lp + (512f32).ln()).abs() < 0.5, "{lp}");
}

#[test]
fn config_variants_shards_and_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let base = LmPolicy::load(&fixture(), &cfg_for(&fixture()), None).unwrap();
    let want = base.score(&P, &R, false).unwrap().0;
    let edit = |name: &str, f: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let d = tmp.path().join(name);
        copy_dir(&fixture(), &d);
        let mut c: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap();
        f(c.as_object_mut().unwrap());
        std::fs::write(d.join("config.json"), serde_json::to_vec(&c).unwrap()).unwrap();
        d
    };
    // transformers-4 keys only, and transformers-5 keys only.
    let v4 = edit("v4", &|c| {
        c.remove("dtype");
        c.remove("rope_parameters");
    });
    let v5 = edit("v5", &|c| {
        c.remove("torch_dtype");
        c.remove("rope_theta");
    });
    for d in [&v4, &v5] {
        let p = LmPolicy::load(d, &cfg_for(d), None).unwrap();
        assert_eq!(p.score(&P, &R, false).unwrap().0, want);
    }
    // rope_theta matters (so the v5 path really read rope_parameters).
    let theta = edit("theta", &|c| {
        c.remove("rope_theta");
        c.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_theta": 1e5, "rope_type": "default"}),
        );
    });
    let p = LmPolicy::load(&theta, &cfg_for(&theta), None).unwrap();
    assert!((p.score(&P, &R, false).unwrap().0[0] - want[0]).abs() > 1e-2);
    // Errors name what is wrong.
    let bad = edit("arch", &|c| {
        c.insert("model_type".into(), "gpt2".into());
    });
    let e = LmPolicy::load(&bad, &cfg_for(&bad), None).err().unwrap();
    assert!(format!("{e:#}").contains("gpt2"), "{e:#}");
    let bad = edit("arch2", &|c| {
        c.insert(
            "architectures".into(),
            serde_json::json!(["FalconForCausalLM"]),
        );
    });
    let e = LmPolicy::load(&bad, &cfg_for(&bad), None).err().unwrap();
    assert!(format!("{e:#}").contains("FalconForCausalLM"), "{e:#}");
    let bad = edit("key", &|c| {
        c.remove("hidden_size");
    });
    let e = LmPolicy::load(&bad, &cfg_for(&bad), None).err().unwrap();
    assert!(format!("{e:#}").contains("`hidden_size`"), "{e:#}");
    // Claiming tied embeddings drops lm_head; claiming a Qwen2 makes q/k/v biases required.
    let bad = edit("qwen", &|c| {
        c.insert("model_type".into(), "qwen2".into());
        c.insert(
            "architectures".into(),
            serde_json::json!(["Qwen2ForCausalLM"]),
        );
    });
    let e = LmPolicy::load(&bad, &cfg_for(&bad), None).err().unwrap();
    assert!(
        format!("{e:#}").contains("missing tensor model.layers.0.self_attn.q_proj.bias"),
        "{e:#}"
    );
    // Sharded checkpoint: split the fixture's tensors over two files with an index.
    let d = tmp.path().join("sharded");
    copy_dir(&fixture(), &d);
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let all = candle_core::safetensors::load(
        fixture().join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let ts: Vec<(String, candle_core::Tensor)> = part
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        spoke::util::save_safetensors(&d.join(file), &ts).unwrap();
        for n in part {
            map.insert((*n).clone(), file.into());
        }
    }
    std::fs::write(
        d.join("model.safetensors.index.json"),
        serde_json::to_vec(&serde_json::json!({"metadata": {}, "weight_map": map})).unwrap(),
    )
    .unwrap();
    let p = LmPolicy::load(&d, &cfg_for(&d), None).unwrap();
    assert_eq!(p.score(&P, &R, false).unwrap().0, want);
    // A missing tensor is named.
    std::fs::remove_file(d.join("model-00002-of-00002.safetensors")).unwrap();
    let e = LmPolicy::load(&d, &cfg_for(&d), None).err().unwrap();
    assert!(format!("{e:#}").contains("model-00002-of-00002"), "{e:#}");
}

#[test]
fn truncation_left_for_prompts_right_for_responses() {
    let mut cfg = cfg_for(&fixture());
    cfg.max_prompt_tokens = 3;
    cfg.max_response_tokens = 2;
    let p = LmPolicy::load(&fixture(), &cfg, None).unwrap();
    let full = LmPolicy::load(&fixture(), &cfg_for(&fixture()), None).unwrap();
    let pi = full.tokenize(P[0]).unwrap();
    let ri = full.tokenize(R[0]).unwrap();
    let seq = p.encode_pair(P[0], R[0]).unwrap();
    let mut want = pi[pi.len() - 3..].to_vec();
    want.extend(&ri[..2]);
    assert_eq!(seq.ids, want);
    assert_eq!(seq.n_scored, 2);
    let (_, n) = p.score(&P, &R, false).unwrap();
    assert_eq!(n, vec![2, 2]);
}

#[test]
fn exports_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    // Full fine-tune: an HF directory that loads back with the trained weights.
    let cfg = ModelConfig::default();
    let mut pol = load_lm(&cfg, &data).unwrap();
    let mut changed = HashMap::new();
    for (n, v) in pol.trainable() {
        changed.insert(n, (v.as_tensor() * 1.5).unwrap());
    }
    pol.load_trainable(&changed).unwrap();
    let want = pol.score(&P, &R, false).unwrap().0;
    assert_ne!(want, pol.score(&P, &R, true).unwrap().0);
    let exp = pol.export().unwrap();
    assert_eq!(exp.tensor_file, "model.safetensors");
    let files: Vec<&str> = exp.side_files.iter().map(|(n, _)| n.as_str()).collect();
    assert!(files.contains(&"config.json") && files.contains(&"tokenizer.json"));
    let out = tmp.path().join("full");
    std::fs::create_dir_all(&out).unwrap();
    spoke::util::save_safetensors(&out.join(&exp.tensor_file), &exp.tensors).unwrap();
    for (n, b) in &exp.side_files {
        std::fs::write(out.join(n), b).unwrap();
    }
    let back = LmPolicy::load(&out, &cfg_for(&out), None).unwrap();
    assert_eq!(back.score(&P, &R, false).unwrap().0, want);
    // load_trainable accepts exactly what export wrote, and rejects strangers.
    let tensors =
        candle_core::safetensors::load(out.join(&exp.tensor_file), &candle_core::Device::Cpu)
            .unwrap();
    let mut fresh = load_lm(&cfg, &data).unwrap();
    fresh.load_trainable(&tensors).unwrap();
    assert_eq!(fresh.score(&P, &R, false).unwrap().0, want);
    let mut bad = tensors.clone();
    bad.remove("model.norm.weight");
    let e = fresh.load_trainable(&bad).err().unwrap().to_string();
    assert!(e.contains("model.norm.weight"), "{e}");

    // LoRA: PEFT names and shapes, adapter_config.json, round trip.
    let lcfg = ModelConfig {
        train: TrainMode::Lora,
        lora: LoraConfig {
            r: 4,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: vec!["q_proj".into(), "up_proj".into()],
        },
        ..Default::default()
    };
    let lp = load_lm(&lcfg, &data).unwrap();
    let exp = lp.export().unwrap();
    assert_eq!(exp.tensor_file, "adapter_model.safetensors");
    let shapes: HashMap<String, Vec<usize>> = exp
        .tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.dims().to_vec()))
        .collect();
    assert_eq!(shapes.len(), 2 * 2 * 2);
    assert_eq!(
        shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
        vec![4, 64]
    );
    assert_eq!(
        shapes["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"],
        vec![176, 4]
    );
    // B starts at zero: the policy equals the reference.
    assert_eq!(
        lp.score(&P, &R, false).unwrap().0,
        lp.score(&P, &R, true).unwrap().0
    );
    let (name, bytes) = &exp.side_files[0];
    assert_eq!(name, "adapter_config.json");
    let ac: serde_json::Value = serde_json::from_slice(bytes).unwrap();
    assert_eq!(ac["peft_type"], "LORA");
    assert_eq!(ac["task_type"], "CAUSAL_LM");
    assert_eq!(ac["r"], 4);
    assert_eq!(ac["lora_alpha"], 16.0);
    assert_eq!(ac["lora_dropout"], 0.05);
    assert_eq!(ac["bias"], "none");
    assert_eq!(
        ac["target_modules"],
        serde_json::json!(["q_proj", "up_proj"])
    );
    // Dropout is seeded: two policies built alike give the same training-mode log-probs.
    let lp2 = load_lm(&lcfg, &data).unwrap();
    let mut m = HashMap::new();
    for (n, v) in lp.trainable() {
        m.insert(n, (v.as_tensor() + 0.1).unwrap());
    }
    let mut lp = lp;
    let mut lp2 = lp2;
    lp.load_trainable(&m).unwrap();
    lp2.load_trainable(&m).unwrap();
    let a = lp.logps(&P, &R, true).unwrap().to_vec1::<f32>().unwrap();
    let b = lp2.logps(&P, &R, true).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(a, b);
    let c = lp.logps(&P, &R, false).unwrap().to_vec1::<f32>().unwrap();
    assert_ne!(a, c, "dropout had no effect in training mode");
}

#[test]
fn half_precision_weights_keep_f32_log_probs() {
    // The CUDA path's dtype handling, exercised on the CPU: bf16 and f16 weights, f32 output.
    let want = LmPolicy::load(&fixture(), &cfg_for(&fixture()), None)
        .unwrap()
        .score(&P, &R, false)
        .unwrap()
        .0;
    for dt in ["bf16", "f16"] {
        let mut cfg = cfg_for(&fixture());
        cfg.dtype = dt.into();
        let p = LmPolicy::load(&fixture(), &cfg, None).unwrap();
        let t = p.logps(&P, &R, true).unwrap();
        assert_eq!(t.dtype(), candle_core::DType::F32);
        let got = t.to_vec1::<f32>().unwrap();
        for (g, w) in got.iter().zip(&want) {
            // ×15-scaled fixture weights in 8-bit-mantissa bf16: a few nats on ~-150.
            assert!(
                g.is_finite() && (g - w).abs() < 0.05 * w.abs(),
                "{dt}: {g} vs {w}"
            );
        }
        // Gradients flow in half precision too.
        let g = t.sum_all().unwrap().backward().unwrap();
        assert!(p
            .trainable()
            .iter()
            .all(|(_, v)| g.get(v.as_tensor()).is_some()));
    }
    let mut cfg = cfg_for(&fixture());
    cfg.device = "cuda:0".into();
    match LmPolicy::load(&fixture(), &cfg, None) {
        Err(e) if !cfg!(feature = "cuda") => {
            assert!(e.to_string().contains("--features cuda"), "{e}")
        }
        Err(e) => eprintln!("cuda build without a usable GPU: {e:#}"),
        Ok(_) if cfg!(feature = "cuda") => {}
        Ok(_) => panic!("cuda:0 loaded without the cuda feature"),
    }
}
