//! `spoke bench compare`: puts two runs of the SPO synthetic experiment side by side, e.g.
//! spoke's `results.csv` and the CSV written by the paper's own code (causalml/spo,
//! `synthetic/scripts/run_grid.py`, same columns), and says whether they agree within seed noise.
//!
//! Both files hold one row per (seed, s, method, β) with the columns
//! `seed,n,s,tau,method,beta,avg_reward,avg_kl` (extra columns are ignored). For every (s, method)
//! it compares the mean reward at KL budget κ (unpaired across the two files, since their random
//! draws differ) and the paired gain over DPO (paired by seed inside each file). The two
//! implementations agree on a quantity when |difference| ≤ z·√(se₁² + se₂²).

use super::synthetic::{paired_gain, reward_at_kl, stats};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Arguments of `spoke bench compare`.
#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// spoke's CSV (`results.csv` of `spoke bench synthetic`).
    #[arg(long)]
    pub ours: PathBuf,
    /// The other CSV (e.g. the paper code's `results.csv`).
    #[arg(long)]
    pub reference: PathBuf,
    /// KL budget κ.
    #[arg(long, default_value_t = 0.2)]
    pub kappa: f64,
    /// Agreement threshold in standard errors of the difference.
    #[arg(long, default_value_t = 2.58)]
    pub z: f64,
    /// Also write the table to this Markdown file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Exit with status 1 when any quantity disagrees.
    #[arg(long)]
    pub check: bool,
}

/// β bits → (avg_kl, avg_reward): one run's β scan.
type Scan = BTreeMap<u64, (f64, f64)>;

/// (s bits, method) → seed → reward at κ.
type PerSeed = BTreeMap<(u64, String), BTreeMap<u64, f64>>;

/// Reads a synthetic-experiment CSV into rewards at κ per (s, method, seed).
pub fn load(path: &Path, kappa: f64) -> Result<PerSeed> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines().enumerate();
    let (_, header) = lines
        .next()
        .with_context(|| format!("{} is empty", path.display()))?;
    let cols: Vec<&str> = header.split(',').map(str::trim).collect();
    let col = |name: &str| -> Result<usize> {
        cols.iter()
            .position(|c| *c == name)
            .with_context(|| format!("{}: no column `{name}` in the header", path.display()))
    };
    let (cs, cse, cm, cb, cr, ck) = (
        col("s")?,
        col("seed")?,
        col("method")?,
        col("beta")?,
        col("avg_reward")?,
        col("avg_kl")?,
    );
    // (s, method, seed) → β bits → (kl, reward)
    let mut curves: BTreeMap<(u64, String, u64), Scan> = BTreeMap::new();
    for (ln, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let get = |i: usize, what: &str| -> Result<f64> {
            let v = f
                .get(i)
                .with_context(|| format!("{} line {}: missing `{what}`", path.display(), ln + 1))?;
            v.parse::<f64>().with_context(|| {
                format!(
                    "{} line {}: `{what}` = {v:?} is not a number",
                    path.display(),
                    ln + 1
                )
            })
        };
        let s = get(cs, "s")? + 0.0; // -0.0 → 0.0
        let seed = get(cse, "seed")?;
        if seed < 0.0 || seed.fract() != 0.0 {
            bail!(
                "{} line {}: seed {seed} is not a non-negative integer",
                path.display(),
                ln + 1
            );
        }
        let method = f
            .get(cm)
            .map(|m| m.to_ascii_lowercase())
            .with_context(|| format!("{} line {}: missing `method`", path.display(), ln + 1))?;
        let beta = get(cb, "beta")?;
        let (kl, rw) = (get(ck, "avg_kl")?, get(cr, "avg_reward")?);
        let c = curves
            .entry((s.to_bits(), method.clone(), seed as u64))
            .or_default();
        if c.insert(beta.to_bits(), (kl, rw)).is_some() {
            bail!(
                "{}: seed {seed}, s {s}, method {method} has β = {beta} twice; pass a file with \
                 one run per (seed, s, method), such as `results.csv`",
                path.display()
            );
        }
    }
    let mut out = PerSeed::new();
    for ((s, m, seed), c) in curves {
        let pts: Vec<(f64, f64)> = c.into_values().collect();
        out.entry((s, m))
            .or_default()
            .insert(seed, reward_at_kl(&pts, kappa));
    }
    if out.is_empty() {
        bail!("{} holds no rows", path.display());
    }
    Ok(out)
}

