//! The Llama family's ops against the CPU reference: token embedding, RMSNorm (plain and fused
//! with the residual add), RoPE (implicit positions after `past`, packed positions, and angles
//! far past 2 pi), SwiGLU; forward and backward. Grouped-query attention is in
//! `gqa_attention.rs`.

use super::*;

fn embedding<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(21);
    for (b, t, c, v) in [
        (2, 5, 12, 11),
        (3, 33, 100, 7),
        (1, 64, 257, 300),
        (2, 70, 576, 50),
    ] {
        let ids = ids_for(&mut rng, b * t, v);
        let wte = randn(&mut rng, v * c, 1.0);
        let mut want = vec![0.0; b * t * c];
        cpu.embedding_forward(&mut want, &ids, &wte, b, t, c)
            .unwrap();
        let mut out = up(be, &nan(b * t * c), Role::Activation);
        let gte = up(be, &wte, Role::Param);
        let gids = be.upload_ids(&ids).unwrap();
        be.embedding_forward(&mut out, &gids, &gte, b, t, c)
            .unwrap();
        // Rows are copies of bf16 values: exact.
        assert_close("embedding_forward out", &down(be, &out), &want, 0.0);

        let dout = randn(&mut rng, b * t * c, 1.0);
        let mut dwte = randn(&mut rng, v * c, 1.0);
        let mut gdte = up(be, &dwte, Role::Grad);
        cpu.embedding_backward(&mut dwte, &dout, &ids, b, t, c)
            .unwrap();
        let gdout = up(be, &dout, Role::Activation);
        be.embedding_backward(&mut gdte, &gdout, &gids, b, t, c)
            .unwrap();
        assert_close("embedding_backward dwte", &down(be, &gdte), &dwte, F32_TOL);
    }
    // An id outside the table is refused before launching.
    let wte = up(be, &randn(&mut rng, 3 * 8, 1.0), Role::Param);
    let ids = be.upload_ids(&[0, 3]).unwrap();
    let mut out = up(be, &nan(2 * 8), Role::Activation);
    match be.embedding_forward(&mut out, &ids, &wte, 1, 2, 8) {
        Err(BackendError::Invalid { .. }) => {}
        other => panic!("embedding_forward with id 3 of 3: {other:?}"),
    }
}
parity_tests!(embedding => embedding_cpu, embedding_cuda);

