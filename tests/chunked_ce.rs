//! The LM head and cross-entropy in chunks of rows (model/head.rs) against the head in one
//! piece, on the CPU backend: GPT-2 (tied head) and the Llama family (tied and untied), with
//! masked targets, packed rows and recompute, the mean loss's gradient (`LossGrad::Uniform`)
//! and the per-row weights of DPO and RL (`LossGrad::PerRow`), at chunk sizes of one row, one
//! that does not divide `N` and one that does. The default rule chunks a 128256-token
//! vocabulary, and the activations shrink by the logits rows a chunk does not hold. The CUDA
//! twin is tests/cuda_parity/chunked_ce.rs.

mod common;

use common::rel_err;
use topcoat::backend::cpu::CpuBackend;
use topcoat::backend::Backend;
use topcoat::config::{Family, LlamaShape, LoraConfig, LoraTarget, ModelConfig};
use topcoat::model::head::{logit_chunk_rows, logit_staging_elements, LOGIT_CHUNK_ELEMENTS};
use topcoat::model::{Gpt, Packing};
use topcoat::rng::Rng;

/// Gradients, chunked vs in one piece. The products of the head are the same bits for a row
/// whatever the number of rows in the call (the CPU GEMM's blocked kernel) once a call has
/// two rows or more, so then each row's logits, losses and `dlnf` are bit-equal, and so is every
/// gradient but the head's: the head's gradient `dlogits^T @ lnf` sums over positions, and
/// chunking splits that sum at the chunk boundaries (f32 rounding of an `N`-term sum).
const HEAD_GRAD_TOL: f64 = 1e-6;
/// Chunks of one row: the `gemm` crate runs a one-row product through its matrix-vector kernel,
/// whose dot products round differently from the blocked kernel's (an ulp or two per logit),
/// so losses and every gradient agree to f32 rounding, not bit for bit.
const ONE_ROW_LOSS_TOL: f64 = 1e-6;
const ONE_ROW_GRAD_TOL: f64 = 1e-5;

const B: usize = 2;
const T: usize = 9;
/// One row, a size that leaves a short last chunk (18 = 4 * 4 + 2), one that divides N, and
/// one past N (a single chunk). (A vocabulary of 320 padded columns keeps every product of two
/// rows or more off the `gemm` crate's dot-product kernel for outputs of at most 256.)
const CHUNKS: [usize; 4] = [1, 4, 6, 64];

fn gpt2() -> ModelConfig {
    ModelConfig {
        vocab_size: 300,
        padded_vocab_size: 320,
        n_layer: 2,
        n_head: 4,
        n_embd: 16,
        max_seq_len: 16,
        family: Family::default(),
        lora: None,
    }
}

fn llama(tie: bool) -> ModelConfig {
    ModelConfig {
        family: Family::Llama(LlamaShape {
            tie_embeddings: tie,
            qkv_bias: true,
            ..LlamaShape::new(2, 24)
        }),
        ..gpt2()
    }
}

/// Initial values with every tensor moved off its init (so every gradient is exercised);
/// padded vocabulary rows stay zero.
fn values(be: &CpuBackend, cfg: &ModelConfig, seed: u64) -> Vec<Vec<f32>> {
    let model = Gpt::init(be, cfg, seed).unwrap();
    let mut rng = Rng::new(seed ^ 0xC4E);
    let mut values = model.param_values(be).unwrap();
    for (spec, v) in model.layout.specs.iter().zip(&mut values) {
        let keep = if spec.shape == [cfg.padded_vocab_size, cfg.n_embd] {
            cfg.vocab_size * cfg.n_embd
        } else {
            v.len()
        };
        let scale = if spec.shape.len() == 1 { 0.3 } else { 0.1 };
        for x in &mut v[..keep] {
            *x += scale * rng.normal();
        }
    }
    values
}

fn ids(rng: &mut Rng, n: usize, v: usize) -> Vec<i32> {
    (0..n).map(|_| rng.below(v as u64) as i32).collect()
}

/// Random inputs, and targets with a few masked (-1).
fn batch(rng: &mut Rng, cfg: &ModelConfig) -> (Vec<i32>, Vec<i32>) {
    let inputs = ids(rng, B * T, cfg.vocab_size);
    let mut targets = ids(rng, B * T, cfg.vocab_size);
    for i in [0, 5, T, B * T - 1] {
        targets[i] = -1;
    }
    (inputs, targets)
}

