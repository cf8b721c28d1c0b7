//! Cross-entropy (uniform and per-row weights) against naive sums and finite differences;
//! AdamW and the global norm against hand computations.

use super::*;

// ---- cross-entropy -------------------------------------------------------------------------

#[test]
fn cross_entropy_matches_naive_and_finite_differences() {
    let mut rng = Rng::new(17);
    let mut logits = randn(N * VP, &mut rng);
    for i in 0..N {
        for j in V..VP {
            logits[i * VP + j] = 50.0; // padding must be ignored, however large
        }
    }
    let mut targets = random_ids(N, V, &mut rng);
    targets[4] = -1; // masked
    targets[0] = V as i32 - 1; // last real column
    let s = 1.0 / (N - 1) as f64;

    let mut losses = vec![f64::NAN; N];
    let mut work = logits.clone();
    cross_entropy::cross_entropy(&mut losses, &mut work, &targets, N, V, VP, None, None);
    assert_eq!(work, logits, "logits must be left alone without dloss");
    let naive: Vec<f64> = (0..N)
        .map(|i| {
            if targets[i] < 0 {
                return 0.0;
            }
            let row = &logits[i * VP..][..V];
            row.iter().map(|x| x.exp()).sum::<f64>().ln() - row[targets[i] as usize]
        })
        .collect();
    assert_close("cross-entropy losses", &losses, &naive, 1e-14);
    assert_eq!(losses[4], 0.0, "masked row has zero loss");

    let loss_of = |l: &[f64]| {
        let mut losses = vec![0.0; N];
        let mut l = l.to_vec();
        cross_entropy::cross_entropy(&mut losses, &mut l, &targets, N, V, VP, None, None);
        s * losses.iter().sum::<f64>()
    };
    let fd = fd_grad(&logits, loss_of);
    let mut dlogits = logits.clone();
    let mut losses2 = vec![0.0; N];
    cross_entropy::cross_entropy(
        &mut losses2,
        &mut dlogits,
        &targets,
        N,
        V,
        VP,
        Some(s),
        None,
    );
    assert_eq!(losses2, losses, "losses must not depend on dloss");
    assert_close("dlogits", &dlogits, &fd, FD_TOL);
    for i in 0..N {
        for j in 0..VP {
            if j >= V || targets[i] < 0 {
                assert_eq!(
                    dlogits[i * VP + j],
                    0.0,
                    "row {i} col {j} must have zero gradient"
                );
            }
        }
    }

    let be = CpuBackend;
    let (mut l32, mut g32) = (vec![f32::NAN; N], to32(&logits));
    be.cross_entropy(
        &mut l32,
        &mut g32,
        &targets,
        N,
        V,
        VP,
        LossGrad::Uniform(s as f32),
    )
    .unwrap();
    assert_close("cross-entropy losses (f32)", &to64(&l32), &naive, F32_TOL);
    assert_close("dlogits (f32)", &to64(&g32), &fd, F32_TOL);
}

