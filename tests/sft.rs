//! SFT: the assistant-only loss mask reaches the gradient, `prepare sft` reports bad input by
//! file and line and counts what it cuts, and a short SFT run from a tiny pretrained checkpoint
//! lowers the training loss.

use std::path::Path;
use topcoat::backend::cpu::CpuBackend;
use topcoat::commands::inputs::TokenizerArg;
use topcoat::commands::prepare::{prepare_sft, EMBEDDED_CORPUS};
use topcoat::commands::pretrain::PretrainStage;
use topcoat::commands::sft::{SftJob, SftStage};
use topcoat::commands::stage::{train, Stage, TrainJob};
use topcoat::config::{ModelConfig, RunConfig};
use topcoat::data::chat::{render, Message, Role};
use topcoat::data::{self, PrepareOptions, SftPrepareOptions, SftSplit, Tokenizer};
use topcoat::model::Gpt;
use topcoat::runtime::Runtime;
use topcoat::stages::sft::fill_row;
use topcoat::train::checkpoint;

fn small_tokenizer() -> Tokenizer {
    let text = String::from_utf8_lossy(&EMBEDDED_CORPUS[..20_000]).into_owned();
    Tokenizer::train_bpe([text.as_str()].into_iter(), 300, |_, _| {}).unwrap()
}

fn row(ids: &[u32], mask: &[bool], t: usize, pad: u32) -> (Vec<i32>, Vec<i32>) {
    let (mut i, mut o) = (vec![0; t], vec![0; t]);
    fill_row(ids, mask, t, pad, &mut i, &mut o);
    (i, o)
}

#[test]
fn only_assistant_targets_reach_loss_and_gradient() {
    let tok = small_tokenizer();
    let r = render(
        &tok,
        &[
            Message::new(Role::System, "You answer briefly."),
            Message::new(Role::User, "What is the capital of France?"),
            Message::new(Role::Assistant, "Paris."),
        ],
    )
    .unwrap();
    let t = 64;
    assert!(r.ids.len() <= t + 1, "{} tokens", r.ids.len());
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
    let be = CpuBackend;
    let mut model = Gpt::init(&be, &cfg, 5).unwrap();
    let mut run = |inputs: &[i32], targets: &[i32]| {
        model.zero_grad(&be).unwrap();
        let loss = model
            .forward_backward(&be, inputs, targets, 1, t, 1.0)
            .unwrap();
        (loss, model.grad_values(&be).unwrap())
    };
    let pad = tok.eot();
    let (inputs, targets) = row(&r.ids, &r.loss_mask, t, pad);
    let (base_loss, base_grads) = run(&inputs, &targets);
    assert_eq!(
        base_loss.tokens,
        r.loss_mask[1..].iter().filter(|&&m| m).count()
    );

    // A user content token, as a target only (the inputs stay the same).
    let user_tag = tok.special("<|user|>").unwrap();
    let user_pos = r.ids.iter().position(|&i| i == user_tag).unwrap() + 2;
    assert!(!r.loss_mask[user_pos]);
    let mut ids = r.ids.clone();
    ids[user_pos] = (ids[user_pos] + 1) % 256;
    let (_, user_targets) = row(&ids, &r.loss_mask, t, pad);
    let (loss, grads) = run(&inputs, &user_targets);
    assert_eq!(loss.sum.to_bits(), base_loss.sum.to_bits());
    assert_eq!(loss.mean.to_bits(), base_loss.mean.to_bits());
    for (a, b) in grads.iter().zip(&base_grads) {
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    // An assistant content token as a target: the loss moves.
    let asst_pos = r.loss_mask.iter().position(|&m| m).unwrap();
    let mut ids = r.ids.clone();
    ids[asst_pos] = (ids[asst_pos] + 1) % 256;
    let (_, asst_targets) = row(&ids, &r.loss_mask, t, pad);
    let (loss, grads) = run(&inputs, &asst_targets);
    assert_ne!(loss.sum, base_loss.sum);
    assert!(grads
        .iter()
        .zip(&base_grads)
        .any(|(a, b)| a.iter().zip(b).any(|(x, y)| x != y)));
}

fn conv(user: &str, assistant: &str) -> String {
    serde_json::json!({"messages": [
        {"role": "user", "content": user},
        {"role": "assistant", "content": assistant},
    ]})
    .to_string()
}

#[test]
fn prepare_sft_names_file_and_line_of_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let tok = small_tokenizer();
    let cases = [
        (
            r#"{"messages": [{"role": "robot", "content": "x"}]}"#,
            "unknown role",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}"#,
            "empty assistant content",
        ),
        (
            r#"{"messages": [{"content": "x"}]}"#,
            "missing field \"role\"",
        ),
    ];
    for (bad, want) in cases {
        let path = dir.path().join("chats.jsonl");
        std::fs::write(&path, format!("{}\n\n{bad}\n", conv("hi", "hello"))).unwrap();
        let e = data::prepare_sft(&path, &tok, &SftPrepareOptions::new(dir.path().join("o")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("chats.jsonl: line 3: "), "{e}");
        assert!(e.contains(want), "{e}");
    }
}