/// What one pass leaves: the per-position losses and every gradient.
struct Pass {
    losses: Vec<f32>,
    grads: Vec<Vec<f32>>,
    /// What the pass returned (a mean loss, or log-probabilities), as f64 bits.
    out: Vec<f64>,
}

/// The three kinds of loss pass with a gradient.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// `forward_backward`: `LossGrad::Uniform`.
    Mean,
    /// DPO's `sequence_logps_step`: `LossGrad::PerRow`, one weight per row.
    Sequence,
    /// RL's `token_logps_step`: `LossGrad::PerRow`, one weight per position.
    Token,
}

#[allow(clippy::too_many_arguments)]
fn run(
    be: &CpuBackend,
    cfg: &ModelConfig,
    vals: &[Vec<f32>],
    chunk: Option<usize>,
    kind: Kind,
    inputs: &[i32],
    targets: &[i32],
    packing: Option<&Packing>,
    recompute: u8,
) -> Pass {
    let mut m = Gpt::from_values(be, cfg, vals.to_vec()).unwrap();
    m.set_logit_chunk_rows(chunk).unwrap();
    m.set_recompute(recompute).unwrap();
    m.zero_grad(be).unwrap();
    let out = match kind {
        Kind::Mean => {
            let l = m
                .forward_backward_with(be, inputs, targets, packing, B, T, 0.7)
                .unwrap();
            vec![l.sum, l.mean as f64, l.tokens as f64]
        }
        Kind::Sequence => m
            .sequence_logps_step(be, inputs, targets, B, T, |lp| {
                lp.iter().map(|&x| (0.3 - 0.01 * x) as f32).collect()
            })
            .unwrap(),
        Kind::Token => m
            .token_logps_step(be, inputs, targets, B, T, |lp| {
                lp.iter().map(|&x| 0.2 + 0.05 * x).collect()
            })
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect(),
    };
    Pass {
        losses: m.position_losses(be).unwrap(),
        grads: m.grad_values(be).unwrap(),
        out,
    }
}

