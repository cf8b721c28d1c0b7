//! The Llama-family model on the CPU backend: its whole gradient against finite differences
//! (grouped-query ratios 1, 2 and NH, tied and untied head, q/k/v biases), packed rows equal
//! to each example alone (forward and gradient), KV-cache decoding equal to the full forward,
//! recompute levels equal to storing everything bit for bit, the gradient buckets, the
//! parameter count of Llama-3.2-1B; then the CLI end to end on a llama-tiny checkpoint
//! (pretrain, sft, reward, dpo, rl, sample, chat, eval loss, info).

mod common;

use common::cli::{ok, prepare_small_corpus, s};
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use topcoat::backend::cpu::CpuBackend;
use topcoat::backend::Backend;
use topcoat::config::{Family, LlamaShape, ModelConfig, RopeScaling};
use topcoat::model::{Gpt, GradHook, KvCache, Packing};
use topcoat::rng::Rng;

/// Fourth-order central differences of the f32 model's mean loss along a unit direction `u`,
/// `[8 (L(h) - L(-h)) - (L(2h) - L(-2h))] / 12h`, against the analytic `g.u`. The f32 loss
/// (~ln 50) carries ~1e-6 of rounding per evaluation, i.e. ~3e-5 absolute over a step of
/// 5e-2; the truncation is O(h^4). Each parameter tensor is checked along its own gradient
/// (`|g_T|`, 1e-2 and up here), so the error relative to `|g_T|` stays below ~3e-3.
const FD_STEP: f64 = 5e-2;
const FD_TOL: f64 = 1e-2;
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
    }
}

