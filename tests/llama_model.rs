//! The Llama-family model on the CPU backend: its whole gradient against finite differences
//! (grouped-query ratios 1, 2 and NH, tied and untied head, q/k/v biases), packed rows equal
//! to each example alone (forward and gradient), KV-cache decoding equal to the full forward,
//! recompute levels equal to storing everything bit for bit, the gradient buckets, the
//! parameter count of Llama-3.2-1B and its `info`, and every backend against the CPU. The CLI
//! end to end on a llama-tiny checkpoint is llama_cli.rs.

mod common;

use common::cli::ok;
use topcoat::backend::cpu::CpuBackend;
use topcoat::backend::Backend;
use topcoat::config::{Family, LlamaShape, ModelConfig, RopeScaling};
use topcoat::model::{Gpt, GradHook, KvCache, Packing, ParamLayout};
use topcoat::rng::Rng;

/// Fourth-order central differences of the f32 model's mean loss along a unit direction `u`,
/// `[8 (L(h) - L(-h)) - (L(2h) - L(-2h))] / 12h`, against the analytic `g.u`. Each parameter
/// tensor is checked along its own gradient (`u = g_T / |g_T|`, so the analytic side is
/// `|g_T|`): a missing or wrong term moves the finite difference off it. The f32 loss (~ln 50)
/// carries ~1e-6 of rounding per evaluation, ~1.5e-4 absolute over 12h; the truncation is
/// O(h^4). Measured: at most 1.3e-3 (the smallest `|g_T|`, 1.4e-2); a margin of ~4.
const FD_STEP: f64 = 1e-2;
const FD_TOL: f64 = 5e-3;
/// Packed rows vs each example alone, and cached decoding vs the full forward: the same
/// arithmetic in other matmul shapes (f32 rounding only).
const F32_TOL: f64 = 1e-5;

/// A tiny Llama: 2 layers, 4 heads of 4, `nkv` KV heads, SwiGLU width 24, vocab 50 (padded 64).
fn tiny(nkv: usize, tie: bool, bias: bool) -> ModelConfig {
    ModelConfig {
        vocab_size: 50,
        padded_vocab_size: 64,
        n_layer: 2,
        n_head: 4,
        n_embd: 16,
        max_seq_len: 16,
        family: Family::Llama(LlamaShape {
            tie_embeddings: tie,
            qkv_bias: bias,
            // Llama 3's scaling, so that the table the model uploads is not the plain one.
            rope_scaling: Some(RopeScaling {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8,
            }),
            ..LlamaShape::new(nkv, 24)
        }),
        lora: None,
    }
}

/// Initial values with every tensor moved off its init (norm weights off 1, biases off 0), so
/// that every parameter's gradient is exercised; padded vocabulary rows stay zero.
fn random_values(be: &CpuBackend, cfg: &ModelConfig, seed: u64) -> Vec<Vec<f32>> {
    let model = Gpt::init(be, cfg, seed).unwrap();
    let mut rng = Rng::new(seed ^ 0x5EED);
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

fn random_ids(rng: &mut Rng, n: usize, v: usize) -> Vec<i32> {
    (0..n).map(|_| rng.below(v as u64) as i32).collect()
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut n) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        d += (*x as f64 - *y as f64).powi(2);
        n += (*y as f64).powi(2);
    }
    (d / n.max(1e-300)).sqrt()
}

