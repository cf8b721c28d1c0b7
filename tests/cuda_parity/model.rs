//! Whole-model parity: the reward model end to end, and packed against unpacked SFT batches.

use super::*;

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
        family: Default::default(),
        lora: None,
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
parity_tests!(reward_model => reward_model_cpu, reward_model_cuda);

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
        family: Default::default(),
        lora: None,
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
parity_tests!(packed_model => packed_model_cpu, packed_model_cuda);
