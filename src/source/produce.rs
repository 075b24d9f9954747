//! `spoke produce`: publish events to a Kafka topic (synthetic stream or a file).

use anyhow::Result;

/// Arguments of `spoke produce`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProduceArgs {
    /// Bootstrap servers.
    #[arg(long, default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Topic to publish to.
    #[arg(long, default_value = "spoke.preferences")]
    pub topic: String,
    /// Number of events (from the synthetic stream).
    #[arg(long, default_value_t = 1000)]
    pub count: u64,
}

pub async fn produce(_args: ProduceArgs) -> Result<()> {
    anyhow::bail!("spoke produce is not implemented yet")
}