/// Every parameter tensor's gradient against finite differences along it.
fn check_gradient(cfg: &ModelConfig, seed: u64) {
    let be = CpuBackend::new();
    let (b, t) = (2, 7);
    let mut rng = Rng::new(seed);
    let inputs = random_ids(&mut rng, b * t, cfg.vocab_size);
    let mut targets = random_ids(&mut rng, b * t, cfg.vocab_size);
    targets[3] = -1; // a masked position
    let base = random_values(&be, cfg, seed);
    let mut model = Gpt::from_values(&be, cfg, base.clone()).unwrap();
    model.zero_grad(&be).unwrap();
    model
        .forward_backward(&be, &inputs, &targets, b, t, 1.0)
        .unwrap();
    let grads = model.grad_values(&be).unwrap();
    let names: Vec<String> = model.layout.specs.iter().map(|s| s.name.clone()).collect();
    let loss_at = |k: usize, dir: &[f64], h: f64| {
        let mut moved = base.clone();
        for (x, d) in moved[k].iter_mut().zip(dir) {
            *x = (*x as f64 + h * d) as f32;
        }
        let mut m = Gpt::from_values(&be, cfg, moved).unwrap();
        m.forward_loss(&be, &inputs, &targets, b, t).unwrap().mean as f64
    };
    for (k, g) in grads.iter().enumerate() {
        let gnorm = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        assert!(gnorm > 0.0, "{}: zero gradient", names[k]);
        let dir: Vec<f64> = g.iter().map(|&x| x as f64 / gnorm).collect();
        let (h, h2) = (FD_STEP, 2.0 * FD_STEP);
        let fd = (8.0 * (loss_at(k, &dir, h) - loss_at(k, &dir, -h))
            - (loss_at(k, &dir, h2) - loss_at(k, &dir, -h2)))
            / (12.0 * h);
        let err = (fd - gnorm).abs() / gnorm;
        println!(
            "{}: |g| {gnorm:.4e}, fd {fd:.4e}, rel err {err:.1e}",
            names[k]
        );
        assert!(
            err <= FD_TOL,
            "{}: analytic {gnorm} vs finite differences {fd} (rel err {err:.2e})",
            names[k]
        );
    }
}

#[test]
fn gradient_matches_finite_differences_multi_head_tied() {
    check_gradient(&tiny(4, true, false), 1);
}

#[test]
fn gradient_matches_finite_differences_grouped_untied_with_bias() {
    check_gradient(&tiny(2, false, true), 2);
}

#[test]
fn gradient_matches_finite_differences_multi_query_tied_with_bias() {
    check_gradient(&tiny(1, true, true), 3);
}

#[test]
fn gradient_matches_finite_differences_multi_query_untied() {
    check_gradient(&tiny(1, false, false), 4);
}

/// Examples packed into rows get the logits, losses and gradient they get alone.
#[test]
fn packed_rows_equal_each_example_alone() {
    let be = CpuBackend::new();
    let cfg = tiny(2, false, true);
    let values = random_values(&be, &cfg, 7);
    let mut rng = Rng::new(8);
    let t = 9;
    let lengths = vec![vec![3, 5], vec![8]];
    let packing = Packing::from_lengths(&lengths, t).unwrap();
    let inputs = random_ids(&mut rng, 2 * t, cfg.vocab_size);
    let mut targets = random_ids(&mut rng, 2 * t, cfg.vocab_size);
    // Padding positions (the last of each row) take no loss.
    targets[t - 1] = -1;
    targets[2 * t - 1] = -1;
    let tokens = targets.iter().filter(|&&x| x >= 0).count();

    let mut packed = Gpt::from_values(&be, &cfg, values.clone()).unwrap();
    packed.zero_grad(&be).unwrap();
    let loss = packed
        .forward_backward_with(&be, &inputs, &targets, Some(&packing), 2, t, 1.0)
        .unwrap();
    let packed_logits: Vec<Vec<f32>> = (0..2 * t)
        .map(|i| packed.logits_at(&be, i / t, i % t).unwrap())
        .collect();

    let mut alone = Gpt::from_values(&be, &cfg, values).unwrap();
    alone.zero_grad(&be).unwrap();
    let mut sum = 0f64;
    for (row, lens) in lengths.iter().enumerate() {
        let mut begin = row * t;
        for &len in lens {
            let (x, y) = (&inputs[begin..begin + len], &targets[begin..begin + len]);
            // Each example's share of the mean over all the batch's tokens.
            let n = y.iter().filter(|&&v| v >= 0).count();
            let scale = n as f32 / tokens as f32;
            let l = alone.forward_backward(&be, x, y, 1, len, scale).unwrap();
            sum += l.sum;
            for p in 0..len {
                let got = &packed_logits[begin + p];
                let want = alone.logits_at(&be, 0, p).unwrap();
                let e = rel_err(got, &want);
                assert!(e <= F32_TOL, "row {row} position {p}: rel err {e:.2e}");
            }
            begin += len;
        }
    }
    assert!(
        (loss.sum - sum).abs() <= 1e-5 * sum,
        "{} vs {sum}",
        loss.sum
    );
    let (gp, ga) = (
        packed.grad_values(&be).unwrap(),
        alone.grad_values(&be).unwrap(),
    );
    for (k, (p, a)) in gp.iter().zip(&ga).enumerate() {
        let e = rel_err(p, a);
        let name = &packed.layout.specs[k].name;
        assert!(
            e <= 1e-4,
            "{name}: packed vs alone gradient rel err {e:.2e}"
        );
    }
}

