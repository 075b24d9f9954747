//! Weighted pool-adjacent-violators (isotonic regression) and a piecewise-linear curve that
//! can be applied to a tensor with a gradient.

use anyhow::Result;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// Weighted isotonic (non-decreasing) regression of `y` with weights `w`, in the given order.
/// Returns the fitted value of every input point. O(len). Points with zero weight take the
/// value of the block they fall into.
pub fn pava(y: &[f64], w: &[f64]) -> Vec<f64> {
    assert_eq!(y.len(), w.len(), "pava: y and w lengths differ");
    // Blocks: (weighted mean, weight, number of points).
    let mut mean: Vec<f64> = Vec::with_capacity(y.len());
    let mut wt: Vec<f64> = Vec::with_capacity(y.len());
    let mut cnt: Vec<usize> = Vec::with_capacity(y.len());
    for (&yi, &wi) in y.iter().zip(w) {
        mean.push(yi);
        wt.push(wi.max(0.0));
        cnt.push(1);
        while mean.len() >= 2 {
            let k = mean.len();
            if mean[k - 2] <= mean[k - 1] {
                break;
            }
            let (m2, w2, c2) = (mean.pop().unwrap(), wt.pop().unwrap(), cnt.pop().unwrap());
            let (m1, w1) = (mean[k - 2], wt[k - 2]);
            let ws = w1 + w2;
            mean[k - 2] = if ws > 0.0 {
                (w1 * m1 + w2 * m2) / ws
            } else {
                0.5 * (m1 + m2)
            };
            wt[k - 2] = ws;
            cnt[k - 2] += c2;
        }
    }
    let mut out = Vec::with_capacity(y.len());
    for (m, c) in mean.iter().zip(&cnt) {
        out.extend(std::iter::repeat_n(*m, *c));
    }
    out
}

/// Smallest knot gap used for a slope.
pub const MIN_GAP: f64 = 1e-6;

/// A piecewise-linear function through knots (x strictly increasing), constant outside.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PiecewiseLinear {
    pub x: Vec<f64>,
    pub y: Vec<f64>,
}

impl PiecewiseLinear {
    /// Knots must be strictly increasing in x; equal x are merged (mean of y).
    pub fn new(x: Vec<f64>, y: Vec<f64>) -> Self {
        assert_eq!(x.len(), y.len());
        let mut xs: Vec<f64> = Vec::with_capacity(x.len());
        let mut ys: Vec<f64> = Vec::with_capacity(x.len());
        let mut cs: Vec<f64> = Vec::with_capacity(x.len());
        for (a, b) in x.into_iter().zip(y) {
            if let Some(last) = xs.last() {
                if a <= *last {
                    let k = ys.len() - 1;
                    ys[k] = (ys[k] * cs[k] + b) / (cs[k] + 1.0);
                    cs[k] += 1.0;
                    continue;
                }
            }
            xs.push(a);
            ys.push(b);
            cs.push(1.0);
        }
        Self { x: xs, y: ys }
    }

    pub fn is_empty(&self) -> bool {
        self.x.is_empty()
    }

    /// The affine piece at `t` as (x0, y0, b): value = y0 + b·(t − x0), b = 0 outside the
    /// knots. Segment search as `bucketize` (right = false): the segment is (x[i−1], x[i]]
    /// with x[i−1] < t ≤ x[i].
    pub fn piece(&self, t: f64) -> (f64, f64, f64) {
        let n = self.x.len();
        if n == 0 {
            return (0.0, 0.5, 0.0);
        }
        if n == 1 || t <= self.x[0] {
            return (self.x[0], self.y[0], 0.0);
        }
        if t > self.x[n - 1] {
            return (self.x[n - 1], self.y[n - 1], 0.0);
        }
        let i = self.x.partition_point(|k| *k < t).clamp(1, n - 1);
        let (x0, x1, y0, y1) = (self.x[i - 1], self.x[i], self.y[i - 1], self.y[i]);
        // Gaps under 1e-6 are widened to 1e-6 (as the paper's code clamps them), which bounds
        // the slope between two almost equal knots.
        (x0, y0, (y1 - y0) / (x1 - x0).max(MIN_GAP))
    }

    pub fn eval(&self, t: f64) -> f64 {
        let (x0, y0, b) = self.piece(t);
        y0 + b * (t - x0)
    }

