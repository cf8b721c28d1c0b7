//! Every Backend op on the backend under test against the f32 CPU reference, forward and
//! backward, on fresh random inputs at several shapes (including sizes that are not multiples
//! of any block or tile size). Forward outputs are poisoned with NaN first, gradient outputs
//! pre-filled with random values (parameter gradients and layernorm's `dinp` accumulate, other
//! activation gradients are overwritten), so untouched or wrongly kept elements show. On the CPU backend these compare the backend with itself (they still run
//! every op); on CUDA they are the parity tests of DESIGN.md convention 3.

mod common;

use common::{assert_close, bf16_round, down, randn, rel_err, rel_err_f64};
use topcoat::backend::cpu::{attention as cpu_attention, CpuBackend};
use topcoat::backend::{AdamWStep, Backend, BackendError, LossGrad, Role};
use topcoat::rng::Rng;

/// bf16 storage: `||gpu - ref|| / ||ref||` for ops with short reductions.
const BF16_TOL: f64 = 1e-2;
/// fp32 buffers (gradients accumulated into random fp32 values, optimizer state).
const F32_TOL: f64 = 1e-3;
/// Cross-entropy losses stored in fp32 from bf16 logits: the logits are bf16-exact inputs, so
/// only the fp32 exp/log-sum error remains (far below bf16 rounding of the loss, 2^-9).
const CE_F32_LOSS_TOL: f64 = 1e-4;
/// Attention may be at most this many times as far from f64 as a naive bf16 implementation.
const ATTN_NAIVE_FACTOR: f64 = 2.0;

fn nan(n: usize) -> Vec<f32> {
    vec![f32::NAN; n]
}

fn up<B: Backend>(be: &B, host: &[f32], role: Role) -> B::Buf {
    be.upload(host, role).expect("upload")
}

fn ids_for(rng: &mut Rng, n: usize, v: usize) -> Vec<i32> {
    (0..n).map(|_| rng.below(v as u64) as i32).collect()
}

/// Positions that restart at random example boundaries inside each row (a new example at each
/// token with probability `1 / one_in`), each in `[0, tmax)`.
fn packed_positions(rng: &mut Rng, b: usize, t: usize, tmax: usize, one_in: u64) -> Vec<i32> {
    let mut pos = Vec::with_capacity(b * t);
    for _ in 0..b {
        let mut p = 0;
        for _ in 0..t {
            if p == tmax || rng.below(one_in) == 0 {
                p = 0;
            }
            pos.push(p as i32);
            p += 1;
        }
    }
    pos
}

fn encoder<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(1);
    for (b, t, tmax, c, v, packed) in [
        (2, 5, 7, 12, 11, false),
        (3, 33, 40, 100, 7, false),
        (1, 64, 64, 257, 300, false),
        (2, 5, 7, 12, 11, true),
        (3, 45, 40, 100, 7, true),
        (2, 64, 64, 257, 300, true),
    ] {
        let ids = ids_for(&mut rng, b * t, v);
        let pos = packed.then(|| packed_positions(&mut rng, b, t, tmax, 6));
        let (wte, wpe) = (randn(&mut rng, v * c, 1.0), randn(&mut rng, tmax * c, 1.0));
        let mut want = vec![0.0; b * t * c];
        cpu.encoder_forward(&mut want, &ids, pos.as_ref(), &wte, &wpe, b, t, c)
            .unwrap();
        let mut out = up(be, &nan(b * t * c), Role::Activation);
        let (gte, gpe) = (up(be, &wte, Role::Param), up(be, &wpe, Role::Param));
        let gids = be.upload_ids(&ids).unwrap();
        let gpos = pos.as_ref().map(|p| be.upload_ids(p).unwrap());
        be.encoder_forward(&mut out, &gids, gpos.as_ref(), &gte, &gpe, b, t, c)
            .unwrap();
        assert_close("encoder_forward out", &down(be, &out), &want, BF16_TOL);

        let dout = randn(&mut rng, b * t * c, 1.0);
        let (mut dwte, mut dwpe) = (randn(&mut rng, v * c, 1.0), randn(&mut rng, tmax * c, 1.0));
        let (mut gdte, mut gdpe) = (up(be, &dwte, Role::Grad), up(be, &dwpe, Role::Grad));
        cpu.encoder_backward(&mut dwte, &mut dwpe, &dout, &ids, pos.as_ref(), b, t, c)
            .unwrap();
        let gdout = up(be, &dout, Role::Activation);
        be.encoder_backward(&mut gdte, &mut gdpe, &gdout, &gids, gpos.as_ref(), b, t, c)
            .unwrap();
        assert_close("encoder_backward dwte", &down(be, &gdte), &dwte, F32_TOL);
        assert_close("encoder_backward dwpe", &down(be, &gdpe), &dwpe, F32_TOL);
    }
    // A position outside [0, Tmax) is refused before launching.
    let (b, t, tmax, c) = (1, 4, 4, 8);
    let (wte, wpe) = (
        up(be, &randn(&mut rng, 3 * c, 1.0), Role::Param),
        up(be, &randn(&mut rng, tmax * c, 1.0), Role::Param),
    );
    let ids = be.upload_ids(&[0, 1, 2, 0]).unwrap();
    let pos = be.upload_ids(&[0, 1, 4, 0]).unwrap();
    let mut out = up(be, &nan(b * t * c), Role::Activation);
    match be.encoder_forward(&mut out, &ids, Some(&pos), &wte, &wpe, b, t, c) {
        Err(BackendError::Invalid { msg, .. }) => assert!(msg.contains("position 4"), "{msg}"),
        other => panic!("encoder_forward with position 4 of 4: {other:?}"),
    }
}
backend_tests!(encoder => encoder_cpu, encoder_cuda);

