//! The recursive (streaming) estimate of the link Ψ(t) = P(z = 1 | t), and its drift from a
//! logistic link. Plain math on (t, z): knows no model.
//!
//! State is O(bins): per bin the discounted mass, label sum and index sum, plus discounted
//! moments of t. Bins are equal-width over ±[`SPAN`] running standard deviations around the
//! running mean; when that frame moves too far from the current moments, every bin's mass is
//! moved (whole, at its mean index) into the new frame, so no mass is lost. After each update
//! a weighted pool-adjacent-violators fit on the bins' label means gives a monotone curve with
//! one knot per PAVA block at the block's mass-weighted mean index, interpolated linearly (so
//! it rises strictly between blocks; flat outside the outer knots), clipped to [eps, 1 − eps].

pub mod drift;
pub mod isotonic;

use anyhow::Result;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

pub use drift::{fit_logistic, sigmoid};
pub use isotonic::{block_knots, isotonic_fit, pava, Knots, PiecewiseLinear};

/// Half-width of the binned range, in running standard deviations.
pub const SPAN: f64 = 4.0;
/// Re-bin when the running std differs from the frame's by more than this factor.
const RESCALE_FACTOR: f64 = 1.5;
/// ... or the running mean moved by more than this many frame scales.
const RECENTER: f64 = 0.5;

/// `[link]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LinkConfig {
    /// Number of bins over the standardised index.
    pub bins: usize,
    /// Per-update forgetting factor in (0, 1]; 1 keeps everything.
    pub forgetting: f64,
    /// Values are clipped to [eps, 1 - eps].
    pub eps: f64,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            bins: 64,
            forgetting: 0.995,
            eps: 1e-3,
        }
    }
}

/// Distance of the learned link from the best-fitting logistic σ(a t + b).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Drift {
    /// max over non-empty bins of |Ψ̂ − σ(a t + b)|.
    pub sup: f64,
    /// sqrt of the mass-weighted mean of (Ψ̂ − σ(a t + b))² over bins.
    pub l2: f64,
    pub a: f64,
    pub b: f64,
}

/// The learned link on a grid, for `link.parquet` and dashboards.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LinkCurve {
    /// Index values (original, unstandardised units).
    pub t: Vec<f64>,
    /// Ψ̂(t).
    pub psi: Vec<f64>,
    /// dΨ̂/dt.
    pub dpsi: Vec<f64>,
    /// Discounted mass of observations in the bin around each point.
    pub mass: Vec<f64>,
    /// Best-fitting logistic σ(a t + b) at the same points.
    pub logistic: Vec<f64>,
}

/// Streaming monotone link estimate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RecursiveLink {
    pub cfg: LinkConfig,
    /// Discounted Σw, Σw t, Σw t² of all observations (running standardisation).
    #[serde(default)]
    mom: [f64; 3],
    /// Frame of the bins: centre and scale (bin k covers centre + scale·[−SPAN + kΔ, …)).
    #[serde(default)]
    center: f64,
    #[serde(default)]
    scale: f64,
    /// Per bin: discounted Σw, Σw z, Σw t.
    #[serde(default)]
    bin_w: Vec<f64>,
    #[serde(default)]
    bin_z: Vec<f64>,
    #[serde(default)]
    bin_t: Vec<f64>,
    /// The fitted monotone curve (one knot per PAVA block, at its mean index).
    #[serde(default)]
    fit: PiecewiseLinear,
    /// Number of updates folded in.
    #[serde(default)]
    updates: u64,
}

impl RecursiveLink {
    pub fn new(cfg: LinkConfig) -> Self {
        let bins = cfg.bins.max(2);
        Self {
            cfg,
            mom: [0.0; 3],
            center: 0.0,
            scale: 0.0,
            bin_w: vec![0.0; bins],
            bin_z: vec![0.0; bins],
            bin_t: vec![0.0; bins],
            fit: PiecewiseLinear::default(),
            updates: 0,
        }
    }

    fn nbins(&self) -> usize {
        self.bin_w.len()
    }

    fn bin_of(&self, t: f64) -> usize {
        let nb = self.nbins();
        let u = (t - self.center) / self.scale;
        let k = ((u + SPAN) / (2.0 * SPAN) * nb as f64).floor();
        if k.is_nan() {
            return nb / 2;
        }
        k.clamp(0.0, (nb - 1) as f64) as usize
    }

    fn running_mean_std(&self) -> (f64, f64) {
        let [w, s1, s2] = self.mom;
        if w <= 0.0 {
            return (0.0, 1.0);
        }
        let m = s1 / w;
        let v = (s2 / w - m * m).max(0.0);
        (m, v.sqrt())
    }

