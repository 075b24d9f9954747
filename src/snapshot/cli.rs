//! `spoke snapshot list | inspect | verify | promote | export`.

use super::parquet_io::{count_event_roles, summarize_metrics};
use super::{list, read_manifest, snapshots_dir, verify, BOOKKEEPING_FILES};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// `spoke snapshot` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum SnapshotCommand {
    /// List the snapshots of a data directory (name, step, events, objective, promoted).
    List,
    /// Print a snapshot's manifest and a summary of its metrics and events.
    Inspect {
        /// Snapshot directory, or its name under <data-dir>/snapshots.
        id: String,
    },
    /// Verify a snapshot's checksums (exit code 1 on any mismatch).
    Verify {
        /// Snapshot directory, or its name under <data-dir>/snapshots.
        id: String,
    },
    /// Promote a snapshot now (manual; atomic pointer swap under <data-dir>/promoted).
    Promote {
        /// Snapshot directory, or its name under <data-dir>/snapshots.
        id: String,
        /// Reason recorded in promotions.parquet.
        #[arg(long, default_value = "manual promotion")]
        reason: String,
    },
    /// Export the weights as a Hugging Face model directory (full fine-tune) or a PEFT
    /// adapter folder (LoRA): the weight file and its side files.
    Export {
        /// Snapshot directory, or its name under <data-dir>/snapshots.
        id: String,
        /// Target directory (created; must be empty if it exists).
        #[arg(long)]
        to: PathBuf,
    },
    /// Benchmark: learner step time with no / background / synchronous snapshot writes
    /// (uses <data-dir> for the model and the snapshots).
    Bench(super::bench::SnapshotBenchArgs),
}

/// Resolve an ID: a snapshot directory path, or a name under the data directory; `promoted`
/// means the currently promoted snapshot.
pub fn resolve(data_dir: &Path, id: &str) -> Result<PathBuf> {
    let p = PathBuf::from(id);
    if p.join("manifest.json").exists() {
        return Ok(p);
    }
    if id == "promoted" {
        let cur = crate::promote::current(data_dir)?
            .with_context(|| format!("{}: nothing is promoted", data_dir.display()))?;
        return Ok(data_dir.join(cur.path));
    }
    let q = snapshots_dir(data_dir).join(id);
    if q.is_dir() {
        return Ok(q);
    }
    bail!(
        "no snapshot {id:?}: neither a snapshot directory nor a name under {}",
        snapshots_dir(data_dir).display()
    )
}

fn fmt_f(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.4}"),
        _ => "-".into(),
    }
}