/// Prefill then one token at a time, and a multi-token extend after a prefix, give the full
/// forward's logits at every position, for each grouped-query ratio.
#[test]
fn kv_cache_decoding_equals_the_full_forward() {
    let be = CpuBackend::new();
    for (nkv, tie, bias) in [(4, true, false), (2, false, true), (1, false, false)] {
        let cfg = tiny(nkv, tie, bias);
        let mut model = Gpt::from_values(&be, &cfg, random_values(&be, &cfg, 11)).unwrap();
        let (b, t) = (2, 12);
        let ids = random_ids(&mut Rng::new(12), b * t, cfg.vocab_size);
        model.forward(&be, &ids, b, t).unwrap();
        let full: Vec<Vec<Vec<f32>>> = (0..b)
            .map(|r| {
                (0..t)
                    .map(|p| model.logits_at(&be, r, p).unwrap())
                    .collect()
            })
            .collect();
        // Steps of 4 (prefill), 1, 1, 3, then 1 each.
        let mut cache = KvCache::new(&be, &cfg, b).unwrap();
        let mut at = 0;
        for step in [4, 1, 1, 3, 1, 1, 1] {
            let chunk: Vec<i32> = (0..b)
                .flat_map(|r| ids[r * t + at..r * t + at + step].to_vec())
                .collect();
            model.extend(&be, &mut cache, &chunk, step).unwrap();
            at += step;
            for (r, row) in full.iter().enumerate() {
                let e = rel_err(&cache.logits_row(&be, r).unwrap(), &row[at - 1]);
                assert!(
                    e <= F32_TOL,
                    "nkv {nkv}: row {r}, position {}: rel err {e:.2e}",
                    at - 1
                );
            }
        }
        assert_eq!(at, t);
    }
}

/// A cache past its first allocation (1024 positions per row) grows, keeping what it holds:
/// the logits after the growth are still the full forward's.
#[test]
fn a_kv_cache_grows_past_its_first_allocation() {
    let be = CpuBackend::new();
    let mut cfg = tiny(2, false, false);
    cfg.max_seq_len = 1500;
    let mut model = Gpt::from_values(&be, &cfg, random_values(&be, &cfg, 41)).unwrap();
    let (b, t) = (2, 1030);
    let ids = random_ids(&mut Rng::new(42), b * t, cfg.vocab_size);
    model.forward(&be, &ids, b, t).unwrap();
    let mut cache = KvCache::new(&be, &cfg, b).unwrap();
    assert_eq!(cache.capacity(), 1500);
    let mut at = 0;
    for step in [1000, 20, 9, 1] {
        let chunk: Vec<i32> = (0..b)
            .flat_map(|r| ids[r * t + at..r * t + at + step].to_vec())
            .collect();
        model.extend(&be, &mut cache, &chunk, step).unwrap();
        at += step;
        for r in 0..b {
            let want = model.logits_at(&be, r, at - 1).unwrap();
            let e = rel_err(&cache.logits_row(&be, r).unwrap(), &want);
            assert!(
                e <= F32_TOL,
                "row {r}, position {}: rel err {e:.2e}",
                at - 1
            );
        }
    }
    assert_eq!(cache.len(), t);
    let e = model
        .extend(&be, &mut cache, &vec![1; b * 471], 471)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("exceed the model's max_seq_len 1500"),
        "{e}"
    );
    assert_eq!(cache.len(), t);
}

