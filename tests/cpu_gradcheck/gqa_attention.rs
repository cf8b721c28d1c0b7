//! Grouped-query attention (query head `h` reads key/value head `h / (NH / NKV)`): backward
//! against finite differences for ratios 1, 2 and NH (multi-query), plain and packed; the
//! definition (multi-head attention on key/value heads repeated per group); `NKV = NH` against
//! the multi-head ops bit for bit; the cached forward against the full one; shape errors; and
//! thread-count independence of the Llama ops together.

use super::*;

const G_NH: usize = 4;
const G_C: usize = 12;
const G_HS: usize = G_C / G_NH;

/// Width of a `qkv` row with `nkv` key/value heads.
fn width(nkv: usize) -> usize {
    (G_NH + 2 * nkv) * G_HS
}

/// Row 0 packs examples [0, 3) and [3, 5); row 1 packs [0, 1), [1, 4) and [4, 5).
const STARTS: [i32; N] = [0, 0, 0, 3, 3, 0, 1, 1, 1, 4];

fn gqa_forward(qkv: &[f64], starts: Option<&[i32]>, nkv: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut out, mut lse) = (vec![0.0; N * G_C], vec![0.0; B * G_NH * T]);
    attention::attention_gqa_forward(&mut out, &mut lse, qkv, starts, B, T, G_C, G_NH, nkv);
    (out, lse)
}

/// The multi-head `qkv [B*T*3C]` whose key and value heads repeat each of `qkv`'s per group.
fn repeat_kv(qkv: &[f64], nkv: usize) -> Vec<f64> {
    let (w, rep) = (width(nkv), G_NH / nkv);
    let mut mha = Vec::with_capacity(N * 3 * G_C);
    for row in qkv.chunks(w) {
        mha.extend_from_slice(&row[..G_C]);
        for part in 0..2 {
            for h in 0..G_NH {
                let g = G_NH + part * nkv + h / rep;
                mha.extend_from_slice(&row[g * G_HS..][..G_HS]);
            }
        }
    }
    mha
}

/// GQA backward vs finite differences, each of dq, dk, dv on its own, overwrite semantics and
/// the f32 backend.
fn check_gqa(nkv: usize, starts: Option<&[i32]>, seed: u64) {
    let mut rng = Rng::new(seed);
    let w = width(nkv);
    let qkv = randn(N * w, &mut rng);
    let dout = randn(N * G_C, &mut rng);
    let (out, lse) = gqa_forward(&qkv, starts, nkv);
    let mut dqkv = vec![0.0; N * w];
    let args = (B, T, G_C, G_NH, nkv);
    let (b, t, c, nh, _) = args;
    attention::attention_gqa_backward(&mut dqkv, &dout, &qkv, &out, &lse, starts, b, t, c, nh, nkv);
    let fd = fd_grad(&qkv, |x| dot(&gqa_forward(x, starts, nkv).0, &dout));
    let what = format!("gqa dqkv (NKV = {nkv}, packed: {})", starts.is_some());
    assert_close(&what, &dqkv, &fd, FD_TOL);
    let cols = [0..G_C, G_C..G_C + nkv * G_HS, G_C + nkv * G_HS..w];
    for (name, range) in ["dq", "dk", "dv"].iter().zip(cols) {
        let pick = |g: &[f64]| -> Vec<f64> {
            g.chunks(w)
                .flat_map(|row| row[range.clone()].to_vec())
                .collect()
        };
        assert_close(&format!("{what}: {name}"), &pick(&dqkv), &pick(&fd), FD_TOL);
    }
    let mut overwritten = randn(N * w, &mut rng);
    attention::attention_gqa_backward(
        &mut overwritten,
        &dout,
        &qkv,
        &out,
        &lse,
        starts,
        b,
        t,
        c,
        nh,
        nkv,
    );
    assert_overwrites(&what, &dqkv, &overwritten);

    let be = CpuBackend;
    let st = starts.map(<[i32]>::to_vec);
    let qkv32 = to32(&qkv);
    let (mut o32, mut l32) = (vec![f32::NAN; N * G_C], vec![f32::NAN; B * G_NH * T]);
    be.attention_gqa_forward(&mut o32, &mut l32, &qkv32, st.as_ref(), b, t, c, nh, nkv)
        .unwrap();
    assert_close(&format!("{what}: out (f32)"), &to64(&o32), &out, F32_TOL);
    assert_close(&format!("{what}: lse (f32)"), &to64(&l32), &lse, F32_TOL);
    let mut g32 = vec![f32::NAN; N * w];
    let d32 = to32(&dout);
    be.attention_gqa_backward(
        &mut g32,
        &d32,
        &qkv32,
        &o32,
        &l32,
        st.as_ref(),
        b,
        t,
        c,
        nh,
        nkv,
    )
    .unwrap();
    assert_close(&format!("{what} (f32)"), &to64(&g32), &fd, F32_TOL);
}

