//! spoke's synthetic-benchmark trainer replays runs of the SPO paper's own code step for step.
//!
//! `tests/data/spo-reference/replay.json` was recorded by `scripts/spo-reference-replay.py`
//! from causalml/spo (`synthetic/`, commit fb36845) with torch 2.15 on CPU: the teacher and the
//! learner's initial weights, the data, the order of every epoch, and the β scan after DPO,
//! RSPO and OSPO (n = 260 pairs: two full minibatches of 128 and a partial one of 4; 10 epochs;
//! OSPO 2 DPO warm-up epochs + 10 kernel epochs). Given the same weights, data and orders,
//! spoke's Adam, losses, kernel link, sign alignment and evaluation must reproduce the paper
//! code's rewards and KLs to float precision. (PSPO is not replayable: after each isotonic
//! refit, which linear piece a pair falls on is decided by float rounding, and the pieces'
//! slopes differ by orders of magnitude; BENCHMARKS.md.)

use candle_core::{Device, Tensor, Var};
use clap::Parser;
use spoke::bench::synthetic::mlp::{Linear, Mlp};
use spoke::bench::synthetic::{replay_run, SeedData, SyntheticBenchArgs, D, HIDDEN, K};
use spoke::objective::ObjectiveKind;
use std::collections::BTreeMap;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    a: SyntheticBenchArgs,
}

#[derive(serde::Deserialize)]
struct Run {
    orders: Vec<Vec<usize>>,
    avg_reward: Vec<f64>,
    avg_kl: Vec<f64>,
}

#[derive(serde::Deserialize)]
struct Recording {
    seed: u64,
    epochs: u32,
    teacher: Vec<serde_json::Value>,
    init: Vec<serde_json::Value>,
    x: Vec<Vec<f32>>,
    x_eval: Vec<Vec<f32>>,
    y0: Vec<usize>,
    y1: Vec<usize>,
    z: Vec<f64>,
    runs: BTreeMap<String, Run>,
}

fn flatten(v: &serde_json::Value, out: &mut Vec<f32>) {
    match v {
        serde_json::Value::Array(a) => a.iter().for_each(|x| flatten(x, out)),
        x => out.push(x.as_f64().expect("a number") as f32),
    }
}

/// An MLP with the given PyTorch parameters (weight [out, in], bias [out] per layer).
fn mlp(params: &[serde_json::Value]) -> Mlp {
    let dims: Vec<usize> = std::iter::once(D)
        .chain(HIDDEN)
        .chain(std::iter::once(K))
        .collect();
    let var = |v: &serde_json::Value, shape: &[usize]| {
        let mut f = vec![];
        flatten(v, &mut f);
        Var::from_tensor(&Tensor::from_vec(f, shape, &Device::Cpu).unwrap()).unwrap()
    };
    let layers = dims
        .windows(2)
        .enumerate()
        .map(|(i, w)| Linear {
            w: var(&params[2 * i], &[w[1], w[0]]),
            b: var(&params[2 * i + 1], &[w[1]]),
        })
        .collect();
    Mlp { layers, dims }
}

fn rows(r: &[Vec<f32>]) -> Tensor {
    Tensor::from_vec(r.concat(), (r.len(), D), &Device::Cpu).unwrap()
}

#[test]
fn replays_the_paper_code_runs() {
    // SPOKE_REPLAY_RECORDING replays another recording (e.g. a full-size one).
    let path = std::env::var("SPOKE_REPLAY_RECORDING").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/spo-reference/replay.json"
        )
        .to_string()
    });
    // Long runs accumulate float32 rounding (OSPO's 1000-term kernel sums): SPOKE_REPLAY_TOL.
    let tol: f64 = std::env::var("SPOKE_REPLAY_TOL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1e-4);
    let rec: Recording = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let mut a = Cli::parse_from(["spoke"]).a;
    a.epochs = rec.epochs;
    let teacher = mlp(&rec.teacher);
    let n = rec.y0.len();
    let data = SeedData::from_parts(
        rec.seed,
        rows(&rec.x),
        rows(&rec.x_eval),
        rec.y0.clone(),
        rec.y1.clone(),
        vec![0.0; n],
        &teacher,
        10.0,
    )
    .unwrap();
    assert_eq!(rec.runs.len(), 3);
    for (method, run) in &rec.runs {
        let kind: ObjectiveKind = method.parse().unwrap();
        let curve = replay_run(
            &data,
            rec.z.clone(),
            kind,
            mlp(&rec.init),
            run.orders.clone(),
            &a,
        )
        .unwrap();
        assert_eq!(curve.len(), run.avg_kl.len());
        let mut worst: f64 = 0.0;
        for (i, (kl, rw)) in curve.iter().enumerate() {
            worst = worst
                .max((kl - run.avg_kl[i]).abs())
                .max((rw - run.avg_reward[i]).abs());
        }
        eprintln!("{method}: max |difference| over the β scan {worst:.1e}");
        assert!(
            worst < tol,
            "{method}: spoke's β scan differs from the paper code's by {worst:.2e}"
        );
        // The runs trained: the policy moved away from the reference.
        assert!(run.avg_kl[0] > 1e-3, "{method}: {:?}", run.avg_kl);
    }
    // A replay must be told exactly one order per epoch, each a permutation.
    let short = replay_run(
        &data,
        rec.z.clone(),
        ObjectiveKind::Dpo,
        mlp(&rec.init),
        vec![(0..n).collect()],
        &a,
    );
    assert!(short.unwrap_err().to_string().contains("epoch orders"));
    let mut bad: Vec<Vec<usize>> = rec.runs["dpo"].orders.clone();
    bad[3][0] = bad[3][1];
    let e = replay_run(
        &data,
        rec.z.clone(),
        ObjectiveKind::Dpo,
        mlp(&rec.init),
        bad,
        &a,
    );
    assert!(e.unwrap_err().to_string().contains("permutation"));
}
