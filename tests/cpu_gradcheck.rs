//! CPU reference backend: every backward against central finite differences in f64, forward
//! sanity against naive computations, AdamW and global norm against hand computations,
//! accumulate (parameter gradients, the residual stream) and overwrite (other activation
//! gradients) semantics, thread-count determinism, and shape errors.
//!
//! The kernel families are generic over the float type: finite differences run the f64
//! instantiation; the f32 `CpuBackend` is then checked against the same f64 references.

use topcoat::backend::cpu::CpuBackend;
use topcoat::backend::cpu::{adamw, attention, cross_entropy, encoder, gelu, layernorm, matmul};
use topcoat::backend::{AdamWStep, Backend, BackendError, LossGrad};
use topcoat::rng::Rng;

/// f64 analytic gradient vs f64 central differences: `||a - fd|| / ||fd||`.
const FD_TOL: f64 = 1e-7;
/// Step of the central differences.
const FD_H: f64 = 1e-5;
/// f32 backend vs f64 reference, relative error.
const F32_TOL: f64 = 1e-5;
/// f64 accumulate check: `backward(prefilled) - prefilled` vs `backward(zeros)`.
const ACC_TOL: f64 = 1e-12;

// Small odd shapes.
const B: usize = 2;
const T: usize = 5;
const TMAX: usize = 7;
const C: usize = 12;
const NH: usize = 3;
const OC: usize = 7;
const V: usize = 11;
const VP: usize = 16;
const N: usize = B * T;

/// Random normal values that are exactly representable in f32, so f32 and f64 see one input.
fn randn(len: usize, rng: &mut Rng) -> Vec<f64> {
    (0..len).map(|_| rng.normal() as f64).collect()
}

fn to32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

fn to64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn norm(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum::<f64>().sqrt()
}

/// `||a - b|| / ||b||`.
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let diff: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    norm(&diff) / norm(b).max(1e-300)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Central differences of the scalar `loss` with respect to every element of `x`.
fn fd_grad(x: &[f64], loss: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            xp[i] = x[i] + FD_H;
            let up = loss(&xp);
            xp[i] = x[i] - FD_H;
            let down = loss(&xp);
            xp[i] = x[i];
            (up - down) / (2.0 * FD_H)
        })
        .collect()
}

fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
    assert!(
        norm(want) > 0.0,
        "{what}: reference gradient is zero, test is vacuous"
    );
}

/// `prefill + fresh` vs the result of accumulating onto `prefill`.
fn assert_accumulates(what: &str, prefill: &[f64], fresh: &[f64], accumulated: &[f64]) {
    let expect: Vec<f64> = prefill.iter().zip(fresh).map(|(p, g)| p + g).collect();
    let e = rel_err(accumulated, &expect);
    assert!(
        e <= ACC_TOL,
        "{what}: does not accumulate (rel err {e:.3e})"
    );
}

/// An activation gradient computed into a buffer pre-filled with random values must equal the
/// one computed into zeros (the op overwrites it).
fn assert_overwrites(what: &str, fresh: &[f64], from_prefilled: &[f64]) {
    let e = rel_err(from_prefilled, fresh);
    assert!(e <= ACC_TOL, "{what}: does not overwrite (rel err {e:.3e})");
}

fn random_ids(len: usize, below: usize, rng: &mut Rng) -> Vec<i32> {
    (0..len).map(|_| rng.below(below as u64) as i32).collect()
}

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
        &mut gw,
        &mut gb,
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
        &mut dw,
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
        &mut a_w,
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
        &mut gw,
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
    be.matmul_backward(&mut gi2, &mut gw2, None, &to32(&dout), &x32, &w32, N, C, OC)
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
        &mut gw,
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
        &mut gw,
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

// ---- attention -----------------------------------------------------------------------------

