//! The Llama family's own ops: RMSNorm (alone and after the residual add), rotary position
//! embedding, SwiGLU and the token embedding. Forwards against direct formulas, backwards
//! against finite differences in f64, accumulate and overwrite semantics, the f32 backend
//! against the f64 reference, and each op's shape errors.

use super::*;
use topcoat::backend::cpu::{embedding, rmsnorm, rope, swiglu};
use topcoat::config::{LlamaShape, RopeScaling};

// ---- RMSNorm -------------------------------------------------------------------------------

/// Large enough that it moves the rstd of the small row below by a quarter (finite
/// differences on still smaller rows would lose their accuracy).
const EPS: f32 = 1e-2;

#[test]
fn rmsnorm_backward_matches_finite_differences() {
    let mut rng = Rng::new(41);
    let mut inp: Vec<f64> = randn(N * C, &mut rng)
        .iter()
        .map(|x| 2.0 * x + 0.5)
        .collect();
    // One row small enough that eps moves its rstd noticeably.
    inp[3 * C..4 * C].iter_mut().for_each(|x| *x *= 0.1);
    let weight = randn(C, &mut rng);
    let dout = randn(N * C, &mut rng);
    let fwd = |inp: &[f64], w: &[f64]| {
        let (mut out, mut rstd) = (vec![0.0; N * C], vec![0.0; N]);
        rmsnorm::rmsnorm_forward(&mut out, &mut rstd, inp, w, N, C, EPS);
        (out, rstd)
    };
    let (out, rstd) = fwd(&inp, &weight);

    // Forward against the formula.
    let mut naive = vec![0.0; N * C];
    for i in 0..N {
        let x = &inp[i * C..][..C];
        let ms = x.iter().map(|v| v * v).sum::<f64>() / C as f64;
        let r = 1.0 / (ms + EPS as f64).sqrt();
        assert!((rstd[i] - r).abs() <= 1e-12 * r, "rstd[{i}]");
        for j in 0..C {
            naive[i * C + j] = x[j] * r * weight[j];
        }
    }
    assert_close("rmsnorm out", &out, &naive, 1e-12);

    let (mut dinp, mut dw) = (vec![0.0; N * C], vec![0.0; C]);
    rmsnorm::rmsnorm_backward(&mut dinp, &mut dw, &dout, &inp, &weight, &rstd, N, C);
    let fd_inp = fd_grad(&inp, |x| dot(&fwd(x, &weight).0, &dout));
    let fd_w = fd_grad(&weight, |w| dot(&fwd(&inp, w).0, &dout));
    assert_close("rmsnorm dinp", &dinp, &fd_inp, FD_TOL);
    assert_close("rmsnorm dweight", &dw, &fd_w, FD_TOL);
    // The small row's gradient on its own (eps matters there).
    let row = 3 * C..4 * C;
    let small = "rmsnorm dinp, small row";
    assert_close(small, &dinp[row.clone()], &fd_inp[row], FD_TOL);

    // Both gradients accumulate.
    let (p_inp, p_w) = (randn(N * C, &mut rng), randn(C, &mut rng));
    let (mut a_inp, mut a_w) = (p_inp.clone(), p_w.clone());
    rmsnorm::rmsnorm_backward(&mut a_inp, &mut a_w, &dout, &inp, &weight, &rstd, N, C);
    assert_accumulates("rmsnorm dinp", &p_inp, &dinp, &a_inp);
    assert_accumulates("rmsnorm dweight", &p_w, &dw, &a_w);

    // The f32 backend.
    let be = CpuBackend;
    let (inp32, w32) = (to32(&inp), to32(&weight));
    let (mut o32, mut r32) = (vec![f32::NAN; N * C], vec![f32::NAN; N]);
    be.rmsnorm_forward(&mut o32, &mut r32, &inp32, &w32, N, C, EPS)
        .unwrap();
    assert_close("rmsnorm out (f32)", &to64(&o32), &out, F32_TOL);
    assert_close("rmsnorm rstd (f32)", &to64(&r32), &rstd, F32_TOL);
    let (mut gi, mut gw) = (vec![0.0f32; N * C], vec![0.0f32; C]);
    be.rmsnorm_backward(
        &mut gi,
        Some(&mut gw),
        &to32(&dout),
        &inp32,
        &w32,
        &r32,
        N,
        C,
    )
    .unwrap();
    assert_close("rmsnorm dinp (f32)", &to64(&gi), &fd_inp, F32_TOL);
    assert_close("rmsnorm dweight (f32)", &to64(&gw), &fd_w, F32_TOL);
}

