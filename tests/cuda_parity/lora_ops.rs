//! LoRA's ops against the CPU reference: the column-slice add and copy (bf16 storage, shapes
//! off every block size), and the seeded dropout, whose mask must be the CPU's bit for bit
//! (the backward recomputes it from the seed on whichever backend runs).

use super::*;

fn columns<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(81);
    for (n, oc, col, w) in [
        (5, 12, 4, 3),
        (33, 3 * 64, 64, 64),
        (70, 577, 0, 577),
        (9, 300, 299, 1),
    ] {
        let x = randn(&mut rng, n * w, 1.0);
        let y0 = randn(&mut rng, n * oc, 1.0);
        let alpha = 1.75;
        let mut want = y0.clone();
        cpu.add_columns(&mut want, &x, n, oc, col, w, alpha)
            .unwrap();
        let mut gy = up(be, &y0, Role::Activation);
        be.add_columns(&mut gy, &up(be, &x, Role::Activation), n, oc, col, w, alpha)
            .unwrap();
        assert_close("add_columns y", &down(be, &gy), &want, BF16_TOL);
        // The columns outside the slice are untouched, bit for bit.
        let got = down(be, &gy);
        for r in 0..n {
            for j in (0..oc).filter(|j| !(col..col + w).contains(j)) {
                assert_eq!(got[r * oc + j], y0[r * oc + j], "add_columns ({r}, {j})");
            }
        }

        let mut want = vec![0.0; n * w];
        cpu.copy_columns(&mut want, &y0, n, oc, col, w, alpha)
            .unwrap();
        let mut gout = up(be, &nan(n * w), Role::Activation);
        be.copy_columns(
            &mut gout,
            &up(be, &y0, Role::Activation),
            n,
            oc,
            col,
            w,
            alpha,
        )
        .unwrap();
        assert_close("copy_columns out", &down(be, &gout), &want, BF16_TOL);
    }
}

parity_tests!(columns => columns_cpu, columns_cuda);

fn dropout<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(82);
    for (n, p, seed) in [
        (1000, 0.1f32, 3u64),
        (65_537, 0.5, u64::MAX),
        (4097, 0.0, 9),
    ] {
        let x = randn(&mut rng, n, 1.0);
        let mut want = vec![0.0; n];
        cpu.dropout_forward(&mut want, &x, n, p, seed).unwrap();
        let mut out = up(be, &nan(n), Role::Activation);
        be.dropout_forward(&mut out, &up(be, &x, Role::Activation), n, p, seed)
            .unwrap();
        let got = down(be, &out);
        // The same elements dropped, bit for bit (x has no zeros to confuse the count).
        for i in 0..n {
            assert_eq!(
                got[i] == 0.0,
                want[i] == 0.0,
                "mask at {i} (p {p}, seed {seed})"
            );
        }
        assert_close("dropout_forward out", &got, &want, BF16_TOL);
        let mut dx = up(be, &nan(n), Role::Activation);
        be.dropout_backward(&mut dx, &up(be, &x, Role::Activation), n, p, seed)
            .unwrap();
        assert_eq!(down(be, &dx), got, "the backward is the same map");
    }
}

parity_tests!(dropout => dropout_cpu, dropout_cuda);

/// A whole LoRA model (bf16 frozen base, adapters on every projection, dropout on) against
/// the f32 CPU reference: one training pass's loss and adapter gradients, and the logits with
/// the adapters switched off.
const LORA_MODEL_TOL: f64 = 2e-2;
const LORA_TENSOR_TOL: f64 = 5e-2;

fn lora_model<B: Backend>(be: &B) {
    use topcoat::config::{Family, LlamaShape, LoraConfig, LoraTarget, ModelConfig};
    use topcoat::model::Gpt;
    let gpt2 = ModelConfig {
        vocab_size: 61,
        padded_vocab_size: 64,
        n_layer: 2,
        n_head: 2,
        n_embd: 64,
        max_seq_len: 48,
        family: Family::default(),
        lora: None,
    };
    let llama = ModelConfig {
        family: Family::Llama(LlamaShape::new(1, 96)),
        ..gpt2.clone()
    };
    for cfg in [gpt2, llama] {
        let mut rng = Rng::new(91);
        let (b, t) = (3, 40);
        let inputs = ids_for(&mut rng, b * t, cfg.vocab_size);
        let targets = ids_for(&mut rng, b * t, cfg.vocab_size);
        let base = Gpt::init(&CpuBackend, &cfg, 5)
            .unwrap()
            .param_values(&CpuBackend)
            .unwrap();
        let lora = LoraConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.1,
            targets: LoraTarget::all_for(&cfg),
        };
        // Adapters with B moved off zero (bf16-exact values, so both backends see them).
        let mut values = Gpt::with_lora(&CpuBackend, &cfg, base, lora.clone(), 6)
            .unwrap()
            .param_values(&CpuBackend)
            .unwrap();
        let mut lcfg = cfg.clone();
        lcfg.lora = Some(lora);
        let slots = topcoat::model::ParamLayout::new(&lcfg).lora;
        for s in &slots {
            for idx in [s.a, s.b] {
                values[idx] = randn(&mut rng, values[idx].len(), 0.1);
            }
        }
        let run = |be: &B| -> (f64, Vec<Vec<f32>>, Vec<f32>) {
            let mut m = Gpt::from_values(be, &lcfg, values.clone()).unwrap();
            m.set_lora_dropout_seed(17);
            m.zero_grad(be).unwrap();
            let loss = m
                .forward_backward(be, &inputs, &targets, b, t, 1.0)
                .unwrap();
            m.set_adapters_enabled(false);
            m.forward(be, &inputs, b, t).unwrap();
            (
                loss.sum,
                m.grad_values(be).unwrap(),
                m.logits_at(be, 1, t - 1).unwrap(),
            )
        };
        let cpu = CpuBackend::new();
        let (wl, wg, wlog) = run_cpu(&cpu, &lcfg, &values, &inputs, &targets, b, t);
        let (gl, gg, glog) = run(be);
        assert_close("lora loss", &[gl as f32], &[wl as f32], LORA_MODEL_TOL);
        assert_close("lora off logits", &glog, &wlog, LORA_MODEL_TOL);
        for s in &slots {
            for idx in [s.a, s.b] {
                let what = format!("lora grad {idx}");
                assert_close(&what, &gg[idx], &wg[idx], LORA_TENSOR_TOL);
                assert!(gg[idx].iter().any(|&x| x != 0.0), "{what}");
            }
        }
        assert!(
            gg[..slots[0].a].iter().all(Vec::is_empty),
            "frozen: no grads"
        );
    }
}

/// `lora_model`'s pass on the CPU reference.
fn run_cpu(
    cpu: &CpuBackend,
    cfg: &topcoat::config::ModelConfig,
    values: &[Vec<f32>],
    inputs: &[i32],
    targets: &[i32],
    b: usize,
    t: usize,
) -> (f64, Vec<Vec<f32>>, Vec<f32>) {
    let mut m = topcoat::model::Gpt::from_values(cpu, cfg, values.to_vec()).unwrap();
    m.set_lora_dropout_seed(17);
    m.zero_grad(cpu).unwrap();
    let loss = m.forward_backward(cpu, inputs, targets, b, t, 1.0).unwrap();
    m.set_adapters_enabled(false);
    m.forward(cpu, inputs, b, t).unwrap();
    (
        loss.sum,
        m.grad_values(cpu).unwrap(),
        m.logits_at(cpu, 1, t - 1).unwrap(),
    )
}

parity_tests!(lora_model => lora_model_cpu, lora_model_cuda);
