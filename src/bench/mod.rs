//! `spoke bench ...`: benchmarks and the SPO paper's synthetic experiment.

/// `spoke bench` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchCommand {
    /// The SPO paper's synthetic experiment (MLP policy, shifted-logistic-mixture link).
    Synthetic(SyntheticBenchArgs),
}

/// Arguments of `spoke bench synthetic`.
#[derive(Debug, Clone, clap::Args)]
pub struct SyntheticBenchArgs {
    /// Output directory.
    #[arg(long, default_value = "bench-out")]
    pub out: std::path::PathBuf,
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Synthetic(_) => anyhow::bail!("not implemented yet"),
    }
}
