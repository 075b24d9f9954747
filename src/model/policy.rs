//! [`LmPolicy`]: a Llama-family causal LM loaded from a Hugging Face directory, trained fully
//! or through LoRA adapters, with a frozen reference copy.

use super::config::LlamaConfig;
use super::llama::{param_specs, seq_logps, Batch, Ctx, Seq, Weights};
use super::lora::Adapters;
use super::{ModelConfig, Policy, TrainMode, WeightExport};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Files of an HF model directory copied into full fine-tune exports when present.
const SIDE_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// Parse `cpu` / `cuda` / `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    let s = s.trim();
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    if let Some(rest) = s.strip_prefix("cuda") {
        let ord: usize = match rest.strip_prefix(':') {
            Some(n) => n
                .parse()
                .with_context(|| format!("model.device: bad CUDA ordinal in {s:?}"))?,
            None if rest.is_empty() => 0,
            None => bail!("model.device: expected `cpu` or `cuda:N`, got {s:?}"),
        };
        #[cfg(feature = "cuda")]
        {
            return Device::new_cuda(ord)
                .with_context(|| format!("model.device: opening CUDA device {ord}"));
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = ord;
            bail!("model.device = {s:?} needs spoke built with `--features cuda`");
        }
    }
    bail!("model.device: expected `cpu` or `cuda:N`, got {s:?}")
}

/// Parse `f32` / `bf16` / `f16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => bail!("model.dtype: expected f32, bf16 or f16, got {other:?}"),
    }
}

/// An HF model directory read into memory.
pub struct HfModel {
    pub dir: PathBuf,
    pub cfg: LlamaConfig,
    pub config_json: Vec<u8>,
    pub tokenizer: tokenizers::Tokenizer,
    /// Side files (name, bytes) other than config.json.
    pub side_files: Vec<(String, Vec<u8>)>,
    /// Tensors by HF name (only those of [`param_specs`]), in the target dtype.
    pub tensors: HashMap<String, Tensor>,
}

fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("reading {}", index.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: missing key `weight_map`", index.display()))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|x| x.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        for p in &paths {
            if !p.exists() {
                bail!("{}: shard {} not found", index.display(), p.display());
            }
        }
        return Ok(paths);
    }
    bail!(
        "{}: no model.safetensors or model.safetensors.index.json",
        dir.display()
    )
}

impl HfModel {
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let cpath = dir.join("config.json");
        let config_json =
            std::fs::read(&cpath).with_context(|| format!("reading {}", cpath.display()))?;
        let v: serde_json::Value = serde_json::from_slice(&config_json)
            .with_context(|| format!("{}: invalid JSON", cpath.display()))?;
        let cfg = LlamaConfig::from_json(&v, &cpath.display().to_string())?;
        let tpath = dir.join("tokenizer.json");
        let tok_bytes =
            std::fs::read(&tpath).with_context(|| format!("reading {}", tpath.display()))?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(&tok_bytes)
            .map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer: {e}", tpath.display()))?;
        let mut side_files = vec![];
        for name in SIDE_FILES {
            let p = dir.join(name);
            if p.exists() {
                side_files.push((
                    name.to_string(),
                    std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
                ));
            }
        }
        let files = safetensors_files(dir)?;
        // SAFETY: the files are memory-mapped read-only; spoke does not modify them while
        // loading (as with any mmap, a concurrent writer could change them underneath).
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }
            .with_context(|| format!("reading safetensors in {}", dir.display()))?;
        let names: HashSet<String> = st.tensors().into_iter().map(|(n, _)| n).collect();
        let mut tensors = HashMap::new();
        for (name, shape, _) in param_specs(&cfg) {
            if !names.contains(&name) {
                bail!(
                    "{}: missing tensor {name} (expected shape {shape:?})",
                    files[0].display()
                );
            }
            let t = st
                .load(&name, device)
                .with_context(|| format!("loading tensor {name}"))?;
            if t.dims() != shape.as_slice() {
                bail!(
                    "tensor {name} has shape {:?}, config.json implies {shape:?}",
                    t.dims()
                );
            }
            tensors.insert(name, t.to_dtype(dtype)?);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            cfg,
            config_json,
            tokenizer,
            side_files,
            tensors,
        })
    }
}

/// A Llama-family policy with its frozen reference.
pub struct LmPolicy {
    cfg: LlamaConfig,
    source: PathBuf,
    config_json: Vec<u8>,
    side_files: Vec<(String, Vec<u8>)>,
    tokenizer: tokenizers::Tokenizer,
    device: Device,
    dtype: DType,
    max_prompt_tokens: usize,
    max_response_tokens: usize,
    /// Policy base weights (share storage with `vars` in full mode).
    weights: Weights,
    /// Frozen reference weights.
    reference: Weights,
    /// Full mode: every weight, by HF name. Empty in LoRA mode.
    vars: Vec<(String, Var)>,
    lora: Option<Adapters>,
}

