//! Grouped-query attention (training forward and backward, and the KV-cache decode) against the
//! CPU reference at KV-group ratios 1, 2 and NH (multi-query), plain and packed rows, on the
//! tensor-core head sizes (32, 64) and the CUDA-core ones; against f64 no worse than a naive
//! bf16 implementation; the multi-head ops equal to their NKV = NH case bit for bit; and a
//! deterministic backward.

use super::attention::naive_bf16_attention;
use super::*;

/// The multi-head layout `[B*T*3C]` of a grouped `qkv [B*T*(NH+2*NKV)*hs]`: each query head
/// next to copies of its key and value heads.
fn repeat_kv(qkv: &[f32], bt: usize, nh: usize, nkv: usize, hs: usize) -> Vec<f32> {
    let (c, w, group) = (nh * hs, (nh + 2 * nkv) * hs, nh / nkv);
    let mut out = vec![0.0; bt * 3 * c];
    for r in 0..bt {
        let (src, dst) = (&qkv[r * w..][..w], &mut out[r * 3 * c..][..3 * c]);
        dst[..c].copy_from_slice(&src[..c]);
        for h in 0..nh {
            let kv = c + (h / group) * hs;
            dst[c + h * hs..][..hs].copy_from_slice(&src[kv..][..hs]);
            dst[2 * c + h * hs..][..hs].copy_from_slice(&src[kv + nkv * hs..][..hs]);
        }
    }
    out
}

/// A packed row's starts for each of `b` rows: position i minus its position in its example.
fn packed_starts(rng: &mut Rng, b: usize, t: usize, one_in: u64) -> Option<Vec<i32>> {
    (one_in > 0).then(|| {
        let pos = packed_positions(rng, b, t, t, one_in);
        (0..b * t).map(|k| (k % t) as i32 - pos[k]).collect()
    })
}

