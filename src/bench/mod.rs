//! `spoke bench ...`: benchmarks and the SPO paper's synthetic experiment.

pub mod compare;
pub mod ingest;
pub mod step;
pub mod synthetic;

/// `spoke bench` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchCommand {
    /// The SPO paper's synthetic experiment (MLP policy, shifted-logistic-mixture link).
    Synthetic(synthetic::SyntheticBenchArgs),
    /// Compare two runs of the synthetic experiment (e.g. spoke's and the paper code's CSVs).
    Compare(compare::CompareArgs),
    /// Trained tokens per second of one DPO step of a small Llama (candle, CPU).
    Step(step::StepBenchArgs),
    /// Ingest throughput from Kafka into Arrow batches (learner disconnected).
    Ingest(ingest::IngestBenchArgs),
}

pub fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Synthetic(a) => synthetic::run(a),
        BenchCommand::Compare(a) => compare::run(a),
        BenchCommand::Step(a) => step::run(a),
        BenchCommand::Ingest(a) => ingest::run(a),
    }
}
