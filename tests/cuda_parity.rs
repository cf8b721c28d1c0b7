//! Every Backend op on the backend under test against the f32 CPU reference, forward and
//! backward, on fresh random inputs at several shapes (including sizes that are not multiples
//! of any block or tile size). Forward outputs are poisoned with NaN first, gradient outputs
//! pre-filled with random values (backward ops accumulate), so untouched or overwritten
//! elements show. On the CPU backend these compare the backend with itself (they still run
//! every op); on CUDA they are the parity tests of DESIGN.md convention 3.

mod common;

use common::{assert_close, bf16_round, down, randn, rel_err_f64};
use topcoat::backend::cpu::{attention as cpu_attention, CpuBackend};
use topcoat::backend::{AdamWStep, Backend, BackendError, Role};
use topcoat::rng::Rng;

/// bf16 storage: `||gpu - ref|| / ||ref||` for ops with short reductions.
const BF16_TOL: f64 = 1e-2;
/// fp32 buffers (gradients accumulated into random fp32 values, optimizer state).
const F32_TOL: f64 = 1e-3;
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

fn encoder<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(1);
    for (b, t, tmax, c, v) in [
        (2, 5, 7, 12, 11),
        (3, 33, 40, 100, 7),
        (1, 64, 64, 257, 300),
    ] {
        let ids = ids_for(&mut rng, b * t, v);
        let (wte, wpe) = (randn(&mut rng, v * c, 1.0), randn(&mut rng, tmax * c, 1.0));
        let mut want = vec![0.0; b * t * c];
        cpu.encoder_forward(&mut want, &ids, &wte, &wpe, b, t, c)
            .unwrap();
        let mut out = up(be, &nan(b * t * c), Role::Activation);
        let (gte, gpe) = (up(be, &wte, Role::Param), up(be, &wpe, Role::Param));
        let gids = be.upload_ids(&ids).unwrap();
        be.encoder_forward(&mut out, &gids, &gte, &gpe, b, t, c)
            .unwrap();
        assert_close("encoder_forward out", &down(be, &out), &want, BF16_TOL);

        let dout = randn(&mut rng, b * t * c, 1.0);
        let (mut dwte, mut dwpe) = (randn(&mut rng, v * c, 1.0), randn(&mut rng, tmax * c, 1.0));
        let (mut gdte, mut gdpe) = (up(be, &dwte, Role::Grad), up(be, &dwpe, Role::Grad));
        cpu.encoder_backward(&mut dwte, &mut dwpe, &dout, &ids, b, t, c)
            .unwrap();
        let gdout = up(be, &dout, Role::Activation);
        be.encoder_backward(&mut gdte, &mut gdpe, &gdout, &gids, b, t, c)
            .unwrap();
        assert_close("encoder_backward dwte", &down(be, &gdte), &dwte, F32_TOL);
        assert_close("encoder_backward dwpe", &down(be, &gdpe), &dwpe, F32_TOL);
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

/// Naive bf16 attention forward on the host: f64 scores and softmax, probabilities rounded to
/// bf16, the weighted sum in f64, the output rounded to bf16 (q, k, v are bf16 already).
fn naive_bf16_attention(qkv: &[f32], b: usize, t: usize, c: usize, nh: usize) -> Vec<f64> {
    let hs = c / nh;
    let scale = 1.0 / (hs as f64).sqrt();
    let mut out = vec![0.0f64; b * t * c];
    let at = |bb: usize, i: usize, part: usize, h: usize, d: usize| {
        qkv[(bb * t + i) * 3 * c + part * c + h * hs + d] as f64
    };
    for bb in 0..b {
        for h in 0..nh {
            for i in 0..t {
                let s: Vec<f64> = (0..=i)
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
                    let o: f64 = (0..=i)
                        .map(|j| {
                            bf16_round(((s[j] - max).exp() / sum) as f32) as f64
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
    for (b, t, c, nh) in [
        (2, 5, 12, 3),
        (1, 33, 64, 2),
        (2, 70, 160, 2),
        (1, 45, 128, 1),
    ] {
        let qkv = randn(&mut rng, b * t * 3 * c, 1.0);
        let (mut out, mut lse) = (vec![0.0; b * t * c], vec![0.0; b * nh * t]);
        cpu.attention_forward(&mut out, &mut lse, &qkv, b, t, c, nh)
            .unwrap();
        let gqkv = up(be, &qkv, Role::Activation);
        let mut gout = up(be, &nan(b * t * c), Role::Activation);
        let mut glse = up(be, &nan(b * nh * t), Role::Activation);
        be.attention_forward(&mut gout, &mut glse, &gqkv, b, t, c, nh)
            .unwrap();
        let got = down(be, &gout);
        assert_close("attention_forward out", &got, &out, BF16_TOL);
        assert_close("attention_forward lse", &down(be, &glse), &lse, BF16_TOL);

        // Against f64: at most ATTN_NAIVE_FACTOR times the error of naive bf16 attention.
        let q64: Vec<f64> = qkv.iter().map(|&x| x as f64).collect();
        let (mut o64, mut l64) = (vec![0.0f64; b * t * c], vec![0.0f64; b * nh * t]);
        cpu_attention::attention_forward(&mut o64, &mut l64, &q64, b, t, c, nh);
        let naive = naive_bf16_attention(&qkv, b, t, c, nh);
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
        // Both backwards use the CPU's forward outputs rounded to bf16 (what a bf16 backend saves).
        let out_r: Vec<f32> = out.iter().map(|&x| bf16_round(x)).collect();
        let lse_r: Vec<f32> = lse.iter().map(|&x| bf16_round(x)).collect();
        cpu.attention_backward(&mut dqkv, &dout, &qkv, &out_r, &lse, b, t, c, nh)
            .unwrap();
        let (gdout, gout_r) = (
            up(be, &dout, Role::Activation),
            up(be, &out_r, Role::Activation),
        );
        let glse_r = up(be, &lse_r, Role::Activation);
        be.attention_backward(&mut gdqkv, &gdout, &gqkv, &gout_r, &glse_r, b, t, c, nh)
            .unwrap();
        assert_close(
            "attention_backward dqkv",
            &down(be, &gdqkv),
            &dqkv,
            BF16_TOL,
        );
    }
}
backend_tests!(attention => attention_cpu, attention_cuda);

fn cross_entropy<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(6);
    for (n, v, vp, dloss) in [
        (4, 11, 16, Some(0.25)),
        (33, 1000, 1024, None),
        (7, 5000, 5003, Some(1.0)),
    ] {
        let logits = randn(&mut rng, n * vp, 2.0);
        let mut targets = ids_for(&mut rng, n, v);
        targets[n / 2] = -1; // a masked row
        let mut want = logits.clone();
        let mut losses = vec![0.0; n];
        cpu.cross_entropy(&mut losses, &mut want, &targets, n, v, vp, dloss)
            .unwrap();
        let mut glogits = up(be, &logits, Role::Activation);
        let mut glosses = up(be, &nan(n), Role::Activation);
        let gt = be.upload_ids(&targets).unwrap();
        be.cross_entropy(&mut glosses, &mut glogits, &gt, n, v, vp, dloss)
            .unwrap();
        assert_close(
            "cross_entropy losses",
            &down(be, &glosses),
            &losses,
            BF16_TOL,
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
    let mut lse = be.zeros(n, Role::Activation).unwrap();
    match be.attention_forward(&mut out, &mut lse, &x, 1, n, c, 2) {
        Err(BackendError::Shape { .. }) => {}
        other => panic!("attention_forward with a short qkv: {other:?}"),
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
