//! The Llama-family forward pass, written only with differentiable candle primitives
//! (no fused softmax / rms_norm / rope / sdpa kernels, which record no gradient).
//!
//! A batch is right-padded to a common length `L`; attention uses a causal + key-padding
//! (+ sliding-window) additive mask, and only the hidden states that predict response tokens
//! go through the final norm and the LM head.

use super::config::LlamaConfig;
use super::lora::Adapters;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};

/// The seven projection modules of a decoder layer (LoRA targets).
pub const MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// HF name prefix of a module of layer `i` (`model.layers.{i}.self_attn.q_proj`).
pub fn module_prefix(layer: usize, module: usize) -> String {
    let group = if module < 4 { "self_attn" } else { "mlp" };
    format!("model.layers.{layer}.{group}.{}", MODULES[module])
}

/// How a tensor is initialised when a model is created from scratch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Normal,
    Ones,
    Zeros,
}

/// Every tensor of a checkpoint: HF name, shape, initialisation.
pub fn param_specs(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>, Init)> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![v, h],
        Init::Normal,
    )];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h], Init::Ones));
        let shapes = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)];
        for (m, (o, inp)) in shapes.iter().enumerate() {
            let mp = module_prefix(l, m);
            out.push((format!("{mp}.weight"), vec![*o, *inp], Init::Normal));
            let bias = match m {
                0..=2 => cfg.qkv_bias,
                3 => cfg.o_bias,
                _ => cfg.mlp_bias,
            };
            if bias {
                out.push((format!("{mp}.bias"), vec![*o], Init::Zeros));
            }
        }
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            Init::Ones,
        ));
    }
    out.push(("model.norm.weight".to_string(), vec![h], Init::Ones));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h], Init::Normal));
    }
    out
}

/// A linear layer `y = x Wᵀ + b` (HF layout: `W` is `[out, in]`).
#[derive(Clone)]
pub struct Linear {
    pub w: Tensor,
    pub b: Option<Tensor>,
}

#[derive(Clone)]
pub struct Layer {
    pub input_norm: Tensor,
    pub post_norm: Tensor,
    /// q, k, v, o, gate, up, down (see [`MODULES`]).
    pub proj: [Linear; 7],
}

/// All weights of a model (tensors; for a trained policy these share storage with `Var`s).
#[derive(Clone)]
pub struct Weights {
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// `None`: tied to `embed`.
    pub lm_head: Option<Tensor>,
}

