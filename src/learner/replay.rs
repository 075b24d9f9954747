//! The learner's replay buffer: the most recent trained items (FIFO, bounded), from which each
//! step draws a few to train on again beside the fresh batch. Online learning from a stream
//! otherwise sees every event exactly once; replay lets a small stream be used more than once
//! without holding it all. Generic over the item, so the LM pipeline (Arrow rows) and the MLP of
//! `spoke bench synthetic` (pair indices) share the exact sampling logic.
//!
//! Sampling is uniform without replacement from a seeded ChaCha8 stream whose position is part
//! of the saved state, so a resumed run replays exactly what an uninterrupted one would.

use anyhow::{bail, Result};
use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// `[replay]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReplayConfig {
    /// Most recent trained pairs kept for replay (0: replay off).
    pub capacity: usize,
    /// Replayed pairs per fresh pair in each step (e.g. 1.0: a batch of 16 fresh pairs trains
    /// with 16 replayed ones). 0: replay off.
    pub ratio: f64,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            capacity: 1024,
            ratio: 1.0,
        }
    }
}

impl ReplayConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.ratio >= 0.0 && self.ratio <= 64.0) {
            return Err(format!(
                "replay.ratio: must be in [0, 64], got {}",
                self.ratio
            ));
        }
        Ok(())
    }

    pub fn enabled(&self) -> bool {
        self.capacity > 0 && self.ratio > 0.0
    }

    /// Replayed items to draw for a fresh batch of `fresh` items when `available` are held.
    pub fn draw_count(&self, fresh: usize, available: usize) -> usize {
        if !self.enabled() {
            return 0;
        }
        ((self.ratio * fresh as f64).round() as usize).min(available)
    }
}

/// Position of the sampling stream, saved with the learner state.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplayRngState {
    pub seed: [u8; 32],
    /// ChaCha word position (u128, as a decimal string: JSON numbers are not that wide).
    pub word_pos: String,
}

/// A bounded FIFO of recent items with seeded uniform sampling.
#[derive(Debug, Clone)]
pub struct ReplayBuffer<T> {
    cfg: ReplayConfig,
    items: VecDeque<T>,
    rng: ChaCha8Rng,
}

impl<T: Clone> ReplayBuffer<T> {
    pub fn new(cfg: ReplayConfig, seed: u64) -> Self {
        Self {
            items: VecDeque::with_capacity(cfg.capacity.min(1 << 16)),
            cfg,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5245_504C_4159),
        }
    }

    pub fn config(&self) -> &ReplayConfig {
        &self.cfg
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Items to train on again beside a fresh batch of `fresh` items (oldest-first order of
    /// the draw is not meaningful; the draw is uniform without replacement).
    pub fn draw(&mut self, fresh: usize) -> Vec<T> {
        let k = self.cfg.draw_count(fresh, self.items.len());
        if k == 0 {
            return vec![];
        }
        let mut idx = sample(&mut self.rng, self.items.len(), k).into_vec();
        idx.sort_unstable();
        idx.into_iter().map(|i| self.items[i].clone()).collect()
    }

    /// Adds trained items, evicting the oldest beyond capacity.
    pub fn extend(&mut self, items: impl IntoIterator<Item = T>) {
        if !self.cfg.enabled() {
            return;
        }
        for it in items {
            if self.items.len() == self.cfg.capacity {
                self.items.pop_front();
            }
            self.items.push_back(it);
        }
    }

    /// The held items, oldest first.
    pub fn items(&self) -> impl Iterator<Item = &T> {
        self.items.iter()
    }

    pub fn rng_state(&self) -> ReplayRngState {
        ReplayRngState {
            seed: self.rng.get_seed(),
            word_pos: self.rng.get_word_pos().to_string(),
        }
    }

    /// Restores items (oldest first) and the sampling stream. More items than the capacity
    /// keep the newest.
    pub fn restore(&mut self, items: Vec<T>, rng: &ReplayRngState) -> Result<()> {
        let pos: u128 = match rng.word_pos.parse() {
            Ok(p) => p,
            Err(_) => bail!("replay rng word_pos {:?} is not a number", rng.word_pos),
        };
        let mut r = ChaCha8Rng::from_seed(rng.seed);
        r.set_word_pos(pos);
        self.rng = r;
        self.items.clear();
        let skip = items.len().saturating_sub(self.cfg.capacity);
        self.items.extend(items.into_iter().skip(skip));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(capacity: usize, ratio: f64) -> ReplayConfig {
        ReplayConfig { capacity, ratio }
    }

    #[test]
    fn fifo_eviction_and_draw_sizes() {
        let mut b = ReplayBuffer::new(cfg(5, 1.5), 7);
        assert!(b.draw(4).is_empty(), "nothing to replay yet");
        b.extend(0..3);
        assert_eq!(b.draw(4).len(), 3, "capped by what is held");
        b.extend(3..8);
        assert_eq!(b.items().copied().collect::<Vec<_>>(), vec![3, 4, 5, 6, 7]);
        let d = b.draw(2);
        assert_eq!(d.len(), 3);
        let mut u = d.clone();
        u.dedup();
        assert_eq!(u.len(), 3, "without replacement: {d:?}");
        assert!(d.iter().all(|x| (3..8).contains(x)));
    }

    #[test]
    fn off_when_capacity_or_ratio_is_zero() {
        for c in [cfg(0, 1.0), cfg(10, 0.0)] {
            let mut b = ReplayBuffer::new(c, 1);
            b.extend(0..4);
            assert!(b.is_empty() && b.draw(4).is_empty());
        }
        assert!(cfg(1, -1.0)
            .validate()
            .unwrap_err()
            .starts_with("replay.ratio"));
        assert!(cfg(1, f64::NAN).validate().is_err());
    }

    #[test]
    fn draws_are_uniform() {
        let mut b = ReplayBuffer::new(cfg(10, 0.2), 3);
        b.extend(0..10);
        let mut hits = [0usize; 10];
        for _ in 0..20_000 {
            for x in b.draw(10) {
                hits[x] += 1;
            }
        }
        // 40,000 draws over 10 items: 4,000 each, sd ≈ 60.
        for h in hits {
            assert!((3_700..4_300).contains(&h), "{hits:?}");
        }
    }

    #[test]
    fn restored_buffer_draws_exactly_like_the_original() {
        let mut a = ReplayBuffer::new(cfg(6, 1.0), 11);
        a.extend(0..9);
        let _ = a.draw(3);
        let items: Vec<i32> = a.items().copied().collect();
        let state = a.rng_state();
        let json = serde_json::to_string(&state).unwrap();
        let mut b = ReplayBuffer::new(cfg(6, 1.0), 999);
        b.restore(items, &serde_json::from_str(&json).unwrap())
            .unwrap();
        for _ in 0..50 {
            assert_eq!(a.draw(4), b.draw(4));
            a.extend([1, 2]);
            b.extend([1, 2]);
        }
        let bad = ReplayRngState {
            seed: [0; 32],
            word_pos: "x".into(),
        };
        assert!(b.restore(vec![], &bad).is_err());
    }
}