/// Full-matrix causal attention in f64: returns (out [B*T*C], lse [B*NH*T]).
fn naive_attention(qkv: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let hs = C / NH;
    let scale = 1.0 / (hs as f64).sqrt();
    let mut out = vec![0.0; N * C];
    let mut lse = vec![0.0; B * NH * T];
    for b in 0..B {
        for h in 0..NH {
            let at =
                |t: usize, part: usize, d: usize| qkv[(b * T + t) * 3 * C + part * C + h * hs + d];
            // Full T x T score matrix with the causal mask as -inf.
            let mut s = vec![vec![f64::NEG_INFINITY; T]; T];
            for i in 0..T {
                for (j, sij) in s[i][..=i].iter_mut().enumerate() {
                    *sij = (0..hs).map(|d| at(i, 0, d) * at(j, 1, d)).sum::<f64>() * scale;
                }
                let z: f64 = s[i].iter().map(|x| x.exp()).sum();
                lse[(b * NH + h) * T + i] = z.ln();
                for d in 0..hs {
                    out[(b * T + i) * C + h * hs + d] =
                        (0..T).map(|j| s[i][j].exp() / z * at(j, 2, d)).sum();
                }
            }
        }
    }
    (out, lse)
}

#[test]
fn attention_forward_matches_naive_softmax() {
    let mut rng = Rng::new(15);
    let qkv = randn(N * 3 * C, &mut rng);
    let (want_out, want_lse) = naive_attention(&qkv);
    let (mut out, mut lse) = (vec![0.0; N * C], vec![0.0; B * NH * T]);
    attention::attention_forward(&mut out, &mut lse, &qkv, None, B, T, C, NH);
    assert_close("attention out (f64)", &out, &want_out, 1e-12);
    assert_close("attention lse (f64)", &lse, &want_lse, 1e-12);

    let be = CpuBackend;
    let (mut o32, mut l32) = (vec![f32::NAN; N * C], vec![f32::NAN; B * NH * T]);
    be.attention_forward(&mut o32, &mut l32, &to32(&qkv), None, B, T, C, NH)
        .unwrap();
    assert_close("attention out (f32)", &to64(&o32), &want_out, F32_TOL);
    assert_close("attention lse (f32)", &to64(&l32), &want_lse, F32_TOL);
}

/// Attention backward vs finite differences and the f32 backend, plain causal or packed.
fn check_attention(starts: Option<&Vec<i32>>, seed: u64) {
    let mut rng = Rng::new(seed);
    let qkv = randn(N * 3 * C, &mut rng);
    let dout = randn(N * C, &mut rng);
    let st = starts.map(Vec::as_slice);
    let fwd = |qkv: &[f64]| {
        let (mut out, mut lse) = (vec![0.0; N * C], vec![0.0; B * NH * T]);
        attention::attention_forward(&mut out, &mut lse, qkv, st, B, T, C, NH);
        (out, lse)
    };
    let (out, lse) = fwd(&qkv);
    let mut dqkv = vec![0.0; N * 3 * C];
    attention::attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, st, B, T, C, NH);
    let fd = fd_grad(&qkv, |x| dot(&fwd(x).0, &dout));
    assert_close("attention dqkv", &dqkv, &fd, FD_TOL);
    // dq, dk and dv each checked on their own as well.
    for (part, name) in ["dq", "dk", "dv"].iter().enumerate() {
        let pick = |g: &[f64]| -> Vec<f64> {
            g.chunks(3 * C)
                .flat_map(|row| row[part * C..][..C].to_vec())
                .collect()
        };
        assert_close(name, &pick(&dqkv), &pick(&fd), FD_TOL);
    }

    let mut overwritten = randn(N * 3 * C, &mut rng);
    attention::attention_backward(&mut overwritten, &dout, &qkv, &out, &lse, st, B, T, C, NH);
    assert_overwrites("attention dqkv", &dqkv, &overwritten);

    let be = CpuBackend;
    let qkv32 = to32(&qkv);
    let (mut o32, mut l32) = (vec![f32::NAN; N * C], vec![f32::NAN; B * NH * T]);
    be.attention_forward(&mut o32, &mut l32, &qkv32, starts, B, T, C, NH)
        .unwrap();
    let mut g32 = vec![0.0f32; N * 3 * C];
    be.attention_backward(
        &mut g32,
        &to32(&dout),
        &qkv32,
        &o32,
        &l32,
        starts,
        B,
        T,
        C,
        NH,
    )
    .unwrap();
    assert_close("attention dqkv (f32)", &to64(&g32), &fd, F32_TOL);
}

#[test]
fn attention_backward_matches_finite_differences() {
    check_attention(None, 16);
}

/// Row 0 packs examples [0, 2) and [2, 5); row 1 packs [0, 1), [1, 3), [3, 4) and [4, 5).
const PACKED_STARTS: [i32; N] = [0, 0, 2, 2, 2, 0, 1, 1, 3, 4];

