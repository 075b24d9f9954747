//! Gradient flow and training: a real forward/backward gives every trainable tensor a
//! non-zero finite gradient (full and LoRA; Llama with GQA, Qwen2 with q/k/v biases and tied
//! embeddings, Mistral), and the DPO loss falls on a fixed small batch (full and LoRA).

use candle_core::Tensor;
use spoke::link::{LinkConfig, RecursiveLink};
use spoke::model::{tiny, LmPolicy, LoraConfig, ModelConfig, Policy, TrainMode};
use spoke::objective::{index, Divergence, Objective, ObjectiveConfig};
use spoke::optim::{AdamW, OptimConfig};
use std::collections::HashMap;
use std::path::Path;

const PROMPTS: [&str; 4] = [
    "The old man said that the river",
    "Question: where is the market?\nAnswer:",
    "Once upon a time",
    "What a great day",
];
const CHOSEN: [&str; 4] = [
    " was cold.",
    " near the river.",
    " there was a bird.",
    " it was!",
];
const REJECTED: [&str; 4] = [" ran.", " I do not know", " the end", " no"];

fn small_config(arch: &str, tied: bool) -> serde_json::Value {
    let mut c = tiny::config_json(&spoke::model::TinyConfig {
        vocab_size: 512,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        seed: 3,
    });
    c["tie_word_embeddings"] = tied.into();
    match arch {
        "qwen2" => {
            c["model_type"] = "qwen2".into();
            c["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
            c["rope_theta"] = 1_000_000.0.into();
        }
        "mistral" => {
            c["model_type"] = "mistral".into();
            c["architectures"] = serde_json::json!(["MistralForCausalLM"]);
            c["sliding_window"] = 6.into(); // shorter than the sequences: exercises the window
        }
        _ => {}
    }
    c
}

fn make_model(root: &Path, arch: &str, tied: bool) -> std::path::PathBuf {
    let dir = root.join(format!("{arch}-{tied}"));
    tiny::write_model_dir(&dir, &small_config(arch, tied), tiny::TOKENIZER_JSON, 11).unwrap();
    dir
}

fn load(dir: &Path, train: TrainMode, dropout: f64) -> LmPolicy {
    let cfg = ModelConfig {
        path: Some(dir.to_path_buf()),
        train,
        lora: LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout,
            target_modules: [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        },
        ..Default::default()
    };
    LmPolicy::load(dir, &cfg, None).unwrap()
}

fn dpo_index(p: &LmPolicy) -> Tensor {
    let n = PROMPTS.len();
    let prompts: Vec<&str> = PROMPTS.iter().chain(PROMPTS.iter()).copied().collect();
    let resp: Vec<&str> = REJECTED.iter().chain(CHOSEN.iter()).copied().collect();
    let r = p.ref_logps(&prompts, &resp).unwrap();
    let lp = p.logps(&prompts, &resp, true).unwrap();
    let dev = p.device().clone();
    let r0 = Tensor::from_vec(r[..n].to_vec(), n, &dev).unwrap();
    let r1 = Tensor::from_vec(r[n..].to_vec(), n, &dev).unwrap();
    index(
        Divergence::Kl,
        &lp.narrow(0, n, n).unwrap(),
        &r1,
        &lp.narrow(0, 0, n).unwrap(),
        &r0,
    )
    .unwrap()
}

fn dpo_loss(obj: &mut Objective, link: &RecursiveLink, t: &Tensor) -> Tensor {
    let n = t.dim(0).unwrap();
    let z = Tensor::ones(n, candle_core::DType::F32, t.device()).unwrap();
    let w = Tensor::ones(n, candle_core::DType::F32, t.device()).unwrap();
    obj.loss(t, &z, &w, link, 100).unwrap()
}

fn assert_all_grads(p: &LmPolicy, what: &str) {
    let mut obj = Objective::new(ObjectiveConfig::default());
    let link = RecursiveLink::new(LinkConfig::default());
    // The policy starts equal to the reference (t = 0); the DPO gradient is still non-zero.
    let loss = dpo_loss(&mut obj, &link, &dpo_index(p));
    let grads = loss.backward().unwrap();
    let vars = p.trainable();
    assert!(!vars.is_empty());
    for (name, v) in &vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{what}: no gradient for {name}"));
        let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            g.iter().all(|x| x.is_finite()),
            "{what}: non-finite gradient for {name}"
        );
        assert!(
            g.iter().any(|x| *x != 0.0),
            "{what}: zero gradient for {name}"
        );
    }
}

