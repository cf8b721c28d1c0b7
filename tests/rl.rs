//! RL stage: on a toy reward ("say token X") the mean reward rises over the steps while the KL
//! to the reference stays under a stated bound, and a larger KL coefficient keeps the policy
//! closer to the reference; the command runs end to end with checkpoints and a reward model
//! (the first rollout's KL is exactly 0), and a bad prompts line is named.

use std::path::Path;
use topcoat::backend::cpu::CpuBackend;
use topcoat::commands::prepare::EMBEDDED_CORPUS;
use topcoat::commands::rl::{RlJob, RlStage};
use topcoat::commands::stage::{train, Stage, TrainJob};
use topcoat::config::{ModelConfig, RunConfig};
use topcoat::data::Tokenizer;
use topcoat::model::Gpt;
use topcoat::rng::Rng;
use topcoat::runtime::Runtime;
use topcoat::stages::rl::{FnScorer, Rl, RlConfig};
use topcoat::train::{self, checkpoint, TrainOptions};

const VOCAB: usize = 32;
const T: usize = 12;
/// The token the toy reward asks for.
const X: u32 = 7;
const STEPS: usize = 40;
/// KL coefficients: the leashed run, and a loose one for the comparison.
const KL_LEASHED: f64 = 0.1;
const KL_LOOSE: f64 = 0.01;
/// Bound on the leashed run's mean summed KL (nats per 4-token completion) at every step.
/// Against a near-uniform reference, this reward's KL-regularised optimum says X with
/// probability e^2.5 / (31 + e^2.5) = 0.28 per token, a KL of about 1.6 nats per completion;
/// the bound leaves room for the overshoot on the way there. A policy that always says X sits
/// at 4 ln 32 = 13.9 nats.
const KL_BOUND: f64 = 6.0;

fn tiny_cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: VOCAB,
        padded_vocab_size: 64,
        n_layer: 2,
        n_head: 2,
        n_embd: 32,
        max_seq_len: T,
        family: Default::default(),
        lora: None,
    }
}

/// Fraction of the completion's tokens that are `X`.
fn say_x(_prompt: &[u32], completion: &[u32]) -> f32 {
    completion.iter().filter(|&&x| x == X).count() as f32 / completion.len().max(1) as f32
}

fn prompts() -> Vec<Vec<u32>> {
    let mut rng = Rng::new(11);
    (0..8)
        .map(|i| {
            (0..3 + i % 4)
                .map(|_| rng.below(VOCAB as u64) as u32)
                .collect()
        })
        .collect()
}

