//! `spoke bench step`: trained tokens per second of one DPO step of a small Llama in candle
//! on CPU, set up like the PyTorch baseline in `shared/reference/torch-dpo-step`:
//! 8 preference pairs, each a 64-token prompt with a 64-token chosen and a 64-token rejected
//! response (16 sequences × 128 tokens = 2,048 tokens), random seeded token ids, the same
//! batch every step; DPO sigmoid loss with β = 0.1; AdamW (lr 1e-5, no weight decay, no
//! clipping). 3 untimed warm-up steps, then 20 timed steps; median and min are reported.
//!
//! Two timings per config: `cached_ref` (the step: reference log-probs computed once
//! and cached, as spoke's learner does) and `with_ref` (the reference forward inside every
//! step, as the PyTorch script does). The JSON also records how much CPU other processes
//! used during the timed steps (from /proc/stat), since the numbers collapse under contention,
//! and candle's thread count (`CANDLE_NUM_THREADS` / `RAYON_NUM_THREADS`, default: all cores).

use crate::model::llama::{Batch, Seq};
use crate::model::{tiny, LmPolicy, ModelConfig, Policy};
use crate::objective::{index, Divergence, Objective, ObjectiveConfig};
use crate::optim::{AdamW, OptimConfig};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// Arguments of `spoke bench step`.
#[derive(Debug, Clone, clap::Args)]
pub struct StepBenchArgs {
    /// Output directory.
    #[arg(long, default_value = "bench-out")]
    pub out: std::path::PathBuf,
    /// Configs to run: small (vocab 8192, hidden 256, 4 layers) and/or tiny (the fixture's).
    #[arg(long, value_delimiter = ',', default_value = "small,tiny")]
    pub configs: Vec<String>,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Preference pairs per step.
    #[arg(long, default_value_t = 8)]
    pub pairs: usize,
    /// Prompt tokens and response tokens per sequence.
    #[arg(long, default_value_t = 64)]
    pub half_len: usize,
}

struct Shape {
    name: &'static str,
    vocab: usize,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv: usize,
}

const SHAPES: [Shape; 2] = [
    Shape {
        name: "small",
        vocab: 8192,
        hidden: 256,
        inter: 704,
        layers: 4,
        heads: 8,
        kv: 8,
    },
    Shape {
        name: "tiny",
        vocab: 512,
        hidden: 64,
        inter: 176,
        layers: 2,
        heads: 4,
        kv: 2,
    },
];