fn rmsnorm<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(22);
    for (n, c, eps) in [
        (3, 12, 1e-5),
        (37, 100, 1e-6),
        (300, 576, 1e-5),
        (9, 2048, 1e-5),
    ] {
        let (a, r) = (randn(&mut rng, n * c, 1.0), randn(&mut rng, n * c, 1.0));
        let w = randn(&mut rng, c, 1.0);
        let (mut res, mut out, mut rstd) = (vec![0.0; n * c], vec![0.0; n * c], vec![0.0; n]);
        cpu.residual_rmsnorm_forward(&mut res, &mut out, &mut rstd, &a, &r, &w, n, c, eps)
            .unwrap();
        let (ga, gr, gw) = (
            up(be, &a, Role::Activation),
            up(be, &r, Role::Activation),
            up(be, &w, Role::Param),
        );
        let mut gres = up(be, &nan(n * c), Role::Activation);
        let mut gout = up(be, &nan(n * c), Role::Activation);
        let mut grstd = up(be, &nan(n), Role::Stat);
        be.residual_rmsnorm_forward(&mut gres, &mut gout, &mut grstd, &ga, &gr, &gw, n, c, eps)
            .unwrap();
        let what = "residual_rmsnorm residual";
        assert_close(what, &down(be, &gres), &res, BF16_TOL);
        assert_close("residual_rmsnorm out", &down(be, &gout), &out, BF16_TOL);
        // The backend sums the bf16-rounded residual, the CPU the exact one: bf16's error.
        let what = "residual_rmsnorm rstd";
        assert_close(what, &down(be, &grstd), &rstd, BF16_TOL);

        // Plain forward on the bf16-rounded residual: both sides see the same input, and rstd
        // is fp32 on both.
        let inp: Vec<f32> = res.iter().map(|&x| bf16_round(x)).collect();
        let ginp = up(be, &inp, Role::Activation);
        cpu.rmsnorm_forward(&mut out, &mut rstd, &inp, &w, n, c, eps)
            .unwrap();
        let mut gout = up(be, &nan(n * c), Role::Activation);
        let mut grstd = up(be, &nan(n), Role::Stat);
        be.rmsnorm_forward(&mut gout, &mut grstd, &ginp, &gw, n, c, eps)
            .unwrap();
        assert_close("rmsnorm_forward out", &down(be, &gout), &out, BF16_TOL);
        assert_close("rmsnorm_forward rstd", &down(be, &grstd), &rstd, F32_TOL);

        // Backward: dinp accumulates into random values, dweight into random fp32 values.
        let dout = randn(&mut rng, n * c, 1.0);
        let mut dinp = randn(&mut rng, n * c, 1.0);
        let mut dw = randn(&mut rng, c, 1.0);
        let mut gdinp = up(be, &dinp, Role::Activation);
        let mut gdw = up(be, &dw, Role::Grad);
        cpu.rmsnorm_backward(&mut dinp, Some(&mut dw), &dout, &inp, &w, &rstd, n, c)
            .unwrap();
        let (gdout, grstd) = (up(be, &dout, Role::Activation), up(be, &rstd, Role::Stat));
        be.rmsnorm_backward(&mut gdinp, Some(&mut gdw), &gdout, &ginp, &gw, &grstd, n, c)
            .unwrap();
        let what = "rmsnorm_backward dinp";
        assert_close(what, &down(be, &gdinp), &dinp, BF16_TOL);
        assert_close("rmsnorm_backward dweight", &down(be, &gdw), &dw, F32_TOL);
    }
}
parity_tests!(rmsnorm => rmsnorm_cpu, rmsnorm_cuda);

/// RoPE tables of Llama shapes: theta 10000 and 500000 (Llama 3), hs 64 and 32 and 48.
fn inv_freq(hs: usize, theta: f32) -> Vec<f32> {
    (0..hs / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / hs as f32))
        .collect()
}

fn rope<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(23);
    // (B, T, NH, NKV, hs, theta, past, packed): GQA ratios 1, 2, NH; positions after a cache,
    // and packed rows restarting at example boundaries.
    for (b, t, nh, nkv, hs, theta, past, packed) in [
        (2, 5, 2, 2, 8, 10_000.0, 0, false),
        (2, 33, 4, 2, 64, 500_000.0, 0, false),
        (1, 70, 3, 1, 32, 10_000.0, 100, false),
        (3, 40, 4, 2, 48, 10_000.0, 0, true),
        (1, 17, 32, 8, 64, 500_000.0, 4000, false),
    ] {
        let w = (nh + 2 * nkv) * hs;
        let qkv = randn(&mut rng, b * t * w, 1.0);
        let freq = inv_freq(hs, theta);
        let pos = packed.then(|| packed_positions(&mut rng, b, t, t, 6));
        let mut want = qkv.clone();
        cpu.rope_forward(&mut want, &freq, pos.as_ref(), past, b, t, nh, nkv, hs)
            .unwrap();
        let mut gx = up(be, &qkv, Role::Activation);
        let gfreq = up(be, &freq, Role::State);
        let gpos = pos.as_ref().map(|p| be.upload_ids(p).unwrap());
        be.rope_forward(&mut gx, &gfreq, gpos.as_ref(), past, b, t, nh, nkv, hs)
            .unwrap();
        let got = down(be, &gx);
        assert_close("rope_forward qkv", &got, &want, BF16_TOL);
        // The value heads are untouched: bit for bit.
        for r in 0..b * t {
            let v = r * w + (nh + nkv) * hs..(r + 1) * w;
            assert_eq!(got[v.clone()], qkv[v], "rope_forward touched value heads");
        }

        // Backward (past = 0): the transpose, on a random gradient.
        if past > 0 {
            continue;
        }
        let dqkv = randn(&mut rng, b * t * w, 1.0);
        let mut want = dqkv.clone();
        cpu.rope_backward(&mut want, &freq, pos.as_ref(), b, t, nh, nkv, hs)
            .unwrap();
        let mut gd = up(be, &dqkv, Role::Activation);
        be.rope_backward(&mut gd, &gfreq, gpos.as_ref(), b, t, nh, nkv, hs)
            .unwrap();
        assert_close("rope_backward dqkv", &down(be, &gd), &want, BF16_TOL);
    }
    rope_far_angles(be);
}
parity_tests!(rope => rope_cpu, rope_cuda);

