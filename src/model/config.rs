//! Parsing of Hugging Face `config.json` for the Llama family (Llama 2/3, Mistral, Qwen2,
//! SmolLM, TinyLlama). Accepts both the transformers-4 keys (`torch_dtype`, top-level
//! `rope_theta`/`rope_scaling`) and the transformers-5 keys (`dtype`, `rope_parameters`).

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Which member of the family (decides default biases and defaults of missing keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

impl Arch {
    pub fn as_str(&self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// Rotary-embedding frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// `linear`: positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// `llama3`: smooth per-frequency interpolation (Llama 3.1+).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The architecture hyper-parameters the forward pass needs.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v projections (Qwen2 always; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Biases on the MLP projections (Llama with `mlp_bias`).
    pub mlp_bias: bool,
    /// Mistral / Qwen2 sliding-window attention (None: full causal attention).
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    /// Dtype the checkpoint declares (`dtype` or `torch_dtype`), informational.
    pub declared_dtype: Option<String>,
}

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

fn req_usize(v: &Value, key: &str, file: &str) -> Result<usize> {
    let x = get(v, key).with_context(|| format!("{file}: missing config key `{key}`"))?;
    x.as_u64().map(|n| n as usize).with_context(|| {
        format!("{file}: config key `{key}` must be a non-negative integer, got {x}")
    })
}

fn opt_usize(v: &Value, key: &str, file: &str) -> Result<Option<usize>> {
    match get(v, key) {
        None => Ok(None),
        Some(x) => x.as_u64().map(|n| Some(n as usize)).with_context(|| {
            format!("{file}: config key `{key}` must be a non-negative integer, got {x}")
        }),
    }
}

fn opt_f64(v: &Value, key: &str, file: &str) -> Result<Option<f64>> {
    match get(v, key) {
        None => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .with_context(|| format!("{file}: config key `{key}` must be a number, got {x}")),
    }
}

fn opt_bool(v: &Value, key: &str, file: &str) -> Result<Option<bool>> {
    match get(v, key) {
        None => Ok(None),
        Some(x) => x
            .as_bool()
            .map(Some)
            .with_context(|| format!("{file}: config key `{key}` must be true or false, got {x}")),
    }
}

/// First id of a token-id key that may be an integer or a list of integers.
fn opt_token_id(v: &Value, key: &str) -> Option<u32> {
    match get(v, key)? {
        Value::Number(n) => n.as_u64().map(|x| x as u32),
        Value::Array(a) => a.first().and_then(|x| x.as_u64()).map(|x| x as u32),
        _ => None,
    }
}

fn parse_rope(rope: &Value, file: &str, key: &str) -> Result<RopeScaling> {
    let ty = rope
        .get("rope_type")
        .or_else(|| rope.get("type"))
        .and_then(|x| x.as_str())
        .unwrap_or("default");
    let f = |k: &str| -> Result<f64> {
        opt_f64(rope, k, file)?
            .with_context(|| format!("{file}: `{key}` of type {ty:?} lacks `{k}`"))
    };
    Ok(match ty {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: f("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: f("factor")?,
            low_freq_factor: f("low_freq_factor")?,
            high_freq_factor: f("high_freq_factor")?,
            original_max_position_embeddings: f("original_max_position_embeddings")?,
        },
        other => bail!(
            "{file}: `{key}.rope_type` {other:?} is not supported (supported: default, linear, llama3)"
        ),
    })
}

impl LlamaConfig {
    /// Parse a `config.json` value. `file` names the file in error messages.
    pub fn from_json(v: &Value, file: &str) -> Result<Self> {
        let model_type = get(v, "model_type").and_then(|x| x.as_str());
        let archs: Vec<&str> = get(v, "architectures")
            .and_then(|x| x.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        let from_model_type = match model_type {
            Some("llama") => Some(Arch::Llama),
            Some("mistral") => Some(Arch::Mistral),
            Some("qwen2") => Some(Arch::Qwen2),
            Some(other) => bail!(
                "{file}: model_type {other:?} is not supported (supported: llama, mistral, qwen2 \
                 — the Llama family: Llama 2/3, Mistral, Qwen2/2.5, SmolLM, TinyLlama)"
            ),
            None => None,
        };
        let from_arch = match archs.first().copied() {
            Some("LlamaForCausalLM") => Some(Arch::Llama),
            Some("MistralForCausalLM") => Some(Arch::Mistral),
            Some("Qwen2ForCausalLM") => Some(Arch::Qwen2),
            Some(other) => bail!(
                "{file}: architectures {other:?} is not supported (supported: \
                 LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"
            ),
            None => None,
        };
        let arch = match (from_model_type, from_arch) {
            (Some(a), Some(b)) if a != b => bail!(
                "{file}: model_type {:?} disagrees with architectures {:?}",
                a.as_str(),
                archs
            ),
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => bail!("{file}: missing config key `model_type` (and `architectures`)"),
        };
        if let Some(act) = get(v, "hidden_act").and_then(|x| x.as_str()) {
            if act != "silu" {
                bail!("{file}: hidden_act {act:?} is not supported (only silu)");
            }
        }
        let hidden_size = req_usize(v, "hidden_size", file)?;
        let num_attention_heads = req_usize(v, "num_attention_heads", file)?;
        let num_key_value_heads =
            opt_usize(v, "num_key_value_heads", file)?.unwrap_or(num_attention_heads);
        if num_attention_heads == 0 || num_key_value_heads == 0 {
            bail!("{file}: num_attention_heads and num_key_value_heads must be > 0");
        }
        if num_attention_heads % num_key_value_heads != 0 {
            bail!(
                "{file}: num_attention_heads ({num_attention_heads}) must be a multiple of \
                 num_key_value_heads ({num_key_value_heads})"
            );
        }
        let head_dim = opt_usize(v, "head_dim", file)?.unwrap_or(hidden_size / num_attention_heads);
        if head_dim == 0 || head_dim % 2 != 0 {
            bail!("{file}: head_dim must be even and > 0, got {head_dim}");
        }
        // Rope: transformers-5 `rope_parameters`, else transformers-4 `rope_theta`/`rope_scaling`.
        let rope_params = get(v, "rope_parameters");
        let rope_theta = match opt_f64(v, "rope_theta", file)? {
            Some(t) => t,
            None => match rope_params {
                Some(p) => opt_f64(p, "rope_theta", file)?
                    .with_context(|| format!("{file}: `rope_parameters` lacks `rope_theta`"))?,
                None => 10000.0,
            },
        };
        let rope_scaling = match (rope_params, get(v, "rope_scaling")) {
            (_, Some(s)) => parse_rope(s, file, "rope_scaling")?,
            (Some(p), None) => parse_rope(p, file, "rope_parameters")?,
            (None, None) => RopeScaling::None,
        };
        let attention_bias = opt_bool(v, "attention_bias", file)?.unwrap_or(false);
        let mlp_bias = opt_bool(v, "mlp_bias", file)?.unwrap_or(false);
        let (qkv_bias, o_bias, mlp_bias) = match arch {
            Arch::Llama => (attention_bias, attention_bias, mlp_bias),
            Arch::Mistral => (false, false, false),
            Arch::Qwen2 => (true, false, false),
        };
        let sliding_window = match arch {
            Arch::Llama => None,
            Arch::Mistral => opt_usize(v, "sliding_window", file)?,
            Arch::Qwen2 => {
                if opt_bool(v, "use_sliding_window", file)?.unwrap_or(false) {
                    opt_usize(v, "sliding_window", file)?
                } else {
                    None
                }
            }
        };
        let declared_dtype = get(v, "dtype")
            .or_else(|| get(v, "torch_dtype"))
            .and_then(|x| x.as_str())
            .map(String::from);
        let rms_norm_eps = opt_f64(v, "rms_norm_eps", file)?.unwrap_or(1e-6);
        let cfg = Self {
            arch,
            vocab_size: req_usize(v, "vocab_size", file)?,
            hidden_size,
            intermediate_size: req_usize(v, "intermediate_size", file)?,
            num_hidden_layers: req_usize(v, "num_hidden_layers", file)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: opt_bool(v, "tie_word_embeddings", file)?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            sliding_window,
            bos_token_id: opt_token_id(v, "bos_token_id"),
            eos_token_id: opt_token_id(v, "eos_token_id"),
            pad_token_id: opt_token_id(v, "pad_token_id"),
            declared_dtype,
        };
        if cfg.vocab_size == 0 || cfg.hidden_size == 0 || cfg.intermediate_size == 0 {
            bail!("{file}: vocab_size, hidden_size and intermediate_size must be > 0");
        }
        Ok(cfg)
    }

    /// Inverse frequencies of the rotary embedding (length head_dim / 2), in f64.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        let base: Vec<f64> = (0..self.head_dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d))
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// Number of query heads sharing one key/value head.
    pub fn n_rep(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "model_type": "llama", "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 8,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 500000.0
        })
    }

    #[test]
    fn llama3_rope_scaling_keeps_high_and_scales_low_frequencies() {
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192});
        let c = LlamaConfig::from_json(&v, "t").unwrap();
        let plain = LlamaConfig::from_json(&base(), "t").unwrap().inv_freq();
        let scaled = c.inv_freq();
        assert_eq!(scaled[0], plain[0]); // wavelength 2π < 8192/4: unchanged
        let last = plain.len() - 1; // wavelength ≫ 8192: divided by the factor
        assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-15);
        for (s, p) in scaled.iter().zip(&plain) {
            assert!(*s <= *p && *s >= p / 8.0 - 1e-18);
        }
        // transformers-5 form inside rope_parameters gives the same.
        let mut v5 = base();
        v5.as_object_mut().unwrap().remove("rope_theta");
        v5["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 500000.0,
            "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192});
        assert_eq!(LlamaConfig::from_json(&v5, "t").unwrap().inv_freq(), scaled);
        let mut bad = base();
        bad["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        let e = LlamaConfig::from_json(&bad, "t").unwrap_err().to_string();
        assert!(e.contains("yarn"), "{e}");
    }

    #[test]
    fn family_defaults() {
        let mut q = base();
        q["model_type"] = "qwen2".into();
        q["use_sliding_window"] = false.into();
        q["sliding_window"] = 4096.into();
        let c = LlamaConfig::from_json(&q, "t").unwrap();
        assert!(c.qkv_bias && !c.o_bias && c.sliding_window.is_none());
        let mut m = base();
        m["model_type"] = "mistral".into();
        m["sliding_window"] = 4096.into();
        let c = LlamaConfig::from_json(&m, "t").unwrap();
        assert_eq!(c.sliding_window, Some(4096));
        assert!(!c.qkv_bias);
        let mut l = base();
        l["attention_bias"] = true.into();
        l["eos_token_id"] = json!([128001, 128009]);
        let c = LlamaConfig::from_json(&l, "t").unwrap();
        assert!(c.qkv_bias && c.o_bias && !c.mlp_bias);
        assert_eq!(c.eos_token_id, Some(128001));
        assert_eq!(c.head_dim, 8);
        assert_eq!(c.n_rep(), 4);
        let mut g = base();
        g["num_key_value_heads"] = 3.into();
        assert!(LlamaConfig::from_json(&g, "t")
            .unwrap_err()
            .to_string()
            .contains("num_key_value_heads"));
    }
}
