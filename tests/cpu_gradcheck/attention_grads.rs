//! Causal attention, plain and packed: forward against a naive softmax, backward against
//! finite differences, and a packed row against each example run alone.

use super::*;

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