#[test]
fn packed_attention_matches_finite_differences() {
    check_attention(Some(&PACKED_STARTS.to_vec()), 17);
}

#[test]
fn packed_attention_equals_each_example_run_alone() {
    let mut rng = Rng::new(18);
    let qkv = to32(&randn(N * 3 * C, &mut rng));
    let starts = PACKED_STARTS.to_vec();
    let be = CpuBackend;
    let (mut out, mut lse) = (vec![f32::NAN; N * C], vec![f32::NAN; B * NH * T]);
    be.attention_forward(&mut out, &mut lse, &qkv, Some(&starts), B, T, C, NH)
        .unwrap();
    // Every example, cut out of its row and run as a batch of one with plain causal attention.
    let segments = [
        (0, 0, 2),
        (0, 2, 5),
        (1, 0, 1),
        (1, 1, 3),
        (1, 3, 4),
        (1, 4, 5),
    ];
    for (bb, s0, s1) in segments {
        let len = s1 - s0;
        let rows = (bb * T + s0)..(bb * T + s1);
        let sub = qkv[rows.start * 3 * C..rows.end * 3 * C].to_vec();
        let (mut o, mut l) = (vec![f32::NAN; len * C], vec![f32::NAN; NH * len]);
        be.attention_forward(&mut o, &mut l, &sub, None, 1, len, C, NH)
            .unwrap();
        let got = &out[rows.start * C..rows.end * C];
        let diff = got
            .iter()
            .zip(&o)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            diff <= 1e-6,
            "example {bb}:[{s0}, {s1}): out differs by {diff}"
        );
        for h in 0..NH {
            for i in 0..len {
                let (a, b) = (lse[(bb * NH + h) * T + s0 + i], l[h * len + i]);
                assert!(
                    (a - b).abs() <= 1e-5,
                    "lse of example {bb}:[{s0}, {s1}) row {i}"
                );
            }
        }
    }

    // Starts that do not cut the row into contiguous examples are Invalid errors naming the entry.
    for (k, bad) in [(0, 1), (3, 1), (4, -1), (6, 2), (9, 2)] {
        let mut st = starts.clone();
        st[k] = bad;
        match be.attention_forward(&mut out, &mut lse, &qkv, Some(&st), B, T, C, NH) {
            Err(BackendError::Invalid { msg, .. }) => {
                assert!(msg.contains(&format!("starts[{k}] = {bad}")), "{msg}")
            }
            other => panic!("starts[{k}] = {bad}: expected Invalid, got {other:?}"),
        }
    }
    let mut dqkv = vec![0.0f32; N * 3 * C];
    let r = be.attention_backward(
        &mut dqkv,
        &out,
        &qkv,
        &out,
        &lse,
        Some(&vec![0; N + 1]),
        B,
        T,
        C,
        NH,
    );
    assert_shape_err(r, "starts");
}

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

// ---- determinism ---------------------------------------------------------------------------

