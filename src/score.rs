//! `spoke score`: log-probs of responses given prompts under a model (and optional adapter).

use anyhow::Result;
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
}

pub fn score(_args: ScoreArgs) -> Result<()> {
    anyhow::bail!("spoke score is not implemented yet")
}