fn layernorm<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(2);
    for (n, c) in [(3, 12), (37, 100), (300, 768), (9, 1000)] {
        let (a, r) = (randn(&mut rng, n * c, 1.0), randn(&mut rng, n * c, 1.0));
        let (w, bias) = (randn(&mut rng, c, 1.0), randn(&mut rng, c, 0.5));
        let (mut res, mut out) = (vec![0.0; n * c], vec![0.0; n * c]);
        let (mut mean, mut rstd) = (vec![0.0; n], vec![0.0; n]);
        cpu.residual_layernorm_forward(
            &mut res, &mut out, &mut mean, &mut rstd, &a, &r, &w, &bias, n, c,
        )
        .unwrap();
        let (ga, gr) = (up(be, &a, Role::Activation), up(be, &r, Role::Activation));
        let (gw, gb) = (up(be, &w, Role::Param), up(be, &bias, Role::Param));
        let mut gres = up(be, &nan(n * c), Role::Activation);
        let mut gout = up(be, &nan(n * c), Role::Activation);
        let mut gmean = up(be, &nan(n), Role::Activation);
        let mut grstd = up(be, &nan(n), Role::Activation);
        be.residual_layernorm_forward(
            &mut gres, &mut gout, &mut gmean, &mut grstd, &ga, &gr, &gw, &gb, n, c,
        )
        .unwrap();
        assert_close(
            "residual_layernorm residual",
            &down(be, &gres),
            &res,
            BF16_TOL,
        );
        assert_close("residual_layernorm out", &down(be, &gout), &out, BF16_TOL);
        assert_close(
            "residual_layernorm rstd",
            &down(be, &grstd),
            &rstd,
            BF16_TOL,
        );

        // Plain forward on the bf16-rounded residual, so both sides see the same input.
        let inp: Vec<f32> = res.iter().map(|&x| bf16_round(x)).collect();
        let ginp = up(be, &inp, Role::Activation);
        cpu.layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &w, &bias, n, c)
            .unwrap();
        let mut gout = up(be, &nan(n * c), Role::Activation);
        let mut gmean = up(be, &nan(n), Role::Activation);
        let mut grstd = up(be, &nan(n), Role::Activation);
        be.layernorm_forward(&mut gout, &mut gmean, &mut grstd, &ginp, &gw, &gb, n, c)
            .unwrap();
        assert_close("layernorm_forward out", &down(be, &gout), &out, BF16_TOL);
        assert_close("layernorm_forward mean", &down(be, &gmean), &mean, BF16_TOL);
        assert_close("layernorm_forward rstd", &down(be, &grstd), &rstd, BF16_TOL);

        let dout = randn(&mut rng, n * c, 1.0);
        let mut dinp = randn(&mut rng, n * c, 1.0);
        let (mut dw, mut db) = (randn(&mut rng, c, 1.0), randn(&mut rng, c, 1.0));
        let mut gdinp = up(be, &dinp, Role::Activation);
        let (mut gdw, mut gdb) = (up(be, &dw, Role::Grad), up(be, &db, Role::Grad));
        cpu.layernorm_backward(
            &mut dinp, &mut dw, &mut db, &dout, &inp, &w, &mean, &rstd, n, c,
        )
        .unwrap();
        let gdout = up(be, &dout, Role::Activation);
        be.layernorm_backward(
            &mut gdinp, &mut gdw, &mut gdb, &gdout, &ginp, &gw, &gmean, &grstd, n, c,
        )
        .unwrap();
        assert_close(
            "layernorm_backward dinp",
            &down(be, &gdinp),
            &dinp,
            BF16_TOL,
        );
        assert_close("layernorm_backward dweight", &down(be, &gdw), &dw, BF16_TOL);
        assert_close("layernorm_backward dbias", &down(be, &gdb), &db, F32_TOL);
    }
}
backend_tests!(layernorm => layernorm_cpu, layernorm_cuda);

