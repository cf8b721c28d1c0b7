//! DPO: with the policy equal to the reference the loss is ln 2 and the gradient matches central
//! differences of the loss (sigmoid and IPO); the sequence log-probability backward agrees with
//! the mean-loss backward; on a toy pair set the margin grows and the accuracy rises; stored
//! reference log-probabilities equal those computed on the fly and are reused on --resume; the
//! command names a bad --loss or --beta.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use topcoat::backend::cpu::CpuBackend;
use topcoat::commands::dpo::{DpoJob, DpoStage};
use topcoat::commands::prepare::EMBEDDED_CORPUS;
use topcoat::commands::stage::{Stage, TrainJob};
use topcoat::config::{ModelConfig, RunConfig};
use topcoat::data::{self, fill_pair_batch, PairSplit, PrefsPrepareOptions, Tokenizer};
use topcoat::model::Gpt;
use topcoat::rng::Rng;
use topcoat::runtime::Runtime;
use topcoat::stages::dpo::reference::RefLogps;
use topcoat::stages::dpo::{pair_terms, DpoLoss};
use topcoat::train::checkpoint;

const BETA: f64 = 0.1;

/// Fourth-order central differences of the f32 model's loss along a unit direction `u`,
/// `[8 (L(h) - L(-h)) - (L(2h) - L(-2h))] / 12h`, against the analytic `g.u`. Error budget:
/// the analytic side carries the f32 backward's rounding, ~1e-6 of `|g|` (~1.2 here; IPO ~240),
/// which is ~3e-4 of the smallest `|g.u|` tested (3.5e-3; IPO 0.44); the difference side
/// carries the f32 forward's (each sequence log-probability ~5e-7 absolute, so ~5e-8 of
/// sigmoid loss over a step of 1e-2) and an O(h^4) truncation (a plain central difference's
/// O(h^2) reached 1.3e-2 along the gradient, where the curvature is largest). Measured: at
/// most 5e-4; `FD_TOL` leaves a margin of 10.
const FD_STEP: f64 = 5e-3;
const FD_TOL: f64 = 5e-3;

fn tiny_cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: 50,
        padded_vocab_size: 64,
        n_layer: 2,
        n_head: 2,
        n_embd: 16,
        max_seq_len: 16,
        family: Default::default(),
        lora: None,
    }
}

/// `pairs` random pairs as one batch of `2 * pairs` rows (chosen rows, then rejected rows):
/// inputs, and targets masked (-1) over the first `prompt` positions of every row.
fn random_pairs(rng: &mut Rng, pairs: usize, t: usize, prompt: usize) -> (Vec<i32>, Vec<i32>) {
    let v = tiny_cfg().vocab_size as u64;
    let rows = 2 * pairs;
    let mut inputs = vec![0; rows * t];
    let mut targets = vec![0; rows * t];
    for p in 0..pairs {
        let prefix: Vec<i32> = (0..prompt).map(|_| rng.below(v) as i32).collect();
        for r in [p, p + pairs] {
            let seq: Vec<i32> = prefix
                .iter()
                .copied()
                .chain((prompt..=t).map(|_| rng.below(v) as i32))
                .collect();
            inputs[r * t..(r + 1) * t].copy_from_slice(&seq[..t]);
            for j in 0..t {
                targets[r * t + j] = if j + 1 > prompt { seq[j + 1] } else { -1 };
            }
        }
    }
    (inputs, targets)
}

/// Mean DPO loss of a batch, and the per-row coefficients `dL/dlogp` of the mean.
fn dpo_batch(loss: DpoLoss, policy: &[f64], reference: &[f64]) -> (f64, Vec<f32>) {
    let pairs = policy.len() / 2;
    let mut coef = vec![0.0f32; 2 * pairs];
    let mut total = 0.0;
    for p in 0..pairs {
        let t = pair_terms(
            loss,
            BETA,
            policy[p],
            policy[p + pairs],
            reference[p],
            reference[p + pairs],
        );
        total += t.loss;
        coef[p] = (t.d_chosen / pairs as f64) as f32;
        coef[p + pairs] = (t.d_rejected / pairs as f64) as f32;
    }
    (total / pairs as f64, coef)
}