#[test]
fn gqa_backward_matches_finite_differences_for_every_ratio() {
    // NKV = NH (ratio 1), NKV = NH / 2 (ratio 2), NKV = 1 (multi-query).
    for (k, nkv) in [G_NH, 2, 1].into_iter().enumerate() {
        check_gqa(nkv, None, 60 + k as u64);
        check_gqa(nkv, Some(&STARTS), 70 + k as u64);
    }
}

#[test]
fn gqa_equals_multi_head_attention_on_repeated_kv_heads() {
    let mut rng = Rng::new(61);
    for nkv in [2, 1] {
        for starts in [None, Some(&STARTS[..])] {
            let w = width(nkv);
            let qkv = randn(N * w, &mut rng);
            let dout = randn(N * G_C, &mut rng);
            let mha = repeat_kv(&qkv, nkv);
            let (out, lse) = gqa_forward(&qkv, starts, nkv);
            let (mut out_m, mut lse_m) = (vec![0.0; N * G_C], vec![0.0; B * G_NH * T]);
            attention::attention_forward(&mut out_m, &mut lse_m, &mha, starts, B, T, G_C, G_NH);
            let what = format!("NKV = {nkv}, packed: {}", starts.is_some());
            assert_close(&format!("{what}: out"), &out, &out_m, 1e-14);
            assert_close(&format!("{what}: lse"), &lse, &lse_m, 1e-14);

            // A key/value head's gradient is the sum of its copies' gradients.
            let mut g = vec![0.0; N * w];
            let (b, t, c, nh) = (B, T, G_C, G_NH);
            attention::attention_gqa_backward(
                &mut g, &dout, &qkv, &out, &lse, starts, b, t, c, nh, nkv,
            );
            let mut g_m = vec![0.0; N * 3 * G_C];
            attention::attention_backward(
                &mut g_m, &dout, &mha, &out_m, &lse_m, starts, b, t, c, nh,
            );
            let mut want = vec![0.0; N * w];
            for (row, src) in want.chunks_mut(w).zip(g_m.chunks(3 * G_C)) {
                row[..G_C].copy_from_slice(&src[..G_C]);
                for part in 0..2 {
                    for h in 0..G_NH {
                        let dst = (G_NH + part * nkv + h / (G_NH / nkv)) * G_HS;
                        let from = (part + 1) * G_C + h * G_HS;
                        for d in 0..G_HS {
                            row[dst + d] += src[from + d];
                        }
                    }
                }
            }
            assert_close(&format!("{what}: dqkv"), &g, &want, 1e-13);
        }
    }
}

