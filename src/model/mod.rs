//! Policy models: anything that gives differentiable summed log-probs of responses given
//! prompts. The learner only sees the [`Policy`] trait.
//!
//! The implementation is [`LmPolicy`]: a Llama-family causal LM (Llama 2/3, Mistral,
//! Qwen2/2.5, SmolLM, TinyLlama) loaded from a Hugging Face directory, or the embedded tiny
//! model ([`tiny`]), trained fully or through PEFT-compatible LoRA adapters.
//!
//! Conventions (those of the SPO paper's code and TRL):
//! * log π(y|x): prompt and response are tokenized separately without special tokens and
//!   concatenated; the log-softmax of every response token given all tokens before it is
//!   summed. Prompts are truncated from the left at `max_prompt_tokens`, responses from the
//!   right at `max_response_tokens`; an empty prompt is replaced by the BOS token when the
//!   model has one. Parity with transformers: `tests/model_parity.rs` (1e-3 absolute).
//! * One forward pass per call: all sequences right-padded into one batch with a causal +
//!   key-padding (+ sliding-window) mask; logits only at the positions that predict response
//!   tokens. Everything is built from differentiable candle primitives (candle's fused
//!   softmax / rms_norm / rope / sdpa record no gradient).
//! * The reference model is a frozen copy of the initial weights (full fine-tune) or the base
//!   model without adapters (LoRA).
//! * Exports: full fine-tune = an HF directory (`model.safetensors` under HF names plus
//!   config.json, tokenizer files); LoRA = `adapter_model.safetensors` under PEFT names
//!   (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, A `[r, in]`,
//!   B `[out, r]`) and `adapter_config.json`. [`Policy::trainable`] uses the same names, so
//!   [`Policy::load_trainable`] accepts exactly what [`Policy::export`] wrote.
//! * Devices: `cpu` (f32) by default; `cuda:N` with the `cuda` cargo feature, with f32, bf16
//!   or f16 weights (norms, softmax and log-probs are computed in f32).

pub mod config;
pub mod llama;
pub mod lora;
pub mod policy;
pub mod tiny;

pub use config::LlamaConfig;
pub use policy::{parse_device, parse_dtype, LmPolicy};

use anyhow::Result;
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// How the policy is trained.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum TrainMode {
    /// Every weight is trainable.
    #[default]
    Full,
    /// Only LoRA adapters are trainable.
    Lora,
}

/// `[model.lora]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: vec!["q_proj".into(), "v_proj".into()],
        }
    }
}

/// `[model.tiny]`: the embedded default model (Llama architecture, random init, seeded),
/// created under the data directory on first run and reused.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TinyConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub seed: u64,
}

impl Default for TinyConfig {
    fn default() -> Self {
        Self {
            vocab_size: 512,
            hidden_size: 64,
            intermediate_size: 176,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            seed: 0,
        }
    }
}

/// `[model]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// A Hugging Face model directory (config.json, model.safetensors, tokenizer.json).
    /// Unset: the embedded tiny model under `<data_dir>/model`.
    pub path: Option<PathBuf>,
    pub tiny: TinyConfig,
    pub train: TrainMode,
    pub lora: LoraConfig,
    /// Prompts longer than this many tokens are truncated from the left.
    pub max_prompt_tokens: usize,
    /// Responses longer than this many tokens are truncated from the right.
    pub max_response_tokens: usize,
    /// `cpu` or `cuda:N` (needs the `cuda` feature).
    pub device: String,
    /// Weight dtype: `f32` (default), `bf16` or `f16` (CUDA).
    pub dtype: String,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            path: None,
            tiny: TinyConfig::default(),
            train: TrainMode::Full,
            lora: LoraConfig::default(),
            max_prompt_tokens: 256,
            max_response_tokens: 256,
            device: "cpu".into(),
            dtype: "f32".into(),
        }
    }
}

