//! Small shared helpers: hashing, durable file writes, safetensors with HF metadata.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;

/// Hex SHA-256 of a byte slice.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Hex SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex::encode(h.finalize()))
}

/// Stable 64-bit hash (FNV-1a) of a string; used for deterministic hold-out assignment.
pub fn fnv1a64(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Whether an event id falls in the held-out slice (deterministic in the id).
pub fn is_holdout(event_id: &str, fraction: f64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    // FNV-1a followed by a splitmix64 finaliser, so that ids differing only in their last
    // characters still spread uniformly.
    let mut z = fnv1a64(event_id);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^= z >> 31;
    let u = (z >> 11) as f64 / (1u64 << 53) as f64;
    u < fraction
}

/// Write bytes to `path` and fsync the file.
pub fn write_durable(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("fsync {}", path.display()))?;
    Ok(())
}

/// Write bytes atomically: temp file in the same directory, fsync, rename, fsync directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    write_durable(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    fsync_dir(dir)
}

/// fsync a directory so that renames inside it are durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).with_context(|| format!("opening dir {}", dir.display()))?;
    d.sync_all()
        .with_context(|| format!("fsync dir {}", dir.display()))?;
    Ok(())
}

/// Serialize named tensors to safetensors bytes with the `{"format": "pt"}` metadata that
/// transformers and peft require (candle's own `save` omits it). Tensors are written in
/// name order so the bytes are deterministic.
pub fn safetensors_bytes(tensors: &[(String, candle_core::Tensor)]) -> Result<Vec<u8>> {
    let mut sorted: Vec<&(String, candle_core::Tensor)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let owned: Vec<(String, candle_core::Tensor)> = sorted
        .into_iter()
        .map(|(n, t)| Ok((n.clone(), t.contiguous()?)))
        .collect::<Result<_>>()?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let bytes =
        safetensors::tensor::serialize(owned.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))?;
    Ok(bytes)
}

/// Write named tensors as a durable safetensors file with HF metadata.
pub fn save_safetensors(path: &Path, tensors: &[(String, candle_core::Tensor)]) -> Result<()> {
    let bytes = safetensors_bytes(tensors)?;
    write_durable(path, &bytes)
}

#[cfg(test)]
mod tests {
    #[test]
    fn holdout_share_is_close_to_the_fraction() {
        let n = 20_000;
        let k = (0..n)
            .filter(|i| super::is_holdout(&format!("syn-0-{i}"), 0.1))
            .count();
        let share = k as f64 / n as f64;
        assert!((share - 0.1).abs() < 0.01, "{share}");
    }
}