#[test]
fn residual_rmsnorm_equals_the_add_then_the_norm() {
    let mut rng = Rng::new(42);
    let (a, b, w) = (
        to32(&randn(N * C, &mut rng)),
        to32(&randn(N * C, &mut rng)),
        to32(&randn(C, &mut rng)),
    );
    let be = CpuBackend;
    let (mut res, mut out, mut rstd) = (vec![f32::NAN; N * C], vec![0.0; N * C], vec![0.0; N]);
    be.residual_rmsnorm_forward(&mut res, &mut out, &mut rstd, &a, &b, &w, N, C, EPS)
        .unwrap();
    let mut res2 = vec![f32::NAN; N * C];
    be.residual_forward(&mut res2, &a, &b, N * C).unwrap();
    let (mut out2, mut rstd2) = (vec![f32::NAN; N * C], vec![f32::NAN; N]);
    be.rmsnorm_forward(&mut out2, &mut rstd2, &res2, &w, N, C, EPS)
        .unwrap();
    assert_eq!(res, res2, "residual");
    assert_eq!(out, out2, "out");
    assert_eq!(rstd, rstd2, "rstd");
}

// ---- RoPE ----------------------------------------------------------------------------------

/// Heads of the RoPE tests: 4 query heads over 2 key/value heads of 8.
const R_NH: usize = 4;
const R_NKV: usize = 2;
const R_HS: usize = 8;
const R_W: usize = (R_NH + 2 * R_NKV) * R_HS;

/// Llama 3's scaling with theta 500000 at hs = 8: wavelengths 6.3, 167, 4443 and 118000 fall
/// in the kept, kept, blended and divided bands.
fn llama3_inv_freq() -> Vec<f32> {
    let mut shape = LlamaShape::new(R_NKV, 16);
    shape.rope_theta = 500_000.0;
    shape.rope_scaling = Some(RopeScaling {
        factor: 32.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    });
    let scaled = shape.rope_inv_freq(R_HS);
    shape.rope_scaling = None;
    let plain = shape.rope_inv_freq(R_HS);
    assert_eq!(scaled[..2], plain[..2], "short wavelengths are kept");
    assert!(
        scaled[2] < plain[2] && scaled[2] > plain[2] / 32.0,
        "blended"
    );
    assert_eq!(scaled[3], plain[3] / 32.0, "long wavelengths are divided");
    scaled
}

/// Rotate-half RoPE written out index by index: angle `p * f` and its cosine and sine in f32,
/// the rotation in f64; value heads copied.
fn naive_rope(qkv: &[f64], f: &[f32], positions: &[usize]) -> Vec<f64> {
    let half = R_HS / 2;
    let mut out = qkv.to_vec();
    for (r, &p) in positions.iter().enumerate() {
        for head in 0..R_NH + R_NKV {
            for (i, &fi) in f[..half].iter().enumerate() {
                let a = p as f32 * fi;
                let (cos, sin) = (a.cos() as f64, a.sin() as f64);
                let lo = r * R_W + head * R_HS + i;
                let hi = lo + half;
                out[lo] = qkv[lo] * cos - qkv[hi] * sin;
                out[hi] = qkv[hi] * cos + qkv[lo] * sin;
            }
        }
    }
    out
}

