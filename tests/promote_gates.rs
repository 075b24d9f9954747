//! Promotion: the gates on known metrics, the periodic promoter over written snapshots, and
//! an end-to-end check on the synthetic stream where the answer is known (a policy trained
//! on the true labels beats the promoted one; one trained on flipped labels is worse and is
//! rejected).

mod snapshot_support;
use snapshot_support::*;
use spoke::promote::{current, gate, promoted_names, promotions_path, PromoteConfig, Promoter};
use spoke::snapshot::parquet_io::read_promotions;
use spoke::snapshot::{write_snapshot, Evaluation};

fn ev(auc: f64, kl: f64) -> Evaluation {
    Evaluation {
        n: 200,
        accuracy: auc - 0.05,
        auc,
        dpo_loss: 0.6,
        spo_nll: 0.6,
        kl,
    }
}

#[test]
fn gates_on_known_metrics() {
    let cfg = PromoteConfig {
        auc_tolerance: 0.01,
        min_auc: 0.55,
        ..PromoteConfig::default()
    };
    let cur = ev(0.70, f64::NAN);
    // Better, slightly worse within tolerance: accepted; worse beyond tolerance: rejected.
    assert!(gate(&cfg, Some(&ev(0.75, f64::NAN)), Some(&cur)).is_ok());
    assert!(gate(&cfg, Some(&ev(0.695, f64::NAN)), Some(&cur)).is_ok());
    let why = gate(&cfg, Some(&ev(0.65, f64::NAN)), Some(&cur)).unwrap_err();
    assert!(why.contains("below the promoted one's 0.7000"), "{why}");
    // First promotion: only the absolute floor applies.
    assert!(gate(&cfg, Some(&ev(0.56, f64::NAN)), None).is_ok());
    assert!(gate(&cfg, Some(&ev(0.54, f64::NAN)), None)
        .unwrap_err()
        .contains("min_auc"));
    // NaN anywhere, too few held-out pairs, no evaluation: rejected.
    let mut nan = ev(0.8, f64::NAN);
    nan.dpo_loss = f64::NAN;
    assert!(gate(&cfg, Some(&nan), Some(&cur))
        .unwrap_err()
        .contains("dpo_loss"));
    let mut few = ev(0.8, f64::NAN);
    few.n = 3;
    assert!(gate(&cfg, Some(&few), None)
        .unwrap_err()
        .contains("min_holdout"));
    assert!(gate(&cfg, None, None).is_err());
    // KL budget only when configured; then a missing estimate is a rejection.
    let kl = PromoteConfig {
        max_kl: 0.1,
        ..cfg.clone()
    };
    assert!(gate(&kl, Some(&ev(0.8, 0.05)), Some(&cur)).is_ok());
    assert!(gate(&kl, Some(&ev(0.8, 0.2)), Some(&cur))
        .unwrap_err()
        .contains("max_kl"));
    assert!(gate(&kl, Some(&ev(0.8, f64::NAN)), Some(&cur))
        .unwrap_err()
        .contains("KL estimate unavailable"));
    assert!(gate(&cfg, Some(&ev(0.8, 5.0)), Some(&cur)).is_ok());
    assert!(PromoteConfig {
        min_auc: 2.0,
        ..cfg
    }
    .validate()
    .unwrap_err()
    .starts_with("promote.min_auc"));
}

