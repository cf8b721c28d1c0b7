//! SFT packing: several whole examples in one row, kept apart. A packed batch and an unpacked
//! batch of the same examples give the same summed loss and the same gradients; a token of one
//! packed example does not reach another's losses; the `sft` stage packs whole examples
//! greedily in draw order and its validation loss does not depend on packing. (The CUDA twin
//! of the first test is `packed_model_*` in tests/cuda_parity/model.rs.)

use topcoat::backend::cpu::CpuBackend;
use topcoat::commands::inputs::TokenizerArg;
use topcoat::commands::prepare::{prepare_sft, EMBEDDED_CORPUS};
use topcoat::config::ModelConfig;
use topcoat::data::RankSlice;
use topcoat::data::{SftPrepareOptions, Tokenizer};
use topcoat::model::{Gpt, Packing};
use topcoat::rng::Rng;
use topcoat::stages::sft::{fill_row, BatchBuilder, Sft};
use topcoat::stages::PreparedData;
use topcoat::train::Objective;

/// Packed vs unpacked, f32 CPU: relative difference of the summed loss.
const LOSS_TOL: f64 = 1e-6;
/// Packed vs unpacked, f32 CPU: `||g_packed - g_unpacked|| / ||g_unpacked||` per tensor (the
/// two differ only in the order of f32 sums over rows).
const GRAD_TOL: f64 = 1e-5;

const T: usize = 40;
const V: usize = 61;

fn config() -> ModelConfig {
    ModelConfig {
        vocab_size: V,
        padded_vocab_size: 64,
        n_layer: 2,
        n_head: 2,
        n_embd: 32,
        max_seq_len: 48,
        family: Default::default(),
        lora: None,
    }
}

/// Random examples of the given token counts: random ids, a random loss mask with at least one
/// trained-on target.
fn examples(lens: &[usize], rng: &mut Rng) -> Vec<(Vec<u32>, Vec<bool>)> {
    lens.iter()
        .map(|&n| {
            let ids = (0..n).map(|_| rng.below(V as u64) as u32).collect();
            let mut mask: Vec<bool> = (0..n).map(|_| rng.below(2) == 0).collect();
            mask[n - 1] = true;
            (ids, mask)
        })
        .collect()
}

/// One example per row, built with `fill_row` (an independent path from the batch builder).
fn unpacked(ex: &[(Vec<u32>, Vec<bool>)], pad: u32) -> (Vec<i32>, Vec<i32>) {
    let (mut inputs, mut targets) = (vec![0; ex.len() * T], vec![0; ex.len() * T]);
    for (r, (ids, mask)) in ex.iter().enumerate() {
        let rows = r * T..(r + 1) * T;
        fill_row(
            ids,
            mask,
            T,
            pad,
            &mut inputs[rows.clone()],
            &mut targets[rows],
        );
    }
    (inputs, targets)
}