/// Per-step `(reward, kl)` of a toy run with `kl_coef`.
fn toy_run(kl_coef: f64) -> Vec<(f64, f64)> {
    let be = CpuBackend;
    let cfg = tiny_cfg();
    let mut policy = Gpt::init(&be, &cfg, 5).unwrap();
    let reference = Gpt::init(&be, &cfg, 5).unwrap();
    let rl_cfg = RlConfig {
        prompts: 4,
        k: 4,
        kl_coef,
        clip: 0.2,
        max_new: 4,
        epochs: 2,
        t: T,
        accum: 1,
        stop: None,
        pad: 0,
    };
    let mut rl = Rl::new(prompts(), reference, Box::new(FnScorer(say_x)), rl_cfg).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let opts = TrainOptions {
        run: RunConfig {
            batch_size: 4,
            seq_len: T,
            max_steps: STEPS,
            learning_rate: 1e-2,
            warmup_steps: 0,
            min_lr_ratio: 1.0,
            weight_decay: 0.0,
            val_every: 0,
            checkpoint_every: 0,
            seed: 3,
            ..RunConfig::default()
        },
        out_dir: dir.path().to_path_buf(),
        resume: false,
        keep_checkpoints: 1,
        quiet: true,
    };
    let tok = Tokenizer::gpt2();
    train::train(&be, &train::solo(), &mut policy, &mut rl, &tok, &opts).unwrap();
    let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get("reward").is_some())
        .map(|r| (r["reward"].as_f64().unwrap(), r["kl"].as_f64().unwrap()))
        .collect()
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = xs.collect();
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn toy_reward_rises_under_a_kl_bound_and_a_larger_kl_coefficient_stays_closer() {
    let leashed = toy_run(KL_LEASHED);
    // Rollouts are sampled every second step (epochs = 2): one record each.
    assert_eq!(leashed.len(), STEPS / 2);
    let first = mean(leashed[..4].iter().map(|r| r.0));
    let last = mean(leashed[leashed.len() - 4..].iter().map(|r| r.0));
    assert!(
        last > first + 0.1 && last > 3.0 * first,
        "mean reward {first:.3} -> {last:.3}: did not rise ({leashed:?})"
    );
    let worst = leashed.iter().map(|r| r.1).fold(0.0, f64::max);
    assert!(
        worst < KL_BOUND,
        "KL {worst:.3} over the bound {KL_BOUND} ({leashed:?})"
    );
    let kl_leashed = mean(leashed[leashed.len() - 4..].iter().map(|r| r.1));
    assert!(
        kl_leashed > 0.0,
        "KL {kl_leashed:.3}: the policy did not move"
    );

    let loose = toy_run(KL_LOOSE);
    let kl_loose = mean(loose[loose.len() - 4..].iter().map(|r| r.1));
    assert!(
        kl_leashed < 0.5 * kl_loose,
        "final KL with coefficient {KL_LEASHED}: {kl_leashed:.3}, with {KL_LOOSE}: {kl_loose:.3}"
    );
}

fn records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn the_command_runs_with_a_reward_checkpoint_and_names_a_bad_prompt_line() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (init, reward, prompts, _) = rl_inputs(root, 21);
    std::fs::write(
        &prompts,
        "{\"prompt\": \"What color is the sky?\"}\n\n{\"prompt\": \"Name a fruit.\"}\n",
    )
    .unwrap();
    let stage = RlStage {
        k: 3,
        max_new_tokens: 6,
        epochs: 1,
        ..RlStage::new(init.clone(), reward.clone(), prompts.clone())
    };
    let job = RlJob {
        run: RunConfig {
            batch_size: 2,
            seq_len: 32,
            max_steps: 3,
            learning_rate: 1e-3,
            warmup_steps: 0,
            val_every: 0,
            checkpoint_every: 0,
            ..RlStage::defaults()
        },
        quiet: true,
        ..TrainJob::new(stage, root.join("rl"))
    };
    let cpu = Runtime::cpu();
    let summary = train(&cpu, &job, &|_| {}).unwrap();
    // The runs below are refused over their inputs, before the earlier run would be deleted.
    let job = RlJob {
        overwrite: true,
        ..job
    };
    assert_eq!(summary.final_step, 3);
    assert!(summary
        .last_checkpoint
        .unwrap()
        .join("model.safetensors")
        .exists());
    let recs = records(&job.out);
    let steps: Vec<&serde_json::Value> = recs.iter().filter(|r| r.get("loss").is_some()).collect();
    assert_eq!(steps.len(), 3);
    for r in &steps {
        for key in ["reward", "kl", "entropy", "response_len", "clip_frac"] {
            assert!(r[key].as_f64().unwrap().is_finite(), "{key} in {r}");
        }
        let len = r["response_len"].as_f64().unwrap();
        assert!(len > 0.0 && len <= 6.0, "response_len {len}");
        assert!(r["entropy"].as_f64().unwrap() > 0.0, "{r}");
    }
    // Before the first update the policy is the reference: the KL is exactly zero.
    assert_eq!(steps[0]["kl"].as_f64().unwrap(), 0.0);
    // One epoch per rollout: the ratio is 1, nothing is clipped.
    assert_eq!(steps[0]["clip_frac"].as_f64().unwrap(), 0.0);

    std::fs::write(
        &prompts,
        "{\"prompt\": \"ok\"}\n{\"text\": \"no prompt\"}\n",
    )
    .unwrap();
    let err = train(&cpu, &job, &|_| {}).unwrap_err().to_string();
    assert!(
        err.contains("prompts.jsonl:2") && err.contains("prompt"),
        "{err}"
    );
    std::fs::write(&prompts, "{\"prompt\": \"ok\"}\n").unwrap();
    let bad_k = RlJob {
        stage: RlStage { k: 1, ..job.stage },
        ..job
    };
    let err = train(&cpu, &bad_k, &|_| {}).unwrap_err().to_string();
    assert!(err.contains("--k"), "{err}");
    assert!(
        bad_k.out.join("ckpt_000003").is_dir(),
        "a refused --overwrite run deleted the earlier run"
    );
}