/// Chunked against one piece, every chunk size and every kind of pass: losses and outputs
/// bit-equal, every gradient bit-equal but the head's, which is within [`HEAD_GRAD_TOL`].
fn check(cfg: &ModelConfig, packing: Option<&Packing>, recompute: u8, seed: u64) {
    let be = CpuBackend::new();
    let vals = values(&be, cfg, seed);
    let mut rng = Rng::new(seed);
    let (inputs, targets) = batch(&mut rng, cfg);
    let head = Gpt::init(&be, cfg, 1).unwrap().layout.head();
    let names: Vec<String> = Gpt::init(&be, cfg, 1)
        .unwrap()
        .layout
        .specs
        .iter()
        .map(|s| s.name.clone())
        .collect();
    for kind in [Kind::Mean, Kind::Sequence, Kind::Token] {
        let p = |chunk| {
            run(
                &be, cfg, &vals, chunk, kind, &inputs, &targets, packing, recompute,
            )
        };
        let want = p(None);
        assert!(want.losses.iter().filter(|&&x| x != 0.0).count() >= B * T - 4);
        for rows in CHUNKS {
            let got = p(Some(rows));
            let at = format!("{kind:?}, chunks of {rows}");
            if rows == 1 {
                let e = rel_err(&got.losses, &want.losses);
                assert!(e <= ONE_ROW_LOSS_TOL, "{at}: losses rel err {e:.2e}");
                let e = common::rel_err_f64(&got.out, &want.out);
                assert!(e <= ONE_ROW_LOSS_TOL, "{at}: outputs rel err {e:.2e}");
                for (k, (g, w)) in got.grads.iter().zip(&want.grads).enumerate() {
                    let e = rel_err(g, w);
                    assert!(e <= ONE_ROW_GRAD_TOL, "{at}: {} rel err {e:.2e}", names[k]);
                }
                continue;
            }
            assert_eq!(bits(&got.losses), bits(&want.losses), "{at}: losses");
            let out = |x: &[f64]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(out(&got.out), out(&want.out), "{at}: outputs");
            for (k, (g, w)) in got.grads.iter().zip(&want.grads).enumerate() {
                if w.is_empty() {
                    // A frozen tensor (LoRA's base) has no gradient either way.
                    assert!(g.is_empty(), "{at}: frozen {} has a gradient", names[k]);
                    continue;
                }
                assert!(
                    w.iter().any(|&x| x != 0.0),
                    "{at}: {} has no gradient",
                    names[k]
                );
                if k == head && rows < B * T {
                    let e = rel_err(g, w);
                    assert!(e <= HEAD_GRAD_TOL, "{at}: {} rel err {e:.2e}", names[k]);
                } else {
                    assert_eq!(bits(g), bits(w), "{at}: {}", names[k]);
                }
            }
        }
    }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn chunked_equals_unchunked_gpt2() {
    check(&gpt2(), None, 0, 3);
}

#[test]
fn chunked_equals_unchunked_llama_untied() {
    check(&llama(false), None, 0, 4);
}

#[test]
fn chunked_equals_unchunked_llama_tied() {
    check(&llama(true), None, 0, 5);
}

/// Packed rows and recompute level 2 take the same head (its input is `lnf`, whatever made it).
#[test]
fn chunked_equals_unchunked_packed_with_recompute() {
    let packing = Packing::from_lengths(&[vec![3, 6], vec![2, 4, 3]], T).unwrap();
    check(&gpt2(), Some(&packing), 2, 6);
    check(&llama(false), Some(&packing), 1, 7);
}

/// A LoRA model (frozen base and head, adapters on every projection, B moved off zero,
/// dropout on): the head's backward gives `dlnf` only, and the adapters' gradients are the
/// same bits chunked or not.
#[test]
fn chunked_equals_unchunked_lora() {
    for (cfg, seed) in [(gpt2(), 11), (llama(false), 12)] {
        let targets = LoraTarget::all_for(&cfg);
        let cfg = ModelConfig {
            lora: Some(LoraConfig {
                rank: 2,
                alpha: 4.0,
                dropout: 0.1,
                targets,
            }),
            ..cfg
        };
        check(&cfg, None, 0, seed);
    }
}

/// A loss pass without a gradient (evaluation, reference log-probabilities) gives the same
/// losses; the activations hold `rows` logit rows instead of `N`, plus the chunk's staging
/// of `lnf` and `dlnf` rows (`2 * rows * C`).
#[test]
fn activations_shrink_by_the_rows_not_held() {
    let be = CpuBackend::new();
    let cfg = llama(false);
    let vals = values(&be, &cfg, 8);
    let (inputs, targets) = batch(&mut Rng::new(8), &cfg);
    let (n, c, vp) = (B * T, cfg.n_embd, cfg.padded_vocab_size);
    let mut m = Gpt::from_values(&be, &cfg, vals).unwrap();
    let whole = m.forward_loss(&be, &inputs, &targets, B, T).unwrap();
    let want = m.position_losses(&be).unwrap();
    let full = m.activation_elements(&be).unwrap();
    for rows in [1, 4, 6] {
        m.set_logit_chunk_rows(Some(rows)).unwrap();
        let loss = m.forward_loss(&be, &inputs, &targets, B, T).unwrap();
        let losses = m.position_losses(&be).unwrap();
        if rows == 1 {
            let e = rel_err(&losses, &want);
            assert!(e <= ONE_ROW_LOSS_TOL, "chunks of 1: losses rel err {e:.2e}");
        } else {
            assert_eq!(loss, whole, "chunks of {rows}");
            assert_eq!(bits(&losses), bits(&want), "chunks of {rows}");
        }
        let got = m.activation_elements(&be).unwrap();
        assert_eq!(
            full - got,
            (n - rows) * vp - 2 * rows * c,
            "chunks of {rows}"
        );
    }
    m.set_logit_chunk_rows(None).unwrap();
    m.forward_loss(&be, &inputs, &targets, B, T).unwrap();
    assert_eq!(m.activation_elements(&be).unwrap(), full);
}

/// The default rule at a Llama-3 vocabulary: 524 positions of 128256 logits do not fit one
/// chunk of LOGIT_CHUNK_ELEMENTS, so the pass runs two chunks of 262 rows, with the losses of
/// a pass in chunks of 200 (a short last one), and the logits buffer holds 262 rows.
#[test]
fn a_large_vocabulary_is_chunked_by_default() {
    let be = CpuBackend::new();
    let cfg = ModelConfig {
        vocab_size: 128_256,
        padded_vocab_size: 128_256,
        n_layer: 1,
        n_head: 2,
        n_embd: 8,
        max_seq_len: 262,
        family: Family::Llama(LlamaShape::new(1, 16)),
        lora: None,
    };
    let (b, t) = (2, 262);
    let (n, vp, c) = (b * t, cfg.padded_vocab_size, cfg.n_embd);
    assert!(n * vp > LOGIT_CHUNK_ELEMENTS);
    assert_eq!(logit_chunk_rows(n, vp), 262);
    assert_eq!(logit_staging_elements(n, c, vp), 2 * 262 * c);
    let mut rng = Rng::new(9);
    let inputs = ids(&mut rng, n, cfg.vocab_size);
    let mut targets = ids(&mut rng, n, cfg.vocab_size);
    targets[7] = -1;
    let mut m = Gpt::init(&be, &cfg, 9).unwrap();
    assert_eq!(m.loss_chunk_rows(n), 262);
    let loss = m
        .forward_backward(&be, &inputs, &targets, b, t, 1.0)
        .unwrap();
    assert!(loss.mean > 10.0 && loss.mean < 13.0, "{loss:?}"); // ~ln 128256 = 11.76
    let losses = m.position_losses(&be).unwrap();
    let default_elems = m.activation_elements(&be).unwrap();
    m.set_logit_chunk_rows(Some(200)).unwrap();
    assert_eq!(m.forward_loss(&be, &inputs, &targets, b, t).unwrap(), loss);
    assert_eq!(bits(&m.position_losses(&be).unwrap()), bits(&losses));
    let smaller = m.activation_elements(&be).unwrap();
    assert_eq!(default_elems - smaller, (262 - 200) * (vp + 2 * c));
}

/// After a chunked loss pass only the last chunk's positions are held; the others are a named
/// error, the held ones are the logits `forward` gives. A chunk of 0 rows is refused.
#[test]
fn logits_at_names_the_positions_held() {
    let be = CpuBackend::new();
    let cfg = gpt2();
    let vals = values(&be, &cfg, 10);
    let (inputs, targets) = batch(&mut Rng::new(10), &cfg);
    let mut m = Gpt::from_values(&be, &cfg, vals).unwrap();
    m.forward(&be, &inputs, B, T).unwrap();
    let want: Vec<Vec<f32>> = (0..B * T)
        .map(|i| m.logits_at(&be, i / T, i % T).unwrap())
        .collect();
    m.set_logit_chunk_rows(Some(4)).unwrap();
    m.forward_loss(&be, &inputs, &targets, B, T).unwrap();
    // 18 positions in chunks of 4: the last chunk starts at 16.
    for (i, w) in want.iter().enumerate().skip(16) {
        let got = m.logits_at(&be, i / T, i % T).unwrap();
        assert_eq!(bits(&got), bits(w), "position {i}");
    }
    let e = m.logits_at(&be, 0, 3).unwrap_err().to_string();
    assert!(
        e.contains("logits of row 0, position 3 are not held")
            && e.contains("chunks of 4 rows and kept positions 16..18 of 18"),
        "{e}"
    );
    let e = m.logits_at(&be, 2, 0).unwrap_err().to_string();
    assert!(e.contains("outside the last batch B=2, T=9"), "{e}");
    // `forward` after a chunked pass holds every position again.
    m.forward(&be, &inputs, B, T).unwrap();
    assert_eq!(bits(&m.logits_at(&be, 0, 3).unwrap()), bits(&want[3]));
    let e = m.set_logit_chunk_rows(Some(0)).unwrap_err().to_string();
    assert!(e.contains("logit chunk rows 0"), "{e}");
}

/// `copy_range` copies the range asked for and nothing else, and refuses a range past either
/// end by name.
#[test]
fn copy_range_copies_and_checks() {
    let be = CpuBackend::new();
    let src: Vec<f32> = (0..10).map(|i| i as f32 + 0.5).collect();
    let mut dst = vec![-1.0f32; 6];
    be.copy_range(&mut dst, 2, &src, 5, 3).unwrap();
    assert_eq!(dst, [-1.0, -1.0, 5.5, 6.5, 7.5, -1.0]);
    let e = be
        .copy_range(&mut dst, 4, &src, 0, 3)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("copy_range: buffer `dst` has 6 elements, expected 7"),
        "{e}"
    );
    let e = be
        .copy_range(&mut dst, 0, &src, 8, 3)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("copy_range: buffer `src` has 10 elements, expected 11"),
        "{e}"
    );
    let e = be
        .copy_range(&mut dst, 0, &src, usize::MAX, 3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`src`"), "{e}");
}
