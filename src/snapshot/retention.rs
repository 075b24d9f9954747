//! Retention: keep the last K snapshots, every promoted one and any explicitly protected one
//! (the one resumed from, the newest good one); remove stale temporary directories.

use super::{list, snapshots_dir, TMP_PREFIX};
use anyhow::{Context, Result};
use std::collections::BTreeSet;
use std::path::Path;

/// Remove temporary snapshot directories (`snapshots/.tmp-*`) left by a crash. Call at
/// startup only, before any writer of this data directory is running.
pub fn gc_tmp(data_dir: &Path) -> Result<usize> {
    let root = snapshots_dir(data_dir);
    if !root.exists() {
        return Ok(0);
    }
    let mut n = 0;
    for e in std::fs::read_dir(&root).with_context(|| format!("listing {}", root.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(TMP_PREFIX) {
            let p = e.path();
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            r.with_context(|| format!("removing stale {}", p.display()))?;
            tracing::info!("Removed stale temporary snapshot {}.", p.display());
            n += 1;
        }
    }
    Ok(n)
}

/// Delete snapshots beyond the newest `keep_last` (at least 1), except promoted ones
/// (`promotions.parquet`, `promoted/PROMOTED.json`) and the names in `protected`. Each is
/// first renamed to a temporary name (atomic disappearance), then removed. Returns the
/// names deleted.
pub fn apply(
    data_dir: &Path,
    keep_last: usize,
    protected: &BTreeSet<String>,
) -> Result<Vec<String>> {
    let all = list(data_dir)?;
    let keep_last = keep_last.max(1);
    if all.len() <= keep_last {
        return Ok(vec![]);
    }
    let promoted = crate::promote::promoted_names(data_dir)?;
    let root = snapshots_dir(data_dir);
    let mut deleted = vec![];
    for p in &all[..all.len() - keep_last] {
        let Some(name) = p.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            continue;
        };
        if promoted.contains(&name) || protected.contains(&name) {
            continue;
        }
        let doomed = root.join(format!("{TMP_PREFIX}del-{name}"));
        std::fs::rename(p, &doomed)
            .with_context(|| format!("retention: renaming {} away", p.display()))?;
        std::fs::remove_dir_all(&doomed)
            .with_context(|| format!("retention: removing {}", doomed.display()))?;
        deleted.push(name);
    }
    if !deleted.is_empty() {
        crate::util::fsync_dir(&root)?;
        tracing::debug!("Retention removed snapshots {deleted:?}.");
    }
    Ok(deleted)
}