fn elementwise<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(3);
    for n in [1, 1000, 100_003] {
        let (a, b) = (randn(&mut rng, n, 2.0), randn(&mut rng, n, 1.0));
        let mut want = vec![0.0; n];
        let (ga, gb) = (up(be, &a, Role::Activation), up(be, &b, Role::Activation));
        cpu.residual_forward(&mut want, &a, &b, n).unwrap();
        let mut out = up(be, &nan(n), Role::Activation);
        be.residual_forward(&mut out, &ga, &gb, n).unwrap();
        assert_close("residual_forward", &down(be, &out), &want, BF16_TOL);

        cpu.gelu_forward(&mut want, &a, n).unwrap();
        let mut out = up(be, &nan(n), Role::Activation);
        be.gelu_forward(&mut out, &ga, n).unwrap();
        assert_close("gelu_forward", &down(be, &out), &want, BF16_TOL);

        let mut dinp = randn(&mut rng, n, 1.0);
        let mut gdinp = up(be, &dinp, Role::Activation);
        cpu.gelu_backward(&mut dinp, &a, &b, n).unwrap();
        be.gelu_backward(&mut gdinp, &ga, &gb, n).unwrap();
        assert_close("gelu_backward", &down(be, &gdinp), &dinp, BF16_TOL);
    }
}
backend_tests!(elementwise => elementwise_cpu, elementwise_cuda);

fn matmul<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(4);
    for (n, c, oc, with_bias) in [(5, 12, 7, true), (37, 64, 100, false), (130, 96, 257, true)] {
        let inp = randn(&mut rng, n * c, 1.0);
        let w = randn(&mut rng, oc * c, 0.2);
        let bias = randn(&mut rng, oc, 1.0);
        let mut want = vec![0.0; n * oc];
        cpu.matmul_forward(&mut want, &inp, &w, with_bias.then_some(&bias), n, c, oc)
            .unwrap();
        let (ginp, gw) = (up(be, &inp, Role::Activation), up(be, &w, Role::Param));
        let gbias = up(be, &bias, Role::Param);
        let mut out = up(be, &nan(n * oc), Role::Activation);
        be.matmul_forward(&mut out, &ginp, &gw, with_bias.then_some(&gbias), n, c, oc)
            .unwrap();
        assert_close("matmul_forward", &down(be, &out), &want, BF16_TOL);

        let dout = randn(&mut rng, n * oc, 1.0);
        let mut dinp = randn(&mut rng, n * c, 1.0);
        let (mut dw, mut db) = (randn(&mut rng, oc * c, 1.0), randn(&mut rng, oc, 1.0));
        let mut gdinp = up(be, &dinp, Role::Activation);
        let (mut gdw, mut gdb) = (up(be, &dw, Role::Grad), up(be, &db, Role::Grad));
        cpu.matmul_backward(
            &mut dinp,
            &mut dw,
            with_bias.then_some(&mut db),
            &dout,
            &inp,
            &w,
            n,
            c,
            oc,
        )
        .unwrap();
        let gdout = up(be, &dout, Role::Activation);
        be.matmul_backward(
            &mut gdinp,
            &mut gdw,
            with_bias.then_some(&mut gdb),
            &gdout,
            &ginp,
            &gw,
            n,
            c,
            oc,
        )
        .unwrap();
        assert_close("matmul_backward dinp", &down(be, &gdinp), &dinp, BF16_TOL);
        assert_close("matmul_backward dweight", &down(be, &gdw), &dw, F32_TOL);
        assert_close("matmul_backward dbias", &down(be, &gdb), &db, F32_TOL);
    }
}
backend_tests!(matmul => matmul_cpu, matmul_cuda);

