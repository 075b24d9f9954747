//! `spoke bench step`.

/// Arguments of `spoke bench step`.
#[derive(Debug, Clone, clap::Args)]
pub struct StepBenchArgs {
    /// Output directory.
    #[arg(long, default_value = "bench-out")]
    pub out: std::path::PathBuf,
}

pub fn run(_args: StepBenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("spoke bench step is not implemented yet")
}
