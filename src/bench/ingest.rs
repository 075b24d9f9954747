//! `spoke bench ingest`.

/// Arguments of `spoke bench ingest`.
#[derive(Debug, Clone, clap::Args)]
pub struct IngestBenchArgs {
    /// Output directory.
    #[arg(long, default_value = "bench-out")]
    pub out: std::path::PathBuf,
}

pub fn run(_args: IngestBenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("spoke bench ingest is not implemented yet")
}
