//! The embedded default model: a small Llama-architecture config with seeded random weights
//! and the byte-level BPE tokenizer shipped in the crate, written as a Hugging Face model
//! directory under `<data_dir>/model/` on first run and reused afterwards.

use super::config::LlamaConfig;
use super::llama::{param_specs, Init};
use super::TinyConfig;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use std::path::{Path, PathBuf};

/// The shipped tokenizer: byte-level BPE, 512 tokens (`<|endoftext|>` = 0, `<|pad|>` = 1,
/// 256 byte tokens, 254 merges).
pub const TOKENIZER_JSON: &str = include_str!("tiny_tokenizer.json");
/// Vocabulary size of [`TOKENIZER_JSON`].
pub const TOKENIZER_VOCAB: usize = 512;
/// Standard deviation of the normal initialisation (HF `initializer_range`).
pub const INIT_STD: f64 = 0.02;

/// `config.json` of the tiny model.
pub fn config_json(t: &TinyConfig) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 1,
        "head_dim": t.hidden_size / t.num_attention_heads.max(1),
        "hidden_act": "silu",
        "hidden_size": t.hidden_size,
        "initializer_range": INIT_STD,
        "intermediate_size": t.intermediate_size,
        "max_position_embeddings": 4096,
        "mlp_bias": false,
        "num_attention_heads": t.num_attention_heads,
        "num_hidden_layers": t.num_hidden_layers,
        "num_key_value_heads": t.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "dtype": "float32",
        "torch_dtype": "float32",
        "use_cache": true,
        "vocab_size": t.vocab_size,
        "spoke_tiny_seed": t.seed,
    })
}

fn validate(t: &TinyConfig) -> Result<()> {
    if t.vocab_size < TOKENIZER_VOCAB {
        bail!(
            "model.tiny.vocab_size must be >= {TOKENIZER_VOCAB} (the shipped tokenizer's size), got {}",
            t.vocab_size
        );
    }
    if t.hidden_size == 0 || t.intermediate_size == 0 || t.num_hidden_layers == 0 {
        bail!("model.tiny: hidden_size, intermediate_size and num_hidden_layers must be > 0");
    }
    if t.num_attention_heads == 0
        || t.num_key_value_heads == 0
        || t.hidden_size % t.num_attention_heads != 0
        || t.num_attention_heads % t.num_key_value_heads != 0
        || (t.hidden_size / t.num_attention_heads) % 2 != 0
    {
        bail!(
            "model.tiny: need hidden_size divisible by num_attention_heads (into an even \
             head_dim) and num_attention_heads divisible by num_key_value_heads (got {} / {} / {})",
            t.hidden_size,
            t.num_attention_heads,
            t.num_key_value_heads
        );
    }
    Ok(())
}

/// Seeded random weights under HF names: normal(0, 0.02) for matrices, ones for norm gains.
pub fn init_weights(cfg: &LlamaConfig, seed: u64) -> Result<Vec<(String, Tensor)>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, INIT_STD as f32)?;
    let mut out = Vec::new();
    for (name, shape, init) in param_specs(cfg) {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = match init {
            Init::Normal => (0..n).map(|_| normal.sample(&mut rng)).collect(),
            Init::Ones => vec![1.0; n],
            Init::Zeros => vec![0.0; n],
        };
        out.push((name, Tensor::from_vec(data, shape, &Device::Cpu)?));
    }
    Ok(out)
}

/// Write a complete HF model directory for `config` (a `config.json` value) with random
/// weights into `dir` (which must not exist yet), atomically via a temporary directory.
pub fn write_model_dir(
    dir: &Path,
    config: &serde_json::Value,
    tokenizer_json: &str,
    seed: u64,
) -> Result<()> {
    let cfg = LlamaConfig::from_json(config, "generated config.json")?;
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(
        ".{}.tmp-{}",
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("model"),
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let w = init_weights(&cfg, seed)?;
    crate::util::save_safetensors(&tmp.join("model.safetensors"), &w)?;
    crate::util::write_durable(
        &tmp.join("config.json"),
        &serde_json::to_vec_pretty(config)?,
    )?;
    crate::util::write_durable(&tmp.join("tokenizer.json"), tokenizer_json.as_bytes())?;
    let tok_cfg = serde_json::json!({
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|pad|>",
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast"
    });
    crate::util::write_durable(
        &tmp.join("tokenizer_config.json"),
        &serde_json::to_vec_pretty(&tok_cfg)?,
    )?;
    let special = serde_json::json!({
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|pad|>"
    });
    crate::util::write_durable(
        &tmp.join("special_tokens_map.json"),
        &serde_json::to_vec_pretty(&special)?,
    )?;
    crate::util::fsync_dir(&tmp)?;
    if let Err(e) = std::fs::rename(&tmp, dir) {
        let _ = std::fs::remove_dir_all(&tmp);
        if dir.join("config.json").exists() {
            return Ok(()); // another process created it first
        }
        return Err(e).with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()));
    }
    crate::util::fsync_dir(parent)
}

/// The tiny model's directory under `data_dir`, created on first use. An existing directory
/// must have been made from the same `[model.tiny]` settings.
pub fn ensure(data_dir: &Path, t: &TinyConfig) -> Result<PathBuf> {
    validate(t)?;
    let dir = data_dir.join("model");
    let want = config_json(t);
    let cpath = dir.join("config.json");
    if !cpath.exists() {
        write_model_dir(&dir, &want, TOKENIZER_JSON, t.seed)
            .with_context(|| format!("creating the tiny model in {}", dir.display()))?;
    }
    let have: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&cpath).with_context(|| format!("reading {}", cpath.display()))?,
    )
    .with_context(|| format!("{}: invalid JSON", cpath.display()))?;
    for key in [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "spoke_tiny_seed",
    ] {
        if have.get(key) != want.get(key) {
            bail!(
                "{}: `{key}` is {} but [model.tiny] asks for {}; the tiny model in this data \
                 directory was made with other settings (use another run.data_dir or remove {})",
                cpath.display(),
                have.get(key).unwrap_or(&serde_json::Value::Null),
                want.get(key).unwrap_or(&serde_json::Value::Null),
                dir.display()
            );
        }
    }
    Ok(dir)
}