/// LoRA B starts at zero (so A gets no gradient at init, as in PEFT): give B random values.
fn randomize_lora_b(p: &mut LmPolicy) {
    let mut m = HashMap::new();
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    for (name, v) in p.trainable() {
        let t = if name.contains("lora_B") {
            let vals: Vec<f32> = (0..v.elem_count())
                .map(|_| rng.random_range(-0.1f32..0.1))
                .collect();
            Tensor::from_vec(vals, v.dims(), v.device()).unwrap()
        } else {
            v.as_tensor().copy().unwrap()
        };
        m.insert(name, t);
    }
    p.load_trainable(&m).unwrap();
}

#[test]
fn every_trainable_tensor_gets_a_gradient() {
    let root = tempfile::tempdir().unwrap();
    for (arch, tied) in [
        ("llama", false),
        ("qwen2", true),
        ("qwen2", false),
        ("mistral", false),
    ] {
        let dir = make_model(root.path(), arch, tied);
        let full = load(&dir, TrainMode::Full, 0.0);
        let n_expected = spoke::model::llama::param_specs(full.config()).len();
        assert_eq!(full.trainable().len(), n_expected);
        if arch == "qwen2" {
            assert!(full
                .trainable()
                .iter()
                .any(|(n, _)| n.ends_with("q_proj.bias")));
        }
        assert_eq!(
            full.trainable().iter().any(|(n, _)| n == "lm_head.weight"),
            !tied
        );
        assert_all_grads(&full, &format!("{arch} tied={tied} full"));
        let mut lora = load(&dir, TrainMode::Lora, 0.1);
        assert_eq!(lora.trainable().len(), 2 * 7 * 2);
        randomize_lora_b(&mut lora);
        assert_all_grads(&lora, &format!("{arch} tied={tied} lora"));
    }
}

fn train_losses(p: &LmPolicy, lr: f64, steps: usize) -> Vec<f64> {
    let mut obj = Objective::new(ObjectiveConfig::default());
    let link = RecursiveLink::new(LinkConfig::default());
    let mut opt = AdamW::new(
        p.trainable(),
        OptimConfig {
            lr,
            ..Default::default()
        },
    )
    .unwrap();
    let mut out = vec![];
    for _ in 0..steps {
        let loss = dpo_loss(&mut obj, &link, &dpo_index(p));
        out.push(loss.to_scalar::<f32>().unwrap() as f64);
        let info = opt.step(&loss.backward().unwrap()).unwrap();
        assert!(info.finite);
    }
    out
}

#[test]
fn dpo_loss_falls_full_and_lora() {
    let root = tempfile::tempdir().unwrap();
    let dir = make_model(root.path(), "llama", false);
    for (mode, lr) in [(TrainMode::Full, 1e-2), (TrainMode::Lora, 2e-2)] {
        let p = load(&dir, mode, 0.0);
        let kl0 = p.kl_estimate(&PROMPTS, 8, 1).unwrap();
        assert_eq!(kl0, 0.0, "policy == reference at start");
        let l = train_losses(&p, lr, 40);
        eprintln!("{mode:?}: {:?}", l);
        assert!(
            (l[0] - std::f64::consts::LN_2).abs() < 1e-5,
            "{mode:?} starts at {}",
            l[0]
        );
        let last = *l.last().unwrap();
        // Full fine-tuning fits 4 pairs quickly; rank-4 adapters on a random 32-wide model
        // move more slowly but steadily.
        let target = if mode == TrainMode::Full { 0.2 } else { 0.75 } * l[0];
        assert!(last < target, "{mode:?}: loss {} -> {last}", l[0]);
        // The reference stays frozen: its log-probs are those of the initial weights.
        let fresh = load(&dir, mode, 0.0);
        let a = p.ref_logps(&PROMPTS, &CHOSEN).unwrap();
        let b = fresh.ref_logps(&PROMPTS, &CHOSEN).unwrap();
        assert_eq!(a, b);
        // KL(π‖π_ref) by sampling: positive after training, deterministic in the seed.
        let many: Vec<&str> = PROMPTS.iter().cycle().take(16).copied().collect();
        let kl = p.kl_estimate(&many, 12, 7).unwrap();
        assert!(kl.is_finite() && kl > 0.0, "{mode:?}: kl {kl}");
        assert_eq!(kl, p.kl_estimate(&many, 12, 7).unwrap());
        let c = p.score(&PROMPTS, &CHOSEN, false).unwrap().0;
        assert!(c.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-3));
    }
}