    /// Move every bin's mass (at its mean index) into the frame (center, scale).
    fn rebin(&mut self, center: f64, scale: f64) {
        let (ow, oz, ot) = (
            std::mem::take(&mut self.bin_w),
            std::mem::take(&mut self.bin_z),
            std::mem::take(&mut self.bin_t),
        );
        let nb = ow.len();
        self.center = center;
        self.scale = scale;
        self.bin_w = vec![0.0; nb];
        self.bin_z = vec![0.0; nb];
        self.bin_t = vec![0.0; nb];
        for k in 0..nb {
            if ow[k] > 0.0 {
                let j = self.bin_of(ot[k] / ow[k]);
                self.bin_w[j] += ow[k];
                self.bin_z[j] += oz[k];
                self.bin_t[j] += ot[k];
            }
        }
    }

    /// Fold a minibatch of detached (t, z, w) into the estimate. Non-finite t or w, and
    /// non-positive w, are ignored.
    pub fn update(&mut self, t: &[f64], z: &[f64], w: &[f64]) {
        let lam = self.cfg.forgetting.clamp(0.0, 1.0);
        let rows: Vec<(f64, f64, f64)> = t
            .iter()
            .zip(z)
            .zip(w)
            .map(|((t, z), w)| (*t, z.clamp(0.0, 1.0), *w))
            .filter(|(t, z, w)| t.is_finite() && z.is_finite() && w.is_finite() && *w > 0.0)
            .collect();
        if rows.is_empty() {
            return;
        }
        for m in self.mom.iter_mut() {
            *m *= lam;
        }
        for k in 0..self.nbins() {
            self.bin_w[k] *= lam;
            self.bin_z[k] *= lam;
            self.bin_t[k] *= lam;
        }
        for (t, _, w) in &rows {
            self.mom[0] += w;
            self.mom[1] += w * t;
            self.mom[2] += w * t * t;
        }
        let (m, sd) = self.running_mean_std();
        let sd = sd.max(1e-6);
        let needs_frame = self.scale <= 0.0
            || (sd / self.scale).ln().abs() > RESCALE_FACTOR.ln()
            || (m - self.center).abs() > RECENTER * self.scale;
        if needs_frame {
            self.rebin(m, sd);
        }
        for (t, z, w) in &rows {
            let k = self.bin_of(*t);
            self.bin_w[k] += w;
            self.bin_z[k] += w * z;
            self.bin_t[k] += w * t;
        }
        self.updates += 1;
        self.refit();
    }

    /// Weighted PAVA over the non-empty bins.
    fn refit(&mut self) {
        // Bins with negligible mass (relative) carry no information but could add noise.
        let total: f64 = self.bin_w.iter().sum();
        let floor = total * 1e-12;
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        let mut ws = Vec::new();
        for k in 0..self.nbins() {
            if self.bin_w[k] > floor && self.bin_w[k] > 0.0 {
                xs.push(self.bin_t[k] / self.bin_w[k]);
                ys.push(self.bin_z[k] / self.bin_w[k]);
                ws.push(self.bin_w[k]);
            }
        }
        let fitted = pava(&ys, &ws);
        // One knot per PAVA block, at the block's mass-weighted mean index: the interpolant
        // then rises strictly between blocks (a gradient everywhere inside the range) instead
        // of being flat across each block.
        self.fit = block_knots(&xs, &fitted, &ws, self.cfg.eps);
    }

    /// Whether any observation has been folded in.
    pub fn is_fitted(&self) -> bool {
        !self.fit.is_empty()
    }

    /// Number of updates folded in so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Ψ̂(t). Before any data: the logistic σ(t) (clipped).
    pub fn psi(&self, t: f64) -> f64 {
        let eps = self.cfg.eps;
        if self.fit.is_empty() {
            return sigmoid(t).clamp(eps, 1.0 - eps);
        }
        self.fit.eval(t).clamp(eps, 1.0 - eps)
    }

    /// dΨ̂/dt (slope of the linear piece; 0 outside the knots).
    pub fn dpsi(&self, t: f64) -> f64 {
        if self.fit.is_empty() {
            let s = sigmoid(t);
            return s * (1.0 - s);
        }
        self.fit.slope(t)
    }