#[test]
fn periodic_promoter_picks_the_best_passing_candidate() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let cfg = base_config(data);
    let l = learner(&cfg, 1);
    let mut p = Promoter::new(
        data,
        PromoteConfig {
            every_steps: 3,
            ..PromoteConfig::default()
        },
    );
    // Steps 1, 2, 3 with AUC 0.60, 0.72, 0.66: decision at step 3 picks 0.72.
    let mut names = vec![];
    for (step, auc) in [(1u64, 0.60), (2, 0.72), (3, 0.66)] {
        let mut c = content(&l, &cfg, Some(ev(auc, f64::NAN)));
        c.step = step;
        let info = write_snapshot(data, c).unwrap();
        names.push(info.name.clone());
        let r = p.consider(&info).unwrap();
        assert_eq!(r.is_some(), step == 3, "decision only when due");
    }
    let cur = current(data).unwrap().unwrap();
    assert_eq!(cur.name, names[1]);
    assert_eq!(cur.kind, "auto");
    assert_eq!(cur.manifest.eval.unwrap().auc, 0.72);
    // Next window: only worse candidates (beyond tolerance) -> nothing promoted.
    for (step, auc) in [(4u64, 0.50), (6, 0.69)] {
        let mut c = content(&l, &cfg, Some(ev(auc, f64::NAN)));
        c.step = step;
        let info = write_snapshot(data, c).unwrap();
        assert!(p.consider(&info).unwrap().is_none());
    }
    assert_eq!(current(data).unwrap().unwrap().name, names[1]);
    // A better one later is promoted, recording the previous one.
    let mut c = content(&l, &cfg, Some(ev(0.80, f64::NAN)));
    c.step = 9;
    let info = write_snapshot(data, c).unwrap();
    let r = p.consider(&info).unwrap().unwrap();
    assert_eq!(r.previous.as_deref(), Some(names[1].as_str()));
    let rows = read_promotions(&promotions_path(data)).unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].name, names[1]);
    assert_eq!(rows[1].name, info.name);
    assert!(rows[1].reason.contains("AUC 0.8000") && rows[1].reason.contains("0.7200"));
    assert!(rows[1].kl.is_nan());
    assert_eq!(
        promoted_names(data).unwrap(),
        [names[1].clone(), info.name.clone()].into()
    );
    // The pointer directory holds only the pointer and the manifest copy (no temp files).
    let mut files: Vec<String> = std::fs::read_dir(data.join("promoted"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    files.sort();
    assert_eq!(files, ["PROMOTED.json", "manifest.json"]);
}

#[test]
fn known_answer_on_the_synthetic_stream() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let cfg = base_config(data);
    // Held-out slice: events far from the training range, never trained on.
    let mut holdout = events(&cfg.source.synthetic, 100_000..100_400, false);
    let pc = PromoteConfig {
        every_steps: 1,
        min_auc: 0.0,
        ..PromoteConfig::default()
    };
    let mut p = Promoter::new(data, pc);
    let snap = |l: &spoke::learner::Learner, holdout: &mut Vec<_>| {
        let rep = l.evaluate(holdout).unwrap();
        write_snapshot(
            data,
            content(l, &cfg, Some(Evaluation::from_report(&rep, None))),
        )
        .unwrap()
    };

    // A lightly trained policy is promoted first.
    let mut base = learner(&cfg, 5);
    train(&mut base, &cfg, 0, 2, false);
    let first = snap(&base, &mut holdout);
    assert!(p.consider(&first).unwrap().is_some());

    // Trained longer on the true labels: better held-out AUC, promoted.
    let mut good = learner(&cfg, 5);
    train(&mut good, &cfg, 0, 40, false);
    let better = snap(&good, &mut holdout);
    let (a0, a1) = (
        first.manifest.eval.unwrap().auc,
        better.manifest.eval.unwrap().auc,
    );
    assert!(a1 > a0 + 0.05, "training should help: {a0} -> {a1}");
    let r = p
        .consider(&better)
        .unwrap()
        .expect("the better one is promoted");
    assert_eq!(r.name, better.name);

    // Trained on flipped labels: worse than the promoted one, rejected.
    let mut bad = learner(&cfg, 5);
    train(&mut bad, &cfg, 0, 40, true);
    let worse = snap(&bad, &mut holdout);
    assert!(worse.manifest.eval.unwrap().auc < a1 - 0.1);
    assert!(p.consider(&worse).unwrap().is_none());
    assert_eq!(current(data).unwrap().unwrap().name, better.name);
}
