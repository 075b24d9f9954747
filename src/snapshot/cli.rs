//! `spoke snapshot list | inspect | verify | promote | export`.

use anyhow::Result;
use std::path::PathBuf;

/// `spoke snapshot` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum SnapshotCommand {
    /// List the snapshots of a data directory.
    List,
    /// Verify a snapshot's checksums (exit code 1 on any mismatch).
    Verify {
        /// Snapshot directory, or its name under <data-dir>/snapshots.
        id: String,
    },
}

/// Resolve an ID: a snapshot directory path, or a name under the data directory.
pub fn resolve(data_dir: &std::path::Path, id: &str) -> PathBuf {
    let p = PathBuf::from(id);
    if p.join("manifest.json").exists() {
        p
    } else {
        super::snapshots_dir(data_dir).join(id)
    }
}

pub fn run(data_dir: &std::path::Path, cmd: SnapshotCommand) -> Result<()> {
    match cmd {
        SnapshotCommand::List => {
            for d in super::list(data_dir)? {
                println!("{}", d.display());
            }
            Ok(())
        }
        SnapshotCommand::Verify { id } => {
            let dir = resolve(data_dir, &id);
            let m = super::verify(&dir)?;
            println!(
                "{}: ok ({} files, step {})",
                dir.display(),
                m.files.len(),
                m.step
            );
            Ok(())
        }
    }
}