fn packed(ex: &[(Vec<u32>, Vec<bool>)], b: usize, pad: u32) -> (Vec<i32>, Vec<i32>, Packing) {
    let mut batch = BatchBuilder::new(b, T, pad, true);
    for (ids, mask) in ex {
        assert!(batch.push(ids, mask), "the examples fit in {b} packed rows");
    }
    let batch = batch.finish();
    (batch.inputs, batch.targets, batch.packing.unwrap())
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// Slots 10 + 25 + 5 fill row 0 exactly; 17 + 12 + 8 go to row 1 (the 30 does not fit after
/// them); 30 takes row 2; the 50-token example is cut to T + 1 tokens and fills row 3.
const LENS: [usize; 8] = [11, 26, 6, 18, 13, 9, 31, 50];
const PACKED_ROWS: usize = 4;

#[test]
fn packed_and_unpacked_batches_give_the_same_loss_and_gradients() {
    let be = CpuBackend;
    let mut rng = Rng::new(7);
    let ex = examples(&LENS, &mut rng);
    let pad = 0;
    let (ui, ut) = unpacked(&ex, pad);
    let (pi, pt, packing) = packed(&ex, PACKED_ROWS, pad);
    assert_eq!(
        &packing.starts()[..T],
        [[0; 10].as_slice(), &[10; 25], &[35; 5]]
            .concat()
            .as_slice()
    );
    assert_eq!(packing.positions()[T + 17 + 3], 3);

    let mut model = Gpt::init(&be, &config(), 11).unwrap();
    model.zero_grad(&be).unwrap();
    let base = model
        .forward_backward(&be, &ui, &ut, LENS.len(), T, 1.0)
        .unwrap();
    let base_grads = model.grad_values(&be).unwrap();
    model.zero_grad(&be).unwrap();
    let loss = model
        .forward_backward_with(&be, &pi, &pt, Some(&packing), PACKED_ROWS, T, 1.0)
        .unwrap();
    let grads = model.grad_values(&be).unwrap();

    assert_eq!(loss.tokens, base.tokens);
    let e = (loss.sum - base.sum).abs() / base.sum.abs();
    assert!(
        e <= LOSS_TOL,
        "summed loss {} vs {} (rel {e:.1e})",
        loss.sum,
        base.sum
    );
    println!("summed loss: rel diff {e:.1e} (tol {LOSS_TOL:.0e})");
    for (i, (g, want)) in grads.iter().zip(&base_grads).enumerate() {
        let e = rel(g, want);
        let name = &model.layout.specs[i].name;
        println!("gradient {name}: rel diff {e:.1e} (tol {GRAD_TOL:.0e})");
        assert!(e <= GRAD_TOL, "gradient {name}: rel diff {e:.2e}");
        assert!(want.iter().any(|&x| x != 0.0), "gradient {name} is zero");
    }

    // The same batch without its packing (plain causal rows) is a different computation: the
    // test can fail.
    let mixed = model.forward_loss(&be, &pi, &pt, PACKED_ROWS, T).unwrap();
    let e = (mixed.sum - base.sum).abs() / base.sum.abs();
    assert!(e > 100.0 * LOSS_TOL, "packing made no difference ({e:.1e})");

    // And forward_loss_with agrees with the training pass.
    let eval = model
        .forward_loss_with(&be, &pi, &pt, Some(&packing), PACKED_ROWS, T)
        .unwrap();
    assert_eq!(eval.sum.to_bits(), loss.sum.to_bits());
}

#[test]
fn a_packed_example_does_not_reach_its_neighbours_losses() {
    let be = CpuBackend;
    let mut rng = Rng::new(8);
    let ex = examples(&LENS, &mut rng);
    let (pi, pt, packing) = packed(&ex, PACKED_ROWS, 0);
    let mut model = Gpt::init(&be, &config(), 12).unwrap();
    model
        .forward_loss_with(&be, &pi, &pt, Some(&packing), PACKED_ROWS, T)
        .unwrap();
    let before = model.position_losses(&be).unwrap();
    // Change every input token of the middle example of row 0 (slots 10..35).
    let mut changed = pi.clone();
    for x in &mut changed[10..35] {
        *x = (*x + 1) % V as i32;
    }
    model
        .forward_loss_with(&be, &changed, &pt, Some(&packing), PACKED_ROWS, T)
        .unwrap();
    let after = model.position_losses(&be).unwrap();
    for (i, (a, b)) in after.iter().zip(&before).enumerate() {
        if (10..35).contains(&i) {
            continue;
        }
        assert_eq!(a.to_bits(), b.to_bits(), "loss at position {i} moved");
    }
    assert!((10..35).any(|i| after[i] != before[i] && pt[i] >= 0));

    // A packing for another batch shape is refused.
    let other = Packing::from_lengths(&[vec![3]], T).unwrap();
    let e = model
        .forward_loss_with(&be, &pi, &pt, Some(&other), PACKED_ROWS, T)
        .unwrap_err();
    assert!(
        e.to_string().contains("packing is for a [1, 40] batch"),
        "{e}"
    );
}

fn conv(user: &str, assistant: &str) -> String {
    serde_json::json!({"messages": [
        {"role": "user", "content": user},
        {"role": "assistant", "content": assistant},
    ]})
    .to_string()
}

#[test]
fn sft_stage_packs_whole_examples_in_order_and_validates_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let text = String::from_utf8_lossy(&EMBEDDED_CORPUS[..20_000]).into_owned();
    let tok = Tokenizer::train_bpe([text.as_str()].into_iter(), 300, |_, _| {}).unwrap();
    let tok_path = dir.path().join("tokenizer.json");
    tok.save(&tok_path).unwrap();
    let words = ["one", "two", "three", "four", "five", "six", "seven"];
    let lines: Vec<String> = (0..30)
        .map(|i| {
            let ask = words[..1 + i % 4].join(" ");
            conv(&format!("Repeat {ask}."), &format!("{ask}, done."))
        })
        .collect();
    let src = dir.path().join("chats.jsonl");
    std::fs::write(&src, lines.join("\n")).unwrap();
    let data = dir.path().join("sft");
    let opts = SftPrepareOptions {
        max_len: 60,
        val_fraction: 0.3,
        ..SftPrepareOptions::new(&data)
    };
    prepare_sft(&src, &TokenizerArg::Path(tok_path.clone()), &opts).unwrap();
    let (b, t, pad) = (3, 96, tok.eot());
    let open = |pack| {
        let prepared = PreparedData {
            dir: &data,
            batch_size: b,
            seq_len: t,
            seed: 5,
            vocab_size: tok.vocab_size(),
            pad,
            val_batches: 2,
            ranks: RankSlice::SOLO,
        };
        Sft::open(&prepared).unwrap().with_packing(pack)
    };

    // The examples of the packed batches, in row order, are the unpacked draw order, and each
    // sits whole in one row, the rows filled greedily.
    let (mut plain, mut pack) = (open(false), open(true));
    let mut drawn = Vec::new();
    for _ in 0..12 {
        let batch = plain.next_batch();
        assert!(batch.packing.is_none());
        for r in 0..b {
            let row = &batch.inputs[r * t..(r + 1) * t];
            let n = row.iter().rposition(|&x| x != pad as i32).unwrap() + 1;
            drawn.push(row[..n].to_vec());
        }
    }
    let mut from_packed = Vec::new();
    let mut row_counts = Vec::new();
    while from_packed.len() < drawn.len() {
        let batch = pack.next_batch();
        let p = batch.packing.as_ref().unwrap();
        for r in 0..b {
            let (mut i, mut count) = (0, 0);
            while i < t {
                assert_eq!(p.starts()[r * t + i] as usize, i, "a segment starts at {i}");
                let len = (i..t)
                    .take_while(|&j| p.starts()[r * t + j] as usize == i)
                    .count();
                let seg = &batch.inputs[r * t + i..r * t + i + len];
                let pos = &p.positions()[r * t + i..r * t + i + len];
                assert!(pos.iter().enumerate().all(|(k, &x)| x as usize == k));
                if i + len < t || seg.iter().any(|&x| x != pad as i32) {
                    // An example (only the padding tail is all pad ids, and it ends the row).
                    from_packed.push(seg.to_vec());
                    count += 1;
                }
                i += len;
            }
            row_counts.push(count);
        }
    }
    assert_eq!(
        &from_packed[..drawn.len()],
        &drawn[..],
        "packed order differs"
    );
    // Greedy: a row ends exactly where the next example's slots would not fit.
    let mut want_counts = vec![0usize];
    let mut used = 0;
    for x in &from_packed {
        if used + x.len() > t {
            want_counts.push(0);
            used = 0;
        }
        used += x.len();
        *want_counts.last_mut().unwrap() += 1;
    }
    assert_eq!(row_counts, want_counts);
    assert!(
        row_counts.len() * 2 <= from_packed.len(),
        "{} examples took {} packed rows: {:?}",
        from_packed.len(),
        row_counts.len(),
        from_packed.iter().map(Vec::len).collect::<Vec<_>>()
    );

    // Validation: the same examples, packed into fewer batches, give the same mean loss.
    let be = CpuBackend;
    let cfg = ModelConfig {
        vocab_size: tok.vocab_size(),
        padded_vocab_size: 320,
        n_layer: 2,
        n_head: 2,
        n_embd: 32,
        max_seq_len: t,
        family: Default::default(),
        lora: None,
    };
    let mut model = Gpt::init(&be, &cfg, 3).unwrap();
    let p_plain = plain.validate(&be, &mut model).unwrap().unwrap();
    let p_pack = pack.validate(&be, &mut model).unwrap().unwrap();
    // The same examples, so the same scored tokens, however they are laid out.
    assert_eq!(p_pack.count, p_plain.count);
    let (v_plain, v_pack) = (p_plain.mean().unwrap(), p_pack.mean().unwrap());
    let e = ((v_pack - v_plain) / v_plain).abs() as f64;
    println!("val loss {v_pack} packed, {v_plain} unpacked: rel diff {e:.1e}");
    assert!(
        e <= LOSS_TOL,
        "val loss {v_pack} packed vs {v_plain} ({e:.1e})"
    );
}
