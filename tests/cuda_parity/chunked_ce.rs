//! The chunked LM head and cross-entropy (model/head.rs) on the backend under test: the
//! `copy_range` op that moves a chunk's rows (bf16 activations and fp32 state), and whole
//! models run in chunks of rows against the same backend in one piece and against the f32
//! CPU reference: GPT-2 (tied head) and a Llama-family model (untied), masked targets, the
//! mean loss's gradient and DPO's per-row weights. The CPU-only bit-level checks are
//! tests/chunked_ce.rs.

use super::*;
use topcoat::config::{Family, LlamaShape, ModelConfig};
use topcoat::model::Gpt;

/// Chunked vs one piece on one backend: the same bf16 inputs; only the head's products run at
/// another `M`, where cuBLASLt may pick another algorithm (another fp32 summation order) and
/// round a logit or a `dlnf` element to the neighbouring bf16 value. Losses are stored in fp32
/// from those logits; gradients go on through bf16 activations of every layer.
const CHUNK_LOSS_TOL: f64 = 2e-3;
const CHUNK_GRAD_TOL: f64 = 2e-2;
/// A whole bf16 model in chunks vs the f32 CPU reference in one piece (as the whole-model
/// tolerances of model.rs).
const CHUNK_MODEL_TOL: f64 = 5e-2;

fn copy_range_parity<B: Backend>(be: &B) {
    let mut rng = Rng::new(31);
    for role in [Role::Activation, Role::State] {
        let src_host = randn(&mut rng, 1000, 1.0);
        let dst_host = randn(&mut rng, 700, 1.0);
        let src = up(be, &src_host, role);
        let mut dst = up(be, &dst_host, role);
        be.copy_range(&mut dst, 13, &src, 301, 517).unwrap();
        let mut want = dst_host.clone();
        want[13..13 + 517].copy_from_slice(&src_host[301..301 + 517]);
        // bf16-exact values copy exactly, in either precision.
        assert_eq!(down(be, &dst), want, "{role:?}");
        be.copy_range(&mut dst, 0, &src, 0, 0).unwrap();
        let e = be.copy_range(&mut dst, 600, &src, 0, 101).unwrap_err();
        assert!(
            e.to_string()
                .contains("copy_range: buffer `dst` has 700 elements, expected 701"),
            "{e}"
        );
        let e = be.copy_range(&mut dst, 0, &src, 999, 2).unwrap_err();
        assert!(e.to_string().contains("buffer `src`"), "{e}");
    }
    // Where the roles differ in precision (CUDA), a copy across them is refused by name.
    if be.element_bytes(Role::Activation) != be.element_bytes(Role::State) {
        let src = up(be, &randn(&mut rng, 8, 1.0), Role::Activation);
        let mut dst = up(be, &randn(&mut rng, 8, 1.0), Role::State);
        let e = be
            .copy_range(&mut dst, 0, &src, 0, 8)
            .unwrap_err()
            .to_string();
        assert!(e.contains("copy_range") && e.contains("`dst`"), "{e}");
    }
}
parity_tests!(copy_range_parity => copy_range_cpu, copy_range_cuda);

fn gpt2() -> ModelConfig {
    ModelConfig {
        vocab_size: 1000,
        padded_vocab_size: 1024,
        n_layer: 2,
        n_head: 2,
        n_embd: 64,
        max_seq_len: 48,
        family: Family::default(),
        lora: None,
    }
}

fn llama() -> ModelConfig {
    ModelConfig {
        family: Family::Llama(LlamaShape::new(1, 96)),
        ..gpt2()
    }
}

/// (per-position losses, sequence log-probabilities, every gradient concatenated) of a mean
/// loss step and a DPO-style sequence step, in chunks of `chunk` rows (`None`: the default).
fn passes<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    values: &[Vec<f32>],
    chunk: Option<usize>,
    (inputs, targets): (&[i32], &[i32]),
    (b, t): (usize, usize),
) -> (Vec<f32>, Vec<f64>, Vec<f32>) {
    let mut m = Gpt::from_values(be, cfg, values.to_vec()).unwrap();
    m.set_logit_chunk_rows(chunk).unwrap();
    m.zero_grad(be).unwrap();
    m.forward_backward(be, inputs, targets, b, t, 1.0).unwrap();
    let losses = m.position_losses(be).unwrap();
    let logps = m
        .sequence_logps_step(be, inputs, targets, b, t, |lp| {
            lp.iter().map(|&x| (0.5 - 0.01 * x) as f32).collect()
        })
        .unwrap();
    (losses, logps, m.grad_values(be).unwrap().concat())
}

fn chunked_model<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(32);
    let (b, t) = (3, 37);
    for cfg in [gpt2(), llama()] {
        let values: Vec<Vec<f32>> = Gpt::init(&cpu, &cfg, 33)
            .unwrap()
            .param_values(&cpu)
            .unwrap()
            .into_iter()
            .map(|v| v.into_iter().map(bf16_round).collect())
            .collect();
        let inputs = ids_for(&mut rng, b * t, cfg.vocab_size);
        let mut targets = ids_for(&mut rng, b * t, cfg.vocab_size);
        for i in (0..b * t).step_by(7) {
            targets[i] = -1;
        }
        let io = (inputs.as_slice(), targets.as_slice());
        let family = if cfg.llama().is_some() {
            "llama"
        } else {
            "gpt2"
        };
        let want = passes(&cpu, &cfg, &values, None, io, (b, t));
        let whole = passes(be, &cfg, &values, None, io, (b, t));
        // 111 positions: chunks of one row, of 16 (a short last chunk of 15), and of 37.
        for rows in [1, 16, 37] {
            let got = passes(be, &cfg, &values, Some(rows), io, (b, t));
            let at = format!("{family}, chunks of {rows}");
            assert_close(&format!("{at}: losses"), &got.0, &whole.0, CHUNK_LOSS_TOL);
            let e = rel_err_f64(&got.1, &whole.1);
            println!("{at}: log-probs rel err {e:.2e}");
            assert!(e <= CHUNK_LOSS_TOL, "{at}: log-probs rel err {e:e}");
            assert_close(&format!("{at}: grads"), &got.2, &whole.2, CHUNK_GRAD_TOL);
            assert_close(
                &format!("{at}: losses vs cpu"),
                &got.0,
                &want.0,
                CHUNK_MODEL_TOL,
            );
            assert_close(
                &format!("{at}: grads vs cpu"),
                &got.2,
                &want.2,
                CHUNK_MODEL_TOL,
            );
        }
    }
}
parity_tests!(chunked_model => chunked_model_cpu, chunked_model_cuda);