/// The MLP's fused matmul + GELU pair. Widths that are multiples of 8 take cuBLASLt's GELU
/// epilogues on CUDA, the others the unfused path (`TOPCOAT_GELU_EPILOGUE=off`: all unfused).
fn matmul_gelu<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(14);
    // (N, C, OC, bias): forward fused when OC % 8 == 0, backward when C % 8 == 0.
    for (n, c, oc, with_bias) in [
        (5, 12, 7, true),
        (37, 64, 96, false),
        (130, 96, 256, true),
        (33, 40, 20, true),
        (70, 20, 48, true),
    ] {
        let inp = randn(&mut rng, n * c, 1.0);
        let w = randn(&mut rng, oc * c, 0.3);
        let bias = randn(&mut rng, oc, 0.5);
        let (mut want, mut want_pre) = (vec![0.0; n * oc], vec![0.0; n * oc]);
        let b = with_bias.then_some(&bias);
        cpu.matmul_gelu_forward(&mut want, &mut want_pre, &inp, &w, b, n, c, oc)
            .unwrap();
        let (ginp, gw) = (up(be, &inp, Role::Activation), up(be, &w, Role::Param));
        let gbias = up(be, &bias, Role::Param);
        let mut out = up(be, &nan(n * oc), Role::Activation);
        let mut pre = up(be, &nan(n * oc), Role::Activation);
        let gb = with_bias.then_some(&gbias);
        be.matmul_gelu_forward(&mut out, &mut pre, &ginp, &gw, gb, n, c, oc)
            .unwrap();
        assert_close(
            "matmul_gelu_forward pre",
            &down(be, &pre),
            &want_pre,
            BF16_TOL,
        );
        assert_close("matmul_gelu_forward out", &down(be, &out), &want, BF16_TOL);

        // Backward of `gelu(x) @ W^T + b` for a fresh x: the matmul's input is gelu(x) [N*C].
        // gelu(x) is rounded to bf16 (what the backend stores), so both sides multiply the
        // same numbers and the fp32 weight gradients compare at F32_TOL.
        let x = randn(&mut rng, n * c, 1.5);
        let mut gelu_x = vec![0.0; n * c];
        cpu.gelu_forward(&mut gelu_x, &x, n * c).unwrap();
        let gelu_x: Vec<f32> = gelu_x.into_iter().map(bf16_round).collect();
        let dout = randn(&mut rng, n * oc, 1.0);
        let mut dx = randn(&mut rng, n * c, 1.0);
        let (mut dw, mut db) = (randn(&mut rng, oc * c, 1.0), randn(&mut rng, oc, 1.0));
        let mut gdx = up(be, &dx, Role::Activation);
        let (mut gdw, mut gdb) = (up(be, &dw, Role::Grad), up(be, &db, Role::Grad));
        cpu.matmul_gelu_backward(
            &mut dx,
            &mut dw,
            with_bias.then_some(&mut db),
            &dout,
            &gelu_x,
            &w,
            &x,
            n,
            c,
            oc,
        )
        .unwrap();
        let (gdout, ggelu_x) = (
            up(be, &dout, Role::Activation),
            up(be, &gelu_x, Role::Activation),
        );
        let gx = up(be, &x, Role::Activation);
        be.matmul_gelu_backward(
            &mut gdx,
            &mut gdw,
            with_bias.then_some(&mut gdb),
            &gdout,
            &ggelu_x,
            &gw,
            &gx,
            n,
            c,
            oc,
        )
        .unwrap();
        assert_close("matmul_gelu_backward dinp", &down(be, &gdx), &dx, BF16_TOL);
        assert_close(
            "matmul_gelu_backward dweight",
            &down(be, &gdw),
            &dw,
            F32_TOL,
        );
        assert_close("matmul_gelu_backward dbias", &down(be, &gdb), &db, F32_TOL);
    }
}
backend_tests!(matmul_gelu => matmul_gelu_cpu, matmul_gelu_cuda);

