//! The `topcoat` binary end to end: prepare -> pretrain -> sample -> info, and its errors
//! (a clear message and a non-zero exit, never a panic).

mod common;
use common::cli::{fails, ok, prepare_small_corpus};

use std::path::Path;

#[test]
fn prepare_pretrain_sample_info() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s).to_string_lossy().into_owned();
    let docs = tmp.path().join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    for i in 0..20 {
        let body =
            format!("Entry {i}. A cat is a small animal. A dog is a loyal animal. Number {i}.\n");
        std::fs::write(docs.join(format!("{i:02}.txt")), body.repeat(20)).unwrap();
    }
    let out = ok(&[
        "prepare",
        &p("docs"),
        "--out",
        &p("data"),
        "--tokenizer",
        "bpe",
        "--vocab-size",
        "300",
    ]);
    assert!(
        out.contains("train documents") && Path::new(&p("data/tokenizer.json")).is_file(),
        "{out}"
    );

    let out = ok(&[
        "pretrain",
        "--data",
        &p("data"),
        "--out",
        &p("run"),
        "--device",
        "cpu",
        "--max-steps",
        "6",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--val-every",
        "3",
        "--warmup-steps",
        "2",
    ]);
    assert!(
        out.contains("validation loss") && out.contains("ckpt_000006"),
        "{out}"
    );

    let out = ok(&[
        "sample",
        "--checkpoint",
        &p("run"),
        "--prompt",
        "A cat",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
    ]);
    assert!(out.starts_with("A cat"), "{out}");
    let again = ok(&[
        "sample",
        "--checkpoint",
        &p("run"),
        "--prompt",
        "A cat",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
    ]);
    assert_eq!(
        out, again,
        "greedy sampling is deterministic (and --max-tokens still means --max-new-tokens)"
    );
    let t = fails(&[
        "sample",
        "--checkpoint",
        &p("run"),
        "--top-p",
        "0",
        "--device",
        "cpu",
    ]);
    assert!(t.contains("--top-p") && t.contains("(0, 1]"), "{t}");

    let out = ok(&["info", &p("run")]);
    assert!(
        out.contains("step 6") && out.contains("vocab: 300"),
        "{out}"
    );
    let out = ok(&["info", &p("data/train_000000.bin")]);
    assert!(out.contains("16-bit ids"), "{out}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s).to_string_lossy().into_owned();
    std::fs::create_dir_all(tmp.path().join("empty")).unwrap();
    std::fs::write(tmp.path().join("junk.bin"), vec![7u8; 2048]).unwrap();

    let t = fails(&["prepare", &p("empty"), "--out", &p("out")]);
    assert!(t.contains("empty") && t.contains("no input files"), "{t}");
    let t = fails(&["info", &p("junk.bin")]);
    assert!(t.contains("junk.bin") && t.contains("magic"), "{t}");
    let t = fails(&[
        "pretrain",
        "--data",
        &p("empty"),
        "--out",
        &p("run"),
        "--device",
        "cpu",
    ]);
    assert!(t.contains("tokenizer.json"), "{t}");
    let t = fails(&["sample", "--checkpoint", &p("empty")]);
    assert!(t.contains("empty") && t.contains("checkpoint"), "{t}");
    let t = fails(&["pretrain", "--device", "cuda", "--out", &p("run")]);
    assert!(
        t.to_lowercase().contains("cuda") || t.contains("nvcc"),
        "{t}"
    );
    let t = fails(&[
        "pretrain",
        "--preset",
        "huge",
        "--out",
        &p("run"),
        "--device",
        "cpu",
    ]);
    assert!(t.contains("unknown preset `huge`"), "{t}");
    // An I/O error names the file, and its cause is printed once, not once per layer.
    let t = fails(&[
        "prepare",
        "sft",
        &p("missing.jsonl"),
        "--out",
        &p("sft"),
        "--tokenizer",
        "gpt2",
    ]);
    assert!(t.contains("missing.jsonl"), "{t}");
    assert_eq!(t.matches("(os error 2)").count(), 1, "{t}");
    let t = fails(&["pretrain", "--device", "tpu", "--out", &p("run")]);
    assert!(
        t.contains("--device") && t.contains("unknown device `tpu`"),
        "{t}"
    );
    let t = fails(&["bench", "--device", "cpu", "--attention", "fast"]);
    assert!(t.contains("--attention") && t.contains("cuda-cores"), "{t}");
}

#[test]
fn a_config_rank_the_launcher_did_not_set_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s).to_string_lossy().into_owned();
    prepare_small_corpus(tmp.path());
    std::fs::write(tmp.path().join("run.toml"), "world_size = 2\nrank = 1\n").unwrap();
    let t = fails(&[
        "pretrain",
        "--config",
        &p("run.toml"),
        "--data",
        &p("data"),
        "--out",
        &p("run"),
        "--device",
        "cpu",
    ]);
    assert!(
        t.contains("the run config sets rank = 1, world_size = 2, but this process is rank 0 of 1 (single process)")
            && t.contains("remove rank and world_size from the config"),
        "{t}"
    );
    assert!(
        !tmp.path().join("run").join("metrics.jsonl").exists(),
        "nothing is trained"
    );
}

#[test]
fn prepare_sft_subcommand_and_its_old_name() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s).to_string_lossy().into_owned();
    prepare_small_corpus(tmp.path());
    let chat = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A cat."}]}"#;
    std::fs::write(tmp.path().join("chats.jsonl"), format!("{chat}\n{chat}\n")).unwrap();
    for (cmd, out) in [
        (vec!["prepare", "sft"], "sft_new"),
        (vec!["prepare-sft"], "sft_old"),
    ] {
        let mut args = cmd.clone();
        let (input, dest, tok) = (p("chats.jsonl"), p(out), p("data"));
        args.extend([input.as_str(), "--out", &dest, "--tokenizer", &tok]);
        let text = ok(&args);
        assert!(text.contains("2 conversations"), "{cmd:?}: {text}");
        assert!(Path::new(&p(&format!("{out}/sft_train.idx"))).is_file());
    }
    let t = fails(&["prepare", &p("docs")]);
    assert!(t.contains("--out"), "{t}");

    // `--tokenizer` takes the same values as `prepare`'s: gpt2 too; `bpe` only trains on text.
    let (input, dest) = (p("chats.jsonl"), p("sft_gpt2"));
    let text = ok(&[
        "prepare",
        "sft",
        &input,
        "--out",
        &dest,
        "--tokenizer",
        "gpt2",
    ]);
    assert!(text.contains("2 conversations"), "{text}");
    let t = fails(&[
        "prepare",
        "prefs",
        &input,
        "--out",
        &dest,
        "--tokenizer",
        "bpe",
    ]);
    assert!(
        t.contains("--tokenizer") && t.contains("prepare prefs"),
        "{t}"
    );
}