#[test]
fn rope_forward_matches_the_rotate_half_formula_with_llama3_frequencies() {
    let mut rng = Rng::new(43);
    let f = llama3_inv_freq();
    let qkv = randn(N * R_W, &mut rng);
    // Packed positions (restarting inside a row) reaching into the blended band's wavelengths.
    let pos: Vec<i32> = vec![0, 1, 2, 0, 4999, 3, 700, 8191, 1, 2];
    let positions: Vec<usize> = pos.iter().map(|&p| p as usize).collect();
    let want = naive_rope(&qkv, &f, &positions);
    let mut got = qkv.clone();
    rope::rope_forward(&mut got, &f, Some(&pos), 0, B, T, R_NH, R_NKV, R_HS);
    assert_close("rope (f64)", &got, &want, 1e-15);
    // Value heads are untouched.
    for r in 0..N {
        let v = r * R_W + (R_NH + R_NKV) * R_HS..(r + 1) * R_W;
        assert_eq!(got[v.clone()], qkv[v], "value heads of row {r}");
    }

    let be = CpuBackend;
    let mut g32 = to32(&qkv);
    be.rope_forward(&mut g32, &f, Some(&pos), 0, B, T, R_NH, R_NKV, R_HS)
        .unwrap();
    assert_close("rope (f32)", &to64(&g32), &want, F32_TOL);

    // Without positions: t, for every row.
    let plain: Vec<usize> = (0..N).map(|i| i % T).collect();
    let mut got = qkv.clone();
    rope::rope_forward(&mut got, &f, None, 0, B, T, R_NH, R_NKV, R_HS);
    assert_close(
        "rope, implicit positions",
        &got,
        &naive_rope(&qkv, &f, &plain),
        1e-15,
    );
}

#[test]
fn rope_with_past_equals_explicit_positions() {
    let mut rng = Rng::new(44);
    let f = llama3_inv_freq();
    let qkv = to32(&randn(N * R_W, &mut rng));
    let be = CpuBackend;
    for past in [0usize, 3, 1000] {
        let pos: Vec<i32> = (0..N).map(|i| (past + i % T) as i32).collect();
        let (mut a, mut b) = (qkv.clone(), qkv.clone());
        be.rope_forward(&mut a, &f, None, past, B, T, R_NH, R_NKV, R_HS)
            .unwrap();
        be.rope_forward(&mut b, &f, Some(&pos), 0, B, T, R_NH, R_NKV, R_HS)
            .unwrap();
        assert_eq!(a, b, "past = {past}");
        assert_ne!(a, qkv, "past = {past}: nothing rotated");
    }
}

/// RoPE backward vs finite differences of `dot(rope(qkv), dout)`, and the f32 backend.
fn check_rope(pos: Option<&Vec<i32>>, seed: u64) {
    let mut rng = Rng::new(seed);
    let f = llama3_inv_freq();
    let qkv = randn(N * R_W, &mut rng);
    let dout = randn(N * R_W, &mut rng);
    let p = pos.map(Vec::as_slice);
    let loss = |x: &[f64]| {
        let mut y = x.to_vec();
        rope::rope_forward(&mut y, &f, p, 0, B, T, R_NH, R_NKV, R_HS);
        dot(&y, &dout)
    };
    let mut grad = dout.clone();
    rope::rope_backward(&mut grad, &f, p, B, T, R_NH, R_NKV, R_HS);
    let fd = fd_grad(&qkv, loss);
    assert_close("rope dqkv", &grad, &fd, FD_TOL);
    assert_ne!(grad, dout, "the gradient was not rotated");

    let mut g32 = to32(&dout);
    CpuBackend
        .rope_backward(&mut g32, &f, pos, B, T, R_NH, R_NKV, R_HS)
        .unwrap();
    assert_close("rope dqkv (f32)", &to64(&g32), &fd, F32_TOL);
}

#[test]
fn rope_backward_matches_finite_differences() {
    check_rope(None, 45);
    check_rope(Some(&vec![0, 1, 2, 0, 1, 0, 1, 2, 3, 2900]), 46);
}

// ---- SwiGLU --------------------------------------------------------------------------------