pub fn run(data_dir: &Path, cmd: SnapshotCommand) -> Result<()> {
    match cmd {
        SnapshotCommand::List => {
            let cur = crate::promote::current(data_dir)?.map(|p| p.name);
            let ever = crate::promote::promoted_names(data_dir)?;
            println!(
                "{:<22} {:>8} {:>10} {:<6} {:>7} {:<9}",
                "name", "step", "events", "obj", "auc", "promoted"
            );
            for d in list(data_dir)? {
                let name = d
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default();
                let promoted = if cur.as_deref() == Some(name.as_str()) {
                    "current"
                } else if ever.contains(&name) {
                    "earlier"
                } else {
                    ""
                };
                match read_manifest(&d) {
                    Ok(m) => println!(
                        "{:<22} {:>8} {:>10} {:<6} {:>7} {:<9}",
                        name,
                        m.step,
                        m.events_seen,
                        m.objective,
                        fmt_f(m.eval.map(|e| e.auc)),
                        promoted
                    ),
                    Err(e) => println!("{name:<22} unreadable manifest: {e:#}"),
                }
            }
            Ok(())
        }
        SnapshotCommand::Inspect { id } => {
            let dir = resolve(data_dir, &id)?;
            let m = read_manifest(&dir)?;
            println!("{}", serde_json::to_string_pretty(&m)?);
            let status = match verify(&dir) {
                Ok(_) => "ok".to_string(),
                Err(e) => format!("FAILED: {e:#}"),
            };
            println!("verify: {status}");
            if m.files.contains_key("metrics.parquet") {
                let s = summarize_metrics(&dir.join("metrics.parquet"))?;
                println!(
                    "metrics: {} steps ({}..{}), {} rejected, mean loss {}, last loss {}, mean step {:.4} s, link drift (sup) {}",
                    s.rows,
                    s.first_step.map(|x| x.to_string()).unwrap_or("-".into()),
                    s.last_step.map(|x| x.to_string()).unwrap_or("-".into()),
                    s.rejected_steps,
                    fmt_f(Some(s.mean_loss)),
                    fmt_f(Some(s.last_loss)),
                    s.mean_step_seconds,
                    fmt_f(Some(s.last_link_drift_sup)),
                );
            }
            if m.files.contains_key("events.parquet") {
                let roles = count_event_roles(&dir.join("events.parquet"))?;
                let parts: Vec<String> = roles.iter().map(|(k, v)| format!("{v} {k}")).collect();
                println!(
                    "events: {}",
                    if parts.is_empty() {
                        "none".into()
                    } else {
                        parts.join(", ")
                    }
                );
            }
            Ok(())
        }
        SnapshotCommand::Verify { id } => {
            let dir = resolve(data_dir, &id)?;
            let m = verify(&dir)?;
            println!(
                "{}: ok ({} files, step {})",
                dir.display(),
                m.files.len(),
                m.step
            );
            Ok(())
        }
        SnapshotCommand::Promote { id, reason } => {
            let dir = resolve(data_dir, &id)?;
            let r = crate::promote::promote(data_dir, &dir, "manual", &reason)?;
            println!(
                "promoted {} (step {}){}",
                r.name,
                r.step,
                r.previous
                    .map(|p| format!(", previously {p}"))
                    .unwrap_or_default()
            );
            Ok(())
        }
        SnapshotCommand::Bench(a) => {
            let stats = tokio::task::block_in_place(|| super::bench::run(data_dir, &a))?;
            let base = stats[0].p99_ms;
            for s in &stats {
                println!(
                    "| {} | {} | {:.1} | {:.1} | {:.1} | {:.2}x | {} | {:.1} |",
                    s.mode,
                    s.steps,
                    s.p50_ms,
                    s.p99_ms,
                    s.max_ms,
                    s.p99_ms / base,
                    s.snapshots,
                    s.mean_write_ms
                );
            }
            Ok(())
        }
        SnapshotCommand::Export { id, to } => {
            let dir = resolve(data_dir, &id)?;
            let files = export(&dir, &to)?;
            println!(
                "exported {} to {}: {}",
                dir.display(),
                to.display(),
                files.join(", ")
            );
            Ok(())
        }
    }
}

/// Export a snapshot's weights and side files (config.json, tokenizer files,
/// adapter_config.json, ...) into `to`, after verifying it. Returns the file names written.
pub fn export(dir: &Path, to: &Path) -> Result<Vec<String>> {
    let m = verify(dir).context("refusing to export a snapshot that does not verify")?;
    if to.exists() {
        let non_empty = std::fs::read_dir(to)
            .with_context(|| format!("{}: not a directory", to.display()))?
            .next()
            .is_some();
        if non_empty {
            bail!("export target {} exists and is not empty", to.display());
        }
    }
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    let mut written = vec![];
    for f in m.files.keys() {
        if BOOKKEEPING_FILES.contains(&f.as_str()) {
            continue;
        }
        let bytes = std::fs::read(dir.join(f)).with_context(|| format!("reading {f}"))?;
        crate::util::write_durable(&to.join(f), &bytes)?;
        written.push(f.clone());
    }
    if written.is_empty() {
        bail!("{}: no weight files to export", dir.display());
    }
    crate::util::fsync_dir(to)?;
    Ok(written)
}