impl LmPolicy {
    /// Load `dir` per `cfg` (train mode, LoRA config, device, dtype, truncation). With
    /// `adapter`, a PEFT adapter directory is loaded as the (trainable) LoRA adapters.
    pub fn load(dir: &Path, cfg: &ModelConfig, adapter: Option<&Path>) -> Result<Self> {
        Self::load_inner(dir, cfg, adapter, false)
    }

    /// Load for inference only (`spoke score`): no trainable copy of the base weights; the
    /// reference shares them. With `adapter`, the PEFT adapter is applied.
    pub fn load_frozen(dir: &Path, cfg: &ModelConfig, adapter: Option<&Path>) -> Result<Self> {
        Self::load_inner(dir, cfg, adapter, true)
    }

    fn load_inner(
        dir: &Path,
        cfg: &ModelConfig,
        adapter: Option<&Path>,
        frozen: bool,
    ) -> Result<Self> {
        let device = parse_device(&cfg.device)?;
        let dtype = parse_dtype(&cfg.dtype)?;
        let hf = HfModel::load(dir, &device, dtype)?;
        let HfModel {
            cfg: lcfg,
            config_json,
            tokenizer,
            side_files,
            mut tensors,
            ..
        } = hf;
        let seed = cfg.tiny.seed;
        let (weights, reference, vars, lora) = match (adapter, cfg.train) {
            (None, _) if frozen => {
                let weights = weights_from(&lcfg, &tensors)?;
                (weights.clone(), weights, vec![], None)
            }
            (None, TrainMode::Full) => {
                let mut vars = Vec::new();
                let mut by_name = HashMap::new();
                for (name, _, _) in param_specs(&lcfg) {
                    let t = tensors.remove(&name).context("internal: tensor vanished")?;
                    let v = Var::from_tensor(&t)?;
                    by_name.insert(name.clone(), v.as_tensor().clone());
                    vars.push((name, v));
                }
                let weights = weights_from(&lcfg, &by_name)?;
                let reference = weights.deep_copy()?;
                (weights, reference, vars, None)
            }
            (adapter, mode) => {
                let weights = weights_from(&lcfg, &tensors)?;
                let ad = match adapter {
                    Some(a) => Adapters::from_peft(&lcfg, a, seed, &device, dtype)?,
                    None => {
                        debug_assert_eq!(mode, TrainMode::Lora);
                        Adapters::new(&lcfg, &cfg.lora, seed, &device, dtype)?
                    }
                };
                (weights.clone(), weights, vec![], Some(ad))
            }
        };
        Ok(Self {
            cfg: lcfg,
            source: dir.to_path_buf(),
            config_json,
            side_files,
            tokenizer,
            device,
            dtype,
            max_prompt_tokens: cfg.max_prompt_tokens,
            max_response_tokens: cfg.max_response_tokens,
            weights,
            reference,
            vars,
            lora,
        })
    }

    /// The parsed architecture.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Token ids of `text` without special tokens.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing {:?}: {e}", truncate_for_msg(text)))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The sequence scored for (prompt, response): prompt truncated from the left, response
    /// from the right. An empty prompt is replaced by the BOS token when the model has one
    /// (otherwise the first response token cannot be scored).
    pub fn encode_pair(&self, prompt: &str, response: &str) -> Result<Seq> {
        let mut p = self.tokenize(prompt)?;
        if p.len() > self.max_prompt_tokens {
            p.drain(..p.len() - self.max_prompt_tokens);
        }
        let mut r = self.tokenize(response)?;
        r.truncate(self.max_response_tokens);
        if p.is_empty() && !r.is_empty() {
            if let Some(bos) = self.cfg.bos_token_id {
                p.push(bos);
            }
        }
        let n_scored = r.len();
        p.extend(r);
        Ok(Seq { ids: p, n_scored })
    }

    fn encode_all(&self, prompts: &[&str], responses: &[&str]) -> Result<Vec<Seq>> {
        if prompts.len() != responses.len() {
            bail!(
                "{} prompts but {} responses",
                prompts.len(),
                responses.len()
            );
        }
        prompts
            .iter()
            .zip(responses)
            .map(|(p, r)| self.encode_pair(p, r))
            .collect()
    }