impl Weights {
    /// Assemble from a lookup by HF name. `get` must return tensors of the spec'd shapes.
    pub fn build(cfg: &LlamaConfig, get: &mut dyn FnMut(&str) -> Result<Tensor>) -> Result<Self> {
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut lin = |m: usize| -> Result<Linear> {
                let mp = module_prefix(l, m);
                let bias = match m {
                    0..=2 => cfg.qkv_bias,
                    3 => cfg.o_bias,
                    _ => cfg.mlp_bias,
                };
                Ok(Linear {
                    w: get(&format!("{mp}.weight"))?,
                    b: if bias {
                        Some(get(&format!("{mp}.bias"))?)
                    } else {
                        None
                    },
                })
            };
            let proj = [
                lin(0)?,
                lin(1)?,
                lin(2)?,
                lin(3)?,
                lin(4)?,
                lin(5)?,
                lin(6)?,
            ];
            layers.push(Layer {
                input_norm: get(&format!("{p}.input_layernorm.weight"))?,
                post_norm: get(&format!("{p}.post_attention_layernorm.weight"))?,
                proj,
            });
        }
        Ok(Self {
            embed: get("model.embed_tokens.weight")?,
            layers,
            norm: get("model.norm.weight")?,
            lm_head: if cfg.tie_word_embeddings {
                None
            } else {
                Some(get("lm_head.weight")?)
            },
        })
    }

    /// Deep copy (independent storage), for a frozen reference model.
    pub fn deep_copy(&self) -> Result<Self> {
        let c = |t: &Tensor| -> Result<Tensor> { Ok(t.detach().copy()?) };
        let lin = |l: &Linear| -> Result<Linear> {
            Ok(Linear {
                w: c(&l.w)?,
                b: l.b.as_ref().map(c).transpose()?,
            })
        };
        Ok(Self {
            embed: c(&self.embed)?,
            layers: self
                .layers
                .iter()
                .map(|l| {
                    Ok(Layer {
                        input_norm: c(&l.input_norm)?,
                        post_norm: c(&l.post_norm)?,
                        proj: [
                            lin(&l.proj[0])?,
                            lin(&l.proj[1])?,
                            lin(&l.proj[2])?,
                            lin(&l.proj[3])?,
                            lin(&l.proj[4])?,
                            lin(&l.proj[5])?,
                            lin(&l.proj[6])?,
                        ],
                    })
                })
                .collect::<Result<_>>()?,
            norm: c(&self.norm)?,
            lm_head: self.lm_head.as_ref().map(c).transpose()?,
        })
    }

    /// The same storage without gradient tracking (for sampling and evaluation).
    pub fn detached(&self) -> Self {
        let lin = |l: &Linear| Linear {
            w: l.w.detach(),
            b: l.b.as_ref().map(|b| b.detach()),
        };
        Self {
            embed: self.embed.detach(),
            layers: self
                .layers
                .iter()
                .map(|l| Layer {
                    input_norm: l.input_norm.detach(),
                    post_norm: l.post_norm.detach(),
                    proj: [
                        lin(&l.proj[0]),
                        lin(&l.proj[1]),
                        lin(&l.proj[2]),
                        lin(&l.proj[3]),
                        lin(&l.proj[4]),
                        lin(&l.proj[5]),
                        lin(&l.proj[6]),
                    ],
                })
                .collect(),
            norm: self.norm.detach(),
            lm_head: self.lm_head.as_ref().map(|t| t.detach()),
        }
    }

    fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}

/// A right-padded batch of token sequences with the positions whose next token is scored.
pub struct Batch {
    /// Number of sequences in the caller's order (including empty ones).
    pub n: usize,
    /// Non-empty sequences in the forward pass.
    pub b: usize,
    /// Padded length.
    pub l: usize,
    /// `[b * l]` u32 token ids (padding: 0).
    pub ids: Tensor,
    /// `[b, 1, 1, l, l]` additive causal + key-padding mask (0 or -inf), in f32.
    pub mask: Tensor,
    /// The same with the sliding window, for layers that use it (None: not needed).
    pub mask_window: Option<Tensor>,
    /// `[l, head_dim]` rotary cos / sin.
    pub cos: Tensor,
    pub sin: Tensor,
    /// `[m]` u32 rows of the flattened hidden states `[b * l, h]` that predict a scored token.
    pub rows: Tensor,
    /// `[m, 1]` u32 the scored tokens.
    pub targets: Tensor,
    /// `[n, m]` f32 one-hot: which sequence each scored token belongs to.
    pub seg: Tensor,
    /// Number of scored tokens.
    pub m: usize,
    /// Per caller sequence: number of scored tokens.
    pub scored: Vec<usize>,
}

/// One sequence: token ids and how many of the trailing tokens are scored.
pub struct Seq {
    pub ids: Vec<u32>,
    /// The last `n_scored` tokens of `ids` are scored (each given everything before it).
    pub n_scored: usize,
}

