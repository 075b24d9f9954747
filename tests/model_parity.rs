//! Parity with HF transformers on the shipped tiny-Llama fixture (tests/data/hf-tiny-llama):
//! every case of cases.jsonl within 1e-3 absolute, one sequence at a time and in one
//! right-padded batch; token counts and token ids as transformers' tokenizer gives them.

use spoke::model::{LmPolicy, ModelConfig};
use std::path::PathBuf;

const TOL: f64 = 1e-3;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/hf-tiny-llama")
}

struct Case {
    prompt: String,
    response: String,
    logp: f64,
    n: usize,
    prompt_ids: Vec<u32>,
    response_ids: Vec<u32>,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixture().join("cases_detail.jsonl")).unwrap();
    let base = std::fs::read_to_string(fixture().join("cases.jsonl")).unwrap();
    let out: Vec<Case> = text
        .lines()
        .zip(base.lines())
        .map(|(d, b)| {
            let d: serde_json::Value = serde_json::from_str(d).unwrap();
            let b: serde_json::Value = serde_json::from_str(b).unwrap();
            assert_eq!(d["prompt"], b["prompt"]);
            let ids = |k: &str| -> Vec<u32> {
                d[k].as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect()
            };
            Case {
                prompt: b["prompt"].as_str().unwrap().to_string(),
                response: b["response"].as_str().unwrap().to_string(),
                logp: b["logp"].as_f64().unwrap(),
                n: b["n_response_tokens"].as_u64().unwrap() as usize,
                prompt_ids: ids("prompt_ids"),
                response_ids: ids("response_ids"),
            }
        })
        .collect();
    assert_eq!(out.len(), 40);
    out
}

fn policy() -> LmPolicy {
    let cfg = ModelConfig {
        path: Some(fixture()),
        max_prompt_tokens: 4096,
        max_response_tokens: 4096,
        ..Default::default()
    };
    LmPolicy::load(&fixture(), &cfg, None).unwrap()
}

#[test]
fn tokenizer_matches_transformers() {
    let p = policy();
    for c in cases() {
        assert_eq!(
            p.tokenize(&c.prompt).unwrap(),
            c.prompt_ids,
            "prompt {:?}",
            c.prompt
        );
        assert_eq!(
            p.tokenize(&c.response).unwrap(),
            c.response_ids,
            "response {:?}",
            c.response
        );
    }
}

#[test]
fn logps_match_transformers_single_and_batched() {
    let p = policy();
    let cases = cases();
    // One sequence at a time, policy and reference (same weights at load).
    let mut worst = 0f64;
    for c in &cases {
        let (lp, n) = p.score(&[&c.prompt], &[&c.response], false).unwrap();
        let (rf, _) = p.score(&[&c.prompt], &[&c.response], true).unwrap();
        assert_eq!(n[0], c.n, "n_response_tokens of {:?}", c.prompt);
        let d = (lp[0] as f64 - c.logp).abs();
        worst = worst.max(d);
        assert!(
            d <= TOL,
            "single: {:?} got {} expected {} (diff {d})",
            c.prompt,
            lp[0],
            c.logp
        );
        assert_eq!(lp[0], rf[0]);
    }
    eprintln!("single: max abs diff {worst:.3e}");
    // All 40 in one right-padded batch (lengths 2..250).
    let prompts: Vec<&str> = cases.iter().map(|c| c.prompt.as_str()).collect();
    let responses: Vec<&str> = cases.iter().map(|c| c.response.as_str()).collect();
    let (lp, n) = p.score(&prompts, &responses, false).unwrap();
    let mut worst = 0f64;
    for (i, c) in cases.iter().enumerate() {
        assert_eq!(n[i], c.n);
        let d = (lp[i] as f64 - c.logp).abs();
        worst = worst.max(d);
        assert!(
            d <= TOL,
            "batched: {:?} got {} expected {} (diff {d})",
            c.prompt,
            lp[i],
            c.logp
        );
    }
    eprintln!("batched: max abs diff {worst:.3e}");
    // The differentiable path gives the same numbers.
    use spoke::model::Policy;
    let t = p
        .logps(&prompts, &responses, false)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (a, b) in t.iter().zip(&lp) {
        assert!((a - b).abs() < 1e-4);
    }
}