/// Initial values with every tensor moved off its init (norm weights off 1, biases off 0), so
/// that every parameter's gradient is exercised; padded vocabulary rows stay zero.
fn random_values(be: &CpuBackend, cfg: &ModelConfig, seed: u64) -> Vec<Vec<f32>> {
    let model = Gpt::init(be, cfg, seed).unwrap();
    let mut rng = Rng::new(seed ^ 0x5EED);
    let mut values = model.param_values(be).unwrap();
    for (spec, v) in model.layout.specs.iter().zip(&mut values) {
        let keep = if spec.shape[0] == cfg.padded_vocab_size {
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

/// Records the buckets the backward pass reports.
struct Record(std::sync::Arc<std::sync::Mutex<Vec<Vec<usize>>>>);

impl GradHook<CpuBackend> for Record {
    fn ready(
        &mut self,
        _: &CpuBackend,
        _: &mut [<CpuBackend as Backend>::Buf],
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

// ---- the CLI, end to end on a llama-tiny checkpoint -----------------------------------------

/// Each step record's loss.
fn losses(out: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|r| r.get("loss").and_then(|x| x.as_f64()))
        .collect()
}

/// `stage` on the CPU with small batches and no validation, plus `extra`.
fn stage(stage: &str, out: &Path, extra: &[&str]) -> String {
    let mut a: Vec<String> = [
        stage,
        "--out",
        &s(out),
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--val-every",
        "0",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    a.extend(extra.iter().map(|x| x.to_string()));
    ok(&a)
}

#[test]
fn every_stage_and_command_runs_on_a_llama_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    prepare_small_corpus(dir.path());
    let (data, p) = (dir.path().join("data"), |n: &str| dir.path().join(n));

    // pretrain from scratch: the loss falls.
    let out = stage(
        "pretrain",
        &p("base"),
        &[
            "--data",
            &s(&data),
            "--preset",
            "llama-tiny",
            "--n-layer",
            "2",
            "--max-steps",
            "12",
            "--seq-len",
            "32",
            "--lr",
            "3e-3",
            "--warmup-steps",
            "2",
        ],
    );
    assert!(
        out.contains("family: llama") || out.contains("model:"),
        "{out}"
    );
    let l = losses(&p("base"));
    assert_eq!(l.len(), 12);
    assert!(l[11] < 0.8 * l[0], "pretrain loss did not fall: {l:?}");
    let info = ok(&["info", &s(&p("base"))]);
    assert!(info.contains("family: llama, 2 KV heads of 32"), "{info}");

    // sft from it.
    let chats: Vec<String> = (0..16)
        .map(|i| {
            format!(
                r#"{{"messages": [{{"role": "user", "content": "Say cat {i}."}}, {{"role": "assistant", "content": "A cat {i}."}}]}}"#
            )
        })
        .collect();
    std::fs::write(p("chats.jsonl"), chats.join("\n")).unwrap();
    ok(&[
        "prepare",
        "sft",
        &s(&p("chats.jsonl")),
        "--out",
        &s(&p("sft_data")),
        "--tokenizer",
        &s(&data),
    ]);
    let tune = |name: &str, init: &Path, data: &Path, extra: &[&str]| {
        let mut a = vec![
            "--init".to_string(),
            s(init),
            "--data".into(),
            s(data),
            "--max-steps".into(),
            "2".into(),
            "--seq-len".into(),
            "48".into(),
        ];
        a.extend(extra.iter().map(|x| x.to_string()));
        let a: Vec<&str> = a.iter().map(|x| x.as_str()).collect();
        stage(name, &p(name), &a);
        let l = losses(&p(name));
        assert_eq!(l.len(), 2, "{name}");
        assert!(l.iter().all(|x| x.is_finite()), "{name}: {l:?}");
    };
    tune("sft", &p("base"), &p("sft_data"), &["--pack"]);

    // Preferences: reward and dpo, then rl against the reward model.
    let lines: Vec<String> = (0..12)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("Is a cat {i} small?"),
                "chosen": "A cat is small.",
                "rejected": "no",
            })
            .to_string()
        })
        .collect();
    std::fs::write(p("prefs.jsonl"), lines.join("\n")).unwrap();
    ok(&[
        "prepare",
        "prefs",
        &s(&p("prefs.jsonl")),
        "--out",
        &s(&p("prefs")),
        "--tokenizer",
        &s(&data),
    ]);
    tune("reward", &p("sft"), &p("prefs"), &[]);
    tune("dpo", &p("sft"), &p("prefs"), &[]);
    let prompts: Vec<String> = (0..8)
        .map(|i| serde_json::json!({ "prompt": format!("Is a cat {i} small?") }).to_string())
        .collect();
    std::fs::write(p("prompts.jsonl"), prompts.join("\n")).unwrap();
    let out = stage(
        "rl",
        &p("rl"),
        &[
            "--init",
            &s(&p("sft")),
            "--reward",
            &s(&p("reward")),
            "--prompts",
            &s(&p("prompts.jsonl")),
            "--max-steps",
            "2",
            "--seq-len",
            "48",
            "--max-new-tokens",
            "6",
        ],
    );
    assert!(!out.is_empty());
    assert_eq!(losses(&p("rl")).len(), 2);

    // sample (greedy twice: the same text), chat, eval loss.
    let sample = || {
        ok(&[
            "sample",
            "--checkpoint",
            &s(&p("dpo")),
            "--prompt",
            "A cat",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
            "--device",
            "cpu",
        ])
    };
    let first = sample();
    assert!(first.starts_with("A cat"), "{first}");
    assert_eq!(first, sample());

    let mut child = Command::new(env!("CARGO_BIN_EXE_topcoat"))
        .args(["chat", "--checkpoint"])
        .arg(p("sft"))
        .args([
            "--device",
            "cpu",
            "--temperature",
            "0",
            "--max-new-tokens",
            "5",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Say cat 3.\nSay cat 4.\n")
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "chat failed:\n{out}\n{err}");
    assert!(err.contains("chat:"), "{err}");
    assert_eq!(out.lines().count(), 2, "one reply per message:\n{out}");

    let out = ok(&[
        "eval",
        "loss",
        "--device",
        "cpu",
        "--checkpoint",
        &s(&p("base")),
        "--data",
        &s(&data),
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--max-batches",
        "2",
    ]);
    assert!(out.contains("loss"), "{out}");
}
