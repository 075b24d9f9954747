//! Shared by the snapshot/promotion tests: a small real policy (bag-of-words linear scorer
//! over hashed words, trained with the real learner, objective and optimiser) for
//! library-level checks that do not need the transformer, plus helpers.
#![allow(dead_code)]

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use spoke::config::Config;
use spoke::learner::Learner;
use spoke::model::{Policy, WeightExport};
use spoke::snapshot::{Evaluation, SnapshotContent};
use spoke::source::synthetic::{synthetic_event, SyntheticConfig};
use spoke::source::{Offsets, Position, PreferenceEvent};
use std::collections::HashMap;

pub const VOCAB: usize = 97;

/// log π(response | prompt) = Σ_words w[hash(word) mod V] (a log-linear scorer).
pub struct BowPolicy {
    w: Var,
    w_ref: Vec<f32>,
    dev: Device,
}

fn bucket(word: &str) -> usize {
    (spoke::util::fnv1a64(word) % VOCAB as u64) as usize
}

impl BowPolicy {
    pub fn new(seed: u64) -> Self {
        let init: Vec<f32> = (0..VOCAB)
            .map(|i| {
                let h = spoke::util::fnv1a64(&format!("{seed}/{i}"));
                ((h % 2001) as f32 / 1000.0 - 1.0) * 0.05
            })
            .collect();
        let dev = Device::Cpu;
        Self {
            w: Var::from_tensor(&Tensor::from_vec(init.clone(), VOCAB, &dev).unwrap()).unwrap(),
            w_ref: init,
            dev,
        }
    }
    fn counts(&self, responses: &[&str]) -> Result<Tensor> {
        let mut c = vec![0f32; responses.len() * VOCAB];
        for (i, r) in responses.iter().enumerate() {
            for word in r.split_whitespace() {
                c[i * VOCAB + bucket(word)] += 1.0;
            }
        }
        Ok(Tensor::from_vec(c, (responses.len(), VOCAB), &self.dev)?)
    }
}

impl Policy for BowPolicy {
    fn logps(&self, _prompts: &[&str], responses: &[&str], _train: bool) -> Result<Tensor> {
        let c = self.counts(responses)?;
        Ok(c.matmul(&self.w.as_tensor().unsqueeze(1)?)?.squeeze(1)?)
    }
    fn ref_logps(&self, _prompts: &[&str], responses: &[&str]) -> Result<Vec<f32>> {
        let c = self.counts(responses)?;
        let r = Tensor::from_vec(self.w_ref.clone(), (VOCAB, 1), &self.dev)?;
        Ok(c.matmul(&r)?.squeeze(1)?.to_vec1::<f32>()?)
    }
    fn trainable(&self) -> Vec<(String, Var)> {
        vec![("bow.weight".into(), self.w.clone())]
    }
    fn device(&self) -> &Device {
        &self.dev
    }
    fn export(&self) -> Result<WeightExport> {
        Ok(WeightExport {
            tensor_file: "model.safetensors".into(),
            tensors: vec![("bow.weight".into(), self.w.as_tensor().copy()?)],
            side_files: vec![("config.json".into(), br#"{"model_type":"bow"}"#.to_vec())],
        })
    }
    fn load_trainable(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let t = tensors
            .get("bow.weight")
            .ok_or_else(|| anyhow::anyhow!("missing bow.weight"))?;
        self.w.set(&t.to_dtype(DType::F32)?)?;
        Ok(())
    }
    fn describe(&self) -> String {
        format!("bag-of-words scorer over {VOCAB} buckets")
    }
}

/// Events `range` of the synthetic stream with their positions (labels flipped if asked).
pub fn events(
    cfg: &SyntheticConfig,
    range: std::ops::Range<u64>,
    flip: bool,
) -> Vec<(PreferenceEvent, Position)> {
    range
        .map(|i| {
            let mut e = synthetic_event(cfg, i).event;
            if flip {
                e.label = 1 - e.label;
            }
            (
                e,
                Position {
                    stream: "synthetic".into(),
                    partition: 0,
                    offset: i as i64,
                },
            )
        })
        .collect()
}

/// Run `steps` learner steps over consecutive batches starting at batch `first`.
pub fn train(learner: &mut Learner, cfg: &Config, first: u64, steps: u64, flip: bool) {
    let bs = cfg.run.batch_size as u64;
    for b in first..first + steps {
        let rows = events(&cfg.source.synthetic, b * bs..(b + 1) * bs, flip);
        let batch = spoke::buffer::to_batch(&rows).unwrap();
        let rep = learner.step(&batch).unwrap();
        assert!(rep.record.applied, "step {b} was rejected");
    }
}

pub fn learner(cfg: &Config, seed: u64) -> Learner {
    Learner::new(Box::new(BowPolicy::new(seed)), cfg).unwrap()
}

/// What the pipeline hands to the snapshot writer, built the same way.
pub fn content(learner: &Learner, cfg: &Config, eval: Option<Evaluation>) -> SnapshotContent {
    let (weights, optimizer, optimizer_step) = learner.export().unwrap();
    let step = learner.step_count();
    let consumed = step * cfg.run.batch_size as u64;
    let mut offsets = Offsets::default();
    offsets.set("synthetic", 0, consumed as i64);
    SnapshotContent {
        step,
        events_seen: consumed,
        objective: learner.objective_name().into(),
        config_hash: cfg.hash(),
        parent: None,
        weights,
        optimizer,
        optimizer_step,
        learner_state: serde_json::to_value(learner.state()).unwrap(),
        offsets,
        metrics: vec![],
        events: vec![],
        link_curve: learner.link().curve(),
        replay: learner.replay_batch().unwrap(),
        eval,
    }
}

/// Safetensors bytes of the learner's weights (what model.safetensors would hold).
pub fn weight_bytes(learner: &Learner) -> Vec<u8> {
    spoke::util::safetensors_bytes(&learner.export().unwrap().0.tensors).unwrap()
}

pub fn optimizer_bytes(learner: &Learner) -> Vec<u8> {
    spoke::util::safetensors_bytes(&learner.export().unwrap().1).unwrap()
}

pub fn base_config(data_dir: &std::path::Path) -> Config {
    let mut cfg = Config::default();
    cfg.run.data_dir = data_dir.to_path_buf();
    cfg.run.batch_size = 8;
    cfg.optim.lr = 0.05;
    cfg.optim.weight_decay = 0.01;
    cfg
}