#[test]
fn prepare_sft_cuts_long_answers_and_drops_long_prompts() {
    let dir = tempfile::tempdir().unwrap();
    let tok = small_tokenizer();
    let long = "the quick brown fox jumps over the lazy dog ".repeat(20);
    let lines = [
        conv("hi", "hello"),
        conv(&long, "ok"),   // the prompt alone fills max_len: dropped
        conv("tell", &long), // the answer runs past max_len: cut
        conv("yes?", "yes."),
    ];
    let path = dir.path().join("c.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    let out = dir.path().join("out");
    let opts = SftPrepareOptions {
        max_len: 40,
        val_fraction: 0.3,
        ..SftPrepareOptions::new(&out)
    };
    let s = data::prepare_sft(&path, &tok, &opts).unwrap();
    assert_eq!((s.conversations, s.dropped, s.truncated), (4, 1, 1));
    assert_eq!((s.train_examples, s.val_examples), (2, 1));
    let train = SftSplit::open(&out, "sft_train", tok.vocab_size()).unwrap();
    let val = SftSplit::open(&out, "sft_val", tok.vocab_size()).unwrap();
    assert_eq!(train.len() + val.len(), 3);
    let mut seen_cut = false;
    for split in [&train, &val] {
        for i in 0..split.len() {
            let (ids, mask) = split.example(i);
            assert!(ids.len() <= 40);
            assert_eq!(ids[0], tok.special("<|user|>").unwrap());
            assert!(mask.iter().any(|&m| m));
            seen_cut |= ids.len() == 40;
        }
    }
    assert!(seen_cut);
}

fn pretrain_tiny(dir: &Path) -> std::path::PathBuf {
    let text = String::from_utf8_lossy(&EMBEDDED_CORPUS[..60_000]).into_owned();
    let cut = text.rfind('\n').unwrap();
    let src = dir.join("src.jsonl");
    std::fs::write(&src, &text[..cut + 1]).unwrap();
    let docs = data::prepare::read_documents(&[&src]).unwrap();
    let tok = Tokenizer::train_bpe(docs.iter().map(String::as_str), 320, |_, _| {}).unwrap();
    data::prepare(
        &[&src],
        &tok,
        &PrepareOptions::new(dir.join("data")),
        &|_| {},
    )
    .unwrap();
    tok.save(dir.join("data/tokenizer.json")).unwrap();
    let stage = PretrainStage {
        data: dir.join("data"),
    };
    let job = TrainJob {
        run: RunConfig {
            batch_size: 4,
            seq_len: 32,
            max_steps: 10,
            warmup_steps: 2,
            val_every: 0,
            ..Default::default()
        },
        quiet: true,
        ..TrainJob::new(stage, dir.join("pre"))
    };
    train(&Runtime::cpu(), &job, &|_| {}).unwrap();
    dir.join("pre")
}

#[test]
fn sft_from_a_tiny_pretrained_checkpoint_lowers_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let pre = pretrain_tiny(dir.path());
    let pairs = [
        ("What color is the sky?", "Blue."),
        ("Say hello.", "Hello!"),
        ("What is two plus two?", "Four."),
        ("Name a fruit.", "An apple."),
        ("Is water wet?", "Yes."),
        ("What do cats say?", "Meow."),
    ];
    let lines: Vec<String> = pairs.iter().map(|(u, a)| conv(u, a)).collect();
    let src = dir.path().join("chats.jsonl");
    std::fs::write(&src, lines.join("\n")).unwrap();
    let sft_data = dir.path().join("sft_data");
    let opts = SftPrepareOptions {
        max_len: 33,
        val_fraction: 0.2,
        ..SftPrepareOptions::new(&sft_data)
    };
    let s = prepare_sft(&src, &TokenizerArg::Path(pre.clone()), &opts).unwrap();
    assert_eq!(s.train_examples + s.val_examples, 6);
    let stage = SftStage {
        init: pre.clone(),
        data: sft_data.clone(),
    };
    let job = SftJob {
        run: RunConfig {
            batch_size: 4,
            seq_len: 32,
            max_steps: 30,
            warmup_steps: 2,
            val_every: 0,
            checkpoint_every: 0,
            ..SftStage::defaults()
        },
        quiet: true,
        ..TrainJob::new(stage, dir.path().join("sft"))
    };
    let summary = train(&Runtime::cpu(), &job, &|_| {}).unwrap();
    let first = summary.train_losses[0].1;
    let last = summary.train_losses.last().unwrap().1;
    assert!(
        last < 0.5 * first,
        "SFT loss only fell from {first} to {last}"
    );
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(summary.last_checkpoint.unwrap().join("train_state.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(meta["stage"], "sft");

    // Data prepared with another tokenizer is refused, naming both sides.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    small_tokenizer()
        .save(other.join("tokenizer.json"))
        .unwrap();
    let mismatched = dir.path().join("mismatched");
    prepare_sft(
        &src,
        &TokenizerArg::Path(other.join("tokenizer.json")),
        &SftPrepareOptions::new(&mismatched),
    )
    .unwrap();
    let e = train(
        &Runtime::cpu(),
        &SftJob {
            run: job.run.clone(),
            out: dir.path().join("sft2"),
            stage: SftStage {
                init: pre.clone(),
                data: mismatched,
            },
            ..job
        },
        &|_| {},
    )
    .unwrap_err()
    .to_string();
    let want = format!("{} ids", small_tokenizer().vocab_size());
    assert!(e.contains("tokenizer mismatch") && e.contains(&want), "{e}");

    // The shared set-up refuses a run for more than one rank before anything is written.
    let out = dir.path().join("sft3");
    let e = train(
        &Runtime::cpu(),
        &SftJob {
            run: RunConfig {
                world_size: 2,
                ..job.run.clone()
            },
            out: out.clone(),
            stage: SftStage {
                init: pre.clone(),
                data: sft_data.clone(),
            },
            ..job
        },
        &|_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("sft") && e.contains("world_size = 2"), "{e}");
    assert!(!out.exists(), "a refused run writes nothing");
}

#[test]
fn resumed_sft_run_matches_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let pre = pretrain_tiny(dir.path());
    let lines: Vec<String> = (0..7)
        .map(|i| conv(&format!("Count to {i}."), &format!("{i} and done.")))
        .collect();
    let src = dir.path().join("chats.jsonl");
    std::fs::write(&src, lines.join("\n")).unwrap();
    let data_dir = dir.path().join("sft_data");
    let tokenizer = TokenizerArg::Path(pre.clone());
    prepare_sft(&src, &tokenizer, &SftPrepareOptions::new(&data_dir)).unwrap();
    let job = |out: &str, resume: bool| SftJob {
        run: RunConfig {
            batch_size: 4, // 6 training examples: batches straddle epochs
            seq_len: 32,
            max_steps: 6,
            warmup_steps: 1,
            val_every: 3,
            checkpoint_every: 3,
            ..SftStage::defaults()
        },
        resume,
        quiet: true,
        ..TrainJob::new(
            SftStage {
                init: pre.clone(),
                data: data_dir.clone(),
            },
            dir.path().join(out),
        )
    };
    let straight = train(&Runtime::cpu(), &job("straight", false), &|_| {}).unwrap();
    train(&Runtime::cpu(), &job("crashed", false), &|_| {}).unwrap();
    let crashed = dir.path().join("crashed");
    std::fs::remove_dir_all(checkpoint::dir_for(&crashed, 6)).unwrap();
    let resumed = train(&Runtime::cpu(), &job("crashed", true), &|_| {}).unwrap();
    assert_eq!(resumed.train_losses, straight.train_losses[3..].to_vec());
    let weights =
        |run: &Path| std::fs::read(checkpoint::dir_for(run, 6).join("model.safetensors")).unwrap();
    assert!(weights(&dir.path().join("straight")) == weights(&crashed));
}