/// Per-token gradient vs central differences of the f32 objective (directional derivative).
const FD_TOL: f64 = 2e-3;
const FD_H: f32 = 5e-2;
/// Per-token log-probabilities summed per row vs the sequence log-probabilities.
const SUM_TOL: f64 = 1e-5;

#[test]
fn per_token_backward_matches_finite_differences_and_rows_sum_to_sequence_logps() {
    let be = CpuBackend;
    let cfg = tiny_cfg();
    let (b, t) = (3, T);
    let mut rng = Rng::new(17);
    let inputs: Vec<i32> = (0..b * t).map(|_| rng.below(VOCAB as u64) as i32).collect();
    let targets: Vec<i32> = (0..b * t)
        .map(|i| {
            if i % t < 4 {
                -1
            } else {
                rng.below(VOCAB as u64) as i32
            }
        })
        .collect();
    let coef: Vec<f32> = (0..b * t).map(|_| rng.normal()).collect();
    let objective = |model: &mut Gpt<CpuBackend>| -> f64 {
        let lp = model.token_logps(&be, &inputs, &targets, b, t).unwrap();
        lp.iter()
            .zip(&coef)
            .map(|(&l, &c)| l as f64 * c as f64)
            .sum()
    };

    let mut model = Gpt::init(&be, &cfg, 8).unwrap();
    model.zero_grad(&be).unwrap();
    let lp = model
        .token_logps_step(&be, &inputs, &targets, b, t, |_| coef.clone())
        .unwrap();
    let seq = model.sequence_logps(&be, &inputs, &targets, b, t).unwrap();
    for (r, s) in seq.iter().enumerate() {
        let sum: f64 = lp[r * t..(r + 1) * t].iter().map(|&x| x as f64).sum();
        assert!(
            (sum - s).abs() <= SUM_TOL * s.abs().max(1.0),
            "row {r}: {sum} vs {s}"
        );
    }
    for (i, (&l, &tg)) in lp.iter().zip(&targets).enumerate() {
        assert!(tg >= 0 || l == 0.0, "masked position {i} has log-prob {l}");
    }

    let grads = model.grad_values(&be).unwrap();
    let values = model.param_values(&be).unwrap();
    // Two tensors: the token embedding (first) and one in the middle of the list.
    for idx in [0, values.len() / 2] {
        // A unit direction, so the step FD_H is small for the whole tensor.
        let raw: Vec<f32> = (0..values[idx].len()).map(|_| rng.normal()).collect();
        let norm = raw.iter().map(|&x| x * x).sum::<f32>().sqrt();
        let dir: Vec<f32> = raw.iter().map(|&x| x / norm).collect();
        let analytic: f64 = grads[idx]
            .iter()
            .zip(&dir)
            .map(|(&g, &d)| g as f64 * d as f64)
            .sum();
        let at = |sign: f32| {
            let mut v = values.clone();
            v[idx]
                .iter_mut()
                .zip(&dir)
                .for_each(|(x, &d)| *x += sign * FD_H * d);
            objective(&mut Gpt::from_values(&be, &cfg, v).unwrap())
        };
        let fd = (at(1.0) - at(-1.0)) / (2.0 * FD_H as f64);
        let rel = (analytic - fd).abs() / fd.abs().max(1e-12);
        assert!(
            rel < FD_TOL,
            "tensor {idx}: analytic {analytic}, finite differences {fd}"
        );
    }
}

