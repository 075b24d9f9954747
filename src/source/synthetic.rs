//! The built-in synthetic feedback stream: seeded, deterministic, no network.
//!
//! Each event has a prompt and two responses made of words; a *known* true reward counts
//! helpful words minus harmful ones, and the label is drawn through the SPO paper's
//! non-logistic link Ψ(u) = ½σ((u−s)/τ) + ½σ((u+s)/τ) of the reward difference u. Event `i`
//! depends only on (seed, i), so a stream resumes at any offset.

use super::{Offsets, Position, PreferenceEvent, Source, SourceItem, SourceRecord};
use anyhow::Result;
use async_trait::async_trait;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// `[source.synthetic]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticConfig {
    /// Seed of the stream (events depend only on the seed and their index).
    pub seed: u64,
    /// Shift s of the true link Ψ(u) = ½σ((u−s)/τ) + ½σ((u+s)/τ). 0 gives a logistic link.
    pub shift: f64,
    /// Temperature τ of the true link.
    pub tau: f64,
    /// Reward per helpful word (minus per harmful word).
    pub reward_scale: f64,
    /// Shortest response, in words.
    pub min_words: usize,
    /// Longest response, in words.
    pub max_words: usize,
    /// Share of deliberately malformed events (for testing dead-lettering).
    pub malformed_share: f64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            shift: 1.5,
            tau: 0.25,
            reward_scale: 0.5,
            min_words: 4,
            max_words: 10,
            malformed_share: 0.0,
        }
    }
}

impl SyntheticConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.tau > 0.0 && self.tau.is_finite()) {
            return Err(format!(
                "source.synthetic.tau: must be > 0, got {}",
                self.tau
            ));
        }
        if !self.shift.is_finite() || self.shift < 0.0 {
            return Err(format!(
                "source.synthetic.shift: must be >= 0, got {}",
                self.shift
            ));
        }
        if self.min_words == 0 || self.min_words > self.max_words {
            return Err(format!(
                "source.synthetic.min_words/max_words: need 1 <= min_words <= max_words, got {} and {}",
                self.min_words, self.max_words
            ));
        }
        if !(0.0..=1.0).contains(&self.malformed_share) {
            return Err(format!(
                "source.synthetic.malformed_share: must be in [0, 1], got {}",
                self.malformed_share
            ));
        }
        Ok(())
    }
}

const GOOD: &[&str] = &[
    "helpful", "clear", "correct", "kind", "precise", "useful", "thorough", "honest", "safe",
    "concise",
];
const BAD: &[&str] = &[
    "rude",
    "wrong",
    "vague",
    "harmful",
    "useless",
    "lazy",
    "spam",
    "confusing",
    "sloppy",
    "evasive",
];
const NEUTRAL: &[&str] = &[
    "the", "answer", "is", "about", "this", "and", "it", "we", "can", "see", "then", "a", "of",
    "to", "so", "here", "that", "with", "for", "on",
];
const TOPICS: &[&str] = &[
    "rust",
    "kafka",
    "gardening",
    "tea",
    "chess",
    "rivers",
    "music",
    "bread",
    "stars",
    "maps",
    "bikes",
    "tides",
];

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// The true link of the synthetic stream: the SPO paper's shifted logistic mixture.
pub fn true_link(u: f64, shift: f64, tau: f64) -> f64 {
    0.5 * sigmoid((u - shift) / tau) + 0.5 * sigmoid((u + shift) / tau)
}

fn rng_for(seed: u64, index: u64, stream: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed ^ 0x5350_4f4b_455f_5359);
    r.set_stream(stream);
    r.set_word_pos((index as u128) * 64);
    r
}

fn response(rng: &mut ChaCha8Rng, cfg: &SyntheticConfig) -> (String, f64) {
    let n = rng.random_range(cfg.min_words..=cfg.max_words);
    let quality: f64 = rng.random_range(-2.0..2.0);
    let p_good = sigmoid(2.0 * quality);
    let mut words = Vec::with_capacity(n);
    let mut score = 0.0;
    for _ in 0..n {
        if rng.random_bool(0.4) {
            if rng.random_bool(p_good) {
                words.push(GOOD[rng.random_range(0..GOOD.len())]);
                score += 1.0;
            } else {
                words.push(BAD[rng.random_range(0..BAD.len())]);
                score -= 1.0;
            }
        } else {
            words.push(NEUTRAL[rng.random_range(0..NEUTRAL.len())]);
        }
    }
    (words.join(" "), score * cfg.reward_scale)
}

/// A generated event with its true rewards (the learner never sees them).
#[derive(Debug, Clone)]
pub struct SyntheticEvent {
    pub event: PreferenceEvent,
    pub reward_0: f64,
    pub reward_1: f64,
}

/// Event `index` of the stream with this config.
pub fn synthetic_event(cfg: &SyntheticConfig, index: u64) -> SyntheticEvent {
    let mut rng = rng_for(cfg.seed, index, 1);
    let topic = TOPICS[rng.random_range(0..TOPICS.len())];
    let prompt = format!("tell me about {topic}");
    let (r0, u0) = response(&mut rng, cfg);
    let (r1, u1) = response(&mut rng, cfg);
    let p = true_link(u1 - u0, cfg.shift, cfg.tau);
    let label = u8::from(rng.random_bool(p.clamp(0.0, 1.0)));
    SyntheticEvent {
        event: PreferenceEvent {
            event_id: format!("syn-{}-{index}", cfg.seed),
            ts: None,
            prompt,
            response_0: r0,
            response_1: r1,
            label,
            weight: None,
            annotator: None,
            policy_version: None,
            ref_logp_0: None,
            ref_logp_1: None,
        },
        reward_0: u0,
        reward_1: u1,
    }
}

