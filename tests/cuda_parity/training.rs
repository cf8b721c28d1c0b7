//! Cross-entropy, AdamW with the global norm, and the shape errors every launcher raises.

use super::*;

/// How a cross-entropy parity case asks for its gradient.
#[derive(Clone, Copy)]
enum CeGrad {
    None,
    Uniform(f32),
    /// Random per-row weights of both signs (DPO's sequence coefficients).
    PerRow,
}

fn cross_entropy<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(6);
    for (n, v, vp, grad, loss_role) in [
        (4, 11, 16, CeGrad::Uniform(0.25), Role::Activation),
        (33, 1000, 1024, CeGrad::None, Role::Activation),
        (7, 5000, 5003, CeGrad::Uniform(1.0), Role::Activation),
        (9, 300, 320, CeGrad::PerRow, Role::State),
        (40, 4100, 4160, CeGrad::PerRow, Role::Activation),
        (5, 777, 832, CeGrad::Uniform(0.5), Role::State),
        // The GPT-2 vocabulary padded to 64: 16-byte accesses with a ragged real part.
        (9, 50257, 50304, CeGrad::Uniform(0.5), Role::State),
        (6, 50257, 50304, CeGrad::PerRow, Role::Activation),
    ] {
        let logits = randn(&mut rng, n * vp, 2.0);
        let mut targets = ids_for(&mut rng, n, v);
        targets[n / 2] = -1; // a masked row
        let weights = randn(&mut rng, n, 1.0);
        let mut want = logits.clone();
        let mut losses = vec![0.0; n];
        let gweights = up(be, &weights, Role::State);
        let (cpu_grad, be_grad) = match grad {
            CeGrad::None => (LossGrad::None, LossGrad::None),
            CeGrad::Uniform(s) => (LossGrad::Uniform(s), LossGrad::Uniform(s)),
            CeGrad::PerRow => (LossGrad::PerRow(&weights), LossGrad::PerRow(&gweights)),
        };
        cpu.cross_entropy(&mut losses, &mut want, &targets, n, v, vp, cpu_grad)
            .unwrap();
        let mut glogits = up(be, &logits, Role::Activation);
        let mut glosses = up(be, &nan(n), loss_role);
        let gt = be.upload_ids(&targets).unwrap();
        be.cross_entropy(&mut glosses, &mut glogits, &gt, n, v, vp, be_grad)
            .unwrap();
        // fp32 losses keep the fp32 math's precision; bf16 losses are rounded once.
        let loss_tol = if loss_role == Role::State {
            CE_F32_LOSS_TOL
        } else {
            BF16_TOL
        };
        assert_close(
            "cross_entropy losses",
            &down(be, &glosses),
            &losses,
            loss_tol,
        );
        assert_close(
            "cross_entropy dlogits",
            &down(be, &glogits),
            &want,
            BF16_TOL,
        );
    }
}
parity_tests!(cross_entropy => cross_entropy_cpu, cross_entropy_cuda);

fn adamw_and_norm<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(7);
    let hp = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 3,
        grad_scale: 0.5,
    };
    for n in [1, 777, 100_001] {
        let mut p = randn(&mut rng, n, 1.0);
        let g = randn(&mut rng, n, 1.0);
        let mut m = randn(&mut rng, n, 0.1);
        let mut v: Vec<f32> = randn(&mut rng, n, 0.1).iter().map(|x| x * x).collect();
        let (mut gp, gg) = (up(be, &p, Role::Param), up(be, &g, Role::Grad));
        let (mut gm, mut gv) = (up(be, &m, Role::State), up(be, &v, Role::State));
        cpu.adamw(&mut p, &g, &mut m, &mut v, &hp).unwrap();
        be.adamw(&mut gp, &gg, &mut gm, &mut gv, &hp).unwrap();
        assert_close("adamw param", &down(be, &gp), &p, 1e-5);
        assert_close("adamw m", &down(be, &gm), &m, 1e-5);
        assert_close("adamw v", &down(be, &gv), &v, 1e-5);

        let h = randn(&mut rng, 2 * n + 3, 1.0);
        let gh = up(be, &h, Role::Grad);
        let want = cpu.global_norm(&[&g, &h]).unwrap();
        let got = be.global_norm(&[&gg, &gh]).unwrap();
        assert_close("global_norm", &[got], &[want], 1e-5);
    }
}
parity_tests!(adamw_and_norm => adamw_and_norm_cpu, adamw_and_norm_cuda);

/// A wrong-length buffer is a Shape error naming the buffer, before anything is launched.
fn shape_errors<B: Backend>(be: &B) {
    let (n, c) = (4, 8);
    let x = be.zeros(n * c, Role::Activation).unwrap();
    let mut short = be.zeros(n * c - 1, Role::Activation).unwrap();
    match be.gelu_forward(&mut short, &x, n * c) {
        Err(BackendError::Shape { what: "out", .. }) => {}
        other => panic!("gelu_forward with a short out: {other:?}"),
    }
    let (w, b) = (
        be.zeros(c, Role::Param).unwrap(),
        be.zeros(c + 1, Role::Param).unwrap(),
    );
    let mut out = be.zeros(n * c, Role::Activation).unwrap();
    let mut mean = be.zeros(n, Role::Activation).unwrap();
    let mut rstd = be.zeros(n, Role::Activation).unwrap();
    match be.layernorm_forward(&mut out, &mut mean, &mut rstd, &x, &w, &b, n, c) {
        Err(BackendError::Shape { what: "bias", .. }) => {}
        other => panic!("layernorm_forward with a long bias: {other:?}"),
    }
    let mut lse = be.zeros(n, Role::Stat).unwrap();
    match be.attention_forward(&mut out, &mut lse, &x, None, 1, n, c, 2) {
        Err(BackendError::Shape { .. }) => {}
        other => panic!("attention_forward with a short qkv: {other:?}"),
    }
    // The fused MLP pair: a short `pre` on either side.
    let wm = be.zeros(c * c, Role::Param).unwrap();
    match be.matmul_gelu_forward(&mut out, &mut short, &x, &wm, None, n, c, c) {
        Err(BackendError::Shape { what: "pre", .. }) => {}
        other => panic!("matmul_gelu_forward with a short pre: {other:?}"),
    }
    let mut dw = be.zeros(c * c, Role::Grad).unwrap();
    match be.matmul_gelu_backward(&mut out, Some(&mut dw), None, &x, &x, &wm, &short, n, c, c) {
        Err(BackendError::Shape { what: "pre", .. }) => {}
        other => panic!("matmul_gelu_backward with a short pre: {other:?}"),
    }
}
parity_tests!(shape_errors => shape_errors_cpu, shape_errors_cuda);