/// Busy jiffies of the whole machine and of this process.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)? + f.get(7)?;
    let me = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &me[me.rfind(')')? + 2..];
    let g: Vec<&str> = rest.split_whitespace().collect();
    let own = g.get(11)?.parse::<u64>().ok()? + g.get(12)?.parse::<u64>().ok()?;
    Some((busy, own))
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn run_one(
    shape: &Shape,
    args: &StepBenchArgs,
    root: &std::path::Path,
) -> Result<serde_json::Value> {
    let t = crate::model::TinyConfig {
        vocab_size: shape.vocab,
        hidden_size: shape.hidden,
        intermediate_size: shape.inter,
        num_hidden_layers: shape.layers,
        num_attention_heads: shape.heads,
        num_key_value_heads: shape.kv,
        seed: 0,
    };
    let mut conf = tiny::config_json(&t);
    conf["max_position_embeddings"] = (2 * args.half_len).into();
    let dir = root.join(shape.name);
    tiny::write_model_dir(&dir, &conf, tiny::TOKENIZER_JSON, 0)?;
    let cfg = ModelConfig {
        path: Some(dir.clone()),
        ..Default::default()
    };
    let policy = LmPolicy::load(&dir, &cfg, None)?;
    let n = args.pairs;
    let hl = args.half_len;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut tok = |k: usize| -> Vec<u32> {
        (0..k)
            .map(|_| rng.random_range(0..shape.vocab as u32))
            .collect()
    };
    let prompts: Vec<Vec<u32>> = (0..n).map(|_| tok(hl)).collect();
    let chosen: Vec<Vec<u32>> = (0..n).map(|_| tok(hl)).collect();
    let rejected: Vec<Vec<u32>> = (0..n).map(|_| tok(hl)).collect();
    // Sequences 0..n: rejected (y0), n..2n: chosen (y1).
    let seqs: Vec<Seq> = rejected
        .iter()
        .chain(chosen.iter())
        .enumerate()
        .map(|(i, r)| {
            let mut ids = prompts[i % n].clone();
            ids.extend(r);
            Seq { ids, n_scored: hl }
        })
        .collect();
    let tokens = seqs.iter().map(|s| s.ids.len()).sum::<usize>();
    let _ = Batch::new(policy.config(), &seqs, policy.device())?; // validates ids
    let mut objective = Objective::new(ObjectiveConfig::default());
    let link = crate::link::RecursiveLink::new(crate::link::LinkConfig::default());
    let ocfg = OptimConfig {
        lr: 1e-5,
        weight_decay: 0.0,
        max_grad_norm: 0.0,
        ..Default::default()
    };
    let dev = policy.device().clone();
    let z = Tensor::ones(n, DType::F32, &dev)?;
    let w = Tensor::ones(n, DType::F32, &dev)?;
    let mut results = serde_json::Map::new();
    for with_ref in [false, true] {
        let mut opt = AdamW::new(policy.trainable(), ocfg.clone())?;
        let cached = policy.logps_of_seqs(&seqs, true, false)?.0;
        let mut phases: Vec<[f64; 4]> = Vec::new();
        let mut step = |objective: &mut Objective, phases: &mut Vec<[f64; 4]>| -> Result<f64> {
            let t0 = Instant::now();
            let reference = if with_ref {
                policy.logps_of_seqs(&seqs, true, false)?.0
            } else {
                cached.clone()
            };
            let t1 = Instant::now();
            let lp = policy.logps_of_seqs(&seqs, false, true)?.0;
            let t = index(
                Divergence::Kl,
                &lp.narrow(0, n, n)?,
                &reference.narrow(0, n, n)?,
                &lp.narrow(0, 0, n)?,
                &reference.narrow(0, 0, n)?,
            )?;
            let loss = objective.loss(&t, &z, &w, &link, 0)?;
            let loss_v = loss.to_scalar::<f32>()? as f64;
            let t2 = Instant::now();
            let grads = loss.backward()?;
            let t3 = Instant::now();
            let info = opt.step(&grads)?;
            if !info.finite {
                bail!("non-finite gradient in the benchmark step");
            }
            let t4 = Instant::now();
            let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
            phases.push([ms(t0, t1), ms(t1, t2), ms(t2, t3), ms(t3, t4)]);
            Ok(loss_v)
        };
        let mut first_loss = f64::NAN;
        for i in 0..args.warmup {
            let l = step(&mut objective, &mut phases)?;
            if i == 0 {
                first_loss = l;
            }
        }
        phases.clear();
        let j0 = cpu_jiffies();
        let t0 = Instant::now();
        let mut times = Vec::with_capacity(args.steps);
        let mut last_loss = f64::NAN;
        for _ in 0..args.steps {
            let s = Instant::now();
            last_loss = step(&mut objective, &mut phases)?;
            times.push(s.elapsed().as_secs_f64() * 1e3);
        }
        let wall = t0.elapsed().as_secs_f64();
        let other = match (j0, cpu_jiffies()) {
            (Some((b0, o0)), Some((b1, o1))) => {
                let d = (b1 - b0) as f64 - (o1 - o0) as f64;
                Some((d / ticks_per_second() / wall).max(0.0))
            }
            _ => None,
        };
        let med = median(&times);
        let min = times.iter().cloned().fold(f64::INFINITY, f64::min);
        let key = if with_ref { "with_ref" } else { "cached_ref" };
        let phase = |k: usize| median(&phases.iter().map(|p| p[k]).collect::<Vec<_>>());
        let phase_ms = serde_json::json!({
            "reference_forward": phase(0),
            "policy_forward_and_loss": phase(1),
            "backward": phase(2),
            "adamw_step": phase(3),
        });
        eprintln!("        phases (median ms): {phase_ms}");
        eprintln!(
            "{:>5} {key:>10}: step median {med:.1} ms (min {min:.1}) = {:.0} tok/s (max {:.0}); other load {:.2} CPUs",
            shape.name,
            tokens as f64 / med * 1e3,
            tokens as f64 / min * 1e3,
            other.unwrap_or(f64::NAN)
        );
        results.insert(
            key.into(),
            serde_json::json!({
                "step_ms": times,
                "median_ms": med,
                "min_ms": min,
                "phase_median_ms": phase_ms,
                "tokens_per_s_median": tokens as f64 / med * 1e3,
                "tokens_per_s_min": tokens as f64 / min * 1e3,
                "loss_first_warmup_step": first_loss,
                "loss_last_step": last_loss,
                "other_processes_avg_cpus_during_timed_steps": other,
            }),
        );
    }
    Ok(serde_json::json!({
        "config": shape.name,
        "vocab_size": shape.vocab,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.inter,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv,
        "params": policy.num_params(),
        "pairs": n,
        "tokens_per_step": tokens,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "results": results,
    }))
}

pub fn run(args: StepBenchArgs) -> anyhow::Result<()> {
    if args.steps == 0 || args.pairs == 0 || args.half_len == 0 {
        bail!("--steps, --pairs and --half-len must be > 0");
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let tmp = args.out.join(".bench-step-models");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    let mut out = vec![];
    for name in &args.configs {
        let shape = SHAPES
            .iter()
            .find(|s| s.name == name.as_str())
            .with_context(|| format!("unknown config {name:?} (expected small or tiny)"))?;
        out.push(run_one(shape, &args, &tmp)?);
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let doc = serde_json::json!({
        "benchmark": "dpo_step",
        "engine": "candle (CPU, f32)",
        "candle_version": "0.11",
        "threads": candle_core::utils::get_num_threads(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "time_utc": chrono::Utc::now().to_rfc3339(),
        "runs": out,
    });
    let path = args.out.join("step.json");
    crate::util::write_atomic(&path, &serde_json::to_vec_pretty(&doc)?)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