impl Batch {
    pub fn new(cfg: &LlamaConfig, seqs: &[Seq], device: &Device) -> Result<Self> {
        let n = seqs.len();
        let present: Vec<usize> = (0..n).filter(|&i| !seqs[i].ids.is_empty()).collect();
        let b = present.len();
        let l = present
            .iter()
            .map(|&i| seqs[i].ids.len())
            .max()
            .unwrap_or(0);
        let mut ids = vec![0u32; b * l];
        let mut mask = vec![f32::NEG_INFINITY; b * l * l];
        // A separate sliding-window mask only when some layer uses it and it matters here.
        let window = cfg.sliding_window.unwrap_or(usize::MAX);
        let mut mask_window = (cfg.sliding_window.is_some()
            && cfg.sliding_from_layer < cfg.num_hidden_layers
            && l > window)
            .then(|| vec![f32::NEG_INFINITY; b * l * l]);
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        let mut owner = Vec::new();
        let mut scored = vec![0usize; n];
        for (bi, &si) in present.iter().enumerate() {
            let s = &seqs[si];
            let len = s.ids.len();
            for (t, id) in s.ids.iter().enumerate() {
                if *id as usize >= cfg.vocab_size {
                    bail!(
                        "token id {id} is outside the model's vocabulary ({} tokens): the \
                         tokenizer does not match the model",
                        cfg.vocab_size
                    );
                }
                ids[bi * l + t] = *id;
            }
            for i in 0..len {
                for j in 0..=i {
                    mask[(bi * l + i) * l + j] = 0.0;
                    if let Some(mw) = &mut mask_window {
                        if i - j < window {
                            mw[(bi * l + i) * l + j] = 0.0;
                        }
                    }
                }
            }
            // Padding queries are never read; let them attend to the first token so that no
            // softmax row is empty (an all -inf row would give NaN, also in the backward pass).
            for i in len..l {
                mask[(bi * l + i) * l] = 0.0;
                if let Some(mw) = &mut mask_window {
                    mw[(bi * l + i) * l] = 0.0;
                }
            }
            let k = s.n_scored.min(len.saturating_sub(1));
            for p in len - k..len {
                rows.push((bi * l + p - 1) as u32);
                targets.push(s.ids[p]);
                owner.push(si);
            }
            scored[si] = k;
        }
        let m = rows.len();
        let mut seg = vec![0f32; n * m];
        for (j, &si) in owner.iter().enumerate() {
            seg[si * m + j] = 1.0;
        }
        let inv = cfg.inv_freq();
        let hd = cfg.head_dim;
        let half = hd / 2;
        let mut cos = vec![0f32; l * hd];
        let mut sin = vec![0f32; l * hd];
        for p in 0..l {
            for (k, f) in inv.iter().enumerate() {
                let a = p as f64 * f;
                let (s, c) = a.sin_cos();
                cos[p * hd + k] = c as f32;
                cos[p * hd + k + half] = c as f32;
                sin[p * hd + k] = s as f32;
                sin[p * hd + k + half] = s as f32;
            }
        }
        Ok(Self {
            n,
            b,
            l,
            ids: Tensor::from_vec(ids, b * l, device)?,
            mask: Tensor::from_vec(mask, (b, 1, 1, l, l), device)?,
            mask_window: mask_window
                .map(|m| Tensor::from_vec(m, (b, 1, 1, l, l), device))
                .transpose()?,
            cos: Tensor::from_vec(cos, (l, hd), device)?,
            sin: Tensor::from_vec(sin, (l, hd), device)?,
            rows: Tensor::from_vec(rows, m, device)?,
            targets: Tensor::from_vec(targets, (m, 1), device)?,
            seg: Tensor::from_vec(seg, (n, m), device)?,
            m,
            scored,
        })
    }
}

/// RMSNorm from primitives, computed in f32: `x / sqrt(mean(x²) + eps) * g`.
pub fn rms_norm(x: &Tensor, g: &Tensor, eps: f64) -> Result<Tensor> {
    let dt = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let ms = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let r = (ms + eps)?.sqrt()?.recip()?;
    Ok(x32.broadcast_mul(&r)?.to_dtype(dt)?.broadcast_mul(g)?)
}

/// Softmax over the last dimension from primitives (max detached: softmax is shift-invariant).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Rotary embedding in the HF "rotate_half" layout; `x` is `[.., l, head_dim]`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let half = hd / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let dt = x.dtype();
    Ok((x.broadcast_mul(&cos.to_dtype(dt)?)? + rot.broadcast_mul(&sin.to_dtype(dt)?)?)?)
}

/// Forward context: optional LoRA adapters and whether dropout is active.
pub struct Ctx<'a> {
    pub lora: Option<&'a Adapters>,
    pub train: bool,
}

fn linear(x: &Tensor, lin: &Linear, layer: usize, module: usize, ctx: &Ctx) -> Result<Tensor> {
    let mut y = x.matmul(&lin.w.t()?)?;
    if let Some(b) = &lin.b {
        y = y.broadcast_add(b)?;
    }
    if let Some(ad) = ctx.lora {
        if let Some(delta) = ad.delta(x, layer, module, ctx.train)? {
            y = (y + delta)?;
        }
    }
    Ok(y)
}

