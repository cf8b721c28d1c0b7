//! The model's loss and every gradient tensor against PyTorch (float64) on a tiny config.
//!
//! The fixture tests/fixtures/gpt_tiny.safetensors is made by scripts/make_fixture.py (see
//! the README for how to remake it): random weights (never zeros), random inputs, three masked
//! targets, vocabulary 61 padded to 64.

use safetensors::SafeTensors;
use topcoat::backend::cpu::CpuBackend;
use topcoat::config::ModelConfig;
use topcoat::model::{Gpt, ParamLayout};

/// f32 forward/backward against an f64 reference: relative L2 error per tensor.
const GRAD_TOL: f64 = 1e-4;
const LOSS_TOL: f64 = 1e-5;

fn floats(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("fixture lacks {name}"));
    t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn ints(st: &SafeTensors, name: &str) -> Vec<i32> {
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("fixture lacks {name}"));
    t.data()
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn loss_and_gradients_match_pytorch() {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/gpt_tiny.safetensors"
    ))
    .unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let cfg = ModelConfig {
        vocab_size: 61,
        padded_vocab_size: 64,
        n_layer: 2,
        n_head: 4,
        n_embd: 32,
        max_seq_len: 16,
        family: Default::default(),
        lora: None,
    };
    let (b, t) = (2, 12);
    let layout = ParamLayout::new(&cfg);
    let values: Vec<Vec<f32>> = layout.specs.iter().map(|s| floats(&st, &s.name)).collect();
    let be = CpuBackend;
    let mut model = Gpt::from_values(&be, &cfg, values).unwrap();
    let inputs = ints(&st, "input_ids");
    let targets = ints(&st, "targets");
    assert_eq!(
        targets.iter().filter(|&&x| x < 0).count(),
        3,
        "fixture masks three targets"
    );

    let loss = model
        .forward_backward(&be, &inputs, &targets, b, t, 1.0)
        .unwrap();
    let want = floats(&st, "loss")[0] as f64;
    assert_eq!(loss.tokens, b * t - 3);
    assert!(
        ((loss.mean as f64 - want) / want).abs() < LOSS_TOL,
        "loss {} vs PyTorch {want}",
        loss.mean
    );

    let grads = model.grad_values(&be).unwrap();
    let mut worst = (0.0f64, "");
    for (spec, g) in layout.specs.iter().zip(&grads) {
        let want = floats(&st, &format!("grad.{}", spec.name));
        let err = rel_err(g, &want);
        assert!(
            err < GRAD_TOL,
            "grad of {}: relative error {err:.3e}",
            spec.name
        );
        if err > worst.0 {
            worst = (err, spec.name.as_str());
        }
    }
    println!(
        "largest gradient relative error: {:.2e} ({})",
        worst.0, worst.1
    );
}