#[test]
fn swiglu_backward_matches_finite_differences() {
    const I: usize = OC;
    let mut rng = Rng::new(47);
    // Gates from -6 to 6 and beyond reach both tails of the sigmoid.
    let gate_up: Vec<f64> = randn(N * 2 * I, &mut rng).iter().map(|x| 3.0 * x).collect();
    let dout = randn(N * I, &mut rng);
    let fwd = |gu: &[f64]| {
        let mut out = vec![0.0; N * I];
        swiglu::swiglu_forward(&mut out, gu, N, I);
        out
    };
    let out = fwd(&gate_up);
    let mut naive = vec![0.0; N * I];
    for r in 0..N {
        for j in 0..I {
            let (g, u) = (gate_up[r * 2 * I + j], gate_up[r * 2 * I + I + j]);
            naive[r * I + j] = g / (1.0 + (-g).exp()) * u;
        }
    }
    assert_close("swiglu out", &out, &naive, 1e-14);

    let mut grad = vec![0.0; N * 2 * I];
    swiglu::swiglu_backward(&mut grad, &dout, &gate_up, N, I);
    let fd = fd_grad(&gate_up, |gu| dot(&fwd(gu), &dout));
    assert_close("swiglu dgate_up", &grad, &fd, FD_TOL);
    let mut overwritten = randn(N * 2 * I, &mut rng);
    swiglu::swiglu_backward(&mut overwritten, &dout, &gate_up, N, I);
    assert_overwrites("swiglu dgate_up", &grad, &overwritten);

    let be = CpuBackend;
    let gu32 = to32(&gate_up);
    let mut o32 = vec![f32::NAN; N * I];
    be.swiglu_forward(&mut o32, &gu32, N, I).unwrap();
    assert_close("swiglu out (f32)", &to64(&o32), &naive, F32_TOL);
    let mut g32 = vec![f32::NAN; N * 2 * I];
    be.swiglu_backward(&mut g32, &to32(&dout), &gu32, N, I)
        .unwrap();
    assert_close("swiglu dgate_up (f32)", &to64(&g32), &fd, F32_TOL);
}

// ---- token embedding -----------------------------------------------------------------------

#[test]
fn embedding_backward_matches_finite_differences() {
    let mut rng = Rng::new(48);
    let wte = randn(V * C, &mut rng);
    let mut ids = random_ids(N, V, &mut rng);
    ids[2] = ids[8]; // a repeated id sums two positions
    let dout = randn(N * C, &mut rng);
    let fwd = |w: &[f64]| {
        let mut out = vec![0.0; N * C];
        embedding::embedding_forward(&mut out, &ids, w, B, T, C);
        out
    };
    let out = fwd(&wte);
    for (i, &id) in ids.iter().enumerate() {
        assert_eq!(out[i * C..][..C], wte[id as usize * C..][..C], "row {i}");
    }
    let mut dwte = vec![0.0; V * C];
    embedding::embedding_backward(&mut dwte, &dout, &ids, B, T, C);
    let fd = fd_grad(&wte, |w| dot(&fwd(w), &dout));
    assert_close("embedding dwte", &dwte, &fd, FD_TOL);
    let pre = randn(V * C, &mut rng);
    let mut acc = pre.clone();
    embedding::embedding_backward(&mut acc, &dout, &ids, B, T, C);
    assert_accumulates("embedding dwte", &pre, &dwte, &acc);

    let be = CpuBackend;
    let mut o32 = vec![f32::NAN; N * C];
    be.embedding_forward(&mut o32, &ids, &to32(&wte), B, T, C)
        .unwrap();
    assert_eq!(to64(&o32), out, "embedding out (f32)");
    let mut g32 = vec![0.0f32; V * C];
    be.embedding_backward(&mut g32, &to32(&dout), &ids, B, T, C)
        .unwrap();
    assert_close("embedding dwte (f32)", &to64(&g32), &fd, F32_TOL);
}

// ---- shape errors --------------------------------------------------------------------------

fn assert_invalid(r: Result<(), BackendError>, want: &str) {
    match r {
        Err(BackendError::Invalid { msg, .. }) if msg.contains(want) => {}
        other => panic!("expected an Invalid error saying `{want}`, got {other:?}"),
    }
}