/// Angles up to ~131072 rad (position 131071 at inv_freq 1, Llama 3's context): with each
/// pair set to (1, 0) the op writes (cos a, sin a), which must be within one bf16 step (2^-8)
/// of the f64 cosine and sine of the f32 angle (a fast-math `__cosf`, reducing through the fp32
/// product a / 2 pi, would be off by several 1e-3 at the far end).
fn rope_far_angles<B: Backend>(be: &B) {
    let (nh, nkv, hs) = (1, 1, 8);
    let w = (nh + 2 * nkv) * hs;
    let freq = inv_freq(hs, 10_000.0);
    let positions: Vec<i32> =
        [0, 1, 7, 1000, 8191, 8192, 30_000, 65_537, 100_003, 131_071].to_vec();
    let n = positions.len();
    let mut qkv = vec![0.0f32; n * w];
    for r in 0..n {
        for head in 0..nh + nkv {
            qkv[r * w + head * hs..][..hs / 2].fill(1.0);
        }
    }
    let mut gx = up(be, &qkv, Role::Activation);
    let gfreq = up(be, &freq, Role::State);
    let gpos = be.upload_ids(&positions).unwrap();
    be.rope_forward(&mut gx, &gfreq, Some(&gpos), 0, n, 1, nh, nkv, hs)
        .unwrap();
    let got = down(be, &gx);
    let mut worst = 0.0f64;
    for (r, &p) in positions.iter().enumerate() {
        for head in 0..nh + nkv {
            for (i, &f) in freq.iter().enumerate() {
                let a = (p as f32 * f) as f64;
                let at = r * w + head * hs + i;
                worst = worst.max((got[at] as f64 - a.cos()).abs());
                worst = worst.max((got[at + hs / 2] as f64 - a.sin()).abs());
            }
        }
    }
    println!("rope far angles: max |error| {worst:.2e}");
    assert!(
        worst <= 1.0 / 256.0,
        "rope at far angles: max error {worst:e}"
    );
}

fn swiglu<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(24);
    for (n, i, scale) in [(1, 1, 1.0), (5, 12, 2.0), (37, 1536, 3.0), (8, 8192, 1.0)] {
        let mut gate_up = randn(&mut rng, n * 2 * i, scale);
        // Saturated gates: silu(-90) = -0 (e^90 overflows fp32), silu(90) = 90.
        gate_up[0] = -90.0;
        if i > 1 {
            gate_up[1] = 90.0;
        }
        let mut want = vec![0.0; n * i];
        cpu.swiglu_forward(&mut want, &gate_up, n, i).unwrap();
        let gx = up(be, &gate_up, Role::Activation);
        let mut gout = up(be, &nan(n * i), Role::Activation);
        be.swiglu_forward(&mut gout, &gx, n, i).unwrap();
        assert_close("swiglu_forward out", &down(be, &gout), &want, BF16_TOL);

        let dout = randn(&mut rng, n * i, 1.0);
        let mut dx = randn(&mut rng, n * 2 * i, 1.0);
        let mut gdx = up(be, &dx, Role::Activation);
        cpu.swiglu_backward(&mut dx, &dout, &gate_up, n, i).unwrap();
        let gdout = up(be, &dout, Role::Activation);
        be.swiglu_backward(&mut gdx, &gdout, &gx, n, i).unwrap();
        let got = down(be, &gdx);
        assert!(
            got.iter().all(|x| x.is_finite()),
            "swiglu_backward: not finite"
        );
        assert_close("swiglu_backward dgate_up", &got, &dx, BF16_TOL);
    }
}
parity_tests!(swiglu => swiglu_cpu, swiglu_cuda);