/// Per-row weights: the gradient is that of `sum_i w_i * loss_i` (weights of both signs, one
/// zero), the losses do not depend on them, and the f32 backend agrees; a weights buffer of the
/// wrong length is a Shape error naming it.
#[test]
fn cross_entropy_per_row_weights_match_finite_differences() {
    let mut rng = Rng::new(29);
    let logits = randn(N * VP, &mut rng);
    let mut targets = random_ids(N, V, &mut rng);
    targets[3] = -1;
    let mut weights = randn(N, &mut rng);
    weights[6] = 0.0;
    let loss_of = |l: &[f64]| {
        let mut losses = vec![0.0; N];
        let mut l = l.to_vec();
        cross_entropy::cross_entropy(&mut losses, &mut l, &targets, N, V, VP, None, None);
        dot(&losses, &weights)
    };
    let fd = fd_grad(&logits, loss_of);
    let (mut losses, mut plain) = (vec![0.0; N], vec![0.0; N]);
    let mut work = logits.clone();
    cross_entropy::cross_entropy(&mut plain, &mut work, &targets, N, V, VP, None, None);
    let mut dlogits = logits.clone();
    let s = 0.75;
    cross_entropy::cross_entropy(
        &mut losses,
        &mut dlogits,
        &targets,
        N,
        V,
        VP,
        Some(s),
        Some(&weights),
    );
    assert_eq!(losses, plain, "losses must not depend on the weights");
    let want: Vec<f64> = fd.iter().map(|g| s * g).collect();
    assert_close("dlogits (per-row weights)", &dlogits, &want, FD_TOL);
    assert!(dlogits[6 * VP..7 * VP].iter().all(|&g| g == 0.0));
    assert!(dlogits[3 * VP..4 * VP].iter().all(|&g| g == 0.0));

    let be = CpuBackend;
    let (mut l32, mut g32) = (vec![f32::NAN; N], to32(&logits));
    let w32 = to32(&weights);
    be.cross_entropy(
        &mut l32,
        &mut g32,
        &targets,
        N,
        V,
        VP,
        LossGrad::PerRow(&w32),
    )
    .unwrap();
    assert_close("dlogits per-row (f32)", &to64(&g32), &fd, F32_TOL);
    assert_close("losses per-row (f32)", &to64(&l32), &plain, F32_TOL);

    let before = to32(&logits);
    let mut g32 = before.clone();
    match be.cross_entropy(
        &mut l32,
        &mut g32,
        &targets,
        N,
        V,
        VP,
        LossGrad::PerRow(&w32[1..].to_vec()),
    ) {
        Err(BackendError::Shape {
            what: "weights", ..
        }) => {}
        other => panic!("expected a Shape error naming `weights`, got {other:?}"),
    }
    assert_eq!(g32, before, "nothing is written on error");
}

// ---- optimizer -----------------------------------------------------------------------------

#[test]
fn adamw_step_matches_hand_computation() {
    let hp = AdamWStep {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 3,
        grad_scale: 0.5,
    };
    let mut param = vec![1.0f32, -2.0];
    let grad = vec![0.4f32, 3.0];
    let mut m = vec![0.1f32, -0.2];
    let mut v = vec![0.01f32, 0.5];
    CpuBackend
        .adamw(&mut param, &grad, &mut m, &mut v, &hp)
        .unwrap();

    // Element 0 by hand: g = 0.2; m = 0.9*0.1 + 0.1*0.2 = 0.11; v = 0.95*0.01 + 0.05*0.04 = 0.0115;
    // mhat = 0.11 / (1 - 0.9^3) = 0.11 / 0.271; vhat = 0.0115 / (1 - 0.95^3) = 0.0115 / 0.142625;
    // p = 1 - 0.01 * (mhat / (sqrt(vhat) + 1e-8) + 0.1 * 1).
    let p0 = 1.0 - 0.01 * ((0.11 / 0.271) / ((0.0115f64 / 0.142625).sqrt() + 1e-8) + 0.1);
    // Element 1: g = 1.5; m = -0.18 + 0.15 = -0.03; v = 0.475 + 0.05*2.25 = 0.5875.
    let p1 = -2.0 - 0.01 * ((-0.03 / 0.271) / ((0.5875f64 / 0.142625).sqrt() + 1e-8) - 0.2);
    let close = |a: f32, b: f64| (a as f64 - b).abs() <= 1e-6 * b.abs().max(1.0);
    assert!(close(m[0], 0.11) && close(m[1], -0.03), "m = {m:?}");
    assert!(close(v[0], 0.0115) && close(v[1], 0.5875), "v = {v:?}");
    assert!(close(param[0], p0), "param[0] = {} want {p0}", param[0]);
    assert!(close(param[1], p1), "param[1] = {} want {p1}", param[1]);
}

#[test]
fn global_norm_matches_hand_computation() {
    let a = vec![3.0f32, 4.0];
    let b = vec![12.0f32];
    let empty: Vec<f32> = vec![];
    assert_eq!(CpuBackend.global_norm(&[&a, &b, &empty]).unwrap(), 13.0);
    assert_eq!(CpuBackend.global_norm(&[]).unwrap(), 0.0);
    // A long buffer: 100_000 ones and one 300 -> sqrt(100_000 + 90_000).
    let mut long = vec![1.0f32; 100_001];
    long[50_000] = 300.0;
    let got = CpuBackend.global_norm(&[&long]).unwrap() as f64;
    let want = (100_000.0f64 + 90_000.0).sqrt();
    assert!((got - want).abs() <= 1e-6 * want, "{got} vs {want}");
    let direct = adamw::global_norm::<f64>(&[&[3.0, 4.0], &[12.0]]);
    assert_eq!(direct, 13.0);
}
