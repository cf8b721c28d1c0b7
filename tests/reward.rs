//! Reward model: the Bradley-Terry loss and every gradient of a two-pair batch against a hand
//! computation (head weight and bias, the hidden-state gradient, the trunk by finite
//! differences); a toy set where chosen is separable from rejected reaches 100% accuracy; the
//! head survives checkpoints and resume; bad set-ups are clear errors.

use std::path::{Path, PathBuf};
use topcoat::backend::cpu::CpuBackend;
use topcoat::backend::Backend;
use topcoat::commands::inputs::TokenizerArg;
use topcoat::commands::prepare::{prepare_prefs, EMBEDDED_CORPUS};
use topcoat::commands::reward::{RewardJob, RewardStage};
use topcoat::commands::stage::{Stage, TrainJob};
use topcoat::config::{ModelConfig, RunConfig};
use topcoat::data::{PairSplit, PrefsPrepareOptions, Tokenizer};
use topcoat::model::reward::{HEAD_BIAS, HEAD_WEIGHT};
use topcoat::model::{Gpt, RewardModel};
use topcoat::rng::Rng;
use topcoat::runtime::Runtime;
use topcoat::stages::reward::bradley_terry;
use topcoat::train::checkpoint;

/// f32 model output vs an f64 hand computation of the same values.
const HAND_TOL: f64 = 1e-5;
/// Trunk gradient vs central differences of the f32 loss (directional derivative).
const FD_TOL: f64 = 2e-3;
const FD_H: f32 = 1e-2;

fn tiny_cfg(vocab: usize, t: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: vocab,
        padded_vocab_size: vocab.div_ceil(64) * 64,
        n_layer: 2,
        n_head: 2,
        n_embd: 32,
        max_seq_len: t,
        family: Default::default(),
        lora: None,
    }
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

fn rel_vec(a: &[f32], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    assert!(den > 0.0, "reference is zero: vacuous comparison");
    (num / den).sqrt()
}

/// Two pairs (four rows) of random ids with their last tokens at different positions.
fn two_pair_batch(rng: &mut Rng, vocab: usize, t: usize) -> (Vec<i32>, Vec<usize>) {
    let ids = (0..4 * t).map(|_| rng.below(vocab as u64) as i32).collect();
    (ids, vec![t - 1, t - 3, 2, t - 2])
}

/// The batch's mean Bradley-Terry loss, forward only.
fn loss_of(
    be: &CpuBackend,
    model: &mut Gpt<CpuBackend>,
    ids: &[i32],
    t: usize,
    last: &[usize],
) -> f32 {
    let pass = model.reward_forward(be, ids, 4, t, last).unwrap();
    bradley_terry(&pass.rewards, 2, 1.0).mean
}