#[test]
fn gqa_with_all_kv_heads_is_the_multi_head_op_bit_for_bit() {
    let mut rng = Rng::new(62);
    let be = CpuBackend;
    let (b, t, c, nh) = (B, T, G_C, G_NH);
    let qkv = to32(&randn(N * 3 * c, &mut rng));
    let dout = to32(&randn(N * c, &mut rng));
    let st = STARTS.to_vec();
    for starts in [None, Some(&st)] {
        let (mut o1, mut l1) = (vec![f32::NAN; N * c], vec![f32::NAN; b * nh * t]);
        let (mut o2, mut l2) = (vec![0.0f32; N * c], vec![0.0f32; b * nh * t]);
        be.attention_forward(&mut o1, &mut l1, &qkv, starts, b, t, c, nh)
            .unwrap();
        be.attention_gqa_forward(&mut o2, &mut l2, &qkv, starts, b, t, c, nh, nh)
            .unwrap();
        assert_eq!((&o1, &l1), (&o2, &l2), "forward");
        let (mut g1, mut g2) = (vec![f32::NAN; N * 3 * c], vec![0.0f32; N * 3 * c]);
        be.attention_backward(&mut g1, &dout, &qkv, &o1, &l1, starts, b, t, c, nh)
            .unwrap();
        be.attention_gqa_backward(&mut g2, &dout, &qkv, &o1, &l1, starts, b, t, c, nh, nh)
            .unwrap();
        assert_eq!(g1, g2, "backward");
    }
    let tmax = T + 1;
    let cache = || vec![0.0f32; b * tmax * c];
    let (mut k1, mut v1, mut k2, mut v2) = (cache(), cache(), cache(), cache());
    let (mut o1, mut o2) = (vec![f32::NAN; N * c], vec![0.0f32; N * c]);
    be.attention_cached_forward(&mut o1, &qkv, &mut k1, &mut v1, b, t, 0, tmax, c, nh)
        .unwrap();
    be.attention_gqa_cached_forward(&mut o2, &qkv, &mut k2, &mut v2, b, t, 0, tmax, c, nh, nh)
        .unwrap();
    assert_eq!((o1, k1, v1), (o2, k2, v2), "cached forward");
}

#[test]
fn cached_gqa_over_a_prefix_then_one_step_equals_the_full_forward() {
    let mut rng = Rng::new(63);
    let be = CpuBackend;
    let (b, t, c, nh, tmax) = (B, T, G_C, G_NH, T + 2);
    for nkv in [G_NH, 2, 1] {
        let w = width(nkv);
        let qkv = to32(&randn(N * w, &mut rng));
        let (mut full, mut lse) = (vec![f32::NAN; N * c], vec![f32::NAN; b * nh * t]);
        be.attention_gqa_forward(&mut full, &mut lse, &qkv, None, b, t, c, nh, nkv)
            .unwrap();
        // Rows [0, T-1) of every batch row, then row T-1.
        let rows = |r: std::ops::Range<usize>| -> Vec<f32> {
            (0..b)
                .flat_map(|bb| qkv[(bb * t + r.start) * w..(bb * t + r.end) * w].to_vec())
                .collect()
        };
        let kvw = nkv * G_HS;
        let (mut kc, mut vc) = (
            vec![f32::NAN; b * tmax * kvw],
            vec![f32::NAN; b * tmax * kvw],
        );
        let mut pre = vec![f32::NAN; b * (t - 1) * c];
        let q0 = rows(0..t - 1);
        be.attention_gqa_cached_forward(
            &mut pre,
            &q0,
            &mut kc,
            &mut vc,
            b,
            t - 1,
            0,
            tmax,
            c,
            nh,
            nkv,
        )
        .unwrap();
        let mut step = vec![f32::NAN; b * c];
        let q1 = rows(t - 1..t);
        be.attention_gqa_cached_forward(
            &mut step,
            &q1,
            &mut kc,
            &mut vc,
            b,
            1,
            t - 1,
            tmax,
            c,
            nh,
            nkv,
        )
        .unwrap();
        for bb in 0..b {
            for i in 0..t {
                let got = if i < t - 1 {
                    &pre[(bb * (t - 1) + i) * c..][..c]
                } else {
                    &step[bb * c..][..c]
                };
                let want = &full[(bb * t + i) * c..][..c];
                let diff = got
                    .iter()
                    .zip(want)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f32::max);
                assert!(
                    diff <= 1e-6,
                    "NKV = {nkv}, row {bb}, position {i}: differs by {diff}"
                );
                // The cache holds the key and value heads exactly.
                let src = &qkv[(bb * t + i) * w..][..w];
                let at = (bb * tmax + i) * kvw;
                assert_eq!(kc[at..at + kvw], src[c..c + kvw], "k cache");
                assert_eq!(vc[at..at + kvw], src[c + kvw..], "v cache");
            }
        }
    }
}