/// Records the buckets the backward pass reports.
struct Record(std::sync::Arc<std::sync::Mutex<Vec<Vec<usize>>>>);

impl GradHook<CpuBackend> for Record {
    fn ready(
        &mut self,
        _: &CpuBackend,
        _: &mut [Option<<CpuBackend as Backend>::Buf>],
        bucket: &[usize],
    ) -> topcoat::model::Result<()> {
        self.0.lock().unwrap().push(bucket.to_vec());
        Ok(())
    }
}

/// Recompute levels 1 and 2 give level 0's gradient bit for bit, and the backward reports the
/// buckets of `grad_buckets`: each layer last to first, then the rest, every tensor once.
#[test]
fn recompute_levels_give_identical_gradients_and_buckets_cover_every_tensor() {
    let be = CpuBackend::new();
    let cfg = tiny(2, false, true);
    let values = random_values(&be, &cfg, 21);
    let mut rng = Rng::new(22);
    let (b, t) = (2, 10);
    let inputs = random_ids(&mut rng, b * t, cfg.vocab_size);
    let targets = random_ids(&mut rng, b * t, cfg.vocab_size);
    let mut model = Gpt::from_values(&be, &cfg, values).unwrap();
    let mut grads = Vec::new();
    for level in 0..=2 {
        model.set_recompute(level).unwrap();
        model.zero_grad(&be).unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        model.set_grad_hook(Some(Box::new(Record(seen.clone()))));
        model
            .forward_backward(&be, &inputs, &targets, b, t, 1.0)
            .unwrap();
        model.set_grad_hook(None);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen, model.grad_buckets(), "level {level}");
        grads.push(model.grad_values(&be).unwrap());
    }
    assert!(grads[1] == grads[0], "recompute 1 differs from 0");
    assert!(grads[2] == grads[0], "recompute 2 differs from 0");

    let buckets = model.grad_buckets();
    let lay = &model.layout;
    assert_eq!(buckets.len(), cfg.n_layer + 1);
    // Layer 1's bucket first: its norm, qkv weight and bias, o, norm, gate_up, down.
    let last = &lay.llama_layers[1];
    assert_eq!(buckets[0][0], last.ln1_w);
    assert_eq!(buckets[0].len(), 7);
    let mut all: Vec<usize> = buckets.concat();
    all.sort_unstable();
    assert_eq!(all, (0..lay.specs.len()).collect::<Vec<_>>());
    assert!(buckets[2].contains(&lay.wte) && buckets[2].contains(&lay.lm_head.unwrap()));
}

/// Llama-3.2-1B's shape with its 128256-token vocabulary has its 1,235,814,400 parameters,
/// and the layout agrees with the count; an untied head adds V x C.
#[test]
fn llama_3_2_1b_has_its_parameter_count() {
    let cfg = ModelConfig::preset("llama-3.2-1b", 128_256).unwrap();
    assert_eq!(cfg.num_params(), 1_235_814_400);
    let layout = topcoat::model::ParamLayout::new(&cfg);
    assert_eq!(layout.num_params(), 1_235_814_400);
    let out = ok(&[
        "info",
        "--preset",
        "llama-3.2-1b",
        "--vocab-size",
        "128256",
        "--seq-len",
        "2048",
        "--batch-size",
        "1",
    ]);
    assert!(out.contains("parameters: 1235814400 (1235.81 M)"), "{out}");
    assert!(
        out.contains(
            "family: llama, 8 KV heads of 64, SwiGLU 8192, RoPE theta 500000 (llama3 scaling x32)"
        ) && out.contains("tied head"),
        "{out}"
    );
    assert!(
        out.contains("activations") && out.contains("recompute 1:"),
        "{out}"
    );
}