/// Mean and standard error of a sample, and of the paired gain over DPO (per seed).
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub seeds: usize,
    pub level: f64,
    pub level_se: f64,
    pub gain: f64,
    pub gain_se: f64,
}

pub fn summarize(p: &PerSeed) -> BTreeMap<(u64, String), Summary> {
    let mut out = BTreeMap::new();
    for ((s, m), seeds) in p {
        let v: Vec<f64> = seeds.values().copied().collect();
        let (level, _, level_se) = stats(&v);
        let (gain, gain_se) = match p.get(&(*s, "dpo".to_string())) {
            Some(d) if m != "dpo" => paired_gain(seeds, d),
            _ => (f64::NAN, f64::NAN),
        };
        out.insert(
            (*s, m.clone()),
            Summary {
                seeds: v.len(),
                level,
                level_se,
                gain,
                gain_se,
            },
        );
    }
    out
}

/// z-score of the difference a − b.
fn zscore(a: f64, sa: f64, b: f64, sb: f64) -> f64 {
    let se = (sa * sa + sb * sb).sqrt();
    if se > 0.0 {
        (a - b) / se
    } else if a == b {
        0.0
    } else {
        f64::INFINITY
    }
}

/// The comparison table and the number of disagreements.
pub fn compare(ours: &PerSeed, reference: &PerSeed, kappa: f64, z: f64) -> (String, usize) {
    let a = summarize(ours);
    let b = summarize(reference);
    let mut md = String::new();
    let mut bad = 0;
    let _ = writeln!(
        md,
        "Reward at KL budget κ = {kappa}: mean ± s.e. over seeds; gain: paired by seed over DPO \
         within each file. Agreement: |difference| ≤ {z}·s.e. of the difference.\n"
    );
    let _ = writeln!(
        md,
        "| s | method | seeds | spoke level | reference level | z | spoke gain | reference gain | z | agree |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|");
    let order = |m: &str| ["dpo", "pspo", "ospo", "rspo"].iter().position(|x| *x == m);
    let mut keys: Vec<&(u64, String)> = a.keys().filter(|k| b.contains_key(*k)).collect();
    keys.sort_by(|x, y| {
        f64::from_bits(x.0)
            .total_cmp(&f64::from_bits(y.0))
            .then(order(&x.1).cmp(&order(&y.1)))
            .then(x.1.cmp(&y.1))
    });
    for k in keys {
        let (x, y) = (a[k], b[k]);
        let zl = zscore(x.level, x.level_se, y.level, y.level_se);
        let (gain_a, gain_b, zg) = if x.gain.is_nan() || y.gain.is_nan() {
            ("—".to_string(), "—".to_string(), None)
        } else {
            (
                format!("{:+.3} ± {:.3}", x.gain, x.gain_se),
                format!("{:+.3} ± {:.3}", y.gain, y.gain_se),
                Some(zscore(x.gain, x.gain_se, y.gain, y.gain_se)),
            )
        };
        let ok = zl.abs() <= z && zg.is_none_or(|v| v.abs() <= z);
        if !ok {
            bad += 1;
        }
        let _ = writeln!(
            md,
            "| {} | {} | {}/{} | {:.3} ± {:.3} | {:.3} ± {:.3} | {:+.1} | {gain_a} | {gain_b} | {} | {} |",
            f64::from_bits(k.0),
            k.1,
            x.seeds,
            y.seeds,
            x.level,
            x.level_se,
            y.level,
            y.level_se,
            zl,
            zg.map(|v| format!("{v:+.1}")).unwrap_or_else(|| "—".into()),
            if ok { "yes" } else { "**no**" }
        );
    }
    let missing: Vec<String> = a
        .keys()
        .filter(|k| !b.contains_key(*k))
        .chain(b.keys().filter(|k| !a.contains_key(*k)))
        .map(|k| format!("s = {} {}", f64::from_bits(k.0), k.1))
        .collect();
    if !missing.is_empty() {
        let _ = writeln!(md, "\nIn one file only: {}.", missing.join(", "));
    }
    (md, bad)
}

