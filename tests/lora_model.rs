//! LoRA inside the model, both families, on the CPU backend: B at zero gives the base model's
//! logits bit for bit; with B random the adapter forward equals the merged model; adapters
//! switched off give the base again; the adapters' gradients against finite differences
//! (dropout included, the mask repeated from its seed); AdamW leaves the frozen base
//! bit-identical and holds moments for adapters only; KV-cache decoding equals the full
//! forward; recompute levels agree bit for bit; the frozen base has no gradient buffer.

mod common;

use topcoat::backend::cpu::CpuBackend;
use topcoat::config::{Family, LlamaShape, LoraConfig, LoraTarget, ModelConfig, RunConfig};
use topcoat::dist::Solo;
use topcoat::model::{lora, Gpt, KvCache};
use topcoat::optim::AdamW;
use topcoat::rng::Rng;

/// The adapter forward against the merged model: the same sums in another order (`x W'^T`
/// with `W' = W + s B A` rounded once, against `x W^T + s (x A^T) B^T`), f32 rounding only.
const MERGE_TOL: f64 = 2e-5;
/// Cached decoding against the full forward: the same arithmetic in other matmul shapes.
const DECODE_TOL: f64 = 1e-5;
/// Fourth-order central differences of the f32 mean loss along each adapter tensor's own
/// gradient, as tests/llama_model.rs checks the base (rounding ~1.5e-4 absolute over 12h
/// against gradient norms of ~3e-2 and up). Measured: at most 3.4e-4 (adapters at 0.2 scale;
/// at 0.3 the model is so far from linear that h^4 truncation reaches 1e-2).
const FD_STEP: f64 = 1e-2;
const FD_TOL: f64 = 5e-3;

/// A tiny GPT-2: 2 layers, 2 heads of 8, vocab 50 (padded 64).
fn gpt2() -> ModelConfig {
    ModelConfig {
        vocab_size: 50,
        padded_vocab_size: 64,
        n_layer: 2,
        n_head: 2,
        n_embd: 16,
        max_seq_len: 16,
        family: Family::default(),
        lora: None,
    }
}

/// A tiny Llama: 2 layers, 4 heads of 4, 2 KV heads, SwiGLU width 24, untied head, q/k/v bias.
fn llama() -> ModelConfig {
    ModelConfig {
        family: Family::Llama(LlamaShape {
            tie_embeddings: false,
            qkv_bias: true,
            ..LlamaShape::new(2, 24)
        }),
        n_head: 4,
        ..gpt2()
    }
}

fn adapters(cfg: &ModelConfig, targets: &str, dropout: f32) -> LoraConfig {
    LoraConfig {
        rank: 3,
        alpha: 6.0,
        dropout,
        targets: LoraTarget::parse_list(targets, cfg).unwrap(),
    }
}

/// Base values with every tensor moved off its init (norms off 1, biases off 0).
fn base_values(be: &CpuBackend, cfg: &ModelConfig, seed: u64) -> Vec<Vec<f32>> {
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

/// Moves every adapter's B (and A) off its init, with values large enough to matter.
fn randomize_adapters(be: &CpuBackend, model: &mut Gpt<CpuBackend>, seed: u64) {
    let mut rng = Rng::new(seed);
    let slots = model.layout.lora.clone();
    for s in slots {
        for (idx, scale) in [(s.a, 0.2), (s.b, 0.2)] {
            let n = model.layout.specs[idx].numel();
            let v: Vec<f32> = (0..n).map(|_| scale * rng.normal()).collect();
            topcoat::backend::Backend::write(be, &mut model.params[idx], &v).unwrap();
        }
    }
}

fn ids(rng: &mut Rng, n: usize, v: usize) -> Vec<i32> {
    (0..n).map(|_| rng.below(v as u64) as i32).collect()
}

/// Every real logit of the last forward pass, row by row.
fn logits(be: &CpuBackend, m: &Gpt<CpuBackend>, b: usize, t: usize) -> Vec<f32> {
    (0..b)
        .flat_map(|r| (0..t).flat_map(move |p| m.logits_at(be, r, p).unwrap()))
        .collect()
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut d, mut n) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        d += (*x as f64 - *y as f64).powi(2);
        n += (*y as f64).powi(2);
    }
    (d / n.max(1e-300)).sqrt()
}

