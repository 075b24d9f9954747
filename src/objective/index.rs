//! The single index t = f'(π/π_ref)(y1) − f'(π/π_ref)(y0) for an f-divergence f (as in
//! f-DPO, Wang et al. 2023), computed from log-probs.
//!
//! With the log-ratio r = log π − log π_ref (so u = π/π_ref = e^r):
//!
//! | divergence      | f(u)                                   | f'(u)               | index from r         |
//! |-----------------|----------------------------------------|---------------------|----------------------|
//! | KL (default)    | u log u                                | log u + 1           | r1 − r0              |
//! | reverse KL      | −log u                                 | −1/u                | e^{−r0} − e^{−r1}    |
//! | Pearson χ²      | (u − 1)²                               | 2(u − 1)            | 2(e^{r1} − e^{r0})   |
//! | Jensen–Shannon  | u log u − (u+1) log((u+1)/2)           | log(2u/(1+u))       | softplus(−r0) − softplus(−r1) |
//! | α-divergence    | (u^{1−α} − (1−α)u − α)/(α(α−1))        | (1 − u^{−α})/α      | (e^{−α r0} − e^{−α r1})/α |
//!
//! Constants of f' cancel in the difference. Exponentials are taken of the log-ratio clamped to
//! ±[`MAX_EXP_ARG`] so that f32 never overflows; the JS form uses the stable softplus.

use anyhow::{ensure, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// Largest |argument| passed to `exp` in the index (e^60 ≈ 1.1e26 fits in f32).
pub const MAX_EXP_ARG: f64 = 60.0;

/// f-divergences supported for the index. Config form: `[objective.divergence]` with
/// `kind = "kl" | "reverse_kl" | "chi2" | "js" | "alpha"` (and `alpha = 0.5` for the last).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Default)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Divergence {
    /// KL(π‖π_ref): f'(u) = log u + 1, t = log-ratio difference.
    #[default]
    Kl,
    /// Reverse KL(π_ref‖π): f(u) = −log u, f'(u) = −1/u.
    ReverseKl,
    /// Pearson χ²: f(u) = (u − 1)², f'(u) = 2(u − 1).
    #[serde(alias = "pearson", alias = "chi_squared")]
    Chi2,
    /// Jensen–Shannon: f'(u) = log(2u/(1+u)).
    #[serde(alias = "jensen_shannon")]
    Js,
    /// α-divergence, α ∈ (0, 1): f'(u) = (1 − u^{−α})/α (→ KL as α → 0, reverse KL at α = 1).
    Alpha { alpha: f64 },
}

impl Divergence {
    /// Name for logs and metrics.
    pub fn name(&self) -> String {
        match self {
            Self::Kl => "kl".into(),
            Self::ReverseKl => "reverse_kl".into(),
            Self::Chi2 => "chi2".into(),
            Self::Js => "js".into(),
            Self::Alpha { alpha } => format!("alpha({alpha})"),
        }
    }

    /// Checks parameters (α must be in (0, 1]).
    pub fn validate(&self) -> Result<(), String> {
        if let Self::Alpha { alpha } = self {
            if !(*alpha > 0.0 && *alpha <= 1.0) {
                return Err(format!(
                    "objective.divergence.alpha: must be in (0, 1], got {alpha}"
                ));
            }
        }
        Ok(())
    }

    /// f'(e^r) up to an additive constant, as plain f64 (for tests and diagnostics).
    pub fn fprime_of_log_ratio(&self, r: f64) -> f64 {
        let e = |x: f64| x.clamp(-MAX_EXP_ARG, MAX_EXP_ARG).exp();
        match *self {
            Self::Kl => r,
            Self::ReverseKl => -e(-r),
            Self::Chi2 => 2.0 * e(r),
            Self::Js => -softplus_f64(-r),
            Self::Alpha { alpha } => -e(-alpha * r) / alpha,
        }
    }
}