/// The weights a snapshot writes, copied out of the live model so that serialisation can
/// happen on another thread.
pub struct WeightExport {
    /// `model.safetensors` (full fine-tune) or `adapter_model.safetensors` (LoRA).
    pub tensor_file: String,
    /// Tensors under their HF/PEFT names.
    pub tensors: Vec<(String, Tensor)>,
    /// Side files (config.json, tokenizer.json, adapter_config.json, ...).
    pub side_files: Vec<(String, Vec<u8>)>,
}

/// A trainable policy over text.
pub trait Policy: Send {
    /// Summed log-probs of each response given its prompt (the TRL convention), shape `[n]`,
    /// f32, differentiable with respect to [`Policy::trainable`]. `train` enables dropout.
    fn logps(&self, prompts: &[&str], responses: &[&str], train: bool) -> Result<Tensor>;
    /// The same under the frozen reference model, no gradient.
    fn ref_logps(&self, prompts: &[&str], responses: &[&str]) -> Result<Vec<f32>>;
    /// Trainable variables, by stable name.
    fn trainable(&self) -> Vec<(String, Var)>;
    /// The compute device.
    fn device(&self) -> &Device;
    /// Copy out what a snapshot writes.
    fn export(&self) -> Result<WeightExport>;
    /// Restore trainable weights (names as in [`Policy::trainable`]).
    fn load_trainable(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()>;
    /// One line for logs.
    fn describe(&self) -> String;
    /// Random state the policy's training forward consumes (e.g. the LoRA dropout stream),
    /// saved with snapshots so that a resumed run draws what an uninterrupted one would.
    fn rng_state(&self) -> Option<serde_json::Value> {
        None
    }
    /// Restore what [`Policy::rng_state`] returned.
    fn set_rng_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let _ = state;
        Ok(())
    }
    /// Monte-Carlo estimate of KL(π‖π_ref) on `prompts`: sample a response of at most
    /// `max_new_tokens` tokens for each prompt from the policy (ancestral sampling, seeded,
    /// no gradient) and return the mean of log π(y|x) − log π_ref(y|x) (the k1 estimator).
    fn kl_estimate(&self, prompts: &[&str], max_new_tokens: usize, seed: u64) -> Result<f64> {
        let _ = (prompts, max_new_tokens, seed);
        anyhow::bail!("kl_estimate is not supported by {}", self.describe())
    }
}

/// Set the number of CPU threads candle uses (its elementwise pool and gemm), unless the
/// user already set `CANDLE_NUM_THREADS` / `RAYON_NUM_THREADS`. Returns the effective count.
///
/// candle's CPU pool waits for its workers by spinning; on a machine whose cores are busy
/// with other work a step with 2 threads can take 3× longer (and 5× the CPU) than with 1
/// (measured: 800 events of the tiny model, load average 11 on 2 cores: 38 s vs 13 s).
/// Must be called at the start of `main`, before any other thread exists and before the
/// first tensor operation (candle reads the variables once).
pub fn set_cpu_threads(n: usize) -> usize {
    for key in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
        if let Ok(v) = std::env::var(key) {
            if let Ok(k) = v.parse::<usize>() {
                if k > 0 {
                    return k;
                }
            }
        }
    }
    let n = n.max(1);
    std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    n
}

/// Build the configured policy (the embedded tiny model by default).
pub fn load_policy(cfg: &ModelConfig, data_dir: &Path) -> Result<Box<dyn Policy>> {
    Ok(Box::new(load_lm(cfg, data_dir)?))
}

/// [`load_policy`] with the concrete type: `cfg.path`, or the tiny model under
/// `<data_dir>/model` (created on first use).
pub fn load_lm(cfg: &ModelConfig, data_dir: &Path) -> Result<LmPolicy> {
    let dir = match &cfg.path {
        Some(p) => p.clone(),
        None => tiny::ensure(data_dir, &cfg.tiny)?,
    };
    LmPolicy::load(&dir, cfg, None)
}