fn families() -> [(&'static str, ModelConfig); 2] {
    [("gpt2", gpt2()), ("llama", llama())]
}

#[test]
fn zero_b_gives_the_base_logits_bit_for_bit() {
    let be = CpuBackend::new();
    for (name, cfg) in families() {
        let (b, t) = (2, 9);
        let inputs = ids(&mut Rng::new(1), b * t, cfg.vocab_size);
        let base = base_values(&be, &cfg, 3);
        let mut plain = Gpt::from_values(&be, &cfg, base.clone()).unwrap();
        plain.forward(&be, &inputs, b, t).unwrap();
        let want = logits(&be, &plain, b, t);
        let lora = adapters(&cfg, "all", 0.0);
        let mut model = Gpt::with_lora(&be, &cfg, base, lora, 7).unwrap();
        let a0 = &model.param_values(&be).unwrap()[model.layout.lora[0].a];
        assert!(a0.iter().any(|&x| x != 0.0), "{name}: A starts random");
        model.forward(&be, &inputs, b, t).unwrap();
        assert_eq!(logits(&be, &model, b, t), want, "{name}");
    }
}

#[test]
fn adapter_forward_equals_the_merged_model_and_off_gives_the_base() {
    let be = CpuBackend::new();
    for (name, cfg) in families() {
        let (b, t) = (2, 9);
        let inputs = ids(&mut Rng::new(2), b * t, cfg.vocab_size);
        let base = base_values(&be, &cfg, 4);
        let mut plain = Gpt::from_values(&be, &cfg, base.clone()).unwrap();
        plain.forward(&be, &inputs, b, t).unwrap();
        let want_base = logits(&be, &plain, b, t);

        let mut model = Gpt::with_lora(&be, &cfg, base, adapters(&cfg, "all", 0.1), 8).unwrap();
        randomize_adapters(&be, &mut model, 9);
        model.forward(&be, &inputs, b, t).unwrap();
        let got = logits(&be, &model, b, t);
        assert!(rel_err(&got, &want_base) > 1e-2, "{name}: adapters matter");

        let (mcfg, mvalues) = lora::merged(&model.cfg, model.param_values(&be).unwrap());
        assert!(mcfg.lora.is_none());
        let mut merged = Gpt::from_values(&be, &mcfg, mvalues).unwrap();
        merged.forward(&be, &inputs, b, t).unwrap();
        let err = rel_err(&got, &logits(&be, &merged, b, t));
        println!("{name}: adapter forward vs merged {err:.2e}");
        assert!(err <= MERGE_TOL, "{name}: {err:.2e}");

        model.set_adapters_enabled(false);
        assert!(!model.adapters_enabled());
        model.forward(&be, &inputs, b, t).unwrap();
        assert_eq!(logits(&be, &model, b, t), want_base, "{name}: adapters off");
        model.set_adapters_enabled(true);
        model.forward(&be, &inputs, b, t).unwrap();
        assert_eq!(logits(&be, &model, b, t), got, "{name}: on again");
    }
}

/// The analytic gradient of every adapter tensor against finite differences along it. With
/// dropout the loss is evaluated by training passes under the same seed (the same masks).
fn check_adapter_gradients(cfg: &ModelConfig, targets: &str, dropout: f32, recompute: u8) {
    let be = CpuBackend::new();
    let (b, t) = (2, 7);
    let mut rng = Rng::new(11);
    let inputs = ids(&mut rng, b * t, cfg.vocab_size);
    let mut tgt = ids(&mut rng, b * t, cfg.vocab_size);
    tgt[4] = -1;
    let base = base_values(&be, cfg, 5);
    let lora = adapters(cfg, targets, dropout);
    let mut model = Gpt::with_lora(&be, cfg, base, lora, 6).unwrap();
    model.set_recompute(recompute).unwrap();
    randomize_adapters(&be, &mut model, 12);
    model.set_lora_dropout_seed(99);
    model.zero_grad(&be).unwrap();
    model
        .forward_backward(&be, &inputs, &tgt, b, t, 1.0)
        .unwrap();
    let grads = model.grad_values(&be).unwrap();
    let values = model.param_values(&be).unwrap();
    let n_base = model.layout.num_base_tensors();
    assert!(
        grads[..n_base].iter().all(Vec::is_empty),
        "frozen: no grads"
    );
    let slots = model.layout.lora.clone();
    let names: Vec<String> = model.layout.specs.iter().map(|s| s.name.clone()).collect();
    let mut loss_at = |v: &[Vec<f32>]| -> f64 {
        for (p, x) in model.params.iter_mut().zip(v) {
            p.copy_from_slice(x);
        }
        model.zero_grad(&be).unwrap();
        model.set_lora_dropout_seed(99);
        let l = model
            .forward_backward(&be, &inputs, &tgt, b, t, 1.0)
            .unwrap();
        l.mean as f64
    };
    for s in slots {
        for idx in [s.a, s.b] {
            let g = &grads[idx];
            let norm = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            let name = &names[idx];
            assert!(norm > 1e-4, "{name}: gradient {norm}");
            let at = |h: f64| -> Vec<Vec<f32>> {
                let mut v = values.clone();
                for (x, &gi) in v[idx].iter_mut().zip(g) {
                    *x += (h * gi as f64 / norm) as f32;
                }
                v
            };
            let h = FD_STEP;
            let fd = (8.0 * (loss_at(&at(h)) - loss_at(&at(-h)))
                - (loss_at(&at(2.0 * h)) - loss_at(&at(-2.0 * h))))
                / (12.0 * h);
            let err = (fd - norm).abs() / norm.max(1e-2);
            println!("{name}: fd {fd:.6} analytic {norm:.6} err {err:.2e}");
            assert!(
                err <= FD_TOL,
                "{name}: fd {fd} vs analytic {norm} ({err:.2e})"
            );
        }
    }
}

#[test]
fn adapter_gradients_match_finite_differences_llama_q_and_up_slices() {
    // q: a column slice of the fused qkv_proj (before RoPE); up: the second half of gate_up.
    check_adapter_gradients(&llama(), "q,up", 0.0, 0);
}

#[test]
fn adapter_gradients_match_finite_differences_llama_all_with_dropout_recompute_2() {
    check_adapter_gradients(&llama(), "all", 0.25, 2);
}

#[test]
fn adapter_gradients_match_finite_differences_gpt2_all() {
    // up sits inside the GELU matmul, down after it (its input gradient joins before dGELU).
    check_adapter_gradients(&gpt2(), "all", 0.0, 0);
}

#[test]
fn adapter_gradients_match_finite_differences_gpt2_with_dropout_recompute_1() {
    check_adapter_gradients(&gpt2(), "q,k,v,up,down", 0.25, 1);
}

#[test]
fn adamw_moves_adapters_only_and_keeps_the_base_bit_identical() {
    let be = CpuBackend::new();
    for (name, cfg) in families() {
        let (b, t) = (2, 8);
        let mut rng = Rng::new(21);
        let base = base_values(&be, &cfg, 22);
        let lora = adapters(&cfg, "all", 0.1);
        let mut model = Gpt::with_lora(&be, &cfg, base.clone(), lora, 23).unwrap();
        let before = model.param_values(&be).unwrap();
        let mut opt = AdamW::new(&be, &Solo::new(), &mut model, 0).unwrap();
        let n_base = model.layout.num_base_tensors();
        for i in 0..model.layout.specs.len() {
            let trained = model.layout.specs[i].trainable;
            assert_eq!(opt.m[i].is_some(), trained, "{name}: moments of tensor {i}");
            assert_eq!(
                model.grads[i].is_some(),
                trained,
                "{name}: grad of tensor {i}"
            );
            assert_eq!(trained, i >= n_base);
        }
        let cfg_run = RunConfig {
            weight_decay: 0.1,
            ..RunConfig::default()
        };
        for step in 0..3 {
            let inputs = ids(&mut rng, b * t, cfg.vocab_size);
            let targets = ids(&mut rng, b * t, cfg.vocab_size);
            model.zero_grad(&be).unwrap();
            model.set_lora_dropout_seed(step);
            model
                .forward_backward(&be, &inputs, &targets, b, t, 1.0)
                .unwrap();
            opt.update(&be, &Solo::new(), &mut model, &cfg_run, 1e-2, 1.0)
                .unwrap();
        }
        let after = model.param_values(&be).unwrap();
        assert_eq!(after[..n_base], before[..n_base], "{name}: frozen base");
        assert_eq!(after[..n_base], base[..], "{name}: the values given");
        for s in &model.layout.lora {
            assert_ne!(after[s.a], before[s.a], "{name}: A moved");
            assert!(after[s.b].iter().all(|x| x.is_finite()));
            assert!(after[s.b].iter().any(|&x| x != 0.0), "{name}: B moved");
        }
        let full = opt.full_state_bytes(&be);
        let trainable = model.layout.num_trainable() as u64;
        assert_eq!(
            full,
            trainable * 8,
            "{name}: two f32 moments per adapter element"
        );
    }
}

#[test]
fn decode_with_adapters_equals_the_full_forward() {
    let be = CpuBackend::new();
    for (name, cfg) in families() {
        let (b, t) = (2, 10);
        let inputs = ids(&mut Rng::new(31), b * t, cfg.vocab_size);
        let base = base_values(&be, &cfg, 32);
        let mut model = Gpt::with_lora(&be, &cfg, base, adapters(&cfg, "all", 0.2), 33).unwrap();
        randomize_adapters(&be, &mut model, 34);
        model.forward(&be, &inputs, b, t).unwrap();
        let mut cache = KvCache::new(&be, &model.cfg, b).unwrap();
        // A prompt of 6, then one token at a time.
        let prompt: Vec<i32> = (0..b)
            .flat_map(|r| inputs[r * t..r * t + 6].to_vec())
            .collect();
        model.extend(&be, &mut cache, &prompt, 6).unwrap();
        for p in 6..t {
            let step: Vec<i32> = (0..b).map(|r| inputs[r * t + p]).collect();
            model.extend(&be, &mut cache, &step, 1).unwrap();
        }
        for r in 0..b {
            let want = model.logits_at(&be, r, t - 1).unwrap();
            let got = cache.logits_row(&be, r).unwrap();
            let err = rel_err(&got, &want);
            assert!(err <= DECODE_TOL, "{name} row {r}: {err:.2e}");
        }
        // Switched off, decoding follows the base.
        model.set_adapters_enabled(false);
        model.forward(&be, &inputs, b, t).unwrap();
        let mut cache = KvCache::new(&be, &model.cfg, b).unwrap();
        model.extend(&be, &mut cache, &inputs, t).unwrap();
        let err = rel_err(
            &cache.logits_row(&be, 0).unwrap(),
            &model.logits_at(&be, 0, t - 1).unwrap(),
        );
        assert!(err <= DECODE_TOL, "{name} off: {err:.2e}");
    }
}

#[test]
fn dropout_masks_repeat_with_the_seed_and_gradients_agree_across_recompute() {
    let be = CpuBackend::new();
    for (name, cfg) in families() {
        let (b, t) = (2, 8);
        let mut rng = Rng::new(41);
        let inputs = ids(&mut rng, b * t, cfg.vocab_size);
        let targets = ids(&mut rng, b * t, cfg.vocab_size);
        let base = base_values(&be, &cfg, 42);
        let grads_at = |level: u8, seed: u64, p: f32| {
            let lora = adapters(&cfg, "all", p);
            let mut m = Gpt::with_lora(&be, &cfg, base.clone(), lora, 43).unwrap();
            randomize_adapters(&be, &mut m, 44);
            m.set_recompute(level).unwrap();
            m.set_lora_dropout_seed(seed);
            m.zero_grad(&be).unwrap();
            let loss = m
                .forward_backward(&be, &inputs, &targets, b, t, 1.0)
                .unwrap();
            // An evaluation pass never drops.
            let eval = m.forward_loss(&be, &inputs, &targets, b, t).unwrap();
            (loss.mean, eval.mean, m.grad_values(&be).unwrap())
        };
        let (l0, e0, g0) = grads_at(0, 5, 0.3);
        for level in [1, 2] {
            let (l, _, g) = grads_at(level, 5, 0.3);
            assert_eq!((l, &g), (l0, &g0), "{name}: recompute {level}");
        }
        let (l1, e1, g1) = grads_at(0, 6, 0.3);
        assert_ne!(g1, g0, "{name}: another seed, another mask");
        assert_ne!(l1, l0);
        assert_eq!(e1, e0, "{name}: evaluation has no dropout");
        let (lz, ez, _) = grads_at(0, 5, 0.0);
        assert_eq!(lz, ez, "{name}: p = 0 trains on the evaluation's forward");
        assert_ne!(l0, e0, "{name}: p > 0 drops in training passes");
    }
}

#[test]
fn grad_buckets_hold_the_adapters_layer_by_layer() {
    let be = CpuBackend::new();
    for (name, cfg) in families() {
        let base = base_values(&be, &cfg, 51);
        let model = Gpt::with_lora(&be, &cfg, base, adapters(&cfg, "all", 0.0), 52).unwrap();
        let buckets = model.grad_buckets();
        assert_eq!(
            buckets.len(),
            cfg.n_layer,
            "{name}: no rest bucket (all frozen)"
        );
        for (k, bucket) in buckets.iter().enumerate() {
            let layer = cfg.n_layer - 1 - k;
            let want: Vec<usize> = model
                .layout
                .lora
                .iter()
                .filter(|s| s.layer == layer)
                .flat_map(|s| [s.a, s.b])
                .collect();
            assert_eq!(bucket, &want, "{name}: layer {layer}");
        }
    }
}

#[test]
fn with_lora_refuses_a_wrong_base() {
    let be = CpuBackend::new();
    let cfg = llama();
    let mut base = base_values(&be, &cfg, 61);
    base.pop();
    let err = Gpt::with_lora(&be, &cfg, base, adapters(&cfg, "q", 0.0), 1)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("base tensors"), "{err}");
    let mut bad = adapters(&cfg, "q", 0.0);
    bad.targets = vec![LoraTarget::Qkv];
    let err = Gpt::with_lora(&be, &cfg, base_values(&be, &cfg, 61), bad, 1)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("`qkv`"), "{err}");
}

