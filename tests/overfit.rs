//! A tiny model must be able to memorise one fixed batch: the end-to-end check that forward,
//! backward and AdamW fit together.

use topcoat::backend::cpu::CpuBackend;
use topcoat::config::{ModelConfig, RunConfig};
use topcoat::model::Gpt;
use topcoat::optim::AdamW;
use topcoat::rng::Rng;

#[test]
fn tiny_model_overfits_one_batch() {
    let cfg = ModelConfig {
        vocab_size: 50,
        padded_vocab_size: 64,
        n_layer: 2,
        n_head: 2,
        n_embd: 32,
        max_seq_len: 16,
        family: Default::default(),
        lora: None,
    };
    let (b, t) = (2, 16);
    let mut rng = Rng::new(11);
    let tokens: Vec<i32> = (0..b * (t + 1)).map(|_| rng.below(50) as i32).collect();
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    for row in tokens.chunks(t + 1) {
        inputs.extend_from_slice(&row[..t]);
        targets.extend_from_slice(&row[1..]);
    }
    let be = CpuBackend;
    let mut model = Gpt::init(&be, &cfg, 3).unwrap();
    let mut opt = AdamW::new(&be, &topcoat::dist::Solo::new(), &mut model, 0).unwrap();
    let run = RunConfig {
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut first = None;
    let mut last = f32::INFINITY;
    for _ in 0..300 {
        model.zero_grad(&be).unwrap();
        let loss = model
            .forward_backward(&be, &inputs, &targets, b, t, 1.0)
            .unwrap();
        first.get_or_insert(loss.mean);
        last = loss.mean;
        if last < 0.1 {
            break;
        }
        opt.update(
            &be,
            &topcoat::dist::Solo::new(),
            &mut model,
            &run,
            3e-3,
            1.0,
        )
        .unwrap();
    }
    let first = first.unwrap();
    assert!(
        (first - (50f32).ln()).abs() < 0.5,
        "initial loss {first} should be near ln(50) = 3.91"
    );
    assert!(last < 0.1, "loss only fell from {first} to {last}");
}