fn softplus_f64(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

fn exp_clamped(x: &Tensor) -> Result<Tensor> {
    Ok(x.clamp(-MAX_EXP_ARG, MAX_EXP_ARG)?.exp()?)
}

/// f'(e^r) (constants dropped) applied to a tensor of log-ratios, differentiable.
fn fprime(div: Divergence, r: &Tensor) -> Result<Tensor> {
    Ok(match div {
        Divergence::Kl => r.clone(),
        Divergence::ReverseKl => exp_clamped(&r.neg()?)?.neg()?,
        Divergence::Chi2 => (exp_clamped(r)? * 2.0)?,
        Divergence::Js => super::softplus(&r.neg()?)?.neg()?,
        Divergence::Alpha { alpha } => (exp_clamped(&(r * -alpha)?)? * (-1.0 / alpha))?,
    })
}

/// Index from policy and reference log-probs of y1 and y0 (all `[n]`, same dtype).
pub fn index(
    div: Divergence,
    logp1: &Tensor,
    ref1: &Tensor,
    logp0: &Tensor,
    ref0: &Tensor,
) -> Result<Tensor> {
    if let Err(e) = div.validate() {
        anyhow::bail!(e);
    }
    ensure!(
        logp1.dims() == ref1.dims() && logp0.dims() == ref0.dims() && logp1.dims() == logp0.dims(),
        "index: log-prob tensors must share one shape (logp1 {:?}, ref1 {:?}, logp0 {:?}, ref0 {:?})",
        logp1.dims(),
        ref1.dims(),
        logp0.dims(),
        ref0.dims()
    );
    let r1 = (logp1 - ref1)?;
    let r0 = (logp0 - ref0)?;
    match div {
        // Exactly the log-ratio difference.
        Divergence::Kl => Ok((r1 - r0)?),
        d => Ok((fprime(d, &r1)? - fprime(d, &r0)?)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn all() -> Vec<Divergence> {
        vec![
            Divergence::Kl,
            Divergence::ReverseKl,
            Divergence::Chi2,
            Divergence::Js,
            Divergence::Alpha { alpha: 0.5 },
            Divergence::Alpha { alpha: 1.0 },
        ]
    }

    /// f'(u) from the textbook definitions, with their constants (which cancel in t).
    fn closed_form_fprime(div: Divergence, u: f64) -> f64 {
        match div {
            Divergence::Kl => u.ln() + 1.0,
            Divergence::ReverseKl => -1.0 / u,
            Divergence::Chi2 => 2.0 * (u - 1.0),
            Divergence::Js => (2.0 * u / (1.0 + u)).ln(),
            Divergence::Alpha { alpha } => (1.0 - u.powf(-alpha)) / alpha,
        }
    }

    /// f itself, to check f' against a finite difference of f.
    fn f(div: Divergence, u: f64) -> f64 {
        match div {
            Divergence::Kl => u * u.ln(),
            Divergence::ReverseKl => -u.ln(),
            Divergence::Chi2 => (u - 1.0).powi(2),
            Divergence::Js => u * u.ln() - (u + 1.0) * ((u + 1.0) / 2.0).ln(),
            Divergence::Alpha { alpha } => {
                (u.powf(1.0 - alpha) - (1.0 - alpha) * u - alpha) / (alpha * (alpha - 1.0))
            }
        }
    }

    fn t64(v: &[f64]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn closed_forms_and_f_derivative() {
        let lp1 = [-1.2, -0.3, -2.5, -0.9];
        let rf1 = [-1.0, -1.1, -2.0, -0.9];
        let lp0 = [-0.7, -2.0, -0.4, -3.0];
        let rf0 = [-1.5, -0.6, -0.4, -2.2];
        for d in all() {
            let t = index(d, &t64(&lp1), &t64(&rf1), &t64(&lp0), &t64(&rf0))
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for i in 0..4 {
                let u1 = (lp1[i] - rf1[i]).exp();
                let u0 = (lp0[i] - rf0[i]).exp();
                let want = closed_form_fprime(d, u1) - closed_form_fprime(d, u0);
                assert!((t[i] - want).abs() < 1e-12, "{d:?} {i}: {} vs {want}", t[i]);
                // f' agrees with a central difference of f (where f is not α=1 with the pole).
                if !matches!(d, Divergence::Alpha { alpha } if alpha == 1.0) {
                    let h = 1e-6;
                    let fd = (f(d, u1 + h) - f(d, u1 - h)) / (2.0 * h);
                    assert!(
                        (fd - closed_form_fprime(d, u1)).abs() < 1e-5,
                        "{d:?}: f' {fd} vs {}",
                        closed_form_fprime(d, u1)
                    );
                }
            }
        }
    }

    #[test]
    fn kl_is_exactly_the_log_ratio_difference() {
        let v = |x: &[f32]| Tensor::new(x, &Device::Cpu).unwrap();
        let (a, b, c, e) = (
            [-3.25f32, -0.5, -7.0],
            [-1.0f32, -2.75, -7.5],
            [-0.125f32, -9.0, -1.5],
            [-2.0f32, -0.25, -1.0],
        );
        let t = index(Divergence::Kl, &v(&a), &v(&b), &v(&c), &v(&e))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for i in 0..3 {
            assert_eq!(t[i], (a[i] - b[i]) - (c[i] - e[i]));
        }
        // α → 0 approaches KL.
        let d = Divergence::Alpha { alpha: 1e-6 };
        let t = index(
            d,
            &t64(&[-1.0]),
            &t64(&[-2.0]),
            &t64(&[-3.0]),
            &t64(&[-1.0]),
        )
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
        assert!((t[0] - 3.0).abs() < 1e-4, "{}", t[0]);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let dev = Device::Cpu;
        for d in all() {
            let p1 = Var::new(&[-1.3f64, -0.2, -4.0][..], &dev).unwrap();
            let p0 = Var::new(&[-0.8f64, -2.2, -1.0][..], &dev).unwrap();
            let r1 = t64(&[-1.0, -1.0, -2.0]);
            let r0 = t64(&[-1.1, -0.7, -1.5]);
            let t = index(d, p1.as_tensor(), &r1, p0.as_tensor(), &r0).unwrap();
            let g = t.sum_all().unwrap().backward().unwrap();
            let g1 = g.get(p1.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
            let g0 = g.get(p0.as_tensor()).unwrap().to_vec1::<f64>().unwrap();
            let val = |a: &[f64], b: &[f64]| {
                index(d, &t64(a), &r1, &t64(b), &r0)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let a = p1.as_tensor().to_vec1::<f64>().unwrap();
            let b = p0.as_tensor().to_vec1::<f64>().unwrap();
            let h = 1e-6;
            for i in 0..3 {
                let (mut ap, mut am) = (a.clone(), a.clone());
                ap[i] += h;
                am[i] -= h;
                let fd = (val(&ap, &b) - val(&am, &b)) / (2.0 * h);
                assert!(
                    (fd - g1[i]).abs() < 1e-5 * (1.0 + fd.abs()),
                    "{d:?} d/dlogp1"
                );
                let (mut bp, mut bm) = (b.clone(), b.clone());
                bp[i] += h;
                bm[i] -= h;
                let fd = (val(&a, &bp) - val(&a, &bm)) / (2.0 * h);
                assert!(
                    (fd - g0[i]).abs() < 1e-5 * (1.0 + fd.abs()),
                    "{d:?} d/dlogp0"
                );
            }
        }
    }

    #[test]
    fn stable_for_extreme_log_ratios_in_f32() {
        let v = |x: f32| Tensor::new(&[x], &Device::Cpu).unwrap();
        for d in all() {
            let t = index(d, &v(-500.0), &v(-1.0), &v(-1.0), &v(-500.0))
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(t[0].is_finite(), "{d:?}: {}", t[0]);
        }
    }

    #[test]
    fn serde_forms() {
        #[derive(Deserialize)]
        struct W {
            divergence: Divergence,
        }
        let w: W = toml::from_str("[divergence]\nkind = \"kl\"\n").unwrap();
        assert_eq!(w.divergence, Divergence::Kl);
        assert_eq!(Divergence::default(), Divergence::Kl);
        let w: W = toml::from_str("[divergence]\nkind = \"alpha\"\nalpha = 0.3\n").unwrap();
        assert_eq!(w.divergence, Divergence::Alpha { alpha: 0.3 });
        let w: W = toml::from_str("[divergence]\nkind = \"js\"\n").unwrap();
        assert_eq!(w.divergence, Divergence::Js);
        assert!(toml::from_str::<W>("[divergence]\nkind = \"hellinger\"\n").is_err());
        assert!(Divergence::Alpha { alpha: 1.5 }.validate().is_err());
    }
}