#[test]
fn two_pair_loss_and_gradients_match_a_hand_computation() {
    let be = CpuBackend;
    let (vocab, t) = (50, 9);
    let cfg = tiny_cfg(vocab, t);
    let mut model = Gpt::init(&be, &cfg, 3).unwrap();
    let head = model.init_reward_head(&be, 4).unwrap();
    let mut rng = Rng::new(5);
    let (ids, last) = two_pair_batch(&mut rng, vocab, t);

    // By hand, in f64, from the hidden states and the head's values.
    model.forward_hidden(&be, &ids, 4, t).unwrap();
    let h: Vec<Vec<f32>> = (0..4)
        .map(|r| model.hidden_at(&be, r, last[r]).unwrap())
        .collect();
    let (w, b) = model.reward_head_values(&be).unwrap();
    let r: Vec<f64> = h
        .iter()
        .map(|h| {
            b as f64
                + h.iter()
                    .zip(&w)
                    .map(|(&x, &y)| x as f64 * y as f64)
                    .sum::<f64>()
        })
        .collect();
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    let d = [r[0] - r[1], r[2] - r[3]];
    let loss = -(sig(d[0]).ln() + sig(d[1]).ln()) / 2.0;
    let g = [-(1.0 - sig(d[0])) / 2.0, -(1.0 - sig(d[1])) / 2.0];
    let dr = [g[0], -g[0], g[1], -g[1]];
    let dw: Vec<f64> = (0..cfg.n_embd)
        .map(|c| (0..4).map(|i| dr[i] * h[i][c] as f64).sum())
        .collect();
    let db: f64 = dr.iter().sum();
    assert!(
        db.abs() < 1e-12,
        "chosen and rejected gradients cancel in the bias"
    );

    // The model's pass.
    model.zero_grad(&be).unwrap();
    let pass = model.reward_forward(&be, &ids, 4, t, &last).unwrap();
    assert!(
        rel_vec(&pass.rewards, &r) <= HAND_TOL,
        "rewards {:?} vs {r:?}",
        pass.rewards
    );
    let scale = 0.5; // a micro-batch's share of an accumulated step
    let bt = bradley_terry(&pass.rewards, 2, scale);
    assert!(
        rel(bt.mean as f64, loss) <= HAND_TOL,
        "loss {} vs {loss}",
        bt.mean
    );
    assert!(rel(bt.sum, 2.0 * loss) <= HAND_TOL);
    let want_dr: Vec<f64> = dr.iter().map(|x| x * scale as f64).collect();
    assert!(rel_vec(&bt.drewards, &want_dr) <= HAND_TOL);
    assert!(rel_vec(&bt.margins, &d) <= HAND_TOL);
    let hg = model
        .reward_backward(&be, &ids, &pass, &bt.drewards)
        .unwrap();
    let grads = model.grad_values(&be).unwrap();
    let want_dw: Vec<f64> = dw.iter().map(|x| x * scale as f64).collect();
    assert!(
        rel_vec(&grads[head.weight], &want_dw) <= HAND_TOL,
        "head weight gradient"
    );
    assert!(
        (grads[head.bias][0] as f64 - db * scale as f64).abs() < 1e-7,
        "head bias gradient"
    );
    for (i, &d) in want_dr.iter().enumerate() {
        let want: Vec<f64> = w.iter().map(|&x| d * x as f64).collect();
        assert!(
            rel_vec(&hg.dhidden[i], &want) <= HAND_TOL,
            "hidden gradient of row {i}"
        );
    }

    // The hidden-state gradient is what reaches the trunk: the same trunk gradients come from
    // backward_hidden with the hand-made d(ln_f output), zero except at the read positions.
    let c = cfg.n_embd;
    let mut dense = vec![0.0f32; 4 * t * c];
    for i in 0..4 {
        for (k, &x) in w.iter().enumerate() {
            dense[(i * t + last[i]) * c + k] = (want_dr[i] * x as f64) as f32;
        }
    }
    let mut again = Gpt::init(&be, &cfg, 3).unwrap();
    again.forward_hidden(&be, &ids, 4, t).unwrap();
    again.backward_hidden(&be, &ids, 4, t, &dense).unwrap();
    let trunk = again.grad_values(&be).unwrap();
    for (k, spec) in again.layout.specs.iter().enumerate() {
        let want: Vec<f64> = trunk[k].iter().map(|&x| x as f64).collect();
        if want.iter().all(|&x| x == 0.0) {
            continue; // e.g. wte rows of ids not in the batch; checked equal below
        }
        assert!(rel_vec(&grads[k], &want) <= HAND_TOL, "{}", spec.name);
    }
    assert!(grads[again.layout.lnf_w].iter().any(|&x| x != 0.0));
}

#[test]
fn trunk_gradients_match_finite_differences() {
    let be = CpuBackend;
    let (vocab, t) = (50, 9);
    let cfg = tiny_cfg(vocab, t);
    let mut model = Gpt::init(&be, &cfg, 13).unwrap();
    model.init_reward_head(&be, 14).unwrap();
    let mut rng = Rng::new(15);
    let (ids, last) = two_pair_batch(&mut rng, vocab, t);
    model.zero_grad(&be).unwrap();
    let pass = model.reward_forward(&be, &ids, 4, t, &last).unwrap();
    let bt = bradley_terry(&pass.rewards, 2, 1.0);
    model
        .reward_backward(&be, &ids, &pass, &bt.drewards)
        .unwrap();
    let grads = model.grad_values(&be).unwrap();

    let names = [
        "wte.weight",
        "wpe.weight",
        "h.0.attn.c_attn.weight",
        "h.1.mlp.c_fc.weight",
        "h.1.attn.c_proj.bias",
        "ln_f.weight",
        HEAD_WEIGHT,
    ];
    // ln_f.bias and the head's bias get exactly zero: their gradients are sums of the reward
    // gradients, and a pair's chosen and rejected gradients cancel.
    for name in ["ln_f.bias", HEAD_BIAS] {
        let k = model
            .layout
            .specs
            .iter()
            .position(|s| s.name == name)
            .unwrap();
        assert!(
            grads[k].iter().all(|&g| g.abs() < 1e-6),
            "{name}: {:?}",
            &grads[k][..4.min(grads[k].len())]
        );
    }
    for name in names {
        let k = model
            .layout
            .specs
            .iter()
            .position(|s| s.name == name)
            .unwrap();
        // Directional derivative along a random unit direction: (L(p + hv) - L(p - hv)) / 2h.
        let p0 = be.download(&model.params[k]).unwrap();
        let mut v: Vec<f32> = (0..p0.len()).map(|_| rng.normal()).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
        let mut at = |sign: f32| {
            let p: Vec<f32> = p0
                .iter()
                .zip(&v)
                .map(|(&a, &d)| a + sign * FD_H * d)
                .collect();
            be.write(&mut model.params[k], &p).unwrap();
            loss_of(&be, &mut model, &ids, t, &last) as f64
        };
        let fd = (at(1.0) - at(-1.0)) / (2.0 * FD_H as f64);
        be.write(&mut model.params[k], &p0).unwrap();
        let analytic: f64 = grads[k]
            .iter()
            .zip(&v)
            .map(|(&g, &d)| g as f64 * d as f64)
            .sum();
        println!("{name}: analytic {analytic:.6e}, finite differences {fd:.6e}");
        assert!(fd.abs() > 1e-4, "{name}: vacuous direction");
        assert!(rel(analytic, fd) <= FD_TOL, "{name}: {analytic} vs {fd}");
    }
}