#[test]
fn gqa_refuses_wrong_heads_and_lengths() {
    let be = CpuBackend;
    let (b, t, c, nh) = (B, T, G_C, G_NH);
    let z = |len: usize| vec![0.5f32; len];
    let invalid = |r: Result<(), BackendError>, want: &str| match r {
        Err(BackendError::Invalid { msg, .. }) if msg.contains(want) => {}
        other => panic!("expected Invalid saying `{want}`, got {other:?}"),
    };
    let w3 = (nh + 2 * 3) * G_HS;
    let r = be.attention_gqa_forward(
        &mut z(N * c),
        &mut z(b * nh * t),
        &z(N * w3),
        None,
        b,
        t,
        c,
        nh,
        3,
    );
    invalid(r, "NH = 4 query heads are not a multiple of NKV = 3");
    let r = be.attention_gqa_forward(
        &mut z(N * c),
        &mut z(b * nh * t),
        &z(N * 2 * c),
        None,
        b,
        t,
        c,
        nh,
        0,
    );
    invalid(r, "NKV = 0");
    // qkv and dqkv are (NH + 2 NKV) hs wide; a 3C-wide buffer is a Shape error for NKV = 2.
    let w = width(2);
    let r = be.attention_gqa_forward(
        &mut z(N * c),
        &mut z(b * nh * t),
        &z(N * 3 * c),
        None,
        b,
        t,
        c,
        nh,
        2,
    );
    assert_shape_err(r, "qkv");
    let (out, lse, qkv) = (z(N * c), z(b * nh * t), z(N * w));
    let r = be.attention_gqa_backward(
        &mut z(N * 3 * c),
        &out,
        &qkv,
        &out,
        &lse,
        None,
        b,
        t,
        c,
        nh,
        2,
    );
    assert_shape_err(r, "dqkv");
    let r = be.attention_gqa_backward(
        &mut z(N * w),
        &out,
        &qkv,
        &out,
        &z(b * t),
        None,
        b,
        t,
        c,
        nh,
        2,
    );
    assert_shape_err(r, "lse");
    let short = vec![0; N - 1];
    let r = be.attention_gqa_backward(
        &mut z(N * w),
        &out,
        &qkv,
        &out,
        &lse,
        Some(&short),
        b,
        t,
        c,
        nh,
        2,
    );
    assert_shape_err(r, "starts");
    // Caches are NKV hs wide per position.
    let tmax = T;
    let (mut kc, mut vc) = (z(b * tmax * c), z(b * tmax * 2 * G_HS));
    let r = be.attention_gqa_cached_forward(
        &mut z(N * c),
        &qkv,
        &mut kc,
        &mut vc,
        b,
        t,
        0,
        tmax,
        c,
        nh,
        2,
    );
    assert_shape_err(r, "k_cache");
    let mut kc = z(b * tmax * 2 * G_HS);
    let r = be.attention_gqa_cached_forward(
        &mut z(N * c),
        &qkv,
        &mut kc,
        &mut vc,
        b,
        t,
        1,
        tmax,
        c,
        nh,
        2,
    );
    invalid(r, "past 1 + Tn 5 new positions exceed the cache's Tmax 5");
    let r = be.attention_gqa_cached_forward(
        &mut z(N * c),
        &qkv,
        &mut kc,
        &mut vc,
        b,
        t,
        0,
        tmax,
        c,
        nh,
        3,
    );
    invalid(r, "not a multiple of NKV = 3");
}

