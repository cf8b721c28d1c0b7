//! `topcoat eval`: normalised-match scoring cases and the prompts file's errors; `eval loss`
//! equals the trainer's validation loss for the same checkpoint; a reward model trained on a
//! separable toy set scores 100% in `eval pairs` (also through the binary); a DPO policy equal
//! to its reference has margin exactly 0 and accuracy 0 (ties are wrong), and a different
//! policy's implicit rewards match a pair-by-pair computation; `eval generate` replies equal
//! greedy generation with the chat template and are scored exact / normalised as stated.

use std::path::{Path, PathBuf};
use std::process::Command;
use topcoat::backend::cpu::CpuBackend;
use topcoat::commands::eval::{
    eval_generate, eval_loss, eval_pairs, EvalGenerateJob, EvalLossJob, EvalPairsJob,
};
use topcoat::commands::inputs::TokenizerArg;
use topcoat::commands::prepare::{prepare_prefs, EMBEDDED_CORPUS};
use topcoat::commands::reward::{RewardJob, RewardStage};
use topcoat::commands::stage::{self, Stage, TrainJob};
use topcoat::config::{ModelConfig, RunConfig};
use topcoat::data::chat::{render_prompt, Message, Role};
use topcoat::data::{self, fill_pair_batch, PairSplit, PrefsPrepareOptions, Tokenizer};
use topcoat::generate::{self, SampleOptions};
use topcoat::model::Gpt;
use topcoat::runtime::Runtime;
use topcoat::scoring::{exact_match, normalize, normalized_match, read_prompts};
use topcoat::stages::pretrain::Pretrain;
use topcoat::train::{self, checkpoint, TrainOptions};

/// `eval loss` against the trainer's validation: the same sums on the same CPU backend, so
/// only f32 rounding of the final division could differ.
const LOSS_TOL: f64 = 1e-6;
/// Implicit rewards scored in batches against a pair-at-a-time computation (different batch
/// shapes may round the f32 forward differently).
const REWARD_TOL: f64 = 1e-4;

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