/// Runs a forward + backward of every family in a pool of `threads` threads; returns all outputs.
fn run_all_ops(threads: usize) -> Vec<Vec<f32>> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let be = CpuBackend;
        let mut rng = Rng::new(99);
        let (b, t, c, nh, oc, v) = (2usize, 64usize, 96usize, 4usize, 160usize, 300usize);
        let n = b * t;
        let r = |len: usize, rng: &mut Rng| to32(&randn(len, rng));
        let ids = random_ids(n, v, &mut rng);
        let (wte, wpe) = (r(v * c, &mut rng), r(t * c, &mut rng));
        let mut x = vec![0.0; n * c];
        be.encoder_forward(&mut x, &ids, None, &wte, &wpe, b, t, c)
            .unwrap();
        let (mut dwte, mut dwpe) = (vec![0.0; v * c], vec![0.0; t * c]);
        let dx = r(n * c, &mut rng);
        be.encoder_backward(&mut dwte, &mut dwpe, &dx, &ids, None, b, t, c)
            .unwrap();
        // Explicit positions (restarting every 7 tokens) sum dwpe rows by position.
        let pos: Vec<i32> = (0..n).map(|i| (i % t % 7) as i32).collect();
        let mut dwpe_pos = vec![0.0; t * c];
        be.encoder_backward(&mut dwte, &mut dwpe_pos, &dx, &ids, Some(&pos), b, t, c)
            .unwrap();
        let (lw, lb) = (r(c, &mut rng), r(c, &mut rng));
        let (mut ln, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        be.layernorm_forward(&mut ln, &mut mean, &mut rstd, &x, &lw, &lb, n, c)
            .unwrap();
        let (mut dln, mut dlw, mut dlb) = (vec![0.0; n * c], vec![0.0; c], vec![0.0; c]);
        be.layernorm_backward(
            &mut dln, &mut dlw, &mut dlb, &dx, &x, &lw, &mean, &rstd, n, c,
        )
        .unwrap();
        let (w, bias) = (r(3 * c * c, &mut rng), r(3 * c, &mut rng));
        let mut qkv = vec![0.0; n * 3 * c];
        be.matmul_forward(&mut qkv, &ln, &w, Some(&bias), n, c, 3 * c)
            .unwrap();
        let (mut att, mut lse) = (vec![0.0; n * c], vec![0.0; b * nh * t]);
        be.attention_forward(&mut att, &mut lse, &qkv, None, b, t, c, nh)
            .unwrap();
        let mut dqkv = vec![0.0; n * 3 * c];
        be.attention_backward(&mut dqkv, &dx, &qkv, &att, &lse, None, b, t, c, nh)
            .unwrap();
        // Packed rows: examples of 20 tokens.
        let starts: Vec<i32> = (0..n).map(|i| (i % t - i % t % 20) as i32).collect();
        let (mut att_p, mut lse_p) = (vec![0.0; n * c], vec![0.0; b * nh * t]);
        be.attention_forward(&mut att_p, &mut lse_p, &qkv, Some(&starts), b, t, c, nh)
            .unwrap();
        let mut dqkv_p = vec![0.0; n * 3 * c];
        be.attention_backward(
            &mut dqkv_p,
            &dx,
            &qkv,
            &att_p,
            &lse_p,
            Some(&starts),
            b,
            t,
            c,
            nh,
        )
        .unwrap();
        let (mut dmi, mut dmw, mut dmb) =
            (vec![0.0; n * c], vec![0.0; 3 * c * c], vec![0.0; 3 * c]);
        be.matmul_backward(
            &mut dmi,
            &mut dmw,
            Some(&mut dmb),
            &dqkv,
            &ln,
            &w,
            n,
            c,
            3 * c,
        )
        .unwrap();
        let mut logits = r(n * oc, &mut rng);
        let mut losses = vec![0.0; n];
        let targets = random_ids(n, oc - 3, &mut rng);
        be.cross_entropy(
            &mut losses,
            &mut logits,
            &targets,
            n,
            oc - 3,
            oc,
            LossGrad::Uniform(0.01),
        )
        .unwrap();
        let norm = be.global_norm(&[&dmw, &dqkv, &dwte]).unwrap();
        vec![
            x,
            dwte,
            dwpe,
            dwpe_pos,
            ln,
            mean,
            rstd,
            dln,
            dlw,
            dlb,
            qkv,
            att,
            lse,
            dqkv,
            att_p,
            lse_p,
            dqkv_p,
            dmi,
            dmw,
            dmb,
            losses,
            logits,
            vec![norm],
        ]
    })
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let one = run_all_ops(1);
    let three = run_all_ops(3);
    for (i, (a, b)) in one.iter().zip(&three).enumerate() {
        let same = a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "output #{i} differs between 1 and 3 threads");
    }
}

// ---- shape errors --------------------------------------------------------------------------

fn assert_shape_err(r: Result<(), BackendError>, want_what: &str) {
    match r {
        Err(BackendError::Shape { what, .. }) if what == want_what => {}
        other => panic!("expected a Shape error on `{want_what}`, got {other:?}"),
    }
}