/// `fill_zero` on every buffer kind, at lengths that leave a ragged tail of bytes.
fn fill_zero<B: Backend>(be: &B) {
    let mut rng = Rng::new(15);
    for len in [1, 7, 8, 33, 1000, 100_003] {
        for role in [
            Role::Activation,
            Role::Grad,
            Role::State,
            Role::Param,
            Role::Stat,
        ] {
            let mut buf = up(be, &randn(&mut rng, len, 1.0), role);
            be.fill_zero(&mut buf).unwrap();
            let got = down(be, &buf);
            assert!(
                got.len() == len && got.iter().all(|&x| x == 0.0),
                "fill_zero {role:?} len {len}: {} nonzero",
                got.iter().filter(|&&x| x != 0.0).count()
            );
        }
    }
}
backend_tests!(fill_zero => fill_zero_cpu, fill_zero_cuda);

/// Naive bf16 attention forward on the host: f64 scores and softmax, probabilities rounded to
/// bf16, the weighted sum in f64, the output rounded to bf16 (q, k, v are bf16 already).
/// Query `i` of row `bb` attends keys `starts[bb*t + i] ..= i` (0 ..= i without `starts`).
fn naive_bf16_attention(
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
backend_tests!(attention => attention_cpu, attention_cuda);

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
backend_tests!(cross_entropy => cross_entropy_cpu, cross_entropy_cuda);

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
backend_tests!(adamw_and_norm => adamw_and_norm_cpu, adamw_and_norm_cuda);

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
    match be.matmul_gelu_backward(&mut out, &mut dw, None, &x, &x, &wm, &short, n, c, c) {
        Err(BackendError::Shape { what: "pre", .. }) => {}
        other => panic!("matmul_gelu_backward with a short pre: {other:?}"),
    }
}
backend_tests!(shape_errors => shape_errors_cpu, shape_errors_cuda);

/// The reward model end to end (forward through every layer, the host-side head, the
/// Bradley-Terry loss, backward from the hidden state): per gradient tensor, and over all of
/// them at once. Looser than one op's tolerance: bf16 rounding compounds over the layers.
const MODEL_TENSOR_TOL: f64 = 5e-2;
const MODEL_TOL: f64 = 2e-2;

fn reward_model<B: Backend>(be: &B) {
    use topcoat::config::ModelConfig;
    use topcoat::model::Gpt;
    use topcoat::stages::reward::bradley_terry;
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(9);
    let cfg = ModelConfig {
        vocab_size: 100,
        padded_vocab_size: 128,
        n_layer: 2,
        n_head: 4,
        n_embd: 64,
        max_seq_len: 40,
    };
    let (pairs, t) = (3, 37);
    let values: Vec<Vec<f32>> = Gpt::init(&cpu, &cfg, 10)
        .unwrap()
        .param_values(&cpu)
        .unwrap()
        .into_iter()
        .map(|v| v.into_iter().map(bf16_round).collect())
        .collect();
    let head = randn(&mut rng, cfg.n_embd, 1.0 / (cfg.n_embd as f32).sqrt());
    let ids = ids_for(&mut rng, 2 * pairs * t, cfg.vocab_size);
    let last: Vec<usize> = (0..2 * pairs)
        .map(|_| t / 2 + rng.below((t - t / 2) as u64) as usize)
        .collect();
    #[allow(clippy::too_many_arguments)]
    fn run<B: Backend>(
        be: &B,
        cfg: &ModelConfig,
        values: &[Vec<f32>],
        head: &[f32],
        ids: &[i32],
        last: &[usize],
        pairs: usize,
        t: usize,
    ) -> (Vec<f32>, f32, Vec<Vec<f32>>, Vec<String>) {
        let mut m = Gpt::from_values(be, cfg, values.to_vec()).unwrap();
        m.add_reward_head(be, head, 0.25).unwrap();
        m.zero_grad(be).unwrap();
        let pass = m.reward_forward(be, ids, 2 * pairs, t, last).unwrap();
        let bt = bradley_terry(&pass.rewards, pairs, 1.0);
        m.reward_backward(be, ids, &pass, &bt.drewards).unwrap();
        let names = m.layout.specs.iter().map(|s| s.name.clone()).collect();
        (pass.rewards, bt.mean, m.grad_values(be).unwrap(), names)
    }
    let want = run(&cpu, &cfg, &values, &head, &ids, &last, pairs, t);
    let got = run(be, &cfg, &values, &head, &ids, &last, pairs, t);
    assert_close("reward rewards", &got.0, &want.0, MODEL_TOL);
    assert_close("reward loss", &[got.1], &[want.1], MODEL_TOL);
    for ((g, w), name) in got.2.iter().zip(&want.2).zip(&want.3) {
        assert_close(&format!("reward grad {name}"), g, w, MODEL_TENSOR_TOL);
    }
    let flat = |x: &[Vec<f32>]| x.concat();
    assert_close(
        "reward grads (all)",
        &flat(&got.2),
        &flat(&want.2),
        MODEL_TOL,
    );
}
backend_tests!(reward_model => reward_model_cpu, reward_model_cuda);

