//! Encoder, layernorm, matmul, GELU (alone and fused with its matmul) and the residual add:
//! backwards against finite differences, accumulate and overwrite semantics.

use super::*;

// ---- encoder -------------------------------------------------------------------------------

/// Encoder backward vs finite differences and the f32 backend, with implicit or explicit positions.
fn check_encoder(pos: Option<&Vec<i32>>, seed: u64) {
    let mut rng = Rng::new(seed);
    let wte = randn(V * C, &mut rng);
    let wpe = randn(TMAX * C, &mut rng);
    let mut ids = random_ids(N, V, &mut rng);
    ids[3] = ids[7]; // a repeated id sums two positions
    let dout = randn(N * C, &mut rng);
    let p = pos.map(Vec::as_slice);
    let fwd = |wte: &[f64], wpe: &[f64]| {
        let mut out = vec![0.0; N * C];
        encoder::encoder_forward(&mut out, &ids, p, wte, wpe, B, T, C);
        dot(&out, &dout)
    };
    let mut dwte = vec![0.0; V * C];
    let mut dwpe = vec![0.0; TMAX * C];
    encoder::encoder_backward(&mut dwte, &mut dwpe, &dout, &ids, p, B, T, C);
    let fd_wte = fd_grad(&wte, |w| fwd(w, &wpe));
    let fd_wpe = fd_grad(&wpe, |w| fwd(&wte, w));
    assert_close("dwte", &dwte, &fd_wte, FD_TOL);
    assert_close("dwpe", &dwpe, &fd_wpe, FD_TOL);

    // Accumulate onto random gradients.
    let pre_wte = randn(V * C, &mut rng);
    let pre_wpe = randn(TMAX * C, &mut rng);
    let (mut acc_wte, mut acc_wpe) = (pre_wte.clone(), pre_wpe.clone());
    encoder::encoder_backward(&mut acc_wte, &mut acc_wpe, &dout, &ids, p, B, T, C);
    assert_accumulates("dwte", &pre_wte, &dwte, &acc_wte);
    assert_accumulates("dwpe", &pre_wpe, &dwpe, &acc_wpe);

    // The f32 backend.
    let be = CpuBackend;
    let mut out32 = vec![f32::NAN; N * C];
    be.encoder_forward(&mut out32, &ids, pos, &to32(&wte), &to32(&wpe), B, T, C)
        .unwrap();
    let mut out64 = vec![0.0; N * C];
    encoder::encoder_forward(&mut out64, &ids, p, &wte, &wpe, B, T, C);
    assert_close("encoder out (f32)", &to64(&out32), &out64, F32_TOL);
    let (mut g_wte, mut g_wpe) = (vec![0.0f32; V * C], vec![0.0f32; TMAX * C]);
    be.encoder_backward(&mut g_wte, &mut g_wpe, &to32(&dout), &ids, pos, B, T, C)
        .unwrap();
    assert_close("dwte (f32)", &to64(&g_wte), &fd_wte, F32_TOL);
    assert_close("dwpe (f32)", &to64(&g_wpe), &fd_wpe, F32_TOL);
}

#[test]
fn encoder_backward_matches_finite_differences() {
    check_encoder(None, 11);
}

