//! Best-fitting logistic σ(a t + b), a > 0, by weighted maximum likelihood on binned label
//! means, and the distance of a link estimate from it.

/// σ(x), stable for large |x|.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// Weighted ML fit of σ(a t + b) to label means `zbar` at points `t` with weights `w`
/// (a binomial likelihood), with a > 0. Newton's method with step halving on standardised t.
/// Returns (a, b) in the original units of t. With no usable data returns (1, 0).
pub fn fit_logistic(t: &[f64], zbar: &[f64], w: &[f64]) -> (f64, f64) {
    let wsum: f64 = w.iter().filter(|x| **x > 0.0).sum();
    if wsum <= 0.0 || t.is_empty() {
        return (1.0, 0.0);
    }
    let c = t.iter().zip(w).map(|(t, w)| t * w.max(0.0)).sum::<f64>() / wsum;
    let var = t
        .iter()
        .zip(w)
        .map(|(t, w)| w.max(0.0) * (t - c).powi(2))
        .sum::<f64>()
        / wsum;
    let h = var.sqrt().max(1e-9);
    let u: Vec<f64> = t.iter().map(|t| (t - c) / h).collect();
    // Normalised weights keep the Hessian well scaled.
    let wn: Vec<f64> = w.iter().map(|w| w.max(0.0) / wsum).collect();
    let nll = |a: f64, b: f64| -> f64 {
        let mut s = 0.0;
        for k in 0..u.len() {
            if wn[k] == 0.0 {
                continue;
            }
            let eta = a * u[k] + b;
            // −[z log σ(η) + (1 − z) log σ(−η)] = softplus(η) − z η
            let sp = eta.max(0.0) + (-eta.abs()).exp().ln_1p();
            s += wn[k] * (sp - zbar[k] * eta);
        }
        s
    };
    const A_MAX: f64 = 200.0;
    let (mut a, mut b) = (1.0, 0.0);
    let mut f = nll(a, b);
    for _ in 0..100 {
        let (mut g0, mut g1, mut h00, mut h01, mut h11) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for k in 0..u.len() {
            if wn[k] == 0.0 {
                continue;
            }
            let p = sigmoid(a * u[k] + b);
            let r = p - zbar[k];
            g0 += wn[k] * r * u[k];
            g1 += wn[k] * r;
            let q = wn[k] * p * (1.0 - p);
            h00 += q * u[k] * u[k];
            h01 += q * u[k];
            h11 += q;
        }
        // Levenberg damping keeps the step finite on (nearly) separable data.
        let lam = 1e-9 + 1e-6 * (h00 + h11);
        let (h00, h11) = (h00 + lam, h11 + lam);
        let det = h00 * h11 - h01 * h01;
        if det.is_nan() || det <= 0.0 {
            break;
        }
        let da = (h11 * g0 - h01 * g1) / det;
        let db = (h00 * g1 - h01 * g0) / det;
        let mut step = 1.0;
        let mut improved = false;
        for _ in 0..40 {
            let na = (a - step * da).clamp(1e-9, A_MAX);
            let nb = b - step * db;
            let nf = nll(na, nb);
            if nf <= f {
                improved = (f - nf) > 1e-15;
                a = na;
                b = nb;
                f = nf;
                break;
            }
            step *= 0.5;
        }
        if !improved || (da.abs() + db.abs()) < 1e-12 {
            break;
        }
    }
    // σ(a (t − c)/h + b) = σ((a/h) t + (b − a c/h)).
    (a / h, b - a * c / h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_exact_logistic_means() {
        let t: Vec<f64> = (-20..=20).map(|i| i as f64 * 0.2).collect();
        let z: Vec<f64> = t.iter().map(|t| sigmoid(1.7 * t - 0.4)).collect();
        let w: Vec<f64> = t.iter().map(|t| (-t * t / 4.0).exp()).collect();
        let (a, b) = fit_logistic(&t, &z, &w);
        assert!((a - 1.7).abs() < 1e-6 && (b + 0.4).abs() < 1e-6, "{a} {b}");
    }

    #[test]
    fn slope_is_positive_even_for_decreasing_data() {
        let t: Vec<f64> = (-10..=10).map(|i| i as f64).collect();
        let z: Vec<f64> = t.iter().map(|t| sigmoid(-t)).collect();
        let (a, _) = fit_logistic(&t, &z, &vec![1.0; t.len()]);
        assert!(a > 0.0 && a < 1e-6, "{a}");
        assert_eq!(fit_logistic(&[], &[], &[]), (1.0, 0.0));
    }
}