/// Packed vs unpacked SFT batches on one backend: the same summed loss and gradients.
const PACKED_LOSS_TOL: f64 = 1e-3;
const PACKED_GRAD_TOL: f64 = 1e-2;
/// The packed batch on this backend vs the f32 CPU reference (a whole bf16 model).
const PACKED_MODEL_TOL: f64 = 5e-2;

/// The examples of one packed batch of 4 rows of T = 40 (slots 10 + 25 + 5 fill row 0,
/// 17 + 12 + 8 row 1, 30 row 2, a cut 50-token example row 3), as an unpacked batch of 8 rows
/// and a packed one; random ids below `v`, random loss masks (-1 targets).
#[allow(clippy::type_complexity)]
fn sft_batches(rng: &mut Rng, v: usize) -> ((Vec<i32>, Vec<i32>), topcoat::stages::sft::SftBatch) {
    use topcoat::stages::sft::{fill_row, BatchBuilder};
    let t = 40;
    let lens = [11, 26, 6, 18, 13, 9, 31, 50];
    let mut unpacked = (vec![0; lens.len() * t], vec![0; lens.len() * t]);
    let mut packed = BatchBuilder::new(4, t, 0, true);
    for (r, &n) in lens.iter().enumerate() {
        let ids: Vec<u32> = (0..n).map(|_| rng.below(v as u64) as u32).collect();
        let mut mask: Vec<bool> = (0..n).map(|_| rng.below(2) == 0).collect();
        mask[n - 1] = true;
        let rows = r * t..(r + 1) * t;
        let (i, o) = (&mut unpacked.0[rows.clone()], &mut unpacked.1[rows]);
        fill_row(&ids, &mask, t, 0, i, o);
        assert!(packed.push(&ids, &mask));
    }
    (unpacked, packed.finish())
}

/// (summed loss, every gradient concatenated) of one forward + backward.
fn loss_and_grads<B: Backend>(
    be: &B,
    model: &mut topcoat::model::Gpt<B>,
    (inputs, targets): (&[i32], &[i32]),
    packing: Option<&topcoat::model::Packing>,
    b: usize,
) -> (f64, Vec<f32>) {
    model.zero_grad(be).unwrap();
    let loss = model
        .forward_backward_with(be, inputs, targets, packing, b, 40, 1.0)
        .unwrap();
    (loss.sum, model.grad_values(be).unwrap().concat())
}