    /// Derivative (right-continuous slope of the piece containing t).
    pub fn slope(&self, t: f64) -> f64 {
        self.piece(t).2
    }

    /// Apply to a tensor, differentiable in `t` (gradient = slope of the piece). Computed as
    /// y0 + b·(t − x0), not a + b·t: on a steep piece (b up to 1e6) the latter cancels
    /// catastrophically in f32.
    pub fn apply_tensor(&self, t: &Tensor) -> Result<Tensor> {
        let tv: Vec<f64> = t
            .detach()
            .to_dtype(candle_core::DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let n = tv.len();
        let (mut x0, mut y0, mut b) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for v in &tv {
            let (px, py, pb) = self.piece(*v);
            x0.push(px);
            y0.push(py);
            b.push(pb);
        }
        let col = |v: Vec<f64>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, t.shape(), t.device())?.to_dtype(t.dtype())?)
        };
        Ok(((t - col(x0)?)? * col(b)?)?.add(&col(y0)?)?)
    }
}

/// Where an isotonic fit puts the knots of its interpolant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Knots {
    /// One knot per distinct input point (the paper's PSPO): the curve is flat across each
    /// PAVA block and steep between blocks, so most points get no gradient.
    Points,
    /// One knot per PAVA block, at the block's weight-weighted mean input: the curve rises
    /// between block centres, so every point inside the range gets a gradient.
    Blocks,
}

/// Isotonic fit of labels on raw (unbinned) index values: PAVA on the distinct sorted t,
/// weighted by their counts, values clipped to [eps, 1 − eps], knots placed as `knots` says.
pub fn isotonic_fit(t: &[f64], z: &[f64], eps: f64, knots: Knots) -> PiecewiseLinear {
    let mut idx: Vec<usize> = (0..t.len()).collect();
    idx.sort_by(|a, b| t[*a].total_cmp(&t[*b]));
    let mut xs: Vec<f64> = Vec::new();
    let mut sums: Vec<f64> = Vec::new();
    let mut counts: Vec<f64> = Vec::new();
    for &i in &idx {
        if xs.last() == Some(&t[i]) {
            *sums.last_mut().unwrap() += z[i];
            *counts.last_mut().unwrap() += 1.0;
        } else {
            xs.push(t[i]);
            sums.push(z[i]);
            counts.push(1.0);
        }
    }
    let means: Vec<f64> = sums.iter().zip(&counts).map(|(s, c)| s / c).collect();
    let fit = pava(&means, &counts);
    match knots {
        Knots::Points => {
            let y = fit.into_iter().map(|v| v.clamp(eps, 1.0 - eps)).collect();
            PiecewiseLinear { x: xs, y }
        }
        Knots::Blocks => block_knots(&xs, &fit, &counts, eps),
    }
}

