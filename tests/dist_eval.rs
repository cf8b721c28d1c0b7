//! `topcoat eval` across data-parallel ranks: `topcoat launch --nproc-per-node 2 -- eval
//! loss|pairs|generate` prints exactly the table one process prints (rank 0 alone prints) and
//! writes the same results file; the same at 3 ranks (an odd split, a short last batch and
//! prompts that do not divide evenly), and for sampled generation (rank 0 takes every prompt).

mod common;

use common::cli::s;
use std::path::{Path, PathBuf};
use std::process::Command;
use topcoat::backend::cpu::CpuBackend;
use topcoat::commands::inputs::TokenizerArg;
use topcoat::commands::prepare::{prepare_prefs, EMBEDDED_CORPUS};
use topcoat::config::ModelConfig;
use topcoat::data::{self, PairSplit, PrefsPrepareOptions, Tokenizer};
use topcoat::model::Gpt;
use topcoat::train::checkpoint;

const BIN: &str = env!("CARGO_BIN_EXE_topcoat");

/// The first `bytes` of the embedded corpus, cut at a line end (whole JSONL documents).
fn corpus_head(bytes: usize) -> String {
    let mut out = String::new();
    for line in String::from_utf8_lossy(EMBEDDED_CORPUS).lines() {
        if out.len() > bytes {
            break;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// A tiny GPT-2 with weights drawn 6x wider than init (fresh weights echo the last prompt
/// token whatever the prompt; wider ones give replies and losses that differ by input).
fn wide_model(vocab: usize, seed: u64) -> Gpt<CpuBackend> {
    let cfg = ModelConfig {
        vocab_size: vocab,
        padded_vocab_size: vocab.div_ceil(64) * 64,
        n_layer: 2,
        n_head: 2,
        n_embd: 32,
        max_seq_len: 64,
        family: Default::default(),
        lora: None,
    };
    let be = CpuBackend;
    let wide = Gpt::init(&be, &cfg, seed)
        .unwrap()
        .param_values(&be)
        .unwrap()
        .into_iter()
        .map(|v| v.into_iter().map(|x| 6.0 * x).collect())
        .collect();
    Gpt::from_values(&be, &cfg, wide).unwrap()
}

/// Everything the three modes need, in `dir`: a prepared text corpus (`data`), a policy
/// checkpoint and a DPO reference of the same shape (`policy`, `reference`), a preference set
/// (`prefs`) and a prompts file (`prompts.jsonl`, 7 prompts).
struct Fixture {
    data: PathBuf,
    policy: PathBuf,
    reference: PathBuf,
    prefs: PathBuf,
    prompts: PathBuf,
}

fn fixture(dir: &Path) -> Fixture {
    let text = corpus_head(30_000);
    let tok = Tokenizer::train_bpe([text.as_str()].into_iter(), 300, |_, _| {}).unwrap();
    let src = dir.join("corpus.jsonl");
    std::fs::write(&src, &text).unwrap();
    let data = dir.join("data");
    let opts = data::PrepareOptions {
        val_fraction: 0.2,
        ..data::PrepareOptions::new(&data)
    };
    data::prepare(&[&src], &tok, &opts, &|_| {}).unwrap();
    tok.save(data.join("tokenizer.json")).unwrap();

    let be = CpuBackend;
    let (policy, reference) = (dir.join("policy"), dir.join("reference"));
    checkpoint::save(&be, &policy, &wide_model(tok.vocab_size(), 3), &tok, None).unwrap();
    checkpoint::save(
        &be,
        &reference,
        &wide_model(tok.vocab_size(), 4),
        &tok,
        None,
    )
    .unwrap();

    let lines: String = (0..44)
        .map(|i| {
            let topic = ["cats", "dogs", "water", "the sky", "apples"][i % 5];
            serde_json::json!({
                "prompt": format!("Tell me about {topic}, number {i}."),
                "chosen": format!("Here is an answer about {topic}."),
                "rejected": format!("No. {topic}? {i}."),
            })
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(dir.join("prefs.jsonl"), lines).unwrap();
    let prefs = dir.join("prefs");
    let opts = PrefsPrepareOptions {
        max_len: 64,
        val_fraction: 0.25,
        ..PrefsPrepareOptions::new(&prefs)
    };
    prepare_prefs(
        &dir.join("prefs.jsonl"),
        &TokenizerArg::Path(policy.clone()),
        &opts,
    )
    .unwrap();

    let prompts = dir.join("prompts.jsonl");
    let text: String = [
        "cats", "water", "a colour", "the sea", "bread", "rain", "owls",
    ]
    .iter()
    .map(|t| {
        serde_json::json!({"prompt": format!("Tell me about {t}."), "reference": "It is."})
            .to_string()
            + "\n"
    })
    .collect();
    std::fs::write(&prompts, text).unwrap();
    Fixture {
        data,
        policy,
        reference,
        prefs,
        prompts,
    }
}

/// Runs `args` with `ranks` ranks (1: the plain command), which must succeed; its stdout.
fn run(ranks: usize, args: &[String]) -> String {
    let mut c = Command::new(BIN);
    if ranks > 1 {
        c.args(["launch", "--nproc-per-node", &ranks.to_string(), "--", BIN]);
    }
    let o = c.args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{ranks} rank(s) {args:?} failed:\n{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|x| x.to_string()).collect()
}

/// The table's single data row's cells.
fn row(table: &str) -> Vec<String> {
    let line = table.lines().nth(2).unwrap_or_else(|| panic!("{table}"));
    line.split('|').map(|c| c.trim().to_string()).collect()
}

#[test]
fn launched_eval_prints_and_writes_what_one_process_does() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixture(dir.path());

    // Loss: 7 batches of B = 2, T = 16 (3 ranks take 3, 2 and 2).
    let loss = args(&[
        "eval",
        "loss",
        "--device",
        "cpu",
        "--checkpoint",
        &s(&f.policy),
        "--data",
        &s(&f.data),
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--max-batches",
        "7",
    ]);
    let one = run(1, &loss);
    assert_eq!(
        row(&one)[3..5],
        ["7".to_string(), "224".to_string()],
        "{one}"
    );
    assert_eq!(run(2, &loss), one);
    assert_eq!(run(3, &loss), one);

    // Pairs (DPO implicit rewards): batches of 4 pairs, the last one short.
    let pairs = args(&[
        "eval",
        "pairs",
        "--device",
        "cpu",
        "--checkpoint",
        &s(&f.policy),
        "--reference",
        &s(&f.reference),
        "--data",
        &s(&f.prefs),
        "--split",
        "train",
        "--batch-size",
        "4",
    ]);
    let n = PairSplit::open(&f.prefs, "prefs_train", 300).unwrap().len();
    assert!(
        !n.is_multiple_of(4) && n / 4 >= 4,
        "{n} pairs: want a short last batch"
    );
    let one = run(1, &pairs);
    let cells = row(&one);
    assert_eq!(
        (cells[1].as_str(), cells[3].clone()),
        ("dpo", n.to_string()),
        "{one}"
    );
    assert_ne!(
        cells[6], "0.0000",
        "vacuous: the policy equals its reference\n{one}"
    );
    assert_eq!(run(2, &pairs), one);
    assert_eq!(run(3, &pairs), one);

    // Generate, greedy: 7 prompts split 4 + 3 and 3 + 2 + 2, results file gathered in order.
    let gen = |out: &Path, extra: &[&str]| {
        let mut a = args(&[
            "eval",
            "generate",
            "--device",
            "cpu",
            "--checkpoint",
            &s(&f.policy),
            "--prompts",
            &s(&f.prompts),
            "--max-new-tokens",
            "5",
            "--out",
            &s(out),
        ]);
        a.extend(args(extra));
        a
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    let one_out = dir.path().join("gen1.jsonl");
    let one = run(1, &gen(&one_out, &[]));
    let outputs: Vec<String> = read(&one_out)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["output"].to_string())
        .collect();
    assert_eq!(outputs.len(), 7);
    assert!(
        outputs.iter().skip(1).any(|o| o != &outputs[0]),
        "vacuous: every reply is the same {outputs:?}"
    );
    for ranks in [2, 3] {
        let out = dir.path().join(format!("gen{ranks}.jsonl"));
        assert_eq!(run(ranks, &gen(&out, &[])), one, "{ranks} ranks");
        assert_eq!(read(&out), read(&one_out), "{ranks} ranks");
    }

    // Sampled: one random stream in prompt order, so rank 0 takes every prompt.
    let sampled = ["--temperature", "0.9", "--seed", "11"];
    let (a, b) = (dir.path().join("s1.jsonl"), dir.path().join("s2.jsonl"));
    assert_eq!(run(2, &gen(&b, &sampled)), run(1, &gen(&a, &sampled)));
    assert_eq!(read(&b), read(&a));
}
