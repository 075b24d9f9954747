//! `spoke score`: log-probs of responses given prompts under a model (and optional adapter).
//!
//! Reads JSON lines with `prompt` and `response`, writes the same objects with `logp` (summed
//! log-prob of the response tokens, the TRL / SPO convention) and `n_response_tokens` added.

use crate::model::{LmPolicy, ModelConfig};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufWriter, Write};
use std::path::PathBuf;

/// Arguments of `spoke score`.
#[derive(Debug, Clone, clap::Args)]
pub struct ScoreArgs {
    /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT LoRA adapter directory to apply on top of the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// JSON lines with `prompt` and `response`.
    #[arg(long)]
    pub input: PathBuf,
    /// Where to write the scored lines (default: stdout).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Truncate prompts from the left to this many tokens (default: no truncation).
    #[arg(long)]
    pub max_prompt_tokens: Option<usize>,
    /// Truncate responses from the right to this many tokens (default: no truncation).
    #[arg(long)]
    pub max_response_tokens: Option<usize>,
    /// `cpu` or `cuda:N` (needs the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weight dtype: f32, bf16 or f16 (log-probs are accumulated in f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// One parsed input line.
struct Item {
    obj: serde_json::Map<String, serde_json::Value>,
    prompt: String,
    response: String,
}

fn read_items(path: &std::path::Path) -> Result<Vec<Item>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let where_ = || format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("{}: invalid JSON", where_()))?;
        let serde_json::Value::Object(obj) = v else {
            bail!("{}: expected a JSON object", where_());
        };
        let field = |k: &str| -> Result<String> {
            obj.get(k)
                .and_then(|x| x.as_str())
                .map(String::from)
                .with_context(|| format!("{}: missing string field `{k}`", where_()))
        };
        let prompt = field("prompt")?;
        let response = field("response")?;
        out.push(Item {
            obj,
            prompt,
            response,
        });
    }
    Ok(out)
}

/// Score `(prompt, response)` pairs in batches of similar length; results in input order.
pub fn score_pairs(
    policy: &LmPolicy,
    prompts: &[&str],
    responses: &[&str],
    batch_size: usize,
    progress: Option<&indicatif::ProgressBar>,
) -> Result<(Vec<f32>, Vec<usize>)> {
    let n = prompts.len();
    let bs = batch_size.max(1);
    // Sort by length so that batches carry little padding.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| prompts[i].len() + responses[i].len());
    let mut logp = vec![0f32; n];
    let mut ntok = vec![0usize; n];
    for chunk in order.chunks(bs) {
        let p: Vec<&str> = chunk.iter().map(|&i| prompts[i]).collect();
        let r: Vec<&str> = chunk.iter().map(|&i| responses[i]).collect();
        let (lp, nt) = policy.score(&p, &r, false)?;
        for (k, &i) in chunk.iter().enumerate() {
            logp[i] = lp[k];
            ntok[i] = nt[k];
        }
        if let Some(pb) = progress {
            pb.inc(chunk.len() as u64);
        }
    }
    Ok((logp, ntok))
}

pub fn score(args: ScoreArgs) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be > 0");
    }
    let cfg = ModelConfig {
        path: Some(args.model.clone()),
        max_prompt_tokens: args.max_prompt_tokens.unwrap_or(usize::MAX),
        max_response_tokens: args.max_response_tokens.unwrap_or(usize::MAX),
        device: args.device.clone(),
        dtype: args.dtype.clone(),
        ..Default::default()
    };
    let policy = LmPolicy::load_frozen(&args.model, &cfg, args.adapter.as_deref())?;
    let items = read_items(&args.input)?;
    let progress = if items.len() > 4 * args.batch_size {
        let pb = indicatif::ProgressBar::new(items.len() as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "scoring {bar:40} {pos}/{len} pairs [{elapsed_precise} < {eta_precise}]",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(pb)
    } else {
        None
    };
    let prompts: Vec<&str> = items.iter().map(|x| x.prompt.as_str()).collect();
    let responses: Vec<&str> = items.iter().map(|x| x.response.as_str()).collect();
    let (logp, ntok) = score_pairs(
        &policy,
        &prompts,
        &responses,
        args.batch_size,
        progress.as_ref(),
    )?;
    if let Some(pb) = &progress {
        pb.finish_and_clear();
    }
    let sink: Box<dyn Write> = match &args.output {
        Some(p) => {
            Box::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)
        }
        None => Box::new(std::io::stdout().lock()),
    };
    let mut w = BufWriter::new(sink);
    for (i, item) in items.into_iter().enumerate() {
        let mut obj = item.obj;
        obj.insert("logp".into(), serde_json::json!(logp[i] as f64));
        obj.insert("n_response_tokens".into(), serde_json::json!(ntok[i]));
        serde_json::to_writer(&mut w, &serde_json::Value::Object(obj))?;
        w.write_all(b"\n")?;
    }
    w.flush().context("writing the scored lines")?;
    Ok(())
}