    /// Summed log-probs of token sequences: under the policy (`reference = false`, with
    /// gradient) or the frozen reference. Returns `[n]` f32 and the scored-token counts.
    pub fn logps_of_seqs(
        &self,
        seqs: &[Seq],
        reference: bool,
        train: bool,
    ) -> Result<(Tensor, Vec<usize>)> {
        let batch = Batch::new(&self.cfg, seqs, &self.device)?;
        let out = if reference {
            let ctx = Ctx {
                lora: None,
                train: false,
            };
            seq_logps(&self.cfg, &self.reference, &batch, &ctx)?.detach()
        } else {
            let ctx = Ctx {
                lora: self.lora.as_ref(),
                train,
            };
            seq_logps(&self.cfg, &self.weights, &batch, &ctx)?
        };
        Ok((out, batch.scored))
    }

    /// Log-probs and scored-token counts of (prompt, response) pairs, no gradient.
    pub fn score(
        &self,
        prompts: &[&str],
        responses: &[&str],
        reference: bool,
    ) -> Result<(Vec<f32>, Vec<usize>)> {
        let seqs = self.encode_all(prompts, responses)?;
        let (t, n) = self.logps_of_seqs(&seqs, reference, false)?;
        Ok((t.detach().to_dtype(DType::F32)?.to_vec1::<f32>()?, n))
    }

    /// Ancestral sampling from the policy (temperature 1, no gradient, seeded): for each
    /// prompt, the prompt ids followed by up to `max_new_tokens` sampled ids (stopping after
    /// EOS), with the number of sampled ids.
    pub fn sample(
        &self,
        prompts: &[&str],
        max_new_tokens: usize,
        seed: u64,
    ) -> Result<Vec<(Vec<u32>, usize)>> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut seqs: Vec<(Vec<u32>, usize, bool)> = Vec::with_capacity(prompts.len());
        for p in prompts {
            let mut ids = self.encode_pair(p, "")?.ids;
            if ids.is_empty() {
                ids.push(self.cfg.bos_token_id.unwrap_or(0));
            }
            seqs.push((ids, 0, false));
        }
        let weights = self.weights.detached();
        let ctx = Ctx {
            lora: self.lora.as_ref(),
            train: false,
        };
        for _ in 0..max_new_tokens {
            let active: Vec<usize> = (0..seqs.len()).filter(|&i| !seqs[i].2).collect();
            if active.is_empty() {
                break;
            }
            let batch_seqs: Vec<Seq> = active
                .iter()
                .map(|&i| Seq {
                    ids: seqs[i].0.clone(),
                    n_scored: 0,
                })
                .collect();
            let batch = Batch::new(&self.cfg, &batch_seqs, &self.device)?;
            let h = super::llama::hidden_states(&self.cfg, &weights, &batch, &ctx)?.detach();
            let rows: Vec<u32> = batch_seqs
                .iter()
                .enumerate()
                .map(|(b, s)| (b * batch.l + s.ids.len() - 1) as u32)
                .collect();
            let rows = Tensor::from_vec(rows, active.len(), &self.device)?;
            let logits = super::llama::logits_of(&self.cfg, &weights, &h.index_select(&rows, 0)?)?;
            let probs = super::llama::softmax_last(&logits)?.to_vec2::<f32>()?;
            for (k, &i) in active.iter().enumerate() {
                let u: f32 = rng.random();
                let mut acc = 0f32;
                let mut tok = probs[k].len() - 1;
                for (t, p) in probs[k].iter().enumerate() {
                    acc += p;
                    if u < acc {
                        tok = t;
                        break;
                    }
                }
                let s = &mut seqs[i];
                s.0.push(tok as u32);
                s.1 += 1;
                if Some(tok as u32) == self.cfg.eos_token_id {
                    s.2 = true;
                }
            }
        }
        Ok(seqs.into_iter().map(|(ids, n, _)| (ids, n)).collect())
    }

    /// Number of weights in the base model.
    pub fn num_params(&self) -> usize {
        param_specs(&self.cfg)
            .iter()
            .map(|(_, s, _)| s.iter().product::<usize>())
            .sum()
    }

    /// Whether LoRA adapters are active.
    pub fn is_lora(&self) -> bool {
        self.lora.is_some()
    }

    /// The frozen reference weights.
    pub fn reference_weights(&self) -> &Weights {
        &self.reference
    }

    /// The policy's (base) weights.
    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// The policy's adapters, if any.
    pub fn adapters(&self) -> Option<&Adapters> {
        self.lora.as_ref()
    }

    /// The directory the model was loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }
}

