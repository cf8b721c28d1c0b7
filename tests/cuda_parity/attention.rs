//! Causal attention (plain and packed rows), and cached attention for generation, each also
//! against f64 no worse than a naive bf16 implementation.

use super::*;

/// Naive bf16 attention forward on the host: f64 scores and softmax, probabilities rounded to
/// bf16, the weighted sum in f64, the output rounded to bf16 (q, k, v are bf16 already).
/// Query `i` of row `bb` attends keys `starts[bb*t + i] ..= i` (0 ..= i without `starts`).
pub(super) fn naive_bf16_attention(
    qkv: &[f32],
    starts: Option<&[i32]>,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) -> Vec<f64> {
    let hs = c / nh;
    let scale = 1.0 / (hs as f64).sqrt();
    let mut out = vec![0.0f64; b * t * c];
    let at = |bb: usize, i: usize, part: usize, h: usize, d: usize| {
        qkv[(bb * t + i) * 3 * c + part * c + h * hs + d] as f64
    };
    for bb in 0..b {
        for h in 0..nh {
            for i in 0..t {
                let first = starts.map_or(0, |s| s[bb * t + i] as usize);
                let s: Vec<f64> = (first..=i)
                    .map(|j| {
                        (0..hs)
                            .map(|d| at(bb, i, 0, h, d) * at(bb, j, 1, h, d))
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = s.iter().map(|x| (x - max).exp()).sum();
                for d in 0..hs {
                    let o: f64 = (first..=i)
                        .map(|j| {
                            bf16_round(((s[j - first] - max).exp() / sum) as f32) as f64
                                * at(bb, j, 2, h, d)
                        })
                        .sum();
                    out[(bb * t + i) * c + h * hs + d] = bf16_round(o as f32) as f64;
                }
            }
        }
    }
    out
}

fn attention<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(5);
    // `one_in`: 0 for plain causal, else packed rows with a new example at each token with
    // probability 1 / one_in (short examples, and long ones that span several key tiles).
    for (b, t, c, nh, one_in) in [
        (2, 5, 12, 3, 0),
        (1, 33, 64, 2, 0),
        (2, 70, 160, 2, 0),
        (1, 45, 128, 1, 0),
        // Head sizes the tensor-core kernels take (32, 64), over several 64-row tiles and a
        // ragged last one.
        (2, 200, 128, 2, 0),
        (1, 130, 256, 8, 0),
        (3, 64, 192, 3, 0),
        (2, 5, 12, 3, 2),
        (2, 70, 160, 2, 6),
        (3, 101, 64, 2, 40),
        (1, 45, 128, 1, 15),
        (2, 200, 128, 2, 30),
    ] {
        let qkv = randn(&mut rng, b * t * 3 * c, 1.0);
        // A packed row's starts: position i minus its position within its example.
        let starts: Option<Vec<i32>> = (one_in > 0).then(|| {
            let pos = packed_positions(&mut rng, b, t, t, one_in);
            (0..b * t).map(|k| (k % t) as i32 - pos[k]).collect()
        });
        let gstarts = starts.as_ref().map(|s| be.upload_ids(s).unwrap());
        let (mut out, mut lse) = (vec![0.0; b * t * c], vec![0.0; b * nh * t]);
        cpu.attention_forward(&mut out, &mut lse, &qkv, starts.as_ref(), b, t, c, nh)
            .unwrap();
        let gqkv = up(be, &qkv, Role::Activation);
        let mut gout = up(be, &nan(b * t * c), Role::Activation);
        let mut glse = up(be, &nan(b * nh * t), Role::Stat);
        be.attention_forward(&mut gout, &mut glse, &gqkv, gstarts.as_ref(), b, t, c, nh)
            .unwrap();
        let got = down(be, &gout);
        assert_close("attention_forward out", &got, &out, BF16_TOL);
        assert_close("attention_forward lse", &down(be, &glse), &lse, BF16_TOL);

        // Against f64: at most ATTN_NAIVE_FACTOR times the error of naive bf16 attention.
        let q64: Vec<f64> = qkv.iter().map(|&x| x as f64).collect();
        let (mut o64, mut l64) = (vec![0.0f64; b * t * c], vec![0.0f64; b * nh * t]);
        let st = starts.as_deref();
        cpu_attention::attention_forward(&mut o64, &mut l64, &q64, st, b, t, c, nh);
        let naive = naive_bf16_attention(&qkv, st, b, t, c, nh);
        let got64: Vec<f64> = got.iter().map(|&x| x as f64).collect();
        let (e_got, e_naive) = (rel_err_f64(&got64, &o64), rel_err_f64(&naive, &o64));
        println!("attention vs f64: backend {e_got:.2e}, naive bf16 {e_naive:.2e}");
        assert!(
            e_got <= ATTN_NAIVE_FACTOR * e_naive.max(1e-7),
            "attention error {e_got:e} > {ATTN_NAIVE_FACTOR} x naive bf16 {e_naive:e}"
        );

        let dout = randn(&mut rng, b * t * c, 1.0);
        let mut dqkv = randn(&mut rng, b * t * 3 * c, 1.0);
        let mut gdqkv = up(be, &dqkv, Role::Activation);
        // Both backwards use the CPU's forward output rounded to bf16 (what a bf16 backend
        // saves) and its fp32 lse (a Role::Stat buffer).
        let out_r: Vec<f32> = out.iter().map(|&x| bf16_round(x)).collect();
        cpu.attention_backward(
            &mut dqkv,
            &dout,
            &qkv,
            &out_r,
            &lse,
            starts.as_ref(),
            b,
            t,
            c,
            nh,
        )
        .unwrap();
        let (gdout, gout_r) = (
            up(be, &dout, Role::Activation),
            up(be, &out_r, Role::Activation),
        );
        let glse = up(be, &lse, Role::Stat);
        let gst = gstarts.as_ref();
        be.attention_backward(&mut gdqkv, &gdout, &gqkv, &gout_r, &glse, gst, b, t, c, nh)
            .unwrap();
        assert_close(
            "attention_backward dqkv",
            &down(be, &gdqkv),
            &dqkv,
            BF16_TOL,
        );
    }
    // Starts that do not cut a row into contiguous examples are refused before launching.
    let (t, c, nh) = (6, 8, 2);
    let qkv = up(be, &randn(&mut rng, t * 3 * c, 1.0), Role::Activation);
    let mut out = up(be, &nan(t * c), Role::Activation);
    let mut lse = up(be, &nan(nh * t), Role::Stat);
    let bad = be.upload_ids(&[0, 0, 2, 1, 4, 4]).unwrap();
    match be.attention_forward(&mut out, &mut lse, &qkv, Some(&bad), 1, t, c, nh) {
        Err(BackendError::Invalid { msg, .. }) => assert!(msg.contains("starts[3] = 1"), "{msg}"),
        other => panic!("attention_forward with starts[3] = 1: {other:?}"),
    }
}
parity_tests!(attention => attention_cpu, attention_cuda);

/// Cached attention (generation): new positions over a cache already holding `past` random
/// rows, against the CPU op, and against f64 no worse than ATTN_NAIVE_FACTOR x naive bf16.
fn attention_cached<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(9);
    // (B, Tn, past, Tmax, C, NH): first steps, decode steps deep into the cache, a prefill,
    // a chunk after a prefill, hs = 128, and a GPT-2-like head layout.
    for (b, tn, past, tmax, c, nh) in [
        (1, 1, 0, 8, 12, 3),
        (2, 1, 37, 64, 64, 2),
        (2, 5, 10, 20, 128, 1),
        (1, 70, 0, 80, 160, 2),
        (3, 1, 255, 256, 768, 12),
    ] {
        let qkv = randn(&mut rng, b * tn * 3 * c, 1.0);
        let kc0 = randn(&mut rng, b * tmax * c, 1.0);
        let vc0 = randn(&mut rng, b * tmax * c, 1.0);
        let (mut kc, mut vc) = (kc0.clone(), vc0.clone());
        let mut want = vec![0.0; b * tn * c];
        cpu.attention_cached_forward(&mut want, &qkv, &mut kc, &mut vc, b, tn, past, tmax, c, nh)
            .unwrap();
        let gqkv = up(be, &qkv, Role::Activation);
        let (mut gkc, mut gvc) = (
            up(be, &kc0, Role::Activation),
            up(be, &vc0, Role::Activation),
        );
        let mut gout = up(be, &nan(b * tn * c), Role::Activation);
        be.attention_cached_forward(
            &mut gout, &gqkv, &mut gkc, &mut gvc, b, tn, past, tmax, c, nh,
        )
        .unwrap();
        let got = down(be, &gout);
        assert_close("attention_cached_forward out", &got, &want, BF16_TOL);
        // The caches hold copies of bf16 values: exact.
        assert_close(
            "attention_cached_forward k_cache",
            &down(be, &gkc),
            &kc,
            0.0,
        );
        assert_close(
            "attention_cached_forward v_cache",
            &down(be, &gvc),
            &vc,
            0.0,
        );

        // Against f64: lay the cache rows and the new rows out as one sequence [B, past+Tn, 3C]
        // (q of the cached rows is random and unused), run plain attention, keep the new rows.
        let t = past + tn;
        let mut full = randn(&mut rng, b * t * 3 * c, 1.0);
        for bb in 0..b {
            for j in 0..t {
                let dst = &mut full[(bb * t + j) * 3 * c..][..3 * c];
                if j < past {
                    let src = (bb * tmax + j) * c;
                    dst[c..2 * c].copy_from_slice(&kc0[src..src + c]);
                    dst[2 * c..].copy_from_slice(&vc0[src..src + c]);
                } else {
                    dst.copy_from_slice(&qkv[(bb * tn + j - past) * 3 * c..][..3 * c]);
                }
            }
        }
        let f64_full: Vec<f64> = full.iter().map(|&x| x as f64).collect();
        let (mut o64, mut l64) = (vec![0.0f64; b * t * c], vec![0.0f64; b * nh * t]);
        cpu_attention::attention_forward(&mut o64, &mut l64, &f64_full, None, b, t, c, nh);
        let naive = naive_bf16_attention(&full, None, b, t, c, nh);
        let new_rows = |x: &[f64]| -> Vec<f64> {
            (0..b)
                .flat_map(|bb| x[(bb * t + past) * c..(bb * t + t) * c].to_vec())
                .collect()
        };
        let (o64, naive) = (new_rows(&o64), new_rows(&naive));
        let got64: Vec<f64> = got.iter().map(|&x| x as f64).collect();
        let (e_got, e_naive) = (rel_err_f64(&got64, &o64), rel_err_f64(&naive, &o64));
        println!("attention_cached vs f64: backend {e_got:.2e}, naive bf16 {e_naive:.2e}");
        assert!(
            e_got <= ATTN_NAIVE_FACTOR * e_naive.max(1e-7),
            "cached attention error {e_got:e} > {ATTN_NAIVE_FACTOR} x naive bf16 {e_naive:e}"
        );
    }
    // Past the cache's end: an error, not a launch.
    let mut out = be.zeros(12, Role::Activation).unwrap();
    let x = be.zeros(36, Role::Activation).unwrap();
    let (mut k, mut v) = (
        be.zeros(8 * 12, Role::Activation).unwrap(),
        be.zeros(8 * 12, Role::Activation).unwrap(),
    );
    match be.attention_cached_forward(&mut out, &x, &mut k, &mut v, 1, 1, 8, 8, 12, 3) {
        Err(BackendError::Invalid { .. }) => {}
        other => panic!("attention_cached_forward past Tmax: {other:?}"),
    }
}
parity_tests!(attention_cached => attention_cached_cpu, attention_cached_cuda);
