//! LoRA adapters (PEFT-compatible names, shapes, initialisation and scaling).
//!
//! For a targeted projection `y = x Wᵀ (+ b)` the adapted output is
//! `y + (dropout(x) Aᵀ Bᵀ) · alpha / r` with `A: [r, in]` initialised like PEFT
//! (Kaiming-uniform with a = √5, i.e. U(±1/√in)) and `B: [out, r]` initialised to zero.

use super::config::LlamaConfig;
use super::llama::{module_prefix, MODULES};
use super::LoraConfig;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

/// PEFT's tensor name of an adapter matrix (`which` = "A" or "B").
pub fn peft_name(layer: usize, module: usize, which: &str) -> String {
    format!(
        "base_model.model.{}.lora_{which}.weight",
        module_prefix(layer, module)
    )
}

/// Input/output sizes of a projection module.
fn module_dims(cfg: &LlamaConfig, module: usize) -> (usize, usize) {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    match module {
        0 => (h, q),
        1 | 2 => (h, kv),
        3 => (q, h),
        4 | 5 => (h, i),
        _ => (i, h),
    }
}

fn module_index(name: &str) -> Result<usize> {
    MODULES.iter().position(|m| *m == name).with_context(|| {
        format!(
            "LoRA target module {name:?} is not supported (supported: {})",
            MODULES.join(", ")
        )
    })
}

/// The adapters of a policy.
pub struct Adapters {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
    pub targets: Vec<String>,
    /// Per layer, per module: (A, B).
    pub pairs: Vec<[Option<(Var, Var)>; 7]>,
    scale: f64,
    rng: Mutex<ChaCha8Rng>,
}