    /// Ψ̂ applied to a tensor, differentiable in `t`.
    pub fn psi_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let eps = self.cfg.eps;
        if self.fit.is_empty() {
            return Ok(candle_nn::ops::sigmoid(t)?.clamp(eps, 1.0 - eps)?);
        }
        self.fit.apply_tensor(t)
    }

    /// The fitted knots (index, Ψ̂) in original units.
    pub fn knots(&self) -> &PiecewiseLinear {
        &self.fit
    }

    /// Non-empty bins as (mean index, label mean, mass).
    fn bins(&self) -> Vec<(f64, f64, f64)> {
        (0..self.nbins())
            .filter(|k| self.bin_w[*k] > 0.0)
            .map(|k| {
                (
                    self.bin_t[k] / self.bin_w[k],
                    self.bin_z[k] / self.bin_w[k],
                    self.bin_w[k],
                )
            })
            .collect()
    }

    /// Drift from the best-fitting logistic link (weighted ML over the bins).
    pub fn drift(&self) -> Drift {
        let b = self.bins();
        if b.is_empty() {
            return Drift {
                sup: 0.0,
                l2: 0.0,
                a: 1.0,
                b: 0.0,
            };
        }
        let t: Vec<f64> = b.iter().map(|x| x.0).collect();
        let zb: Vec<f64> = b.iter().map(|x| x.1).collect();
        let w: Vec<f64> = b.iter().map(|x| x.2).collect();
        let (a, bb) = fit_logistic(&t, &zb, &w);
        let (mut sup, mut s2, mut ws) = (0.0f64, 0.0, 0.0);
        for k in 0..t.len() {
            let d = (self.psi(t[k]) - sigmoid(a * t[k] + bb)).abs();
            sup = sup.max(d);
            s2 += w[k] * d * d;
            ws += w[k];
        }
        Drift {
            sup,
            l2: if ws > 0.0 { (s2 / ws).sqrt() } else { 0.0 },
            a,
            b: bb,
        }
    }

    /// The curve on its bin grid (one point per non-empty bin).
    pub fn curve(&self) -> LinkCurve {
        let b = self.bins();
        let d = self.drift();
        let t: Vec<f64> = b.iter().map(|x| x.0).collect();
        let psi: Vec<f64> = t.iter().map(|t| self.psi(*t)).collect();
        let n = t.len();
        let dpsi: Vec<f64> = (0..n)
            .map(|k| {
                if n < 2 {
                    0.0
                } else {
                    let (l, r) = (k.saturating_sub(1), (k + 1).min(n - 1));
                    (psi[r] - psi[l]) / (t[r] - t[l]).max(1e-12)
                }
            })
            .collect();
        LinkCurve {
            logistic: t.iter().map(|t| sigmoid(d.a * t + d.b)).collect(),
            mass: b.iter().map(|x| x.2).collect(),
            t,
            psi,
            dpsi,
        }
    }

    /// Effective (discounted) number of observations.
    pub fn mass(&self) -> f64 {
        self.bin_w.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn mixture(u: f64, s: f64, tau: f64) -> f64 {
        0.5 * sigmoid((u - s) / tau) + 0.5 * sigmoid((u + s) / tau)
    }

    /// Feed `n` events with t ~ N(0, 2²) in batches of 128 and labels from `link`.
    fn feed(link: &mut RecursiveLink, n: usize, seed: u64, f: &dyn Fn(f64) -> f64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let normal = rand_distr::Normal::new(0.0, 2.0).unwrap();
        let mut left = n;
        while left > 0 {
            let b = left.min(128);
            let t: Vec<f64> = (0..b).map(|_| rng.sample(normal)).collect();
            let z: Vec<f64> = t
                .iter()
                .map(|t| (rng.random::<f64>() < f(*t)) as u8 as f64)
                .collect();
            link.update(&t, &z, &vec![1.0; b]);
            left -= b;
        }
    }

    fn cfg() -> LinkConfig {
        LinkConfig {
            bins: 32,
            forgetting: 1.0,
            eps: 1e-3,
        }
    }

    fn sup_err(link: &RecursiveLink, f: &dyn Fn(f64) -> f64) -> f64 {
        (-30..=30)
            .map(|i| i as f64 * 0.1)
            .map(|t| (link.psi(t) - f(t)).abs())
            .fold(0.0, f64::max)
    }

    #[test]
    fn monotone_clipped_and_mass_is_kept() {
        let mut l = RecursiveLink::new(LinkConfig {
            bins: 16,
            forgetting: 1.0,
            eps: 0.01,
        });
        assert_eq!(l.mass(), 0.0);
        assert!((l.psi(0.0) - 0.5).abs() < 1e-12);
        feed(&mut l, 3000, 1, &|t| sigmoid(t));
        assert!((l.mass() - 3000.0).abs() < 1e-6, "{}", l.mass());
        let mut prev = 0.0;
        for i in -100..=100 {
            let p = l.psi(i as f64 * 0.1);
            assert!(p >= prev && (0.01..=0.99).contains(&p));
            prev = p;
        }
        // A change of scale re-bins without losing mass.
        let t: Vec<f64> = (0..500).map(|i| (i as f64 - 250.0) * 0.5).collect();
        let z: Vec<f64> = t.iter().map(|t| (*t > 0.0) as u8 as f64).collect();
        let w = vec![2.0; 500];
        let s_before = l.scale;
        l.update(&t, &z, &w);
        assert!(l.scale > s_before * 1.5);
        assert!((l.mass() - 4000.0).abs() < 1e-6, "{}", l.mass());
    }

    #[test]
    fn forgetting_discounts_mass() {
        let mut l = RecursiveLink::new(LinkConfig {
            bins: 8,
            forgetting: 0.5,
            eps: 1e-3,
        });
        l.update(&[0.0, 1.0], &[0.0, 1.0], &[1.0, 1.0]);
        l.update(&[0.5], &[1.0], &[1.0]);
        assert!((l.mass() - 2.0).abs() < 1e-12);
        // Ignores junk rows.
        l.update(&[f64::NAN, 1.0], &[1.0, 1.0], &[1.0, 0.0]);
        assert!((l.mass() - 2.0).abs() < 1e-12);
    }

    #[test]
    fn recovers_true_link_and_error_shrinks() {
        let f = |t: f64| mixture(t, 1.5, 0.25);
        let mut small = RecursiveLink::new(cfg());
        feed(&mut small, 1000, 7, &f);
        let mut big = RecursiveLink::new(cfg());
        feed(&mut big, 60_000, 7, &f);
        let (e_small, e_big) = (sup_err(&small, &f), sup_err(&big, &f));
        assert!(e_big < e_small, "{e_big} vs {e_small}");
        assert!(e_big < 0.2, "{e_big}");
        let mut lg = RecursiveLink::new(cfg());
        feed(&mut lg, 60_000, 8, &|t| sigmoid(t));
        assert!(sup_err(&lg, &|t| sigmoid(t)) < 0.08);
    }

    #[test]
    fn drift_separates_logistic_from_shifted_mixture() {
        let mut lg = RecursiveLink::new(cfg());
        feed(&mut lg, 60_000, 3, &|t| sigmoid(1.3 * t + 0.2));
        let d0 = lg.drift();
        let mut mx = RecursiveLink::new(cfg());
        feed(&mut mx, 60_000, 3, &|t| mixture(t, 1.5, 0.25));
        let d1 = mx.drift();
        assert!(
            (d0.a - 1.3).abs() < 0.15 && (d0.b - 0.2).abs() < 0.1,
            "{d0:?}"
        );
        assert!(d0.sup < 0.06 && d0.l2 < 0.02, "{d0:?}");
        assert!(
            d1.sup > 2.0 * d0.sup && d1.l2 > 3.0 * d0.l2,
            "{d0:?} {d1:?}"
        );
        assert!(d1.sup > 0.1, "{d1:?}");
        let c = mx.curve();
        assert_eq!(c.t.len(), c.psi.len());
        assert_eq!(c.t.len(), c.logistic.len());
        assert!(c.dpsi.iter().all(|d| *d >= 0.0));
        assert!((c.mass.iter().sum::<f64>() - mx.mass()).abs() < 1e-6);
    }

    #[test]
    fn state_round_trip_is_bit_identical() {
        let mut l = RecursiveLink::new(LinkConfig::default());
        feed(&mut l, 5000, 11, &|t| mixture(t, 0.75, 0.25));
        let js = serde_json::to_string(&l).unwrap();
        let back: RecursiveLink = serde_json::from_str(&js).unwrap();
        assert_eq!(back, l);
        assert_eq!(back.curve(), l.curve());
        for i in -50..50 {
            let t = i as f64 * 0.137;
            assert_eq!(back.psi(t).to_bits(), l.psi(t).to_bits());
        }
        // Continuing from the copy gives the same state as continuing the original.
        let (mut a, mut b) = (l.clone(), back);
        feed(&mut a, 500, 12, &|t| sigmoid(t));
        feed(&mut b, 500, 12, &|t| sigmoid(t));
        assert_eq!(a, b);
    }

    #[test]
    fn psi_tensor_matches_psi_and_has_gradient() {
        let mut l = RecursiveLink::new(cfg());
        feed(&mut l, 5000, 5, &|t| sigmoid(t));
        let v = candle_core::Var::new(&[-1.0f64, 0.3, 2.0][..], &candle_core::Device::Cpu).unwrap();
        let y = l.psi_tensor(v.as_tensor()).unwrap();
        let yv = y.to_vec1::<f64>().unwrap();
        for (i, t) in [-1.0, 0.3, 2.0].iter().enumerate() {
            assert!((yv[i] - l.psi(*t)).abs() < 1e-12);
        }
        let g = y.sum_all().unwrap().backward().unwrap();
        let gv = g.get(v.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        for (i, t) in [-1.0, 0.3, 2.0].iter().enumerate() {
            assert!((gv[i] - l.dpsi(*t)).abs() < 1e-12);
        }
    }
}