#[test]
fn a_reward_head_trains_in_full_beside_the_adapters() {
    let be = CpuBackend::new();
    for (name, cfg) in families() {
        let (b, t) = (2, 6);
        let inputs = ids(&mut Rng::new(71), b * t, cfg.vocab_size);
        let base = base_values(&be, &cfg, 72);
        let mut model = Gpt::with_lora(&be, &cfg, base, adapters(&cfg, "all", 0.0), 73).unwrap();
        randomize_adapters(&be, &mut model, 74);
        let head = model.init_reward_head(&be, 75).unwrap();
        model.zero_grad(&be).unwrap();
        let pass = model.reward_forward(&be, &inputs, b, t, &[5, 3]).unwrap();
        model
            .reward_backward(&be, &inputs, &pass, &[1.0, -0.5])
            .unwrap();
        let grads = model.grad_values(&be).unwrap();
        for idx in [head.weight, head.bias] {
            assert!(
                grads[idx].iter().any(|&x| x != 0.0),
                "{name}: head grad {idx}"
            );
        }
        for s in &model.layout.lora {
            assert!(grads[s.b].iter().any(|&x| x != 0.0), "{name}: adapter grad");
        }
        let n_base = model.layout.num_base_tensors();
        assert!(
            grads[..n_base].iter().all(Vec::is_empty),
            "{name}: frozen base"
        );
        let buckets = model.grad_buckets();
        assert_eq!(
            buckets.last().unwrap(),
            &vec![head.weight, head.bias],
            "{name}"
        );
        let opt = AdamW::new(&be, &Solo::new(), &mut model, 0).unwrap();
        assert!(opt.m[head.weight].is_some() && opt.m[0].is_none(), "{name}");
    }
}