// ---- determinism ---------------------------------------------------------------------------

/// Every Llama op, forward and backward, in a pool of `threads` threads; all outputs.
fn run_llama_ops(threads: usize) -> Vec<Vec<f32>> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let be = CpuBackend;
        let mut rng = Rng::new(64);
        // T spans two attention blocks; N = 140 rows span three RMSNorm row blocks.
        let (b, t, nh, nkv, hs, v, i) = (2usize, 70usize, 4usize, 2usize, 8usize, 50usize, 24usize);
        let (n, c, w) = (b * t, nh * hs, (nh + 2 * nkv) * hs);
        let r = |len: usize, rng: &mut Rng| to32(&randn(len, rng));
        let ids = random_ids(n, v, &mut rng);
        let (wte, norm_w, dx) = (r(v * c, &mut rng), r(c, &mut rng), r(n * c, &mut rng));
        let mut x = vec![0.0; n * c];
        be.embedding_forward(&mut x, &ids, &wte, b, t, c).unwrap();
        let mut dwte = vec![0.0; v * c];
        be.embedding_backward(&mut dwte, &dx, &ids, b, t, c)
            .unwrap();
        let (mut xn, mut rstd) = (vec![0.0; n * c], vec![0.0; n]);
        be.rmsnorm_forward(&mut xn, &mut rstd, &x, &norm_w, n, c, 1e-5)
            .unwrap();
        let (mut dxn, mut dnw) = (vec![0.0; n * c], vec![0.0; c]);
        be.rmsnorm_backward(&mut dxn, Some(&mut dnw), &dx, &x, &norm_w, &rstd, n, c)
            .unwrap();
        let starts: Vec<i32> = (0..n).map(|k| (k % t - k % t % 30) as i32).collect();
        let pos: Vec<i32> = (0..n).map(|k| (k % t % 30) as i32).collect();
        let inv_freq = (0..hs / 2)
            .map(|k| 1.0 / 10_000f32.powf(2.0 * k as f32 / hs as f32))
            .collect();
        let mut qkv = r(n * w, &mut rng);
        be.rope_forward(&mut qkv, &inv_freq, Some(&pos), 0, b, t, nh, nkv, hs)
            .unwrap();
        let (mut att, mut lse) = (vec![0.0; n * c], vec![0.0; b * nh * t]);
        be.attention_gqa_forward(&mut att, &mut lse, &qkv, Some(&starts), b, t, c, nh, nkv)
            .unwrap();
        let mut dqkv = vec![0.0; n * w];
        be.attention_gqa_backward(
            &mut dqkv,
            &dx,
            &qkv,
            &att,
            &lse,
            Some(&starts),
            b,
            t,
            c,
            nh,
            nkv,
        )
        .unwrap();
        be.rope_backward(&mut dqkv, &inv_freq, Some(&pos), b, t, nh, nkv, hs)
            .unwrap();
        let gate_up = r(n * 2 * i, &mut rng);
        let (mut h, mut dgu) = (vec![0.0; n * i], vec![0.0; n * 2 * i]);
        be.swiglu_forward(&mut h, &gate_up, n, i).unwrap();
        be.swiglu_backward(&mut dgu, &h, &gate_up, n, i).unwrap();
        vec![x, dwte, xn, rstd, dxn, dnw, qkv, att, lse, dqkv, h, dgu]
    })
}

#[test]
fn llama_ops_do_not_depend_on_thread_count() {
    let one = run_llama_ops(1);
    assert_eq!(one, run_llama_ops(3));
    assert!(
        one.iter().all(|o| o.iter().any(|&x| x != 0.0)),
        "an output is all zeros"
    );
}