/// The model's weights from tensors by HF name.
fn weights_from(cfg: &LlamaConfig, tensors: &HashMap<String, Tensor>) -> Result<Weights> {
    Weights::build(cfg, &mut |n| {
        tensors
            .get(n)
            .cloned()
            .with_context(|| format!("missing tensor {n}"))
    })
}

fn truncate_for_msg(s: &str) -> String {
    let mut out: String = s.chars().take(40).collect();
    if s.chars().count() > 40 {
        out.push('…');
    }
    out
}

impl Policy for LmPolicy {
    fn rng_state(&self) -> Option<serde_json::Value> {
        self.lora.as_ref().and_then(|a| a.rng_state().ok())
    }

    fn set_rng_state(&mut self, state: &serde_json::Value) -> Result<()> {
        match self.lora.as_mut() {
            Some(a) => a.set_rng_state(state),
            None => Ok(()),
        }
    }

    fn logps(&self, prompts: &[&str], responses: &[&str], train: bool) -> Result<Tensor> {
        let seqs = self.encode_all(prompts, responses)?;
        Ok(self.logps_of_seqs(&seqs, false, train)?.0)
    }

    fn ref_logps(&self, prompts: &[&str], responses: &[&str]) -> Result<Vec<f32>> {
        Ok(self.score(prompts, responses, true)?.0)
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        match &self.lora {
            Some(ad) => ad.trainable(),
            None => self.vars.clone(),
        }
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn export(&self) -> Result<WeightExport> {
        let tensors: Vec<(String, Tensor)> = self
            .trainable()
            .into_iter()
            .map(|(n, v)| Ok((n, v.as_tensor().detach().copy()?)))
            .collect::<Result<_>>()?;
        match &self.lora {
            Some(ad) => {
                let cfg = ad.peft_config(&self.source.display().to_string());
                Ok(WeightExport {
                    tensor_file: "adapter_model.safetensors".into(),
                    tensors,
                    side_files: vec![(
                        "adapter_config.json".into(),
                        serde_json::to_vec_pretty(&cfg)?,
                    )],
                })
            }
            None => {
                let mut side_files = vec![("config.json".to_string(), self.config_json.clone())];
                side_files.extend(self.side_files.iter().cloned());
                Ok(WeightExport {
                    tensor_file: "model.safetensors".into(),
                    tensors,
                    side_files,
                })
            }
        }
    }

    fn load_trainable(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        if let Some(ad) = &mut self.lora {
            return ad.load(&self.cfg, tensors);
        }
        let known: HashSet<&str> = self.vars.iter().map(|(n, _)| n.as_str()).collect();
        if let Some(extra) = tensors.keys().find(|k| !known.contains(k.as_str())) {
            bail!("unexpected tensor {extra} (not a weight of this model)");
        }
        for (name, var) in &self.vars {
            let t = tensors
                .get(name)
                .with_context(|| format!("missing tensor {name}"))?;
            if t.dims() != var.dims() {
                bail!(
                    "tensor {name} has shape {:?}, the model expects {:?}",
                    t.dims(),
                    var.dims()
                );
            }
            var.set(&t.to_dtype(var.dtype())?.to_device(&self.device)?)?;
        }
        Ok(())
    }

    fn kl_estimate(&self, prompts: &[&str], max_new_tokens: usize, seed: u64) -> Result<f64> {
        if prompts.is_empty() {
            bail!("kl_estimate needs at least one prompt");
        }
        let samples = self.sample(prompts, max_new_tokens, seed)?;
        let seqs: Vec<Seq> = samples
            .into_iter()
            .map(|(ids, n_scored)| Seq { ids, n_scored })
            .collect();
        let (pol, _) = self.logps_of_seqs(&seqs, false, false)?;
        let (refl, _) = self.logps_of_seqs(&seqs, true, false)?;
        let d = (pol.detach() - refl)?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        Ok(d.iter().sum::<f64>() / d.len() as f64)
    }

    fn describe(&self) -> String {
        let c = &self.cfg;
        let mode = match &self.lora {
            Some(ad) => format!(
                "LoRA r={} alpha={} on {} ({} adapter params)",
                ad.r,
                ad.alpha,
                ad.targets.join(","),
                ad.trainable()
                    .iter()
                    .map(|(_, v)| v.elem_count())
                    .sum::<usize>()
            ),
            None => "full fine-tune".to_string(),
        };
        format!(
            "{} from {}: {} layers, hidden {}, {} heads / {} kv, vocab {}, {:.3} M params, {:?} on {:?}, {mode}",
            c.arch.as_str(),
            self.source.display(),
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.vocab_size,
            self.num_params() as f64 / 1e6,
            self.dtype,
            self.device,
        )
    }
}