#[test]
fn a_lora_training_checkpoint_saves_and_resumes_the_adapters_moments_only() {
    use topcoat::data::Tokenizer;
    use topcoat::train::checkpoint::{self, TrainState};
    let be = CpuBackend::new();
    let text = "A cat is a small animal. A dog is a loyal animal. ".repeat(30);
    let tok = Tokenizer::train_bpe([text.as_str()].into_iter(), 300, |_, _| {}).unwrap();
    let v = tok.vocab_size();
    let cfg = ModelConfig {
        vocab_size: v,
        padded_vocab_size: v.div_ceil(64) * 64,
        ..llama()
    };
    let base = base_values(&be, &cfg, 81);
    let mut model = Gpt::with_lora(&be, &cfg, base, adapters(&cfg, "q,v,down", 0.1), 82).unwrap();
    let mut opt = AdamW::new(&be, &Solo::new(), &mut model, 0).unwrap();
    let run = RunConfig::default();
    let (b, t) = (2, 8);
    let mut rng = Rng::new(83);
    for step in 0..2 {
        let (x, y) = (ids(&mut rng, b * t, v), ids(&mut rng, b * t, v));
        model.zero_grad(&be).unwrap();
        model.set_lora_dropout_seed(step);
        model.forward_backward(&be, &x, &y, b, t, 1.0).unwrap();
        opt.update(&be, &Solo::new(), &mut model, &run, 1e-2, 1.0)
            .unwrap();
    }
    let state = TrainState {
        step: 2,
        rng: Rng::new(5),
        data: serde_json::json!({"tokens": 32}),
        run,
        tokens_seen: 32,
        elapsed_s: 1.0,
        stage: "sft".into(),
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = checkpoint::dir_for(tmp.path(), 2);
    checkpoint::save(&be, &dir, &model, &tok, Some((&opt, &state))).unwrap();
    let (again, opt2, st) = checkpoint::resume(&be, &dir, &model.cfg, "sft").unwrap();
    assert_eq!(st.step, 2);
    assert_eq!(again.cfg.lora, model.cfg.lora);
    assert_eq!(
        again.param_values(&be).unwrap(),
        model.param_values(&be).unwrap()
    );
    for i in 0..model.layout.specs.len() {
        let trained = model.layout.specs[i].trainable;
        assert_eq!(opt2.m[i].is_some(), trained, "tensor {i}");
        if trained {
            let m = |o: &AdamW<CpuBackend>| o.m[i].clone().unwrap();
            assert_eq!(m(&opt2), m(&opt), "m of tensor {i}");
        }
    }
}

#[test]
fn packed_rows_train_the_adapters_as_each_example_alone() {
    use topcoat::model::Packing;
    let be = CpuBackend::new();
    for (name, cfg) in families() {
        let t = 9;
        let lengths = vec![vec![3, 5], vec![8]];
        let packing = Packing::from_lengths(&lengths, t).unwrap();
        let mut rng = Rng::new(91);
        let inputs = ids(&mut rng, 2 * t, cfg.vocab_size);
        let mut targets = ids(&mut rng, 2 * t, cfg.vocab_size);
        targets[t - 1] = -1;
        targets[2 * t - 1] = -1;
        let tokens = targets.iter().filter(|&&x| x >= 0).count();
        let base = base_values(&be, &cfg, 92);
        let make = || {
            let lora = adapters(&cfg, "all", 0.0);
            let mut m = Gpt::with_lora(&be, &cfg, base.clone(), lora, 93).unwrap();
            randomize_adapters(&be, &mut m, 94);
            m.zero_grad(&be).unwrap();
            m
        };
        let mut packed = make();
        packed
            .forward_backward_with(&be, &inputs, &targets, Some(&packing), 2, t, 1.0)
            .unwrap();
        let mut alone = make();
        for (row, lens) in lengths.iter().enumerate() {
            let mut begin = row * t;
            for &len in lens {
                let (x, y) = (&inputs[begin..begin + len], &targets[begin..begin + len]);
                let n = y.iter().filter(|&&v| v >= 0).count();
                let scale = n as f32 / tokens as f32;
                alone.forward_backward(&be, x, y, 1, len, scale).unwrap();
                begin += len;
            }
        }
        let (gp, ga) = (
            packed.grad_values(&be).unwrap(),
            alone.grad_values(&be).unwrap(),
        );
        for s in &packed.layout.lora {
            for idx in [s.a, s.b] {
                let e = rel_err(&gp[idx], &ga[idx]);
                assert!(e <= 1e-4, "{name} tensor {idx}: packed vs alone {e:.2e}");
            }
        }
    }
}

#[test]
fn a_reward_forward_drops_only_inside_grad_pass() {
    let be = CpuBackend::new();
    let cfg = llama();
    let inputs = ids(&mut Rng::new(95), 2 * 6, cfg.vocab_size);
    let base = base_values(&be, &cfg, 96);
    let mut model = Gpt::with_lora(&be, &cfg, base, adapters(&cfg, "all", 0.5), 97).unwrap();
    randomize_adapters(&be, &mut model, 98);
    model.init_reward_head(&be, 99).unwrap();
    model.set_lora_dropout_seed(3);
    let plain = model.reward_forward(&be, &inputs, 2, 6, &[5, 4]).unwrap();
    let again = model.reward_forward(&be, &inputs, 2, 6, &[5, 4]).unwrap();
    assert_eq!(plain.rewards, again.rewards);
    let dropped = model
        .grad_pass(|m| m.reward_forward(&be, &inputs, 2, 6, &[5, 4]))
        .unwrap();
    assert_ne!(
        dropped.rewards, plain.rewards,
        "dropout in the training pass"
    );
    // Its backward recomputes the same masks: the gradient is that pass's.
    model.zero_grad(&be).unwrap();
    model
        .reward_backward(&be, &inputs, &dropped, &[1.0, -1.0])
        .unwrap();
    let g = model.grad_values(&be).unwrap();
    assert!(g[model.layout.lora[0].b].iter().any(|&x| x != 0.0));
}

/// The shared step loop with two accumulated micro-batches (the accumulator and the gradient
/// hook over adapter tensors only), clipping and checkpoints: the frozen base comes out
/// bit-identical and every adapter moved.
#[test]
fn the_training_loop_accumulates_and_steps_the_adapters_only() {
    use topcoat::data::Tokenizer;
    use topcoat::stages::pretrain::Pretrain;
    use topcoat::train::{self, TrainOptions};
    let dir = tempfile::tempdir().unwrap();
    common::cli::prepare_small_corpus(dir.path());
    let data = dir.path().join("data");
    let be = CpuBackend;
    let tok = Tokenizer::load(data.join("tokenizer.json")).unwrap();
    let base_cfg = ModelConfig::preset("tiny", tok.vocab_size()).unwrap();
    let base = Gpt::init(&be, &base_cfg, 1)
        .unwrap()
        .param_values(&be)
        .unwrap();
    let lora = adapters(&base_cfg, "all", 0.1);
    let mut model = Gpt::with_lora(&be, &base_cfg, base.clone(), lora, 2).unwrap();
    let (b, t) = (2, 16);
    let run = RunConfig {
        batch_size: b,
        seq_len: t,
        total_batch_tokens: 2 * b * t,
        max_steps: 3,
        warmup_steps: 1,
        val_every: 0,
        checkpoint_every: 0,
        ..RunConfig::default()
    };
    let mut objective = Pretrain::open(&data, b, t, 0, 0, 1, base_cfg.vocab_size, 0).unwrap();
    let opts = TrainOptions {
        run,
        out_dir: dir.path().join("run"),
        resume: false,
        keep_checkpoints: 0,
        quiet: true,
    };
    let summary =
        train::train(&be, &train::solo(), &mut model, &mut objective, &tok, &opts).unwrap();
    assert_eq!(summary.train_losses.len(), 3);
    let after = model.param_values(&be).unwrap();
    assert_eq!(after[..base.len()], base[..], "frozen base");
    for s in &model.layout.lora {
        assert!(
            after[s.b].iter().any(|&x| x != 0.0),
            "B of layer {} moved",
            s.layer
        );
    }
}