/// The first `bytes` of the embedded corpus, cut at a line end (whole JSONL documents).
fn corpus_head(bytes: usize) -> String {
    let text = String::from_utf8_lossy(EMBEDDED_CORPUS);
    let mut out = String::new();
    for line in text.lines() {
        if out.len() > bytes {
            break;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn small_tokenizer() -> Tokenizer {
    let text = corpus_head(20_000);
    Tokenizer::train_bpe([text.as_str()].into_iter(), 300, |_, _| {}).unwrap()
}

#[test]
fn normalised_match_rules() {
    assert_eq!(normalize("  Hello,   World!  "), "hello world");
    assert_eq!(normalize("\"Paris.\"\n"), "paris");
    assert_eq!(
        normalize("It\u{2019}s \u{201C}fine\u{201D} \u{2014} ok\u{2026}"),
        "its fine ok"
    );
    assert_eq!(normalize("a\tb\n\nc"), "a b c");
    assert_eq!(normalize("?!..."), "");
    assert!(normalized_match("The answer is 42.", "the answer is 42"));
    assert!(normalized_match("  ÉCOLE ", "école"));
    assert!(!normalized_match("42", "43"));
    assert!(
        !normalized_match("ab", "a b"),
        "spaces are collapsed, never removed"
    );
    assert!(exact_match("Paris", "Paris"));
    assert!(!exact_match("Paris.", "Paris"));
    assert!(
        !exact_match(" Paris", "Paris"),
        "exact match changes nothing"
    );
}

#[test]
fn prompts_file_forms_and_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.jsonl");
    std::fs::write(
        &good,
        concat!(
            r#"{"prompt": "What is 2+2?", "reference": "4"}"#,
            "\n\n",
            r#"{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "reference": "Hello"}"#,
            "\n",
            r#"{"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]}"#,
            "\n"
        ),
    )
    .unwrap();
    let p = read_prompts(&good).unwrap();
    assert_eq!(p.len(), 3);
    assert_eq!(
        p.iter().map(|x| x.line).collect::<Vec<_>>(),
        [1, 3, 4],
        "blank lines are skipped but still counted"
    );
    assert_eq!(p[0].messages, [Message::new(Role::User, "What is 2+2?")]);
    assert_eq!(p[1].messages.len(), 2);
    assert_eq!(p[1].messages[0].role, Role::System);
    assert_eq!(
        p[2].messages,
        [Message::new(Role::User, "Capital of France?")]
    );
    assert_eq!(p[2].reference, "Paris");

    let cases = [
        ("{not json", "invalid JSON"),
        (r#"{"prompt": "x"}"#, "missing field \"reference\""),
        (
            r#"{"prompt": "x", "reference": 3}"#,
            "\"reference\" is not a string",
        ),
        (r#"{"reference": "x"}"#, "missing field \"prompt\""),
        (r#"{"prompt": 5, "reference": "x"}"#, "field \"prompt\""),
        (
            r#"{"messages": [{"role": "user", "content": "x"}]}"#,
            "the last message must be the assistant's",
        ),
        (
            r#"{"messages": [{"role": "assistant", "content": "x"}]}"#,
            "no prompt message",
        ),
        (
            r#"{"prompt": [{"role": "robot", "content": "x"}], "reference": "y"}"#,
            "message 0",
        ),
    ];
    for (i, (bad, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.jsonl"));
        std::fs::write(
            &path,
            format!("{{\"prompt\": \"ok\", \"reference\": \"ok\"}}\n{bad}\n"),
        )
        .unwrap();
        let e = read_prompts(&path).unwrap_err().to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("line 2") && e.contains(want),
            "{bad}: {e}"
        );
    }
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "\n\n").unwrap();
    assert!(read_prompts(&empty)
        .unwrap_err()
        .to_string()
        .contains("no prompts"));
}

#[test]
fn eval_loss_equals_the_trainers_validation_loss() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("corpus.jsonl");
    std::fs::write(&src, corpus_head(40_000)).unwrap();
    let tok = small_tokenizer();
    let data_dir = dir.path().join("data");
    let opts = data::PrepareOptions {
        val_fraction: 0.2,
        ..data::PrepareOptions::new(&data_dir)
    };
    data::prepare(&[&src], &tok, &opts, &|_| {}).unwrap();
    tok.save(data_dir.join("tokenizer.json")).unwrap();

    let be = CpuBackend;
    let (b, t) = (4, 32);
    let cfg = tiny_cfg(tok.vocab_size(), 64);
    let mut model = Gpt::init(&be, &cfg, 5).unwrap();
    let run_cfg = RunConfig {
        batch_size: b,
        seq_len: t,
        max_steps: 3,
        warmup_steps: 1,
        val_every: 3,
        val_batches: 100_000,
        checkpoint_every: 0,
        ..RunConfig::default()
    };
    let mut objective = Pretrain::open(&data_dir, b, t, 7, 0, 1, cfg.vocab_size, 100_000).unwrap();
    let out = dir.path().join("run");
    let topts = TrainOptions {
        run: run_cfg,
        out_dir: out.clone(),
        resume: false,
        keep_checkpoints: 0,
        quiet: true,
    };
    let summary = train::train(
        &be,
        &train::solo(),
        &mut model,
        &mut objective,
        &tok,
        &topts,
    )
    .unwrap();
    let (step, trainer_val) = *summary.val_losses.last().unwrap();
    assert_eq!(step, 3);

    let job = EvalLossJob {
        checkpoint: out.clone(), // the run directory: its newest checkpoint
        data: data_dir.clone(),
        split: "val".into(),
        batch_size: b,
        seq_len: Some(t),
        max_batches: None,
        adapter: None,
    };
    let r = eval_loss(&Runtime::cpu(), &job, &|_| {}).unwrap();
    println!("{}trainer: {trainer_val}", r.table());
    assert!(r.batches > 1, "a vacuous pass: {} batch", r.batches);
    assert_eq!(r.tokens, r.batches * b * t);
    let rel = (r.loss as f64 - trainer_val as f64).abs() / trainer_val as f64;
    assert!(rel <= LOSS_TOL, "eval {} vs trainer {trainer_val}", r.loss);
    // The step-0 validation (fresh weights) differs: the checkpoint's weights are used.
    assert!((summary.val_losses[0].1 - r.loss).abs() > 1e-4);

    // One batch of the train split is another number; a missing split names the directory.
    let one = eval_loss(
        &Runtime::cpu(),
        &EvalLossJob {
            split: "train".into(),
            max_batches: Some(1),
            ..job.clone()
        },
        &|_| {},
    )
    .unwrap();
    assert_eq!((one.batches, one.tokens), (1, b * t));
    let e = eval_loss(
        &Runtime::cpu(),
        &EvalLossJob {
            split: "test".into(),
            ..job.clone()
        },
        &|_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("test_") && e.contains(&data_dir.display().to_string()),
        "{e}"
    );
}

/// A tiny fresh "SFT checkpoint" and a prepared toy preference set in which every chosen reply
/// praises and every rejected one refuses.
fn toy_prefs(dir: &Path, pairs: usize) -> (PathBuf, PathBuf) {
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
    prepare_prefs(&src, &TokenizerArg::Path(sft.clone()), &opts).unwrap();
    (sft, data)
}

fn pairs_job(ckpt: &Path, reference: Option<&Path>, data: &Path) -> EvalPairsJob {
    EvalPairsJob {
        checkpoint: ckpt.to_path_buf(),
        reference: reference.map(Path::to_path_buf),
        beta: 0.1,
        data: data.to_path_buf(),
        split: "val".into(),
        batch_size: 4,
        seq_len: None,
        adapter: None,
    }
}

#[test]
fn a_trained_reward_model_scores_every_held_out_pair() {
    let dir = tempfile::tempdir().unwrap();
    let (sft, data) = toy_prefs(dir.path(), 24);
    let out = dir.path().join("rm");
    let job = RewardJob {
        run: RunConfig {
            batch_size: 8,
            seq_len: 64,
            max_steps: 30,
            warmup_steps: 3,
            learning_rate: 1e-3,
            val_every: 30,
            checkpoint_every: 0,
            ..RewardStage::defaults()
        },
        quiet: true,
        ..TrainJob::new(
            RewardStage {
                init: sft.clone(),
                data: data.clone(),
            },
            out.clone(),
        )
    };
    stage::train(&Runtime::cpu(), &job, &|_| {}).unwrap();
    let last: serde_json::Value = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .rfind(|r| r.get("val_loss").is_some())
        .unwrap();

    let r = eval_pairs(&Runtime::cpu(), &pairs_job(&out, None, &data), &|_| {}).unwrap();
    print!("{}", r.table());
    let n_val = PairSplit::open(&data, "prefs_val", 300).unwrap().len();
    assert_eq!((r.mode, r.tally.pairs, r.skipped), ("reward", n_val, 0));
    assert_eq!(r.tally.accuracy(), 1.0);
    assert!(r.tally.margin() > 0.0);
    // The same pairs as the trainer's validation, in another batch shape.
    let margin = last["val_margin"].as_f64().unwrap();
    assert!((r.tally.margin() - margin).abs() <= REWARD_TOL * margin.abs().max(1.0));
    assert!((r.tally.loss() - last["val_loss"].as_f64().unwrap()).abs() <= REWARD_TOL);

    // Through the binary: the table, on the CPU.
    let o = Command::new(env!("CARGO_BIN_EXE_topcoat"))
        .args(["eval", "pairs", "--device", "cpu", "--checkpoint"])
        .arg(&out)
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        stdout.contains(&format!("| reward | val | {n_val} | 0 | 1.0000 |")),
        "{stdout}"
    );

    // A plain LM is not a reward model: say how to score a DPO policy instead.
    let e = eval_pairs(&Runtime::cpu(), &pairs_job(&sft, None, &data), &|_| {})
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no reward head") && e.contains("--reference"),
        "{e}"
    );
}

#[test]
fn dpo_implicit_rewards_tie_at_the_reference_and_match_pairwise_logps() {
    let dir = tempfile::tempdir().unwrap();
    let (sft, data) = toy_prefs(dir.path(), 16);
    let r = eval_pairs(
        &Runtime::cpu(),
        &pairs_job(&sft, Some(&sft), &data),
        &|_| {},
    )
    .unwrap();
    print!("{}", r.table());
    assert_eq!(r.mode, "dpo");
    assert!(r.tally.pairs > 0);
    assert_eq!(
        r.tally.margin(),
        0.0,
        "policy == reference: every margin is 0"
    );
    assert_eq!(r.tally.accuracy(), 0.0, "ties count as wrong");
    assert_eq!((r.tally.mean_chosen(), r.tally.mean_rejected()), (0.0, 0.0));
    assert!((r.tally.loss() - std::f64::consts::LN_2).abs() < 1e-12);

    // Another policy: its rewards against a pair-at-a-time computation.
    let be = CpuBackend;
    let tok = checkpoint::load_tokenizer(&sft).unwrap();
    let mut policy = Gpt::init(&be, &tiny_cfg(tok.vocab_size(), 64), 99).unwrap();
    let pdir = dir.path().join("policy");
    checkpoint::save(&be, &pdir, &policy, &tok, None).unwrap();
    let mut reference = checkpoint::load_model(&be, &sft, None).unwrap();
    let beta = 0.5;
    let r = eval_pairs(
        &Runtime::cpu(),
        &EvalPairsJob {
            beta,
            ..pairs_job(&pdir, Some(&sft), &data)
        },
        &|_| {},
    )
    .unwrap();
    let split = PairSplit::open(&data, "prefs_val", tok.vocab_size()).unwrap();
    let (mut correct, mut margin) = (0usize, 0.0f64);
    for i in 0..split.len() {
        let batch = fill_pair_batch(&split, &[i], 1, 64, tok.eot());
        let pi = policy
            .sequence_logps(&be, &batch.inputs, &batch.targets, 2, 64)
            .unwrap();
        let re = reference
            .sequence_logps(&be, &batch.inputs, &batch.targets, 2, 64)
            .unwrap();
        let (c, rj) = (beta * (pi[0] - re[0]), beta * (pi[1] - re[1]));
        correct += usize::from(c > rj);
        margin += c - rj;
    }
    margin /= split.len() as f64;
    println!("{}pairwise: margin {margin}, correct {correct}", r.table());
    assert_eq!(r.tally.pairs, split.len());
    assert!(margin.abs() > 1e-3, "vacuous: the policies barely differ");
    assert!((r.tally.margin() - margin).abs() <= REWARD_TOL * margin.abs().max(1.0));
    assert_eq!(r.tally.correct, correct);

    let e = eval_pairs(
        &Runtime::cpu(),
        &EvalPairsJob {
            beta: 0.0,
            ..pairs_job(&pdir, Some(&sft), &data)
        },
        &|_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--beta"), "{e}");
}

#[test]
fn generate_replies_are_greedy_chat_replies_scored_exact_and_normalised() {
    let dir = tempfile::tempdir().unwrap();
    let be = CpuBackend;
    let tok = small_tokenizer();
    // Fresh GPT-2 weights echo the last prompt token (`<|assistant|>`) whatever the prompt;
    // weights drawn 6x wider give replies that differ from prompt to prompt.
    let cfg = tiny_cfg(tok.vocab_size(), 48);
    let wide: Vec<Vec<f32>> = Gpt::init(&be, &cfg, 3)
        .unwrap()
        .param_values(&be)
        .unwrap()
        .into_iter()
        .map(|v| v.into_iter().map(|x| 6.0 * x).collect())
        .collect();
    let model = Gpt::from_values(&be, &cfg, wide).unwrap();
    let ckpt = dir.path().join("ckpt");
    checkpoint::save(&be, &ckpt, &model, &tok, None).unwrap();
    let prompts = [
        vec![Message::new(Role::User, "Tell me about cats.")],
        vec![
            Message::new(Role::System, "Be brief."),
            Message::new(Role::User, "What is water?"),
        ],
        vec![Message::new(Role::User, "Name a colour.")],
    ];
    let max_new = 6;
    // The replies by hand: the chat template, greedy decoding, cut before <|end|> / end-of-text.
    let end = tok.special("<|end|>").unwrap();
    let replies: Vec<String> = prompts
        .iter()
        .map(|m| {
            let opts = SampleOptions {
                max_tokens: max_new,
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
                seed: 1,
                stop: Some(end),
            };
            let ids =
                generate::generate(&be, &model, &render_prompt(&tok, m).unwrap(), &opts, |_| {})
                    .unwrap();
            let cut = ids
                .iter()
                .position(|&t| t == end || t == tok.eot())
                .unwrap_or(ids.len());
            tok.decode(&ids[..cut])
        })
        .collect();
    println!("replies: {replies:?}");
    assert!(
        replies[0] != replies[1] && replies[1] != replies[2],
        "vacuous: the replies do not depend on the prompt"
    );
    let shout = format!("  {}  !! ", replies[1].to_uppercase().replace(' ', "   "));
    let lines = [
        serde_json::json!({"prompt": "Tell me about cats.", "reference": replies[0]}),
        serde_json::json!({"prompt": [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is water?"}], "reference": shout}),
        serde_json::json!({"messages": [{"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "definitely not this answer"}]}),
    ];
    let file = dir.path().join("prompts.jsonl");
    std::fs::write(
        &file,
        format!("{}\n\n{}\n{}\n", lines[0], lines[1], lines[2]),
    )
    .unwrap();
    let out = dir.path().join("results.jsonl");
    let job = EvalGenerateJob {
        checkpoint: ckpt.clone(),
        prompts: file.clone(),
        max_new_tokens: max_new,
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 42,
        out: Some(out.clone()),
        adapter: None,
    };
    let r = eval_generate(&Runtime::cpu(), &job, &|_| {}).unwrap();
    print!("{}", r.table());
    let got: Vec<&str> = r.examples.iter().map(|e| e.output.as_str()).collect();
    assert_eq!(got, replies.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        r.examples
            .iter()
            .map(|e| (e.exact, e.normalized))
            .collect::<Vec<_>>(),
        [(true, true), (false, true), (false, false)]
    );
    assert_eq!((r.exact(), r.normalized()), (1, 2));
    assert!(
        r.table().contains("| 3 | 1 | 33.3% | 2 | 66.7% |"),
        "{}",
        r.table()
    );
    let recs: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 3);
    assert_eq!(recs[1]["line"], 3);
    assert_eq!(recs[1]["prompt"], "What is water?");
    assert_eq!(recs[2]["reference"], "definitely not this answer");
    assert_eq!(recs[0]["output"], replies[0].as_str());
    for (rec, e) in recs.iter().zip(&r.examples) {
        assert_eq!(rec["tokens"], e.tokens);
        assert!(e.tokens <= max_new);
        assert!(rec["stop"] == "end" || (rec["stop"] == "max_new_tokens" && e.tokens == max_new));
    }

    // A bad line through the binary: the error names the file and the line.
    std::fs::write(&file, format!("{}\n{{\"prompt\": \"x\"}}\n", lines[0])).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_topcoat"))
        .args(["eval", "generate", "--device", "cpu", "--checkpoint"])
        .arg(&ckpt)
        .arg("--prompts")
        .arg(&file)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains(&format!("{}: line 2", file.display())) && err.contains("\"reference\""),
        "{err}"
    );
}