#[test]
fn encoder_with_explicit_positions_matches_finite_differences() {
    // Positions restart inside a row (two packed examples) and reach past T, up to Tmax - 1.
    let mut pos = vec![0, 1, 2, 0, 1, 3, 4, 5, 6, 0];
    assert_eq!(pos.len(), N);
    check_encoder(Some(&pos), 21);

    // The forward reads wpe[pos], not wpe[t]: position 6 of row 1 against a direct sum.
    let mut rng = Rng::new(22);
    let (wte, wpe) = (
        to32(&randn(V * C, &mut rng)),
        to32(&randn(TMAX * C, &mut rng)),
    );
    let ids = random_ids(N, V, &mut rng);
    let mut out = vec![f32::NAN; N * C];
    CpuBackend
        .encoder_forward(&mut out, &ids, Some(&pos), &wte, &wpe, B, T, C)
        .unwrap();
    for i in 0..N {
        for ch in 0..C {
            let want = wte[ids[i] as usize * C + ch] + wpe[pos[i] as usize * C + ch];
            assert_eq!(out[i * C + ch], want, "out[{i}, {ch}]");
        }
    }

    // A position outside [0, Tmax) is an Invalid error naming it, for forward and backward.
    pos[4] = TMAX as i32;
    let r = CpuBackend.encoder_forward(&mut out, &ids, Some(&pos), &wte, &wpe, B, T, C);
    match r {
        Err(BackendError::Invalid { msg, .. }) => {
            assert!(msg.contains("position 7 at index 4"), "{msg}")
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    pos[4] = -1;
    let (mut dwte, mut dwpe) = (vec![0.0f32; V * C], vec![0.0f32; TMAX * C]);
    let r = CpuBackend.encoder_backward(&mut dwte, &mut dwpe, &out, &ids, Some(&pos), B, T, C);
    assert!(matches!(r, Err(BackendError::Invalid { .. })), "{r:?}");
    // A pos buffer of the wrong length is a Shape error.
    let r = CpuBackend.encoder_forward(&mut out, &ids, Some(&vec![0; N - 1]), &wte, &wpe, B, T, C);
    assert_shape_err(r, "pos");
}

// ---- layernorm -----------------------------------------------------------------------------

#[test]
fn layernorm_backward_matches_finite_differences() {
    let mut rng = Rng::new(12);
    let inp: Vec<f64> = randn(N * C, &mut rng)
        .iter()
        .map(|x| 2.0 * x + 0.5)
        .collect();
    let weight = randn(C, &mut rng);
    let bias = randn(C, &mut rng);
    let dout = randn(N * C, &mut rng);
    let fwd = |inp: &[f64], w: &[f64], b: &[f64]| {
        let (mut out, mut mean, mut rstd) = (vec![0.0; N * C], vec![0.0; N], vec![0.0; N]);
        layernorm::layernorm_forward(&mut out, &mut mean, &mut rstd, inp, w, b, N, C);
        (dot(&out, &dout), out, mean, rstd)
    };
    let (_, out, mean, rstd) = fwd(&inp, &weight, &bias);

    // Forward against a direct computation.
    let mut naive = vec![0.0; N * C];
    for i in 0..N {
        let x = &inp[i * C..][..C];
        let m = x.iter().sum::<f64>() / C as f64;
        let var = x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / C as f64;
        for j in 0..C {
            naive[i * C + j] = (x[j] - m) / (var + 1e-5).sqrt() * weight[j] + bias[j];
        }
    }
    assert_close("layernorm out", &out, &naive, 1e-12);

    let (mut dinp, mut dw, mut db) = (vec![0.0; N * C], vec![0.0; C], vec![0.0; C]);
    layernorm::layernorm_backward(
        &mut dinp, &mut dw, &mut db, &dout, &inp, &weight, &mean, &rstd, N, C,
    );
    let fd_inp = fd_grad(&inp, |x| fwd(x, &weight, &bias).0);
    let fd_w = fd_grad(&weight, |w| fwd(&inp, w, &bias).0);
    let fd_b = fd_grad(&bias, |b| fwd(&inp, &weight, b).0);
    assert_close("layernorm dinp", &dinp, &fd_inp, FD_TOL);
    assert_close("layernorm dweight", &dw, &fd_w, FD_TOL);
    assert_close("layernorm dbias", &db, &fd_b, FD_TOL);

    let (p_inp, p_w, p_b) = (
        randn(N * C, &mut rng),
        randn(C, &mut rng),
        randn(C, &mut rng),
    );
    let (mut a_inp, mut a_w, mut a_b) = (p_inp.clone(), p_w.clone(), p_b.clone());
    layernorm::layernorm_backward(
        &mut a_inp, &mut a_w, &mut a_b, &dout, &inp, &weight, &mean, &rstd, N, C,
    );
    assert_accumulates("layernorm dinp", &p_inp, &dinp, &a_inp);
    assert_accumulates("layernorm dweight", &p_w, &dw, &a_w);
    assert_accumulates("layernorm dbias", &p_b, &db, &a_b);

    // The f32 backend.
    let be = CpuBackend;
    let (inp32, w32, b32) = (to32(&inp), to32(&weight), to32(&bias));
    let (mut o32, mut m32, mut r32) = (vec![f32::NAN; N * C], vec![f32::NAN; N], vec![0.0; N]);
    be.layernorm_forward(&mut o32, &mut m32, &mut r32, &inp32, &w32, &b32, N, C)
        .unwrap();
    assert_close("layernorm out (f32)", &to64(&o32), &out, F32_TOL);
    let (mut gi, mut gw, mut gb) = (vec![0.0f32; N * C], vec![0.0f32; C], vec![0.0f32; C]);
    be.layernorm_backward(
        &mut gi,
        Some(&mut gw),
        Some(&mut gb),
        &to32(&dout),
        &inp32,
        &w32,
        &m32,
        &r32,
        N,
        C,
    )
    .unwrap();
    assert_close("layernorm dinp (f32)", &to64(&gi), &fd_inp, F32_TOL);
    assert_close("layernorm dweight (f32)", &to64(&gw), &fd_w, F32_TOL);
    assert_close("layernorm dbias (f32)", &to64(&gb), &fd_b, F32_TOL);
}

// ---- matmul --------------------------------------------------------------------------------

#[test]
fn matmul_backward_matches_finite_differences() {
    let mut rng = Rng::new(13);
    let inp = randn(N * C, &mut rng);
    let weight = randn(OC * C, &mut rng);
    let bias = randn(OC, &mut rng);
    let dout = randn(N * OC, &mut rng);
    let fwd = |x: &[f64], w: &[f64], b: Option<&[f64]>| {
        let mut out = vec![0.0; N * OC];
        matmul::matmul_forward(&mut out, x, w, b, N, C, OC);
        out
    };
    let loss = |x: &[f64], w: &[f64], b: &[f64]| dot(&fwd(x, w, Some(b)), &dout);

    // Forward against a naive triple loop.
    let mut naive = vec![0.0; N * OC];
    for i in 0..N {
        for o in 0..OC {
            naive[i * OC + o] = bias[o]
                + (0..C)
                    .map(|k| inp[i * C + k] * weight[o * C + k])
                    .sum::<f64>();
        }
    }
    assert_close(
        "matmul out",
        &fwd(&inp, &weight, Some(&bias)),
        &naive,
        1e-12,
    );

    let (mut dinp, mut dw, mut db) = (vec![0.0; N * C], vec![0.0; OC * C], vec![0.0; OC]);
    matmul::matmul_backward(
        &mut dinp,
        Some(&mut dw),
        Some(&mut db),
        &dout,
        &inp,
        &weight,
        N,
        C,
        OC,
    );
    let fd_inp = fd_grad(&inp, |x| loss(x, &weight, &bias));
    let fd_w = fd_grad(&weight, |w| loss(&inp, w, &bias));
    let fd_b = fd_grad(&bias, |b| loss(&inp, &weight, b));
    assert_close("matmul dinp", &dinp, &fd_inp, FD_TOL);
    assert_close("matmul dweight", &dw, &fd_w, FD_TOL);
    assert_close("matmul dbias", &db, &fd_b, FD_TOL);

    let (p_inp, p_w, p_b) = (
        randn(N * C, &mut rng),
        randn(OC * C, &mut rng),
        randn(OC, &mut rng),
    );
    let (mut a_inp, mut a_w, mut a_b) = (p_inp.clone(), p_w.clone(), p_b.clone());
    matmul::matmul_backward(
        &mut a_inp,
        Some(&mut a_w),
        Some(&mut a_b),
        &dout,
        &inp,
        &weight,
        N,
        C,
        OC,
    );
    assert_overwrites("matmul dinp", &dinp, &a_inp);
    assert_accumulates("matmul dweight", &p_w, &dw, &a_w);
    assert_accumulates("matmul dbias", &p_b, &db, &a_b);

    // The f32 backend, with and without bias.
    let be = CpuBackend;
    let (x32, w32, b32) = (to32(&inp), to32(&weight), to32(&bias));
    let mut o32 = vec![f32::NAN; N * OC];
    be.matmul_forward(&mut o32, &x32, &w32, Some(&b32), N, C, OC)
        .unwrap();
    assert_close("matmul out (f32)", &to64(&o32), &naive, F32_TOL);
    be.matmul_forward(&mut o32, &x32, &w32, None, N, C, OC)
        .unwrap();
    assert_close(
        "matmul out no bias (f32)",
        &to64(&o32),
        &fwd(&inp, &weight, None),
        F32_TOL,
    );
    let (mut gi, mut gw, mut gb) = (vec![0.0f32; N * C], vec![0.0f32; OC * C], vec![0.0f32; OC]);
    be.matmul_backward(
        &mut gi,
        Some(&mut gw),
        Some(&mut gb),
        &to32(&dout),
        &x32,
        &w32,
        N,
        C,
        OC,
    )
    .unwrap();
    assert_close("matmul dinp (f32)", &to64(&gi), &fd_inp, F32_TOL);
    assert_close("matmul dweight (f32)", &to64(&gw), &fd_w, F32_TOL);
    assert_close("matmul dbias (f32)", &to64(&gb), &fd_b, F32_TOL);
    let (mut gi2, mut gw2) = (vec![0.0f32; N * C], vec![0.0f32; OC * C]);
    be.matmul_backward(
        &mut gi2,
        Some(&mut gw2),
        None,
        &to32(&dout),
        &x32,
        &w32,
        N,
        C,
        OC,
    )
    .unwrap();
    assert_eq!(
        gi, gi2,
        "dinp must not depend on whether dbias is requested"
    );
    assert_eq!(
        gw, gw2,
        "dweight must not depend on whether dbias is requested"
    );
}

// ---- gelu and residual ---------------------------------------------------------------------

#[test]
fn gelu_backward_matches_finite_differences() {
    let mut rng = Rng::new(14);
    let n = N * C;
    let inp: Vec<f64> = randn(n, &mut rng).iter().map(|x| 2.0 * x).collect();
    let dout = randn(n, &mut rng);
    let fwd = |x: &[f64]| {
        let mut out = vec![0.0; n];
        gelu::gelu_forward(&mut out, x, n);
        out
    };
    let naive: Vec<f64> = inp
        .iter()
        .map(|&x| {
            let s = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (s * (x + 0.044715 * x * x * x)).tanh())
        })
        .collect();
    assert_close("gelu out", &fwd(&inp), &naive, 1e-14);
    let mut dinp = vec![0.0; n];
    gelu::gelu_backward(&mut dinp, &inp, &dout, n);
    let fd = fd_grad(&inp, |x| dot(&fwd(x), &dout));
    assert_close("gelu dinp", &dinp, &fd, FD_TOL);
    let mut overwritten = randn(n, &mut rng);
    gelu::gelu_backward(&mut overwritten, &inp, &dout, n);
    assert_overwrites("gelu dinp", &dinp, &overwritten);

    let be = CpuBackend;
    let mut o32 = vec![f32::NAN; n];
    be.gelu_forward(&mut o32, &to32(&inp), n).unwrap();
    assert_close("gelu out (f32)", &to64(&o32), &naive, F32_TOL);
    let mut g32 = vec![0.0f32; n];
    be.gelu_backward(&mut g32, &to32(&inp), &to32(&dout), n)
        .unwrap();
    assert_close("gelu dinp (f32)", &to64(&g32), &fd, F32_TOL);
}

/// The MLP's fused pair: `matmul_gelu_forward` equals the matmul then the GELU, and
/// `matmul_gelu_backward` is the gradient of `gelu(pre) @ W^T + b` (finite differences in
/// f64): `dpre` overwritten, `dweight` and `dbias` accumulated.
#[test]
fn matmul_gelu_matches_finite_differences() {
    let mut rng = Rng::new(21);
    let pre: Vec<f64> = randn(N * C, &mut rng).iter().map(|x| 2.0 * x).collect();
    let weight = randn(OC * C, &mut rng);
    let bias = randn(OC, &mut rng);
    let dout = randn(N * OC, &mut rng);
    let gelu_of = |x: &[f64]| {
        let mut out = vec![0.0; N * C];
        gelu::gelu_forward(&mut out, x, N * C);
        out
    };
    let loss = |x: &[f64], w: &[f64], b: &[f64]| {
        let mut out = vec![0.0; N * OC];
        matmul::matmul_forward(&mut out, &gelu_of(x), w, Some(b), N, C, OC);
        dot(&out, &dout)
    };
    let fd_pre = fd_grad(&pre, |x| loss(x, &weight, &bias));
    let fd_w = fd_grad(&weight, |w| loss(&pre, w, &bias));
    let fd_b = fd_grad(&bias, |b| loss(&pre, &weight, b));

    let be = CpuBackend;
    let (pre32, w32) = (to32(&pre), to32(&weight));
    // Forward: the pair's two outputs against the two ops run apart.
    let (mut out, mut kept) = (vec![f32::NAN; N * C], vec![f32::NAN; N * C]);
    let eye: Vec<f32> = (0..C * C).map(|k| f32::from(k / C == k % C)).collect();
    be.matmul_gelu_forward(&mut out, &mut kept, &pre32, &eye, None, N, C, C)
        .unwrap();
    assert_close("matmul_gelu pre", &to64(&kept), &pre, F32_TOL);
    assert_close("matmul_gelu out", &to64(&out), &gelu_of(&pre), F32_TOL);

    let inp32 = to32(&gelu_of(&pre));
    let mut dpre = randn(N * C, &mut rng)
        .iter()
        .map(|&x| x as f32)
        .collect::<Vec<_>>();
    let (p_w, p_b) = (randn(OC * C, &mut rng), randn(OC, &mut rng));
    let (mut gw, mut gb) = (to32(&p_w), to32(&p_b));
    be.matmul_gelu_backward(
        &mut dpre,
        Some(&mut gw),
        Some(&mut gb),
        &to32(&dout),
        &inp32,
        &w32,
        &pre32,
        N,
        C,
        OC,
    )
    .unwrap();
    assert_close("matmul_gelu dpre", &to64(&dpre), &fd_pre, F32_TOL);
    let sub = |a: &[f32], p: &[f64]| -> Vec<f64> {
        a.iter().zip(p).map(|(&a, p)| a as f64 - p).collect()
    };
    assert_close(
        "matmul_gelu dweight (accumulated)",
        &sub(&gw, &p_w),
        &fd_w,
        F32_TOL,
    );
    assert_close(
        "matmul_gelu dbias (accumulated)",
        &sub(&gb, &p_b),
        &fd_b,
        F32_TOL,
    );
    // A wrong `pre` length is refused.
    let short = vec![0.0f32; N * C - 1];
    match be.matmul_gelu_backward(
        &mut dpre,
        Some(&mut gw),
        None,
        &to32(&dout),
        &inp32,
        &w32,
        &short,
        N,
        C,
        OC,
    ) {
        Err(BackendError::Shape { op, what, .. }) => {
            assert_eq!((op, what), ("matmul_gelu_backward", "pre"))
        }
        other => panic!("short pre: {other:?}"),
    }
}

#[test]
fn residual_forward_adds() {
    let be = CpuBackend;
    let mut out = vec![f32::NAN; 3];
    be.residual_forward(&mut out, &vec![1.0, 2.0, 3.0], &vec![0.5, -2.0, 4.0], 3)
        .unwrap();
    assert_eq!(out, vec![1.5, 0.0, 7.0]);
}