/// An SFT checkpoint (model drawn from `seed`), a reward checkpoint made from it (head drawn
/// from `seed + 1`, same tokenizer) and a prompts file under `root`; their model's config.
fn rl_inputs(
    root: &Path,
    seed: u64,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
    ModelConfig,
) {
    let text = String::from_utf8_lossy(&EMBEDDED_CORPUS[..20_000]).into_owned();
    let tok = Tokenizer::train_bpe([text.as_str()].into_iter(), 300, |_, _| {}).unwrap();
    let cfg = ModelConfig {
        vocab_size: tok.vocab_size(),
        padded_vocab_size: 320,
        n_layer: 2,
        n_head: 2,
        n_embd: 32,
        max_seq_len: 32,
        family: Default::default(),
        lora: None,
    };
    let be = CpuBackend;
    let mut model = Gpt::init(&be, &cfg, seed).unwrap();
    let init = root.join("sft");
    checkpoint::save(&be, &init, &model, &tok, None).unwrap();
    model.init_reward_head(&be, seed + 1).unwrap();
    let reward = root.join("reward");
    checkpoint::save(&be, &reward, &model, &tok, None).unwrap();
    let prompts = root.join("prompts.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"Name a fruit.\"}\n").unwrap();
    (init, reward, prompts, cfg)
}

/// RL's memory plan counts the models it holds beside the policy: the reward model (scoring
/// `k` completions of `T` tokens at a time, its head included) and, in a full fine-tune, the
/// reference (reading the micro-batch's `prompts x k` rows); a LoRA run holds no reference
/// (its policy with the adapters off). The start-of-run budget prints exactly that sum.
#[test]
fn rl_memory_plan_counts_the_reward_model_and_the_reference() {
    use std::cell::RefCell;
    use topcoat::commands::plan::gib;
    use topcoat::commands::preflight::HeldModel;
    let dir = tempfile::tempdir().unwrap();
    let (init, reward, prompts, cfg) = rl_inputs(dir.path(), 31);
    let (k, prompts_per_batch, t) = (3, 2, 32);
    let cpu_bytes = |_| 4;
    let reward_model = HeldModel {
        cfg: cfg.clone(),
        rows: k,
        seq_len: t,
        extra: cfg.n_embd + 1,
    };
    let reference = HeldModel {
        rows: prompts_per_batch * k,
        extra: 0,
        ..reward_model.clone()
    };
    let (r_bytes, ref_bytes) = (reward_model.bytes(&cpu_bytes), reference.bytes(&cpu_bytes));
    // The reference reads twice the rows of the reward model, without a head.
    assert!(ref_bytes > r_bytes && r_bytes > 4 * cfg.num_params() as u128);
    for (lora_rank, held) in [(None, r_bytes + ref_bytes), (Some(4), r_bytes)] {
        let stage = RlStage {
            k,
            max_new_tokens: 4,
            epochs: 1,
            ..RlStage::new(init.clone(), reward.clone(), prompts.clone())
        };
        let job = RlJob {
            run: RunConfig {
                batch_size: prompts_per_batch,
                seq_len: t,
                max_steps: 1,
                warmup_steps: 0,
                val_every: 0,
                checkpoint_every: 0,
                lora_rank,
                ..RlStage::defaults()
            },
            quiet: true,
            ..TrainJob::new(stage, dir.path().join(format!("rl{lora_rank:?}")))
        };
        let lines = RefCell::new(Vec::new());
        train(&Runtime::cpu(), &job, &|l| {
            lines.borrow_mut().push(l.to_string())
        })
        .unwrap();
        let lines = lines.into_inner();
        let line = lines
            .iter()
            .flat_map(|l| l.lines())
            .find(|l| l.contains("models held beside"))
            .unwrap_or_else(|| panic!("no held models in the budget: {lines:?}"));
        assert!(
            line.ends_with(&format!(": {}", gib(held))),
            "lora {lora_rank:?}: {line}"
        );
    }
}