impl Adapters {
    fn empty(cfg: &LlamaConfig, r: usize, alpha: f64, dropout: f64, rslora: bool) -> Self {
        let scale = if rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        };
        Self {
            r,
            alpha,
            dropout,
            use_rslora: rslora,
            targets: vec![],
            pairs: (0..cfg.num_hidden_layers)
                .map(|_| [None, None, None, None, None, None, None])
                .collect(),
            scale,
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(0)),
        }
    }

    fn validate(r: usize, alpha: f64, dropout: f64) -> Result<()> {
        if r == 0 {
            bail!("model.lora.r must be > 0");
        }
        if !alpha.is_finite() {
            bail!("model.lora.alpha must be finite, got {alpha}");
        }
        if !(0.0..1.0).contains(&dropout) {
            bail!("model.lora.dropout must be in [0, 1), got {dropout}");
        }
        Ok(())
    }

    /// Fresh adapters (A random, B zero), seeded.
    pub fn new(
        cfg: &LlamaConfig,
        lc: &LoraConfig,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::validate(lc.r, lc.alpha, lc.dropout)?;
        if lc.target_modules.is_empty() {
            bail!("model.lora.target_modules is empty");
        }
        let mut idx: Vec<usize> = lc
            .target_modules
            .iter()
            .map(|m| module_index(m))
            .collect::<Result<_>>()?;
        idx.sort();
        idx.dedup();
        let mut ad = Self::empty(cfg, lc.r, lc.alpha, lc.dropout, false);
        ad.targets = idx.iter().map(|&i| MODULES[i].to_string()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x10AA_5EED_0000_0001);
        for l in 0..cfg.num_hidden_layers {
            for &m in &idx {
                let (inp, out) = module_dims(cfg, m);
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f32> = (0..lc.r * inp)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                let a = Tensor::from_vec(a, (lc.r, inp), device)?.to_dtype(dtype)?;
                let b = Tensor::zeros((out, lc.r), dtype, device)?;
                ad.pairs[l][m] = Some((Var::from_tensor(&a)?, Var::from_tensor(&b)?));
            }
        }
        *ad.rng.get_mut().expect("fresh mutex") =
            ChaCha8Rng::seed_from_u64(seed ^ 0xD0D0_0D0D_0000_0002);
        Ok(ad)
    }

    /// Load a PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`).
    pub fn from_peft(
        cfg: &LlamaConfig,
        dir: &Path,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let cpath = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cpath)
            .with_context(|| format!("reading {}", cpath.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", cpath.display()))?;
        let f = cpath.display().to_string();
        let peft_type = v
            .get("peft_type")
            .and_then(|x| x.as_str())
            .unwrap_or("LORA");
        if peft_type != "LORA" {
            bail!("{f}: peft_type {peft_type:?} is not supported (only LORA)");
        }
        let r = v
            .get("r")
            .and_then(|x| x.as_u64())
            .with_context(|| format!("{f}: missing config key `r`"))? as usize;
        let alpha = v
            .get("lora_alpha")
            .and_then(|x| x.as_f64())
            .with_context(|| format!("{f}: missing config key `lora_alpha`"))?;
        let dropout = v
            .get("lora_dropout")
            .and_then(|x| x.as_f64())
            .unwrap_or(0.0);
        let rslora = v
            .get("use_rslora")
            .and_then(|x| x.as_bool())
            .unwrap_or(false);
        for key in ["use_dora", "fan_in_fan_out"] {
            if v.get(key).and_then(|x| x.as_bool()).unwrap_or(false) {
                bail!("{f}: `{key}: true` is not supported");
            }
        }
        if let Some(b) = v.get("bias").and_then(|x| x.as_str()) {
            if b != "none" {
                bail!("{f}: bias {b:?} is not supported (only \"none\")");
            }
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if let Some(o) = v.get(key).and_then(|x| x.as_object()) {
                if !o.is_empty() {
                    bail!("{f}: a non-empty `{key}` is not supported");
                }
            }
        }
        let targets: Vec<String> = match v.get("target_modules") {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|x| x.as_str().map(String::from))
                .collect::<Option<_>>()
                .with_context(|| format!("{f}: target_modules must be a list of strings"))?,
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            _ => bail!("{f}: missing config key `target_modules`"),
        };
        Self::validate(r, alpha, dropout).with_context(|| f.clone())?;
        let mut idx: Vec<usize> = targets
            .iter()
            .map(|m| module_index(m))
            .collect::<Result<_>>()
            .with_context(|| f.clone())?;
        idx.sort();
        idx.dedup();
        let wpath = dir.join("adapter_model.safetensors");
        if !wpath.exists() {
            bail!(
                "{}: not found (only safetensors adapters are supported)",
                wpath.display()
            );
        }
        let tensors = candle_core::safetensors::load(&wpath, device)
            .with_context(|| format!("reading {}", wpath.display()))?;
        let mut ad = Self::empty(cfg, r, alpha, dropout, rslora);
        ad.targets = idx.iter().map(|&i| MODULES[i].to_string()).collect();
        let named: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(k, t)| (k.replace(".default.weight", ".weight"), t))
            .collect();
        ad.load_named(cfg, &named, &idx, true, dtype)
            .with_context(|| wpath.display().to_string())?;
        if ad.trainable().is_empty() {
            bail!(
                "{}: no LoRA tensors for the target modules",
                wpath.display()
            );
        }
        *ad.rng.get_mut().expect("fresh mutex") =
            ChaCha8Rng::seed_from_u64(seed ^ 0xD0D0_0D0D_0000_0002);
        Ok(ad)
    }

    /// Fill pairs from tensors under PEFT names; `create`: build new Vars (else set existing).
    fn load_named(
        &mut self,
        cfg: &LlamaConfig,
        named: &HashMap<String, Tensor>,
        idx: &[usize],
        create: bool,
        dtype: DType,
    ) -> Result<()> {
        let mut used = 0usize;
        for l in 0..cfg.num_hidden_layers {
            for &m in idx {
                let (inp, out) = module_dims(cfg, m);
                let (na, nb) = (peft_name(l, m, "A"), peft_name(l, m, "B"));
                let (a, b) = match (named.get(&na), named.get(&nb)) {
                    (Some(a), Some(b)) => (a, b),
                    (None, None) if create => continue,
                    (None, _) => bail!("missing tensor {na}"),
                    (_, None) => bail!("missing tensor {nb}"),
                };
                if a.dims() != [self.r, inp] {
                    bail!(
                        "tensor {na} has shape {:?}, expected [{}, {inp}]",
                        a.dims(),
                        self.r
                    );
                }
                if b.dims() != [out, self.r] {
                    bail!(
                        "tensor {nb} has shape {:?}, expected [{out}, {}]",
                        b.dims(),
                        self.r
                    );
                }
                used += 2;
                if create {
                    let a = a.to_dtype(dtype)?;
                    let b = b.to_dtype(dtype)?;
                    self.pairs[l][m] = Some((Var::from_tensor(&a)?, Var::from_tensor(&b)?));
                } else {
                    let (va, vb) = self.pairs[l][m]
                        .as_ref()
                        .with_context(|| format!("no adapter for {na}"))?;
                    va.set(&a.to_dtype(va.dtype())?.to_device(va.device())?)?;
                    vb.set(&b.to_dtype(vb.dtype())?.to_device(vb.device())?)?;
                }
            }
        }
        if used != named.len() {
            let unknown: Vec<&String> = named
                .keys()
                .filter(|k| {
                    !(0..cfg.num_hidden_layers).any(|l| {
                        idx.iter()
                            .any(|&m| **k == peft_name(l, m, "A") || **k == peft_name(l, m, "B"))
                    })
                })
                .take(5)
                .collect();
            bail!("unexpected adapter tensors (not LoRA A/B of the target modules): {unknown:?}");
        }
        Ok(())
    }

    /// Restore adapter weights from tensors under PEFT names (exactly those of `trainable`).
    pub fn load(&mut self, cfg: &LlamaConfig, named: &HashMap<String, Tensor>) -> Result<()> {
        let idx: Vec<usize> = self
            .targets
            .iter()
            .map(|m| module_index(m))
            .collect::<Result<_>>()?;
        let dtype = self
            .trainable()
            .first()
            .map(|(_, v)| v.dtype())
            .unwrap_or(DType::F32);
        self.load_named(cfg, named, &idx, false, dtype)
    }

    /// Trainable variables under PEFT names, in a stable order.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (l, layer) in self.pairs.iter().enumerate() {
            for (m, p) in layer.iter().enumerate() {
                if let Some((a, b)) = p {
                    out.push((peft_name(l, m, "A"), a.clone()));
                    out.push((peft_name(l, m, "B"), b.clone()));
                }
            }
        }
        out
    }

    /// `adapter_config.json` as PEFT writes it.
    pub fn peft_config(&self, base_model: &str) -> serde_json::Value {
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_rslora": self.use_rslora,
            "use_dora": false,
            "revision": null
        })
    }

    /// Position of the dropout stream: `{"seed": [32 bytes], "word_pos": "decimal u128"}`.
    pub fn rng_state(&self) -> Result<serde_json::Value> {
        let rng = self
            .rng
            .lock()
            .map_err(|_| anyhow::anyhow!("dropout RNG poisoned"))?;
        Ok(serde_json::json!({
            "seed": rng.get_seed().to_vec(),
            "word_pos": rng.get_word_pos().to_string(),
        }))
    }

    /// Restore the dropout stream from [`Adapters::rng_state`].
    pub fn set_rng_state(&mut self, v: &serde_json::Value) -> Result<()> {
        let seed: Vec<u8> =
            serde_json::from_value(v["seed"].clone()).context("LoRA dropout RNG state: seed")?;
        let seed: [u8; 32] = seed
            .try_into()
            .map_err(|_| anyhow::anyhow!("LoRA dropout RNG state: seed is not 32 bytes"))?;
        let pos: u128 = v["word_pos"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .context("LoRA dropout RNG state: word_pos")?;
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_word_pos(pos);
        *self
            .rng
            .get_mut()
            .map_err(|_| anyhow::anyhow!("dropout RNG poisoned"))? = rng;
        Ok(())
    }

    /// The adapter's contribution for `x: [rows, in]`, or None if the module is not adapted.
    pub fn delta(
        &self,
        x: &Tensor,
        layer: usize,
        module: usize,
        train: bool,
    ) -> Result<Option<Tensor>> {
        let Some((a, b)) = self.pairs.get(layer).and_then(|l| l[module].as_ref()) else {
            return Ok(None);
        };
        let x = if train && self.dropout > 0.0 {
            let keep = 1.0 - self.dropout;
            let n = x.elem_count();
            let mask: Vec<f32> = {
                let mut rng = self
                    .rng
                    .lock()
                    .map_err(|_| anyhow::anyhow!("dropout RNG poisoned"))?;
                (0..n)
                    .map(|_| {
                        if rng.random::<f64>() < keep {
                            (1.0 / keep) as f32
                        } else {
                            0.0
                        }
                    })
                    .collect()
            };
            let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
            (x * mask)?
        } else {
            x.clone()
        };
        let d = x.matmul(&a.as_tensor().t()?)?.matmul(&b.as_tensor().t()?)?;
        Ok(Some((d * self.scale)?))
    }
}