/// Final hidden states `[b * l, hidden]` (before the final norm).
pub fn hidden_states(cfg: &LlamaConfig, w: &Weights, batch: &Batch, ctx: &Ctx) -> Result<Tensor> {
    let (b, l) = (batch.b, batch.l);
    let (nh, nkv, hd) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    );
    let rep = cfg.n_rep();
    let dt = w.embed.dtype();
    let mut h = w.embed.index_select(&batch.ids, 0)?;
    let scale = 1.0 / (hd as f64).sqrt();
    for (li, layer) in w.layers.iter().enumerate() {
        let x = rms_norm(&h, &layer.input_norm, cfg.rms_norm_eps)?;
        let q = linear(&x, &layer.proj[0], li, 0, ctx)?;
        let k = linear(&x, &layer.proj[1], li, 1, ctx)?;
        let v = linear(&x, &layer.proj[2], li, 2, ctx)?;
        let q = q.reshape((b, l, nh, hd))?.transpose(1, 2)?.contiguous()?;
        let k = k.reshape((b, l, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let v = v.reshape((b, l, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let q = (rope(&q, &batch.cos, &batch.sin)? * scale)?;
        let k = rope(&k, &batch.cos, &batch.sin)?;
        // Query head j uses kv head j / rep: group the rep query heads of each kv head.
        let q = q.reshape((b, nkv, rep * l, hd))?;
        let s = q.matmul(&k.t()?)?.reshape((b, nkv, rep, l, l))?;
        let mask = match &batch.mask_window {
            Some(m) if li >= cfg.sliding_from_layer => m,
            _ => &batch.mask,
        };
        let s = s.to_dtype(DType::F32)?.broadcast_add(mask)?;
        let p = softmax_last(&s)?
            .to_dtype(dt)?
            .reshape((b, nkv, rep * l, l))?;
        let a = p.matmul(&v)?; // [b, nkv, rep*l, hd] == [b, nh, l, hd]
        let a = a
            .reshape((b, nh, l, hd))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * l, nh * hd))?;
        h = (h + linear(&a, &layer.proj[3], li, 3, ctx)?)?;
        let x = rms_norm(&h, &layer.post_norm, cfg.rms_norm_eps)?;
        let g = linear(&x, &layer.proj[4], li, 4, ctx)?;
        let u = linear(&x, &layer.proj[5], li, 5, ctx)?;
        let m = (g.silu()? * u)?;
        h = (h + linear(&m, &layer.proj[6], li, 6, ctx)?)?;
    }
    Ok(h)
}

/// Logits `[rows, vocab]` in f32 of selected hidden-state rows (final norm + LM head).
pub fn logits_of(cfg: &LlamaConfig, w: &Weights, h: &Tensor) -> Result<Tensor> {
    let x = rms_norm(h, &w.norm, cfg.rms_norm_eps)?;
    Ok(x.matmul(&w.lm_head().t()?)?.to_dtype(DType::F32)?)
}

/// Summed log-probs of the scored tokens of each sequence, `[n]` f32 (differentiable).
pub fn seq_logps(cfg: &LlamaConfig, w: &Weights, batch: &Batch, ctx: &Ctx) -> Result<Tensor> {
    let dev = w.embed.device();
    if batch.m == 0 {
        return Ok(Tensor::zeros(batch.n, DType::F32, dev)?);
    }
    let h = hidden_states(cfg, w, batch, ctx)?;
    let sel = h.index_select(&batch.rows, 0)?;
    let logits = logits_of(cfg, w, &sel)?;
    let m = logits.max_keepdim(1)?.detach();
    let lse = (logits.broadcast_sub(&m)?.exp()?.sum_keepdim(1)?.log()? + m)?;
    let tgt = logits.gather(&batch.targets, 1)?;
    let tok = (tgt - lse)?; // [m, 1]
    let out = batch.seg.matmul(&tok).context("summing token log-probs")?;
    Ok(out.squeeze(1)?)
}