#[test]
fn wrong_lengths_are_shape_errors() {
    let be = CpuBackend;
    let z = |len: usize| vec![0.1f32; len];
    let ids = vec![0i32; N];
    assert_shape_err(
        be.encoder_forward(
            &mut z(N * C - 1),
            &ids,
            None,
            &z(V * C),
            &z(TMAX * C),
            B,
            T,
            C,
        ),
        "out",
    );
    // wpe shorter than T rows.
    assert_shape_err(
        be.encoder_backward(
            &mut z(V * C),
            &mut z((T - 1) * C),
            &z(N * C),
            &ids,
            None,
            B,
            T,
            C,
        ),
        "dwpe",
    );
    assert_shape_err(
        be.layernorm_forward(
            &mut z(N * C),
            &mut z(N + 1),
            &mut z(N),
            &z(N * C),
            &z(C),
            &z(C),
            N,
            C,
        ),
        "mean",
    );
    assert_shape_err(
        be.layernorm_backward(
            &mut z(N * C),
            &mut z(C),
            &mut z(C - 1),
            &z(N * C),
            &z(N * C),
            &z(C),
            &z(N),
            &z(N),
            N,
            C,
        ),
        "dbias",
    );
    assert_shape_err(be.gelu_forward(&mut z(5), &z(4), 5), "inp");
    assert_shape_err(be.gelu_backward(&mut z(5), &z(5), &z(6), 5), "dout");
    assert_shape_err(be.residual_forward(&mut z(5), &z(5), &z(3), 5), "b");
    assert_shape_err(
        be.matmul_forward(&mut z(N * OC), &z(N * C), &z(OC * C + 1), None, N, C, OC),
        "weight",
    );
    assert_shape_err(
        be.matmul_forward(
            &mut z(N * OC),
            &z(N * C),
            &z(OC * C),
            Some(&z(OC - 1)),
            N,
            C,
            OC,
        ),
        "bias",
    );
    assert_shape_err(
        be.matmul_backward(
            &mut z(N * C),
            &mut z(OC * C),
            Some(&mut z(OC)),
            &z(N * C),
            &z(N * C),
            &z(OC * C),
            N,
            C,
            OC,
        ),
        "dout",
    );
    assert_shape_err(
        be.attention_forward(
            &mut z(N * C),
            &mut z(B * NH * T),
            &z(N * C),
            None,
            B,
            T,
            C,
            NH,
        ),
        "qkv",
    );
    assert_shape_err(
        be.attention_backward(
            &mut z(N * 3 * C),
            &z(N * C),
            &z(N * 3 * C),
            &z(N * C),
            &z(B * T),
            None,
            B,
            T,
            C,
            NH,
        ),
        "lse",
    );
    assert_shape_err(
        be.cross_entropy(
            &mut z(N),
            &mut z(N * V),
            &vec![0; N],
            N,
            V,
            VP,
            LossGrad::None,
        ),
        "logits",
    );
    assert_shape_err(
        be.cross_entropy(
            &mut z(N),
            &mut z(N * VP),
            &vec![0; N - 1],
            N,
            V,
            VP,
            LossGrad::None,
        ),
        "targets",
    );
    let hp = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 1,
        grad_scale: 1.0,
    };
    assert_shape_err(
        be.adamw(&mut z(10), &z(10), &mut z(9), &mut z(10), &hp),
        "m",
    );
    assert_shape_err(be.write(&mut z(3), &[1.0, 2.0]), "host");
    assert!(matches!(
        be.download_range(&z(3), 2, 2),
        Err(BackendError::Shape { .. })
    ));
}

#[test]
fn bad_ids_and_targets_are_invalid_errors_naming_the_row() {
    let be = CpuBackend;
    let mut targets = vec![0i32; N];
    targets[6] = V as i32; // first id past the real vocabulary
    let mut logits = vec![0.5f32; N * VP];
    let before = logits.clone();
    match be.cross_entropy(
        &mut vec![0.0; N],
        &mut logits,
        &targets,
        N,
        V,
        VP,
        LossGrad::Uniform(1.0),
    ) {
        Err(BackendError::Invalid { msg, .. }) => {
            assert!(
                msg.contains("row 6") && msg.contains(&V.to_string()),
                "{msg}"
            );
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert_eq!(logits, before, "nothing is written on error");

    let mut ids = vec![0i32; N];
    ids[2] = V as i32;
    let r = be.encoder_forward(
        &mut vec![0.0; N * C],
        &ids,
        None,
        &vec![0.0; V * C],
        &vec![0.0; T * C],
        B,
        T,
        C,
    );
    assert!(matches!(r, Err(BackendError::Invalid { .. })), "{r:?}");
    let r = be.attention_forward(
        &mut vec![0.0; N * C],
        &mut vec![0.0; B * 5 * T],
        &vec![0.0; N * 3 * C],
        None,
        B,
        T,
        C,
        5,
    );
    assert!(matches!(r, Err(BackendError::Invalid { .. })), "{r:?}");
}