fn small_tokenizer() -> Tokenizer {
    let text = String::from_utf8_lossy(&EMBEDDED_CORPUS[..20_000]).into_owned();
    Tokenizer::train_bpe([text.as_str()].into_iter(), 300, |_, _| {}).unwrap()
}

/// A tiny "SFT checkpoint" (fresh weights) and a prepared toy preference set in which every
/// chosen reply praises and every rejected one refuses.
fn toy_setup(dir: &Path, pairs: usize) -> (PathBuf, PathBuf) {
    let be = CpuBackend;
    let tok = small_tokenizer();
    let model = Gpt::init(&be, &tiny_cfg(tok.vocab_size(), 64), 21).unwrap();
    let sft = dir.join("sft");
    checkpoint::save(&be, &sft, &model, &tok, None).unwrap();
    let lines: String = (0..pairs)
        .map(|i| {
            let topic = ["cats", "dogs", "water", "the sky", "apples"][i % 5];
            serde_json::json!({
                "prompt": format!("Tell me about {topic}, number {i}."),
                "chosen": format!("Gladly! Here is a kind answer about {topic}."),
                "rejected": format!("No. {topic}? {i}."),
            })
            .to_string()
                + "\n"
        })
        .collect();
    let src = dir.join("prefs.jsonl");
    std::fs::write(&src, lines).unwrap();
    let data = dir.join("prefs");
    let opts = PrefsPrepareOptions {
        max_len: 64,
        val_fraction: 0.25,
        ..PrefsPrepareOptions::new(&data)
    };
    let s = prepare_prefs(&src, &TokenizerArg::Path(sft.clone()), &opts).unwrap();
    assert_eq!((s.too_long, s.identical), (0, 0));
    (sft, data)
}

fn job(sft: &Path, data: &Path, out: PathBuf, run: RunConfig) -> RewardJob {
    let stage = RewardStage {
        init: sft.to_path_buf(),
        data: data.to_path_buf(),
    };
    RewardJob {
        run,
        quiet: true,
        ..TrainJob::new(stage, out)
    }
}

fn reward(
    job: &RewardJob,
    progress: &dyn Fn(&str),
) -> Result<topcoat::train::TrainSummary, topcoat::commands::CommandError> {
    topcoat::commands::stage::train(&Runtime::cpu(), job, progress)
}

fn records(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn separable_pairs_reach_full_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let (sft, data) = toy_setup(dir.path(), 24);
    let out = dir.path().join("rm");
    let run_cfg = RunConfig {
        batch_size: 8,
        seq_len: 64,
        max_steps: 30,
        warmup_steps: 3,
        learning_rate: 1e-3,
        val_every: 10,
        checkpoint_every: 0,
        ..RewardStage::defaults()
    };
    let summary = reward(&job(&sft, &data, out.clone(), run_cfg), &|_| {}).unwrap();
    let recs = records(&out);
    let vals: Vec<&serde_json::Value> = recs
        .iter()
        .filter(|r| r.get("val_loss").is_some())
        .collect();
    let steps: Vec<&serde_json::Value> = recs.iter().filter(|r| r.get("loss").is_some()).collect();
    assert_eq!(steps.len(), 30);
    for key in [
        "accuracy",
        "margin",
        "reward_mean",
        "reward_min",
        "reward_max",
    ] {
        assert!(
            steps[0][key].is_number(),
            "step record lacks {key}: {}",
            steps[0]
        );
        assert!(
            vals[0][format!("val_{key}")].is_number(),
            "val record lacks {key}"
        );
    }
    let first = vals.first().unwrap();
    let last = vals.last().unwrap();
    println!("validation: {first}\n        -> {last}");
    assert_eq!(last["val_accuracy"], 1.0, "{last}");
    assert_eq!(steps.last().unwrap()["accuracy"], 1.0);
    assert!(last["val_margin"].as_f64().unwrap() > first["val_margin"].as_f64().unwrap());
    let r = |k: &str| last[k].as_f64().unwrap();
    assert!(
        r("val_reward_min") <= r("val_reward_mean") && r("val_reward_mean") <= r("val_reward_max")
    );
    assert!(summary.val_losses.last().unwrap().1 < summary.val_losses[0].1);

    // The checkpoint holds the head beside the whole LM, loads as a reward model, and scores
    // each validation pair's chosen side above its rejected side.
    let ckpt = summary.last_checkpoint.unwrap();
    let be = CpuBackend;
    let gpt = checkpoint::load_model(&be, &ckpt, None).unwrap();
    assert!(gpt.reward_head().is_some());
    assert_eq!(
        gpt.layout.specs.len(),
        Gpt::init(&be, &gpt.cfg, 0).unwrap().layout.specs.len() + 2
    );
    let mut rm = RewardModel::new(gpt).unwrap();
    let tok = small_tokenizer();
    let val = PairSplit::open(&data, "prefs_val", tok.vocab_size()).unwrap();
    for i in 0..val.len() {
        let s = rm
            .score(&be, &[val.chosen(i).ids, val.rejected(i).ids], tok.eot())
            .unwrap();
        assert!(s[0] > s[1], "val pair {i}: {s:?}");
    }
    let info = topcoat::commands::info::info(&out).unwrap();
    assert!(info.contains("stage reward"), "{info}");
    // A model without a head is not a reward model.
    let plain = checkpoint::load_model(&be, &sft, None).unwrap();
    assert!(RewardModel::new(plain).is_err());
}

