//! `spoke bench synthetic`.

/// Arguments of `spoke bench synthetic`.
#[derive(Debug, Clone, clap::Args)]
pub struct SyntheticBenchArgs {
    /// Output directory.
    #[arg(long, default_value = "bench-out")]
    pub out: std::path::PathBuf,
}

pub fn run(_args: SyntheticBenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("spoke bench synthetic is not implemented yet")
}