/// One knot per run of equal fitted values (a PAVA block), at the block's weighted mean x.
pub fn block_knots(xs: &[f64], fitted: &[f64], ws: &[f64], eps: f64) -> PiecewiseLinear {
    let (mut kx, mut ky) = (Vec::new(), Vec::new());
    let mut i = 0;
    while i < xs.len() {
        let (mut sw, mut st) = (0.0, 0.0);
        let mut j = i;
        while j < xs.len() && fitted[j] == fitted[i] {
            sw += ws[j];
            st += ws[j] * xs[j];
            j += 1;
        }
        kx.push(if sw > 0.0 { st / sw } else { xs[i] });
        ky.push(fitted[i].clamp(eps, 1.0 - eps));
        i = j;
    }
    PiecewiseLinear::new(kx, ky)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn pava_hand_computed() {
        // [1, 3, 2, 4] with unit weights -> [1, 2.5, 2.5, 4]
        assert_eq!(
            pava(&[1.0, 3.0, 2.0, 4.0], &[1.0; 4]),
            vec![1.0, 2.5, 2.5, 4.0]
        );
        // weights: (3·3 + 1·1)/4 = 2.5 then merges with 2 → (10 + 2)/5 = 2.4
        let f = pava(&[3.0, 1.0, 2.0], &[3.0, 1.0, 1.0]);
        for v in &f {
            assert!((v - 2.4).abs() < 1e-12);
        }
        let f = pava(&[0.0, 1.0, 0.0, 1.0, 0.0], &[1.0; 5]);
        assert_eq!(f, vec![0.0, 0.5, 0.5, 0.5, 0.5]);
        assert!(pava(&[], &[]).is_empty());
    }

    #[test]
    fn pava_is_monotone_and_preserves_weighted_mean() {
        let y: Vec<f64> = (0..50).map(|i| ((i * 37) % 11) as f64 / 10.0).collect();
        let w: Vec<f64> = (0..50).map(|i| 1.0 + (i % 3) as f64).collect();
        let f = pava(&y, &w);
        for k in 1..f.len() {
            assert!(f[k] >= f[k - 1]);
        }
        let m0: f64 = y.iter().zip(&w).map(|(a, b)| a * b).sum();
        let m1: f64 = f.iter().zip(&w).map(|(a, b)| a * b).sum();
        assert!((m0 - m1).abs() < 1e-9);
    }

    #[test]
    fn piecewise_linear_eval_and_gradient() {
        let p = PiecewiseLinear::new(vec![0.0, 1.0, 3.0], vec![0.2, 0.4, 0.8]);
        assert_eq!(p.eval(-5.0), 0.2);
        assert!((p.eval(0.5) - 0.3).abs() < 1e-12);
        assert!((p.eval(2.0) - 0.6).abs() < 1e-12);
        assert_eq!(p.eval(9.0), 0.8);
        assert!((p.slope(2.0) - 0.2).abs() < 1e-12);
        assert_eq!(p.slope(9.0), 0.0);
        let v = Var::new(&[0.5f64, 2.0, 4.0][..], &Device::Cpu).unwrap();
        let y = p.apply_tensor(v.as_tensor()).unwrap();
        let yv = y.to_vec1::<f64>().unwrap();
        assert!((yv[0] - 0.3).abs() < 1e-12 && (yv[1] - 0.6).abs() < 1e-12 && yv[2] == 0.8);
        let g = y.sum_all().unwrap().backward().unwrap();
        let gv = g.get(v.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
        assert!((gv[0] - 0.2).abs() < 1e-12 && (gv[1] - 0.2).abs() < 1e-12 && gv[2] == 0.0);
    }

    #[test]
    fn isotonic_fit_on_raw_points() {
        let p = isotonic_fit(
            &[2.0, 0.0, 1.0, 1.0, 3.0],
            &[0.0, 0.0, 1.0, 0.0, 1.0],
            1e-4,
            Knots::Points,
        );
        assert_eq!(p.x, vec![0.0, 1.0, 2.0, 3.0]);
        // means [0, 0.5, 0, 1] weights [1, 2, 1, 1] -> [0, 1/3, 1/3, 1] clipped
        assert!((p.y[0] - 1e-4).abs() < 1e-15);
        assert!((p.y[1] - 1.0 / 3.0).abs() < 1e-12 && (p.y[2] - 1.0 / 3.0).abs() < 1e-12);
        assert!((p.y[3] - (1.0 - 1e-4)).abs() < 1e-12);
    }

    #[test]
    fn isotonic_fit_block_knots() {
        // z over sorted t = 0..6: [0, 1, 0, 0, 1, 1] → PAVA blocks {0}, {1,2,3} = 1/3, {4,5} = 1.
        let t = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        let z = [0.0, 1.0, 0.0, 0.0, 1.0, 1.0];
        let p = isotonic_fit(&t, &z, 1e-4, Knots::Blocks);
        assert_eq!(p.x, vec![0.0, 2.0, 4.5]);
        assert!((p.y[1] - 1.0 / 3.0).abs() < 1e-12 && p.y[0] == 1e-4 && p.y[2] == 1.0 - 1e-4);
        // Inside a block the curve still rises (gradient), unlike the knots-at-points fit.
        assert!(p.slope(1.5) > 0.0 && p.slope(3.0) > 0.0);
        let q = isotonic_fit(&t, &z, 1e-4, Knots::Points);
        assert_eq!(q.slope(1.5), 0.0);
        // Both are monotone and agree with PAVA at the block centres.
        assert!((q.eval(2.0) - p.eval(2.0)).abs() < 1e-12);
    }

    #[test]
    fn slope_between_nearly_equal_knots_is_bounded() {
        let p = PiecewiseLinear::new(vec![0.0, 1e-9], vec![0.1, 0.9]);
        assert!((p.slope(5e-10) - 0.8 / MIN_GAP).abs() < 1e-3);
    }
}