#[test]
fn resumed_reward_run_matches_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let (sft, data) = toy_setup(dir.path(), 11);
    let run_cfg = RunConfig {
        batch_size: 6, // 3 pairs of 8 training pairs: batches straddle epochs
        seq_len: 64,
        max_steps: 6,
        warmup_steps: 1,
        val_every: 3,
        checkpoint_every: 3,
        ..RewardStage::defaults()
    };
    let make = |name: &str, resume: bool| RewardJob {
        resume,
        ..job(&sft, &data, dir.path().join(name), run_cfg.clone())
    };
    let straight = reward(&make("straight", false), &|_| {}).unwrap();
    reward(&make("crashed", false), &|_| {}).unwrap();
    let crashed = dir.path().join("crashed");
    std::fs::remove_dir_all(checkpoint::dir_for(&crashed, 6)).unwrap();
    let resumed = reward(&make("crashed", true), &|_| {}).unwrap();
    assert_eq!(resumed.train_losses, straight.train_losses[3..].to_vec());
    let weights =
        |run: &Path| std::fs::read(checkpoint::dir_for(run, 6).join("model.safetensors")).unwrap();
    assert!(weights(&dir.path().join("straight")) == weights(&crashed));
    // Every metric record but the timings matches too (accuracy, margin and rewards included).
    let timeless = |run: &Path| -> Vec<serde_json::Value> {
        let mut r = records(run);
        for rec in &mut r {
            let m = rec.as_object_mut().unwrap();
            m.remove("tokens_per_s");
            m.remove("elapsed_s");
        }
        r
    };
    assert_eq!(timeless(&dir.path().join("straight")), timeless(&crashed));
}

#[test]
fn bad_setups_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (sft, data) = toy_setup(dir.path(), 6);
    let base = RunConfig {
        batch_size: 4,
        seq_len: 64,
        max_steps: 1,
        ..RewardStage::defaults()
    };
    let err = |run: RunConfig, data: &Path| {
        reward(&job(&sft, data, dir.path().join("x"), run), &|_| {})
            .unwrap_err()
            .to_string()
    };
    let e = err(
        RunConfig {
            batch_size: 5,
            ..base.clone()
        },
        &data,
    );
    assert!(e.contains("batch_size 5") && e.contains("even"), "{e}");
    let e = err(
        RunConfig {
            seq_len: 8,
            ..base.clone()
        },
        &data,
    );
    assert!(e.contains("none of the") && e.contains("T = 8"), "{e}");
    let e = err(
        RunConfig {
            seq_len: 65,
            ..base.clone()
        },
        &data,
    );
    assert!(e.contains("max_seq_len 64"), "{e}");
    let e = err(base.clone(), &dir.path().join("sft"));
    assert!(e.contains("prefs_train.bin"), "{e}");
}

#[test]
fn reward_command_runs_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let (sft, data) = toy_setup(dir.path(), 8);
    let out = dir.path().join("rm");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_topcoat"))
        .args(["reward", "--init"])
        .arg(&sft)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args(["--device", "cpu", "--max-steps", "2", "--batch-size", "4"])
        .args(["--seq-len", "64", "--val-every", "1"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{text}");
    for want in [
        "6 training pairs",
        "2 pairs per micro-batch",
        "with a new reward head",
        "| accuracy ",
        "val accuracy ",
        "trained to step 2",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    assert!(checkpoint::dir_for(&out, 2)
        .join("model.safetensors")
        .is_file());
}