pub fn run(a: CompareArgs) -> Result<()> {
    if a.kappa.is_nan() || a.kappa <= 0.0 || a.z.is_nan() || a.z <= 0.0 {
        bail!("--kappa and --z must be > 0");
    }
    let ours = load(&a.ours, a.kappa)?;
    let reference = load(&a.reference, a.kappa)?;
    let (md, bad) = compare(&ours, &reference, a.kappa, a.z);
    print!("{md}");
    if let Some(p) = &a.out {
        std::fs::write(p, &md).with_context(|| format!("writing {}", p.display()))?;
    }
    if bad > 0 {
        eprintln!(
            "{bad} (s, method) cells disagree beyond {} standard errors",
            a.z
        );
        if a.check {
            std::process::exit(1);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csv(rows: &[(u64, f64, &str, f64)]) -> String {
        // One straight reward–KL line per run: reward = level·KL/κ… evaluated at two β.
        let mut s = String::from("seed,n,s,tau,method,beta,avg_reward,avg_kl\n");
        for (seed, sh, m, level) in rows {
            let _ = writeln!(s, "{seed},1000,{sh},0.25,{m},1.0,{},0.4", 2.0 * level);
            let _ = writeln!(s, "{seed},1000,{sh},0.25,{m},2.0,0.0,0.0");
        }
        s
    }

    #[test]
    fn levels_gains_and_verdicts() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = vec![];
        let mut b = vec![];
        for seed in 0..10u64 {
            let noise = (seed as f64 - 4.5) * 0.01;
            a.push((seed, 0.0, "dpo", 0.5 + noise));
            a.push((seed, 0.0, "ospo", 0.6 + noise));
            b.push((seed, 0.0, "dpo", 0.5 - noise));
            // The reference's ospo gains exactly +0.1 too, but pspo loses 0.2.
            b.push((seed, 0.0, "ospo", 0.6 - noise));
            a.push((seed, 0.0, "pspo", 0.5 + noise + 0.001 * seed as f64));
            b.push((seed, 0.0, "pspo", 0.3 - noise + 0.001 * seed as f64));
        }
        let (pa, pb) = (dir.path().join("a.csv"), dir.path().join("b.csv"));
        std::fs::write(&pa, csv(&a)).unwrap();
        std::fs::write(&pb, csv(&b)).unwrap();
        let la = load(&pa, 0.2).unwrap();
        let sa = summarize(&la);
        let o = sa[&(0f64.to_bits(), "ospo".to_string())];
        assert!((o.level - 0.6).abs() < 1e-12, "{o:?}");
        assert!((o.gain - 0.1).abs() < 1e-12 && o.gain_se < 1e-12, "{o:?}");
        let (md, bad) = compare(&la, &load(&pb, 0.2).unwrap(), 0.2, 2.58);
        assert_eq!(bad, 1, "{md}");
        assert!(
            md.contains("| 0 | pspo | 10/10 |") && md.contains("**no**"),
            "{md}"
        );
    }

    #[test]
    fn rejects_mixed_studies_and_bad_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.csv");
        std::fs::write(
            &p,
            "seed,n,s,tau,method,beta,avg_reward,avg_kl,epochs\n0,1,0,0.25,dpo,1,0.1,0.1,1\n0,1,0,0.25,dpo,1,0.1,0.1,3\n",
        )
        .unwrap();
        let e = load(&p, 0.2).unwrap_err().to_string();
        assert!(e.contains("twice"), "{e}");
        std::fs::write(
            &p,
            "seed,n,s,tau,method,beta,avg_reward,avg_kl\n0,1,0,0.25,dpo,x,0.1,0.1\n",
        )
        .unwrap();
        let e = load(&p, 0.2).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("beta"), "{e}");
        std::fs::write(&p, "seed,s,method\n").unwrap();
        let e = load(&p, 0.2).unwrap_err().to_string();
        assert!(e.contains("beta"), "{e}");
    }
}