#[test]
fn llama_ops_refuse_wrong_shapes_naming_the_buffer() {
    let be = CpuBackend;
    let z = |len: usize| vec![0.5f32; len];
    let ids = vec![1i32; N];
    // Embedding.
    let r = be.embedding_forward(&mut z(N * C - 1), &ids, &z(V * C), B, T, C);
    assert_shape_err(r, "out");
    let r = be.embedding_forward(&mut z(N * C), &ids, &z(V * C + 1), B, T, C);
    assert_shape_err(r, "wte");
    let r = be.embedding_forward(&mut z(N * C), &ids[1..].to_vec(), &z(V * C), B, T, C);
    assert_shape_err(r, "ids");
    let mut bad = ids.clone();
    bad[6] = V as i32;
    let r = be.embedding_backward(&mut z(V * C), &z(N * C), &bad, B, T, C);
    assert_invalid(r, &format!("token id {V} at position 6"));
    let r = be.embedding_backward(&mut z(V * C), &z(N * C + 1), &ids, B, T, C);
    assert_shape_err(r, "dout");

    // RMSNorm.
    let r = be.rmsnorm_forward(&mut z(N * C), &mut z(N - 1), &z(N * C), &z(C), N, C, EPS);
    assert_shape_err(r, "rstd");
    let r = be.rmsnorm_forward(&mut z(N * C), &mut z(N), &z(N * C), &z(C + 1), N, C, EPS);
    assert_shape_err(r, "weight");
    let r = be.rmsnorm_forward(&mut z(N * C), &mut z(N), &z(N * C), &z(C), N, C, f32::NAN);
    assert_invalid(r, "eps = NaN");
    let r = be.rmsnorm_backward(
        &mut z(N * C),
        Some(&mut z(C - 1)),
        &z(N * C),
        &z(N * C),
        &z(C),
        &z(N),
        N,
        C,
    );
    assert_shape_err(r, "dweight");
    let (a, b) = (z(N * C), z(N * C + 2));
    let r = be.residual_rmsnorm_forward(
        &mut z(N * C),
        &mut z(N * C),
        &mut z(N),
        &a,
        &b,
        &z(C),
        N,
        C,
        EPS,
    );
    assert_shape_err(r, "b");

    // RoPE.
    let f = z(R_HS / 2);
    let r = be.rope_forward(&mut z(N * R_W - 1), &f, None, 0, B, T, R_NH, R_NKV, R_HS);
    assert_shape_err(r, "qkv");
    let r = be.rope_backward(&mut z(N * R_W), &z(R_HS), None, B, T, R_NH, R_NKV, R_HS);
    assert_shape_err(r, "inv_freq");
    let r = be.rope_forward(
        &mut z(N * R_W),
        &f,
        Some(&ids[1..].to_vec()),
        0,
        B,
        T,
        4,
        2,
        8,
    );
    assert_shape_err(r, "pos");
    let mut neg = ids.clone();
    neg[4] = -3;
    let r = be.rope_backward(&mut z(N * R_W), &f, Some(&neg), B, T, R_NH, R_NKV, R_HS);
    assert_invalid(r, "position -3 at index 4");
    // An odd head size, and key/value heads that do not divide the query heads.
    let odd = (R_NH + 2 * R_NKV) * 7;
    let r = be.rope_forward(&mut z(N * odd), &z(3), None, 0, B, T, R_NH, R_NKV, 7);
    assert_invalid(r, "hs = 7 must be even");
    let w3 = (R_NH + 2 * 3) * R_HS;
    let r = be.rope_forward(&mut z(N * w3), &f, None, 0, B, T, R_NH, 3, R_HS);
    assert_invalid(r, "NH = 4 query heads are not a multiple of NKV = 3");

    // SwiGLU.
    let r = be.swiglu_forward(&mut z(N * OC), &z(N * OC), N, OC);
    assert_shape_err(r, "gate_up");
    let r = be.swiglu_forward(&mut z(N * OC + 1), &z(2 * N * OC), N, OC);
    assert_shape_err(r, "out");
    let r = be.swiglu_backward(&mut z(N * OC), &z(N * OC), &z(2 * N * OC), N, OC);
    assert_shape_err(r, "dgate_up");
    let r = be.swiglu_backward(&mut z(2 * N * OC), &z(N * OC - 1), &z(2 * N * OC), N, OC);
    assert_shape_err(r, "dout");
    assert_invalid(
        be.swiglu_forward(&mut z(0), &z(0), N, 0),
        "I must be positive",
    );
}