fn packed_model<B: Backend>(be: &B) {
    use topcoat::model::Gpt;
    let cfg = topcoat::config::ModelConfig {
        vocab_size: 61,
        padded_vocab_size: 64,
        n_layer: 2,
        n_head: 2,
        n_embd: 64,
        max_seq_len: 48,
    };
    let mut rng = Rng::new(9);
    let ((ui, ut), packed) = sft_batches(&mut rng, cfg.vocab_size);
    let packing = packed.packing.as_ref().unwrap();
    let values = Gpt::init(&CpuBackend, &cfg, 4)
        .unwrap()
        .param_values(&CpuBackend)
        .unwrap();
    let mut model = Gpt::from_values(be, &cfg, values.clone()).unwrap();
    let (base_loss, base_grads) = loss_and_grads(be, &mut model, (&ui, &ut), None, 8);
    let p = (packed.inputs.as_slice(), packed.targets.as_slice());
    let (loss, grads) = loss_and_grads(be, &mut model, p, Some(packing), 4);
    let cpu = CpuBackend::new();
    let mut reference = Gpt::from_values(&cpu, &cfg, values).unwrap();
    let (ref_loss, ref_grads) = loss_and_grads(&cpu, &mut reference, p, Some(packing), 4);

    let e_loss = ((loss - base_loss) / base_loss).abs();
    let e_grad = rel_err(&grads, &base_grads);
    let e_ref_loss = ((loss - ref_loss) / ref_loss).abs();
    let e_ref_grad = rel_err(&grads, &ref_grads);
    println!(
        "packed vs unpacked: loss {e_loss:.1e}, grads {e_grad:.1e}; packed vs CPU: loss \
         {e_ref_loss:.1e}, grads {e_ref_grad:.1e}"
    );
    assert!(
        e_loss <= PACKED_LOSS_TOL,
        "summed loss {loss} vs {base_loss}"
    );
    assert!(e_grad <= PACKED_GRAD_TOL, "gradients: rel diff {e_grad:e}");
    assert!(
        e_ref_loss <= PACKED_MODEL_TOL,
        "loss {loss} vs CPU {ref_loss}"
    );
    assert!(
        e_ref_grad <= PACKED_MODEL_TOL,
        "gradients vs CPU: {e_ref_grad:e}"
    );
}
backend_tests!(packed_model => packed_model_cpu, packed_model_cuda);

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
backend_tests!(attention_cached => attention_cached_cpu, attention_cached_cuda);

/// Sampled tokens may differ from the CPU's on at most this fraction of rows: only where a
/// running probability sum lands within rounding of its target (fp32 on the GPU, f64 on the CPU).
const SAMPLE_MISMATCH: f64 = 0.01;

/// Token sampling against the CPU rule, given the same bf16 logits and uniforms.
fn sample_tokens<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(10);
    let p = |temperature: f32, top_k: usize, top_p: f32| topcoat::backend::SampleParams {
        temperature,
        top_k,
        top_p,
    };
    let rules = [
        topcoat::backend::SampleParams::GREEDY,
        p(1.0, 1, 1.0),
        p(1.0, 0, 1.0),
        p(0.7, 40, 1.0),
        p(1.0, 0, 0.9),
        p(1.3, 50, 0.8),
        p(0.8, 3, 0.37),
    ];
    // (N, V, VP, tied): GPT-2's vocabulary, a small one, and coarse logits full of ties.
    for (n, v, vp, tied) in [
        (16, 50257, 50304, false),
        (300, 100, 128, false),
        (200, 300, 320, true),
    ] {
        let mut logits = randn(&mut rng, n * vp, 2.0);
        for (i, x) in logits.iter_mut().enumerate() {
            if i % vp >= v {
                *x = 1e4; // padding: must never be drawn
            } else if tied {
                *x = (*x * 2.0).round() / 2.0;
            }
        }
        let glogits = up(be, &logits, Role::Activation);
        for rule in &rules {
            let u: Vec<f32> = (0..n).map(|_| rng.next_f32()).collect();
            let want = cpu.sample_tokens(&logits, n, v, vp, rule, &u).unwrap();
            let got = be.sample_tokens(&glogits, n, v, vp, rule, &u).unwrap();
            assert!(
                got.iter().all(|&t| (t as usize) < v),
                "{rule:?}: a padded column drawn"
            );
            let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            println!("sample_tokens V={v} tied={tied} {rule:?}: {differ} of {n} rows differ");
            if rule.is_greedy() {
                assert_eq!(got, want, "greedy must match exactly");
            } else {
                assert!(
                    differ as f64 <= SAMPLE_MISMATCH * n as f64,
                    "{rule:?}: {differ} of {n} rows differ from the CPU rule"
                );
            }
        }
    }
    // Bad parameters are refused before a launch.
    let x = be.zeros(2 * 8, Role::Activation).unwrap();
    assert!(be
        .sample_tokens(&x, 2, 6, 8, &p(1.0, 0, 0.0), &[0.1, 0.2])
        .is_err());
    assert!(be
        .sample_tokens(&x, 2, 6, 8, &p(1.0, 0, 1.0), &[0.1, 1.0])
        .is_err());
}
backend_tests!(sample_tokens => sample_tokens_cpu, sample_tokens_cuda);