// ---- every backend against the CPU -----------------------------------------------------------

/// A device's whole Llama model against the CPU's, from the same bf16-exact values: the loss,
/// every gradient tensor and all of them at once after a packed training pass, and the
/// logits of cached decoding. Looser than one op's tolerance: bf16 rounding compounds over
/// the layers (tests/cuda_parity/model.rs uses the same bounds for GPT-2).
const MODEL_TENSOR_TOL: f64 = 5e-2;
const MODEL_TOL: f64 = 2e-2;

fn matches_the_cpu<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut cfg = tiny(2, false, true);
    cfg.vocab_size = 100;
    cfg.padded_vocab_size = 128;
    cfg.n_embd = 64;
    cfg.max_seq_len = 40;
    let bf16 = |x: f32| f32::from_bits((x.to_bits() + 0x8000) & 0xffff_0000);
    let values: Vec<Vec<f32>> = random_values(&cpu, &cfg, 31)
        .into_iter()
        .map(|v| v.into_iter().map(bf16).collect())
        .collect();
    let mut rng = Rng::new(32);
    let (b, t) = (2, 37);
    let inputs = random_ids(&mut rng, b * t, cfg.vocab_size);
    let targets = random_ids(&mut rng, b * t, cfg.vocab_size);
    let packing = Packing::from_lengths(&[vec![20, 17], vec![30]], t).unwrap();
    fn pass<B: Backend>(
        be: &B,
        cfg: &ModelConfig,
        values: &[Vec<f32>],
        io: (&[i32], &[i32], &Packing),
    ) -> (f32, Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let (inputs, targets, packing) = io;
        let (b, t) = (packing.rows(), packing.row_len());
        let mut m = Gpt::from_values(be, cfg, values.to_vec()).unwrap();
        m.zero_grad(be).unwrap();
        let loss = m
            .forward_backward_with(be, inputs, targets, Some(packing), b, t, 1.0)
            .unwrap();
        let grads = m.grad_values(be).unwrap();
        let mut logits = Vec::new();
        let mut cache = KvCache::new(be, cfg, b).unwrap();
        let prompt: Vec<i32> = (0..b)
            .flat_map(|r| inputs[r * t..r * t + 9].to_vec())
            .collect();
        m.extend(be, &mut cache, &prompt, 9).unwrap();
        for step in 0..4 {
            let next: Vec<i32> = (0..b).map(|r| inputs[r * t + 9 + step]).collect();
            m.extend(be, &mut cache, &next, 1).unwrap();
            logits.push(
                (0..b)
                    .flat_map(|r| cache.logits_row(be, r).unwrap())
                    .collect(),
            );
        }
        (loss.mean, grads, logits)
    }
    let io = (&inputs[..], &targets[..], &packing);
    let want = pass(&cpu, &cfg, &values, io);
    let got = pass(be, &cfg, &values, io);
    let e = ((got.0 - want.0) / want.0).abs() as f64;
    assert!(
        e <= MODEL_TOL,
        "loss {} vs {} (rel err {e:.2e})",
        got.0,
        want.0
    );
    let names: Vec<String> = ParamLayout::new(&cfg)
        .specs
        .into_iter()
        .map(|s| s.name)
        .collect();
    for (k, (g, w)) in got.1.iter().zip(&want.1).enumerate() {
        let e = rel_err(g, w);
        assert!(e <= MODEL_TENSOR_TOL, "{}: rel err {e:.2e}", names[k]);
    }
    let e = rel_err(&got.1.concat(), &want.1.concat());
    assert!(e <= MODEL_TOL, "all gradients: rel err {e:.2e}");
    for (step, (g, w)) in got.2.iter().zip(&want.2).enumerate() {
        let e = rel_err(g, w);
        assert!(e <= MODEL_TOL, "decode step {step} logits: rel err {e:.2e}");
    }
}

backend_tests!(matches_the_cpu => llama_model_matches_the_cpu_cpu, llama_model_matches_the_cpu_cuda);