#[test]
fn at_the_reference_the_loss_is_ln2_and_the_gradient_matches_finite_differences() {
    let be = CpuBackend;
    let cfg = tiny_cfg();
    let (pairs, t) = (3, 16);
    let mut rng = Rng::new(11);
    let (inputs, targets) = random_pairs(&mut rng, pairs, t, 5);
    let base = Gpt::init(&be, &cfg, 3).unwrap().param_values(&be).unwrap();
    let logps_of = |values: Vec<Vec<f32>>| {
        let mut m = Gpt::from_values(&be, &cfg, values).unwrap();
        m.sequence_logps(&be, &inputs, &targets, 2 * pairs, t)
            .unwrap()
    };
    let reference = logps_of(base.clone());
    assert!(reference.iter().all(|&l| l < 0.0));

    for loss in [DpoLoss::Sigmoid, DpoLoss::Ipo] {
        let mut policy = Gpt::from_values(&be, &cfg, base.clone()).unwrap();
        policy.zero_grad(&be).unwrap();
        let mut value = f64::NAN;
        let logps = policy
            .sequence_logps_step(&be, &inputs, &targets, 2 * pairs, t, |lp| {
                let (l, coef) = dpo_batch(loss, lp, &reference);
                value = l;
                coef
            })
            .unwrap();
        assert_eq!(logps, reference, "the policy is the reference");
        match loss {
            DpoLoss::Sigmoid => assert_eq!(value, std::f64::consts::LN_2),
            DpoLoss::Ipo => assert_eq!(value, (0.5 / BETA).powi(2)),
        }
        let grads = policy.grad_values(&be).unwrap();
        let gnorm = grads
            .iter()
            .flatten()
            .map(|&g| (g as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(gnorm > 0.0);

        // Directions: the gradient itself and two random unit vectors.
        let mut dirs: Vec<Vec<Vec<f64>>> = vec![grads
            .iter()
            .map(|g| g.iter().map(|&x| x as f64 / gnorm).collect())
            .collect()];
        for _ in 0..2 {
            let d: Vec<Vec<f64>> = grads
                .iter()
                .map(|g| g.iter().map(|_| rng.normal() as f64).collect())
                .collect();
            let n = d.iter().flatten().map(|x| x * x).sum::<f64>().sqrt();
            dirs.push(
                d.iter()
                    .map(|v| v.iter().map(|x| x / n).collect())
                    .collect(),
            );
        }
        for (k, dir) in dirs.iter().enumerate() {
            let analytic: f64 = grads
                .iter()
                .flatten()
                .zip(dir.iter().flatten())
                .map(|(&g, &u)| g as f64 * u)
                .sum();
            let loss_at = |h: f64| {
                let moved: Vec<Vec<f32>> = base
                    .iter()
                    .zip(dir)
                    .map(|(p, u)| {
                        p.iter()
                            .zip(u)
                            .map(|(&x, &d)| (x as f64 + h * d) as f32)
                            .collect()
                    })
                    .collect();
                dpo_batch(loss, &logps_of(moved), &reference).0
            };
            let (h, h2) = (FD_STEP, 2.0 * FD_STEP);
            let fd = (8.0 * (loss_at(h) - loss_at(-h)) - (loss_at(h2) - loss_at(-h2))) / (12.0 * h);
            let err = (fd - analytic).abs() / analytic.abs().max(1e-3 * gnorm);
            println!(
                "{loss:?} direction {k}: analytic {analytic:.6e}, fd {fd:.6e}, rel err {err:.1e}"
            );
            assert!(
                err <= FD_TOL,
                "{loss:?} direction {k}: analytic {analytic} vs fd {fd}"
            );
        }
    }
}

/// With coefficients `-1 / tokens` on every row, `sum_r c_r logp_r` is the mean token loss, so
/// the sequence backward must give the ordinary mean-loss gradient.
#[test]
fn sequence_backward_with_uniform_coefficients_is_the_mean_loss_gradient() {
    let be = CpuBackend;
    let cfg = tiny_cfg();
    let (rows, t) = (4, 16);
    let mut rng = Rng::new(5);
    let (inputs, targets) = random_pairs(&mut rng, rows / 2, t, 3);
    let tokens = targets.iter().filter(|&&x| x >= 0).count();
    let mut model = Gpt::init(&be, &cfg, 9).unwrap();
    model.zero_grad(&be).unwrap();
    let loss = model
        .forward_backward(&be, &inputs, &targets, rows, t, 1.0)
        .unwrap();
    let want = model.grad_values(&be).unwrap();
    model.zero_grad(&be).unwrap();
    let logps = model
        .sequence_logps_step(&be, &inputs, &targets, rows, t, |_| {
            vec![-1.0 / tokens as f32; rows]
        })
        .unwrap();
    let got = model.grad_values(&be).unwrap();
    let mean = -logps.iter().sum::<f64>() / tokens as f64;
    assert!(
        (mean - loss.mean as f64).abs() < 1e-6,
        "{mean} vs {}",
        loss.mean
    );
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (a, b) in got.iter().flatten().zip(want.iter().flatten()) {
        num += (*a as f64 - *b as f64).powi(2);
        den += (*b as f64).powi(2);
    }
    let rel = (num / den).sqrt();
    assert!(
        rel < 1e-5,
        "sequence vs mean-loss gradient: rel err {rel:e}"
    );
}

// ---- the stage, end to end -----------------------------------------------------------------

/// A tokenizer, a freshly initialised tiny model saved as the "SFT" checkpoint, and a toy pair
/// set with one consistent preference ("Yes, <answer>." over "no") prepared for DPO.
struct Toy {
    _dir: tempfile::TempDir,
    root: PathBuf,
    init: PathBuf,
    data: PathBuf,
}

fn toy() -> Toy {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
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
    let model = Gpt::init(&be, &cfg, 21).unwrap();
    let init = root.join("sft");
    checkpoint::save(&be, &init, &model, &tok, None).unwrap();
    let things = [
        ("the sky", "blue"),
        ("grass", "green"),
        ("snow", "white"),
        ("coal", "black"),
        ("a lemon", "yellow"),
        ("a tomato", "red"),
        ("the sea", "blue"),
        ("an orange", "orange"),
        ("milk", "white"),
        ("a leaf", "green"),
    ];
    let lines: Vec<String> = things
        .iter()
        .map(|(x, c)| {
            serde_json::json!({
                "prompt": format!("What color is {x}?"),
                "chosen": format!("Yes, {c}."),
                "rejected": "no",
            })
            .to_string()
        })
        .collect();
    let src = root.join("prefs.jsonl");
    std::fs::write(&src, lines.join("\n")).unwrap();
    let data = root.join("prefs");
    let opts = PrefsPrepareOptions {
        max_len: 32,
        val_fraction: 0.2,
        ..PrefsPrepareOptions::new(&data)
    };
    let s = data::prepare_prefs(&src, &tok, &opts).unwrap();
    assert_eq!((s.train_pairs, s.val_pairs), (8, 2));
    tok.save(data.join("tokenizer.json")).unwrap();
    Toy {
        _dir: dir,
        root,
        init,
        data,
    }
}

fn job(toy: &Toy, out: &str, steps: usize, resume: bool) -> DpoJob {
    let stage = DpoStage {
        init: toy.init.clone(),
        data: toy.data.clone(),
        beta: BETA,
        loss: DpoLoss::Sigmoid,
    };
    DpoJob {
        run: RunConfig {
            batch_size: 4,
            seq_len: 32,
            max_steps: steps,
            learning_rate: 3e-3,
            warmup_steps: 1,
            val_every: steps,
            checkpoint_every: 3,
            ..DpoStage::defaults()
        },
        resume,
        quiet: true,
        ..TrainJob::new(stage, toy.root.join(out))
    }
}

fn dpo(
    job: &DpoJob,
    progress: &dyn Fn(&str),
) -> Result<topcoat::train::TrainSummary, topcoat::commands::CommandError> {
    topcoat::commands::stage::train(&Runtime::cpu(), job, progress)
}

fn records(run_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn on_a_toy_pair_set_the_margin_grows_and_the_accuracy_rises() {
    let toy = toy();
    let j = job(&toy, "dpo", 20, false);
    let summary = dpo(&j, &|_| {}).unwrap();
    assert_eq!(summary.final_step, 20);
    let recs = records(&j.out);
    let train: Vec<&serde_json::Value> = recs.iter().filter(|r| r.get("loss").is_some()).collect();
    let val: Vec<&serde_json::Value> = recs
        .iter()
        .filter(|r| r.get("val_loss").is_some())
        .collect();
    let f =
        |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or_else(|| panic!("no {k} in {r}"));
    // Step 1 runs on the initial policy, which is the reference: loss ln 2, no margin.
    assert!(
        (f(train[0], "loss") - std::f64::consts::LN_2).abs() < 1e-6,
        "{}",
        train[0]
    );
    assert_eq!(f(train[0], "rewards/margins"), 0.0);
    assert_eq!(f(train[0], "rewards/accuracies"), 0.0);
    let last = train.last().unwrap();
    let early: f64 = train[..3]
        .iter()
        .map(|r| f(r, "rewards/margins"))
        .sum::<f64>()
        / 3.0;
    let late: f64 = train[17..]
        .iter()
        .map(|r| f(r, "rewards/margins"))
        .sum::<f64>()
        / 3.0;
    println!(
        "train margin {early:.3} -> {late:.3}, accuracy {} -> {}, loss {} -> {}",
        f(train[0], "rewards/accuracies"),
        f(last, "rewards/accuracies"),
        f(train[0], "loss"),
        f(last, "loss")
    );
    assert!(late > early + 0.5, "train margin {early} -> {late}");
    assert!(f(last, "rewards/accuracies") >= 0.75, "{last}");
    assert!(f(last, "loss") < 0.5 * std::f64::consts::LN_2, "{last}");
    assert!(
        f(last, "logps/chosen") > f(train[0], "logps/chosen"),
        "{last}"
    );
    for k in ["rewards/chosen", "rewards/rejected", "logps/rejected"] {
        assert!(f(last, k).is_finite(), "{k}");
    }
    // Validation (held-out prompts, same preference): before training ln 2, then better.
    let (v0, v1) = (val[0], val.last().unwrap());
    assert_eq!((f(v0, "step"), f(v1, "step")), (0.0, 20.0));
    assert!(
        (f(v0, "val_loss") - std::f64::consts::LN_2).abs() < 1e-6,
        "{v0}"
    );
    assert_eq!(f(v0, "val_rewards/accuracies"), 0.0);
    println!("validation: {v0}\n  -> {v1}");
    assert!(f(v1, "val_rewards/margins") > 0.5, "{v1}");
    assert_eq!(f(v1, "val_rewards/accuracies"), 1.0, "{v1}");
    assert!(f(v1, "val_loss") < f(v0, "val_loss"));
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(summary.last_checkpoint.unwrap().join("train_state.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(meta["stage"], "dpo");
}

#[test]
fn stored_reference_logps_equal_on_the_fly_ones_and_are_reused_on_resume() {
    let toy = toy();
    let notes = RefCell::new(Vec::<String>::new());
    let note = |m: &str| notes.borrow_mut().push(m.to_string());
    let straight = dpo(&job(&toy, "straight", 6, false), &note).unwrap();
    let stored = RefLogps::load(&toy.root.join("straight")).unwrap().unwrap();
    assert_eq!(stored.t, 32);
    assert_eq!((stored.train.len(), stored.val.len()), (8, 2));

    // On the fly: the init checkpoint, every split's pairs in a different batch composition
    // (reversed, in batches of 4 pairs as training runs them).
    let be = CpuBackend;
    let cfg = checkpoint::load_config(&toy.init).unwrap();
    let mut model = checkpoint::load_model(&be, &toy.init, Some(&cfg)).unwrap();
    let eot = checkpoint::load_tokenizer(&toy.init).unwrap().eot();
    let mut worst = 0.0f64;
    for (name, want) in [("prefs_train", &stored.train), ("prefs_val", &stored.val)] {
        let split = PairSplit::open(&toy.data, name, cfg.vocab_size).unwrap();
        let order: Vec<usize> = (0..split.len()).rev().collect();
        for chunk in order.chunks(4) {
            let batch = fill_pair_batch(&split, chunk, 4, 32, eot);
            let lp = model
                .sequence_logps(&be, &batch.inputs, &batch.targets, 8, 32)
                .unwrap();
            for (k, &p) in chunk.iter().enumerate() {
                let got = [lp[2 * k], lp[2 * k + 1]];
                for side in 0..2 {
                    let (g, w) = (got[side], want[p][side]);
                    worst = worst.max((g - w).abs() / w.abs());
                    // f32 per-token losses summed in f64: a different batch composition may
                    // only change the last bits of a few f32 terms.
                    assert!(
                        (g - w).abs() <= 1e-5 * w.abs(),
                        "{name} pair {p} side {side}: stored {w}, on the fly {g}"
                    );
                }
            }
        }
    }

    println!("stored vs on-the-fly reference log-probabilities: worst rel diff {worst:e}");

    // Resume after losing the last checkpoint: the stored values are reused, not recomputed,
    // and the run continues exactly.
    let crashed = toy.root.join("crashed");
    dpo(&job(&toy, "crashed", 6, false), &|_| {}).unwrap();
    std::fs::remove_dir_all(checkpoint::dir_for(&crashed, 6)).unwrap();
    let before = std::fs::read(crashed.join("ref_logps.bin")).unwrap();
    notes.borrow_mut().clear();
    let resumed = dpo(&job(&toy, "crashed", 6, true), &note).unwrap();
    assert!(
        notes.borrow().iter().any(|n| n.contains("reusing")),
        "{:?}",
        notes.borrow()
    );
    assert!(!notes.borrow().iter().any(|n| n.contains("reference pass")));
    assert_eq!(
        std::fs::read(crashed.join("ref_logps.bin")).unwrap(),
        before
    );
    assert_eq!(resumed.train_losses, straight.train_losses[3..].to_vec());

    // A damaged file is refused by name on resume.
    std::fs::write(crashed.join("ref_logps.bin"), &before[..40]).unwrap();
    let e = dpo(&job(&toy, "crashed", 6, true), &|_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("ref_logps.bin") && e.contains("header"), "{e}");
}

#[test]
fn the_command_refuses_a_bad_loss_and_a_bad_beta_by_name() {
    let toy = toy();
    let dpo = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_topcoat"))
            .args([
                "dpo",
                "--device",
                "cpu",
                "--max-steps",
                "1",
                "--seq-len",
                "32",
            ])
            .arg("--init")
            .arg(&toy.init)
            .arg("--data")
            .arg(&toy.data)
            .arg("--out")
            .arg(toy.root.join("cli"))
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = dpo(&["--loss", "hinge"]);
    assert!(
        e.contains("--loss") && e.contains("expected sigmoid or ipo"),
        "{e}"
    );
    let e = dpo(&["--beta", "0"]);
    assert!(e.contains("--beta must be a positive number, got 0"), "{e}");
    assert!(!toy.root.join("cli").join("ref_logps.bin").exists());
}
