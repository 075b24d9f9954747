//! The `spoke` command line: a thin layer over the library.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// spoke: online preference alignment of language models from live human-feedback streams,
/// robust to an unknown link function (Semiparametric Preference Optimization).
#[derive(Parser)]
#[command(name = "spoke", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline: consume events, train, snapshot, serve metrics.
    ///
    /// With no arguments it uses the built-in synthetic stream and the embedded tiny model
    /// (configs/default.toml), needing no Kafka, GPU, network or download.
    Run(RunArgs),
    /// Publish events to a Kafka topic (synthetic stream or a JSONL/Parquet file).
    Produce(spoke::source::produce::ProduceArgs),
    /// Log-probs of responses given prompts under a model (and adapter).
    Score(spoke::score::ScoreArgs),
    /// Benchmarks and the SPO paper's synthetic experiment.
    #[command(subcommand)]
    Bench(spoke::bench::BenchCommand),
    /// Inspect, verify, promote and export snapshots.
    Snapshot {
        /// Data directory holding the snapshots.
        #[arg(long, default_value = "./spoke-data")]
        data_dir: PathBuf,
        #[command(subcommand)]
        command: spoke::snapshot::cli::SnapshotCommand,
    },
    /// Print the effective configuration (defaults, file and overrides merged) as TOML.
    Config(ConfigArgs),
}

#[derive(clap::Args)]
struct ConfigArgs {
    /// Configuration file (TOML) merged over the built-in defaults.
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Override one setting: dotted.key=value (repeatable), e.g. --set objective.kind=pspo.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Configuration file (TOML) merged over the built-in defaults (configs/default.toml).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Override one setting: dotted.key=value (repeatable), e.g. --set run.batch_size=32.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Where snapshots, dead letters and the tiny model live [run.data_dir].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Stop after this many consumed records, valid or not; 0 runs until Ctrl-C
    /// [run.max_events]. A resumed run continues the count of its snapshot.
    #[arg(long)]
    max_events: Option<u64>,
    /// Objective: dpo, pspo, ospo or rspo [objective.kind].
    #[arg(long)]
    objective: Option<String>,
    /// Serve Prometheus metrics on HOST:PORT [metrics.addr].
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Kafka bootstrap servers [kafka.brokers].
    #[arg(long)]
    brokers: Option<String>,
    /// Kafka topic to consume [kafka.topics].
    #[arg(long)]
    topic: Option<String>,
    /// Kafka consumer group [kafka.group].
    #[arg(long)]
    group: Option<String>,
    /// Kafka dead-letter topic [kafka.dead_letter_topic].
    #[arg(long)]
    dead_letter_topic: Option<String>,
    /// Ignore existing snapshots and start from the initial model.
    #[arg(long)]
    fresh: bool,
    /// Do not print progress lines.
    #[arg(long, short = 'q')]
    quiet: bool,
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

impl RunArgs {
    fn overrides(&self) -> Vec<String> {
        let mut v = self.sets.clone();
        if let Some(d) = &self.data_dir {
            v.push(format!(
                "run.data_dir={}",
                toml_str(&d.display().to_string())
            ));
        }
        if let Some(n) = self.max_events {
            v.push(format!("run.max_events={n}"));
        }
        if let Some(o) = &self.objective {
            v.push(format!("objective.kind={}", toml_str(o)));
        }
        if let Some(a) = &self.metrics_addr {
            v.push(format!("metrics.addr={}", toml_str(a)));
        }
        if let Some(b) = &self.brokers {
            v.push(format!("kafka.brokers={}", toml_str(b)));
        }
        if let Some(t) = &self.topic {
            v.push(format!("kafka.topics=[{}]", toml_str(t)));
        }
        if let Some(g) = &self.group {
            v.push(format!("kafka.group={}", toml_str(g)));
        }
        if let Some(d) = &self.dead_letter_topic {
            v.push(format!("kafka.dead_letter_topic={}", toml_str(d)));
        }
        v
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPOKE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

async fn run_cmd(args: RunArgs) -> Result<()> {
    let cfg = spoke::config::Config::load(args.config.as_deref(), &args.overrides())?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let s2 = shutdown.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("Stopping: finishing the current step and writing a final snapshot (Ctrl-C again to abort).");
            s2.cancel();
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });
    #[cfg(unix)]
    {
        let s3 = shutdown.clone();
        tokio::spawn(async move {
            if let Ok(mut term) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                term.recv().await;
                s3.cancel();
            }
        });
    }
    let summary = spoke::pipeline::run(
        cfg,
        shutdown,
        spoke::pipeline::RunOptions {
            fresh: args.fresh,
            progress: !args.quiet,
        },
    )
    .await?;
    println!("{summary}");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<()> = rt.block_on(async move {
        match cli.command {
            Command::Run(a) => run_cmd(a).await,
            Command::Produce(a) => spoke::source::produce::produce(a).await,
            Command::Score(a) => tokio::task::block_in_place(|| spoke::score::score(a)),
            Command::Bench(c) => tokio::task::block_in_place(|| spoke::bench::run(c)),
            Command::Snapshot { data_dir, command } => {
                spoke::snapshot::cli::run(&data_dir, command)
            }
            Command::Config(a) => {
                let cfg = spoke::config::Config::load(a.config.as_deref(), &a.sets)?;
                print!("{}", toml::to_string_pretty(&cfg)?);
                Ok(())
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