/// Autograd against central finite differences, for the largest-gradient element of several
/// tensors (embedding, attention and MLP weights, a q bias, norm gains, LoRA A and B): the
/// backward pass is the derivative of the forward pass, through masking and padding.
#[test]
fn gradients_match_finite_differences() {
    let root = tempfile::tempdir().unwrap();
    let dir = make_model(root.path(), "qwen2", false);
    let mut lora = load(&dir, TrainMode::Lora, 0.0);
    randomize_lora_b(&mut lora);
    let full = load(&dir, TrainMode::Full, 0.0);
    let f = |p: &LmPolicy| -> f64 {
        let prompts: Vec<&str> = PROMPTS.iter().chain(PROMPTS.iter()).copied().collect();
        let resp: Vec<&str> = REJECTED.iter().chain(CHOSEN.iter()).copied().collect();
        let (lp, _) = p.score(&prompts, &resp, false).unwrap();
        lp.iter().map(|x| *x as f64).sum()
    };
    let checks: [(&LmPolicy, &str); 8] = [
        (&full, "model.embed_tokens.weight"),
        (&full, "model.layers.0.self_attn.q_proj.weight"),
        (&full, "model.layers.0.self_attn.k_proj.bias"),
        (&full, "model.layers.1.mlp.down_proj.weight"),
        (&full, "model.layers.1.input_layernorm.weight"),
        (&full, "lm_head.weight"),
        (
            &lora,
            "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight",
        ),
        (
            &lora,
            "base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight",
        ),
    ];
    for (p, name) in checks {
        let prompts: Vec<&str> = PROMPTS.iter().chain(PROMPTS.iter()).copied().collect();
        let resp: Vec<&str> = REJECTED.iter().chain(CHOSEN.iter()).copied().collect();
        let out = p.logps(&prompts, &resp, false).unwrap().sum_all().unwrap();
        let grads = out.backward().unwrap();
        let var = p
            .trainable()
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no trainable {name}"))
            .1;
        let g: Vec<f32> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (k, gk) = g
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .map(|(k, v)| (k, *v as f64))
            .unwrap();
        let orig = var.as_tensor().copy().unwrap();
        let flat: Vec<f32> = orig.flatten_all().unwrap().to_vec1().unwrap();
        let h = 1e-2f32;
        let at = |delta: f32| -> f64 {
            let mut v = flat.clone();
            v[k] += delta;
            var.set(&Tensor::from_vec(v, orig.shape(), orig.device()).unwrap())
                .unwrap();
            f(p)
        };
        // Richardson-extrapolated central differences (error O(h⁴)).
        let d1 = (at(h) - at(-h)) / (2.0 * h as f64);
        let d2 = (at(h / 2.0) - at(-h / 2.0)) / h as f64;
        let fd = (4.0 * d2 - d1) / 3.0;
        var.set(&orig).unwrap();
        let err = (fd - gk).abs();
        eprintln!("{name}[{k}]: autograd {gk:.5} finite-diff {fd:.5}");
        assert!(
            err <= 0.03 * gk.abs() + 2e-3,
            "{name}[{k}]: autograd {gk} vs finite difference {fd}"
        );
    }
}