/// The kinds of malformed payload the stream can emit, each a different validation failure.
pub const MALFORMED_KINDS: usize = 8;

/// A deliberately malformed payload of kind `kind % MALFORMED_KINDS`, built around event `e`.
pub fn malformed_payload(e: &PreferenceEvent, kind: usize) -> Vec<u8> {
    let mut v = serde_json::to_value(e).expect("event serialises");
    let o = v.as_object_mut().expect("object");
    match kind % MALFORMED_KINDS {
        0 => {
            o.remove("response_0");
        }
        1 => {
            o.insert("prompt".into(), serde_json::json!(42));
        }
        2 => {
            o.insert("label".into(), serde_json::json!(2));
        }
        3 => {
            o.insert("weight".into(), serde_json::json!("NaN"));
        }
        4 => {
            o.insert("response_1".into(), serde_json::json!(""));
        }
        5 => {
            let mut b = serde_json::to_vec(&v).expect("json");
            // Corrupt one byte of the prompt into invalid UTF-8.
            if let Some(pos) = b.windows(6).position(|w| w == b"prompt") {
                b[pos + 9] = 0xff;
            }
            return b;
        }
        6 => {
            let b = serde_json::to_vec(&v).expect("json");
            return b[..b.len() / 2].to_vec();
        }
        _ => {
            o.insert("weight".into(), serde_json::json!(-1.0));
        }
    }
    serde_json::to_vec(&v).expect("json")
}

/// Payload of record `index`: a valid event, or (with probability `malformed_share`) a
/// malformed one. Deterministic in (seed, index).
pub fn synthetic_payload(cfg: &SyntheticConfig, index: u64) -> (Vec<u8>, bool) {
    let e = synthetic_event(cfg, index);
    if cfg.malformed_share > 0.0 {
        let mut rng = rng_for(cfg.seed, index, 2);
        if rng.random_bool(cfg.malformed_share) {
            let kind = rng.random_range(0..MALFORMED_KINDS);
            return (malformed_payload(&e.event, kind), true);
        }
    }
    (e.event.to_json().into_bytes(), false)
}

/// The synthetic stream as a [`Source`]. Unbounded unless `count` is set; the pipeline's
/// `max_events` usually bounds it.
pub struct SyntheticSource {
    cfg: SyntheticConfig,
    next: u64,
    count: Option<u64>,
}

impl SyntheticSource {
    pub fn new(cfg: SyntheticConfig, count: Option<u64>) -> Self {
        Self {
            cfg,
            next: 0,
            count,
        }
    }
    /// Name of the stream in positions and offsets.
    pub const STREAM: &'static str = "synthetic";
}

#[async_trait]
impl Source for SyntheticSource {
    fn kind(&self) -> &'static str {
        "synthetic"
    }
    async fn start(&mut self, resume: &Offsets) -> Result<()> {
        self.next = resume.get(Self::STREAM, 0).unwrap_or(0).max(0) as u64;
        Ok(())
    }
    async fn next(&mut self) -> Result<Option<SourceItem>> {
        if let Some(c) = self.count {
            if self.next >= c {
                return Ok(None);
            }
        }
        let i = self.next;
        self.next += 1;
        let (payload, _) = synthetic_payload(&self.cfg, i);
        Ok(Some(SourceItem::Record(SourceRecord {
            payload,
            key: None,
            headers: vec![],
            position: Position {
                stream: Self::STREAM.into(),
                partition: 0,
                offset: i as i64,
            },
        })))
    }
    async fn commit(&mut self, _offsets: &Offsets) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::decode_event;

    #[test]
    fn deterministic_and_position_addressable() {
        let cfg = SyntheticConfig::default();
        let a = synthetic_event(&cfg, 17).event;
        let b = synthetic_event(&cfg, 17).event;
        assert_eq!(a, b);
        assert_ne!(a, synthetic_event(&cfg, 18).event);
    }

    #[test]
    fn labels_follow_the_reward() {
        let cfg = SyntheticConfig::default();
        let (mut agree, mut n) = (0, 0);
        for i in 0..4000 {
            let e = synthetic_event(&cfg, i);
            let d = e.reward_1 - e.reward_0;
            if d.abs() > 2.0 {
                n += 1;
                agree += usize::from((d > 0.0) == (e.event.label == 1));
            }
        }
        assert!(n > 200, "too few informative pairs: {n}");
        assert!(agree as f64 / n as f64 > 0.85, "{agree}/{n}");
    }

    #[test]
    fn malformed_payloads_are_rejected() {
        let cfg = SyntheticConfig::default();
        let e = synthetic_event(&cfg, 3).event;
        for k in 0..MALFORMED_KINDS {
            let p = malformed_payload(&e, k);
            assert!(decode_event(&p, "x").is_err(), "kind {k} decoded");
        }
        assert!(decode_event(e.to_json().as_bytes(), "x").is_ok());
    }

    #[test]
    fn true_link_is_logistic_at_zero_shift() {
        for u in [-2.0, -0.3, 0.0, 0.7, 3.0] {
            assert!((true_link(u, 0.0, 1.0) - sigmoid(u)).abs() < 1e-12);
        }
    }
}