fn gqa_attention<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(31);
    // (B, T, NH, NKV, hs, one_in): one_in 0 is plain causal, else packed rows.
    for (b, t, nh, nkv, hs, one_in) in [
        (2, 70, 4, 4, 64, 0),   // ratio 1, tensor cores
        (2, 130, 8, 4, 64, 0),  // ratio 2
        (1, 100, 6, 1, 32, 0),  // ratio NH (multi-query), hs 32
        (2, 45, 4, 2, 48, 0),   // CUDA cores
        (1, 33, 3, 1, 16, 0),   // CUDA cores, multi-query
        (3, 101, 4, 2, 64, 40), // packed
        (2, 200, 8, 1, 64, 30), // packed multi-query over several tiles
        (2, 70, 4, 2, 48, 6),   // packed, CUDA cores
        (1, 130, 32, 8, 64, 0), // llama-3.2-1b's heads
    ] {
        let (c, w) = (nh * hs, (nh + 2 * nkv) * hs);
        let qkv = randn(&mut rng, b * t * w, 1.0);
        let starts = packed_starts(&mut rng, b, t, one_in);
        let gstarts = starts.as_ref().map(|s| be.upload_ids(s).unwrap());
        let (mut out, mut lse) = (vec![0.0; b * t * c], vec![0.0; b * nh * t]);
        cpu.attention_gqa_forward(&mut out, &mut lse, &qkv, starts.as_ref(), b, t, c, nh, nkv)
            .unwrap();
        let gqkv = up(be, &qkv, Role::Activation);
        let mut gout = up(be, &nan(b * t * c), Role::Activation);
        let mut glse = up(be, &nan(b * nh * t), Role::Stat);
        let gst = gstarts.as_ref();
        be.attention_gqa_forward(&mut gout, &mut glse, &gqkv, gst, b, t, c, nh, nkv)
            .unwrap();
        let got = down(be, &gout);
        assert_close("attention_gqa_forward out", &got, &out, BF16_TOL);
        assert_close(
            "attention_gqa_forward lse",
            &down(be, &glse),
            &lse,
            BF16_TOL,
        );

        // Against f64: at most ATTN_NAIVE_FACTOR times the error of naive bf16 attention (run
        // on the multi-head layout with repeated key/value heads).
        let q64: Vec<f64> = qkv.iter().map(|&x| x as f64).collect();
        let (mut o64, mut l64) = (vec![0.0f64; b * t * c], vec![0.0f64; b * nh * t]);
        let st = starts.as_deref();
        cpu_attention::attention_gqa_forward(&mut o64, &mut l64, &q64, st, b, t, c, nh, nkv);
        let naive = naive_bf16_attention(&repeat_kv(&qkv, b * t, nh, nkv, hs), st, b, t, c, nh);
        let got64: Vec<f64> = got.iter().map(|&x| x as f64).collect();
        let (e_got, e_naive) = (rel_err_f64(&got64, &o64), rel_err_f64(&naive, &o64));
        println!("gqa attention vs f64: backend {e_got:.2e}, naive bf16 {e_naive:.2e}");
        assert!(
            e_got <= ATTN_NAIVE_FACTOR * e_naive.max(1e-7),
            "gqa attention error {e_got:e} > {ATTN_NAIVE_FACTOR} x naive bf16 {e_naive:e}"
        );

        // Backward from the CPU's forward (out rounded to bf16, lse fp32), into a dqkv
        // pre-filled with random values (it is overwritten).
        let dout = randn(&mut rng, b * t * c, 1.0);
        let mut dqkv = randn(&mut rng, b * t * w, 1.0);
        let mut gdqkv = up(be, &dqkv, Role::Activation);
        let out_r: Vec<f32> = out.iter().map(|&x| bf16_round(x)).collect();
        let sts = starts.as_ref();
        cpu.attention_gqa_backward(&mut dqkv, &dout, &qkv, &out_r, &lse, sts, b, t, c, nh, nkv)
            .unwrap();
        let (gdout, gout_r) = (
            up(be, &dout, Role::Activation),
            up(be, &out_r, Role::Activation),
        );
        let glse = up(be, &lse, Role::Stat);
        be.attention_gqa_backward(
            &mut gdqkv, &gdout, &gqkv, &gout_r, &glse, gst, b, t, c, nh, nkv,
        )
        .unwrap();
        let first = down(be, &gdqkv);
        assert_close("attention_gqa_backward dqkv", &first, &dqkv, BF16_TOL);
        // No float atomics: a second run gives the same bits.
        let mut again = up(be, &nan(b * t * w), Role::Activation);
        be.attention_gqa_backward(
            &mut again, &gdout, &gqkv, &gout_r, &glse, gst, b, t, c, nh, nkv,
        )
        .unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&down(be, &again)),
            bits(&first),
            "backward not deterministic"
        );
    }
    // NKV must divide NH: a named error before launching.
    let (t, nh, nkv, hs) = (4, 4, 3, 8);
    let qkv = up(
        be,
        &randn(&mut rng, t * (nh + 2 * nkv) * hs, 1.0),
        Role::Activation,
    );
    let mut out = up(be, &nan(t * nh * hs), Role::Activation);
    let mut lse = up(be, &nan(nh * t), Role::Stat);
    match be.attention_gqa_forward(&mut out, &mut lse, &qkv, None, 1, t, nh * hs, nh, nkv) {
        Err(BackendError::Invalid { msg, .. }) => assert!(msg.contains("NKV = 3"), "{msg}"),
        other => panic!("attention_gqa_forward with NH 4, NKV 3: {other:?}"),
    }
}
parity_tests!(gqa_attention => gqa_attention_cpu, gqa_attention_cuda);

/// The multi-head ops are the grouped ones at NKV = NH: the same bits, forward, backward and
/// cached (on CUDA the same kernels run).
fn mha_is_gqa_with_nkv_nh<B: Backend>(be: &B) {
    let mut rng = Rng::new(32);
    for (b, t, nh, hs, one_in) in [(2, 70, 4, 64, 0), (1, 45, 3, 48, 9)] {
        let c = nh * hs;
        let qkv = up(be, &randn(&mut rng, b * t * 3 * c, 1.0), Role::Activation);
        let starts = packed_starts(&mut rng, b, t, one_in);
        let gst = starts.as_ref().map(|s| be.upload_ids(s).unwrap());
        let run = |gqa: bool| {
            let mut out = up(be, &nan(b * t * c), Role::Activation);
            let mut lse = up(be, &nan(b * nh * t), Role::Stat);
            let s = gst.as_ref();
            if gqa {
                be.attention_gqa_forward(&mut out, &mut lse, &qkv, s, b, t, c, nh, nh)
            } else {
                be.attention_forward(&mut out, &mut lse, &qkv, s, b, t, c, nh)
            }
            .unwrap();
            (out, lse)
        };
        let ((o1, l1), (o2, l2)) = (run(false), run(true));
        assert_eq!(
            down(be, &o1),
            down(be, &o2),
            "attention out: MHA != GQA(NKV=NH)"
        );
        assert_eq!(
            down(be, &l1),
            down(be, &l2),
            "attention lse: MHA != GQA(NKV=NH)"
        );
        let dout = up(be, &randn(&mut rng, b * t * c, 1.0), Role::Activation);
        let mut d1 = up(be, &nan(b * t * 3 * c), Role::Activation);
        let mut d2 = up(be, &nan(b * t * 3 * c), Role::Activation);
        let s = gst.as_ref();
        be.attention_backward(&mut d1, &dout, &qkv, &o1, &l1, s, b, t, c, nh)
            .unwrap();
        be.attention_gqa_backward(&mut d2, &dout, &qkv, &o1, &l1, s, b, t, c, nh, nh)
            .unwrap();
        assert_eq!(
            down(be, &d1),
            down(be, &d2),
            "attention dqkv: MHA != GQA(NKV=NH)"
        );
    }
    let (b, tn, past, tmax, nh, hs) = (2, 3, 5, 16, 4, 32);
    let c = nh * hs;
    let qkv = up(be, &randn(&mut rng, b * tn * 3 * c, 1.0), Role::Activation);
    let cache = randn(&mut rng, b * tmax * c, 1.0);
    let run = |gqa: bool| {
        let mut out = up(be, &nan(b * tn * c), Role::Activation);
        let (mut kc, mut vc) = (
            up(be, &cache, Role::Activation),
            up(be, &cache, Role::Activation),
        );
        if gqa {
            let (k, v) = (&mut kc, &mut vc);
            be.attention_gqa_cached_forward(&mut out, &qkv, k, v, b, tn, past, tmax, c, nh, nh)
        } else {
            let (k, v) = (&mut kc, &mut vc);
            be.attention_cached_forward(&mut out, &qkv, k, v, b, tn, past, tmax, c, nh)
        }
        .unwrap();
        [out, kc, vc].map(|x| down(be, &x))
    };
    assert_eq!(
        run(false),
        run(true),
        "cached attention: MHA != GQA(NKV=NH)"
    );
}
parity_tests!(mha_is_gqa_with_nkv_nh => attention_mha_is_gqa_cpu, attention_mha_is_gqa_cuda);

/// Cached decode with grouped KV heads: new positions over caches `[B*Tmax*NKV*hs]` already
/// holding `past` random rows, against the CPU op (outputs at bf16 tolerance, caches exact).
fn gqa_attention_cached<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(33);
    // (B, Tn, past, Tmax, NH, NKV, hs): first step, decode deep into the cache, a chunk after a
    // prefill, a prefill (Tn = T), llama-3.2-1b's heads deep into a cache.
    for (b, tn, past, tmax, nh, nkv, hs) in [
        (1, 1, 0, 8, 4, 2, 16),
        (2, 1, 37, 64, 4, 1, 64),
        (2, 5, 10, 20, 8, 2, 32),
        (1, 70, 0, 80, 4, 4, 40),
        (1, 1, 255, 256, 32, 8, 64),
    ] {
        let (c, ckv) = (nh * hs, nkv * hs);
        let qkv = randn(&mut rng, b * tn * (c + 2 * ckv), 1.0);
        let kc0 = randn(&mut rng, b * tmax * ckv, 1.0);
        let vc0 = randn(&mut rng, b * tmax * ckv, 1.0);
        let (mut kc, mut vc) = (kc0.clone(), vc0.clone());
        let mut want = vec![0.0; b * tn * c];
        let (k, v) = (&mut kc, &mut vc);
        cpu.attention_gqa_cached_forward(&mut want, &qkv, k, v, b, tn, past, tmax, c, nh, nkv)
            .unwrap();
        let gqkv = up(be, &qkv, Role::Activation);
        let (mut gkc, mut gvc) = (
            up(be, &kc0, Role::Activation),
            up(be, &vc0, Role::Activation),
        );
        let mut gout = up(be, &nan(b * tn * c), Role::Activation);
        let (k, v) = (&mut gkc, &mut gvc);
        be.attention_gqa_cached_forward(&mut gout, &gqkv, k, v, b, tn, past, tmax, c, nh, nkv)
            .unwrap();
        let what = "attention_gqa_cached_forward out";
        assert_close(what, &down(be, &gout), &want, BF16_TOL);
        assert_close(
            "attention_gqa_cached_forward k_cache",
            &down(be, &gkc),
            &kc,
            0.0,
        );
        assert_close(
            "attention_gqa_cached_forward v_cache",
            &down(be, &gvc),
            &vc,
            0.0,
        );
    }
}
parity_tests!(gqa_attention_cached => gqa_attention_cached_cpu, gqa_attention_cached_cuda);
