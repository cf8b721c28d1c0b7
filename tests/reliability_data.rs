//! Datasets survive misuse and faults: `prepare` replaces a dataset as a whole or not at all,
//! readers refuse the wrong kind of dataset by name, and hand-made or malformed files get named
//! errors (the property tests on every parser are in `reliability_data_parsers.rs`).

mod common;
use common::cli::{fails, ok, snapshot, text, topcoat};

use std::path::Path;
use std::process::Output;

use topcoat::data::{Manifest, Tokenizer};

/// Names in `dir` that start with `prefix`.
fn entries_starting(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

const CHAT: &str = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A cat is small."}]}"#;
const PAIR: &str = r#"{"prompt": "hi", "chosen": "A cat is small.", "rejected": "A dog."}"#;

/// In `dir`: `docs/` (20 text files), `data` (a text dataset with a 280-token BPE),
/// `chats.jsonl` and `pairs.jsonl` (10 lines each).
fn setup(dir: &Path) {
    let docs = dir.join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    for i in 0..20 {
        let body = format!("Entry {i}. A cat is a small animal. A dog is a loyal animal. ");
        std::fs::write(docs.join(format!("{i:02}.txt")), body.repeat(10)).unwrap();
    }
    let p = |s: &str| dir.join(s).to_string_lossy().into_owned();
    ok(&[
        "prepare",
        &p("docs"),
        "--out",
        &p("data"),
        "--tokenizer",
        "bpe",
        "--vocab-size",
        "280",
    ]);
    std::fs::write(dir.join("chats.jsonl"), format!("{CHAT}\n").repeat(10)).unwrap();
    std::fs::write(dir.join("pairs.jsonl"), format!("{PAIR}\n").repeat(10)).unwrap();
}

fn prepare_chat(dir: &Path, kind: &str, input: &str, out: &str, extra: &[&str]) -> Output {
    let p = |s: &str| dir.join(s).to_string_lossy().into_owned();
    let (input, out, tok) = (p(input), p(out), p("data"));
    let mut args = vec!["prepare", kind, &input, "--out", &out, "--tokenizer", &tok];
    args.extend(extra);
    topcoat(&args)
}

#[test]
fn reprepare_without_validation_leaves_no_val_files() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    for (kind, input, val) in [
        ("sft", "chats.jsonl", "sft_val"),
        ("prefs", "pairs.jsonl", "prefs_val"),
    ] {
        let o = prepare_chat(d, kind, input, kind, &[]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(d.join(kind).join(format!("{val}.idx")).is_file());
        let o = prepare_chat(d, kind, input, kind, &["--val-fraction", "0"]);
        assert!(o.status.success(), "{}", text(&o));
        let left = entries_starting(&d.join(kind), val);
        assert!(left.is_empty(), "{kind}: stale validation files {left:?}");
        let m = Manifest::read(&d.join(kind)).unwrap().unwrap();
        assert!(m.files.iter().all(|f| !f.name.starts_with(val)), "{m:?}");
    }
    // Text: the val shards of the first prepare are gone too.
    assert!(d.join("data/val_000000.bin").is_file());
    let (docs, data) = (d.join("docs"), d.join("data"));
    ok(&[
        "prepare",
        docs.to_str().unwrap(),
        "--out",
        data.to_str().unwrap(),
        "--tokenizer",
        data.to_str().unwrap(),
        "--val-fraction",
        "0",
    ]);
    assert!(entries_starting(&data, "val_").is_empty());
    assert_eq!(entries_starting(d, ".data.prepare-"), Vec::<String>::new());
}

#[test]
fn failed_prepare_leaves_the_old_dataset_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    let o = prepare_chat(d, "sft", "chats.jsonl", "sft", &[]);
    assert!(o.status.success(), "{}", text(&o));
    let before = snapshot(&d.join("sft"));
    let mut bad = format!("{CHAT}\n").repeat(12);
    bad.push_str("{\"messages\": [\n");
    std::fs::write(d.join("bad.jsonl"), bad).unwrap();
    let o = prepare_chat(d, "sft", "bad.jsonl", "sft", &[]);
    let t = text(&o);
    assert!(
        !o.status.success() && t.contains("bad.jsonl: line 13: invalid JSON"),
        "{t}"
    );
    assert_eq!(snapshot(&d.join("sft")), before);
    assert!(entries_starting(d, ".sft.prepare-").is_empty());

    // Text JSONL: a bad last line leaves the old shards and tokenizer alone.
    let before = snapshot(&d.join("data"));
    std::fs::write(
        d.join("docs.jsonl"),
        "{\"text\": \"a cat\"}\n{\"text\": \"a dog\"}\n{\"text\": 3}\n",
    )
    .unwrap();
    let (input, data) = (d.join("docs.jsonl"), d.join("data"));
    let t = fails(&[
        "prepare",
        input.to_str().unwrap(),
        "--out",
        data.to_str().unwrap(),
        "--tokenizer",
        "bpe",
        "--vocab-size",
        "270",
    ]);
    assert!(
        t.contains("docs.jsonl: line 3: field \"text\" is a number"),
        "{t}"
    );
    assert_eq!(snapshot(&data), before);
    assert!(entries_starting(d, ".data.prepare-").is_empty());
}

#[test]
fn stale_staging_is_cleaned_and_foreign_directories_are_not_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    // A killed prepare's staging directory (no process has this pid: pid_max <= 2^22).
    let stale = d.join(".sft.prepare-999999999");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("sft_train.bin"), b"half").unwrap();
    let o = prepare_chat(d, "sft", "chats.jsonl", "sft", &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(!stale.exists(), "stale staging directory left behind");
    assert!(entries_starting(d, ".sft.prepare-").is_empty());

    // A directory holding a file of the user's is never replaced.
    let mine = d.join("mine");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), b"keep me").unwrap();
    std::fs::write(mine.join("train_000000.bin"), b"x").unwrap();
    let before = snapshot(&mine);
    let o = prepare_chat(d, "sft", "chats.jsonl", "mine", &[]);
    let t = text(&o);
    assert!(
        !o.status.success()
            && t.contains(
                "not replaced: it holds \"notes.txt\", which is not part of a topcoat dataset"
            ),
        "{t}"
    );
    assert_eq!(snapshot(&mine), before);
    assert!(entries_starting(d, ".mine.prepare-").is_empty());

    // Nor is a dataset of another kind (here the text dataset the tokenizer comes from).
    let before = snapshot(&d.join("data"));
    let o = prepare_chat(d, "sft", "chats.jsonl", "data", &[]);
    let t = text(&o);
    assert!(
        !o.status.success()
            && t.contains("not replaced: it holds a text dataset (train_*.bin token shards), and this prepares an SFT dataset"),
        "{t}"
    );
    assert_eq!(snapshot(&d.join("data")), before);
}

/// Pretrains 2 steps on `dir/data` into `dir/run`.
fn tiny_run(dir: &Path) {
    let p = |s: &str| dir.join(s).to_string_lossy().into_owned();
    ok(&[
        "pretrain",
        "--data",
        &p("data"),
        "--out",
        &p("run"),
        "--device",
        "cpu",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--warmup-steps",
        "1",
    ]);
}

fn train_args<'a>(cmd: &'a str, init: &'a str, data: &'a str, out: &'a str) -> Vec<&'a str> {
    let mut a = vec![cmd, "--data", data, "--out", out, "--device", "cpu"];
    a.extend(["--max-steps", "1", "--batch-size", "2", "--seq-len", "16"]);
    if cmd != "pretrain" {
        a.extend(["--init", init]);
    }
    a
}

#[test]
fn readers_name_the_kind_of_dataset_they_were_given() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    tiny_run(d);
    for (kind, input) in [("sft", "chats.jsonl"), ("prefs", "pairs.jsonl")] {
        let o = prepare_chat(d, kind, input, kind, &[]);
        assert!(o.status.success(), "{}", text(&o));
    }
    let p = |s: &str| d.join(s).to_string_lossy().into_owned();
    let cases = [
        (
            "sft",
            "prefs",
            "a preference-pair dataset",
            "topcoat prepare sft",
        ),
        ("dpo", "sft", "an SFT dataset", "topcoat prepare prefs"),
        (
            "pretrain",
            "sft",
            "an SFT dataset",
            "topcoat prepare TEXT_FILES",
        ),
        (
            "pretrain",
            "prefs",
            "a preference-pair dataset",
            "topcoat prepare TEXT_FILES",
        ),
        ("sft", "data", "a text dataset", "topcoat prepare sft"),
    ];
    for legacy in [false, true] {
        if legacy {
            // Directories prepared before dataset.json: the kind is read from the file names.
            for k in ["sft", "prefs", "data"] {
                std::fs::remove_file(d.join(k).join("dataset.json")).unwrap();
            }
        }
        for (cmd, data, holds, fix) in cases {
            let before = snapshot(&d.join(data));
            let (init, data_p, out) = (p("run"), p(data), p(&format!("out_{cmd}_{data}")));
            let t = fails(&train_args(cmd, &init, &data_p, &out));
            assert!(
                t.contains(&format!("{}: holds {holds}", data_p)) && t.contains(fix),
                "{cmd} --data {data} (legacy {legacy}): {t}"
            );
            assert_eq!(snapshot(&d.join(data)), before);
        }
    }
    // A directory without dataset.json still trains.
    let (init, data_p, out) = (p("run"), p("sft"), p("sft_run"));
    ok(&train_args("sft", &init, &data_p, &out));
}

#[test]
fn hand_made_files_get_named_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    tiny_run(d);
    let p = |s: &str| d.join(s).to_string_lossy().into_owned();
    let o = prepare_chat(d, "sft", "chats.jsonl", "sft", &[]);
    assert!(o.status.success(), "{}", text(&o));

    // A `.idx` whose example count would overflow the size check.
    let idx = d.join("sft/sft_train.idx");
    let mut bytes = std::fs::read(&idx).unwrap();
    bytes[8..16].copy_from_slice(&(u64::MAX / 4).to_le_bytes());
    std::fs::write(&idx, &bytes).unwrap();
    let before = snapshot(&d.join("sft"));
    let (init, data_p, out) = (p("run"), p("sft"), p("sft_run"));
    let t = fails(&train_args("sft", &init, &data_p, &out));
    assert!(
        t.contains("sft_train.idx") && t.contains("expected") && !t.contains("capacity overflow"),
        "{t}"
    );
    assert_eq!(snapshot(&d.join("sft")), before);

    // A directory named like a shard.
    let dir_shard = d.join("data/train_000001.bin");
    std::fs::create_dir(&dir_shard).unwrap();
    let before = snapshot(&d.join("data"));
    let (data_p, out) = (p("data"), p("run2"));
    let t = fails(&train_args("pretrain", "", &data_p, &out));
    assert!(
        t.contains(&format!(
            "{}: is a directory, expected a token shard file",
            dir_shard.display()
        )),
        "{t}"
    );
    assert_eq!(snapshot(&d.join("data")), before);
}

#[test]
fn no_window_error_lists_a_few_shards_and_the_count() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    let p = |s: &str| d.join(s).to_string_lossy().into_owned();
    let (docs, small, tok) = (p("docs"), p("small"), p("data"));
    ok(&[
        "prepare",
        &docs,
        "--out",
        &small,
        "--tokenizer",
        &tok,
        "--shard-tokens",
        "8",
    ]);
    let shards = entries_starting(&d.join("small"), "train_").len();
    assert!(shards > 20, "{shards} shards");
    let out = p("run");
    let t = fails(&train_args("pretrain", "", &small, &out));
    assert!(
        t.contains(&format!("in any of the {shards} shards"))
            && t.contains(&format!("and {} more", shards - 3))
            && !t.contains("train_000010.bin"),
        "{t}"
    );
}

/// A validation split too short for one window names the split and the ways out; with
/// validation off it is not opened at all.
#[test]
fn a_short_validation_split_is_named_and_not_needed_without_validation() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    let p = |s: &str| d.join(s).to_string_lossy().into_owned();
    std::fs::create_dir_all(d.join("few")).unwrap();
    for i in 0..20 {
        std::fs::write(d.join(format!("few/{i:02}.txt")), "A cat is small.").unwrap();
    }
    ok(&[
        "prepare",
        &p("few"),
        "--out",
        &p("short"),
        "--tokenizer",
        &p("data"),
    ]);
    let (short, run) = (p("short"), p("run"));
    let mut args = train_args("pretrain", "", &short, &run);
    let t = fails(&args);
    assert!(
        t.contains("the validation split of")
            && t.contains("val_000000.bin")
            && t.contains("--val-every 0"),
        "{t}"
    );
    assert!(!d.join("run").join("metrics.jsonl").exists());
    args.extend(["--val-every", "0"]);
    ok(&args);
    assert!(checkpoint_written(&d.join("run")));
}

/// Whether `run` holds a checkpoint.
fn checkpoint_written(run: &Path) -> bool {
    std::fs::read_dir(run).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("ckpt_")
    })
}

#[test]
fn a_byte_order_mark_is_not_text() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    setup(d);
    let p = |s: &str| d.join(s).to_string_lossy().into_owned();
    let body = "A cat is a small animal. ".repeat(20);
    let jsonl = format!("{{\"text\": \"{body}\"}}\n");
    for (name, content) in [
        ("plain.txt", body.as_str()),
        ("plain.jsonl", jsonl.as_str()),
    ] {
        let bom = format!("bom_{name}");
        std::fs::write(d.join(name), content).unwrap();
        std::fs::write(d.join(&bom), format!("\u{feff}{content}")).unwrap();
        let tok = p("data");
        for (input, out) in [(name, "a"), (bom.as_str(), "b")] {
            let (i, o) = (p(input), p(out));
            let args = ["prepare", &i, "--out", &o, "--tokenizer", &tok];
            ok(&[&args[..], &["--val-fraction", "0"]].concat());
        }
        assert_eq!(
            std::fs::read(d.join("a/train_000000.bin")).unwrap(),
            std::fs::read(d.join("b/train_000000.bin")).unwrap(),
            "{name}: the BOM changed the tokens"
        );
    }
    // sft and prefs JSONL with a BOM prepare like without.
    for (kind, line) in [("sft", CHAT), ("prefs", PAIR)] {
        let input = format!("bom_{kind}.jsonl");
        std::fs::write(d.join(&input), format!("\u{feff}{line}\n{line}\n")).unwrap();
        let o = prepare_chat(d, kind, &input, kind, &[]);
        assert!(o.status.success(), "{kind}: {}", text(&o));
    }
}

#[test]
fn a_bpe_smaller_than_asked_is_announced() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("tiny.txt"), "ab ab ab").unwrap();
    let (i, o) = (d.join("tiny.txt"), d.join("out"));
    let t = ok(&[
        "prepare",
        i.to_str().unwrap(),
        "--out",
        o.to_str().unwrap(),
        "--tokenizer",
        "bpe",
        "--vocab-size",
        "400",
    ]);
    let reached = Tokenizer::load(d.join("out/tokenizer.json"))
        .unwrap()
        .vocab_size();
    assert!(reached < 400);
    assert!(
        t.contains(&format!(
            "the BPE reached {reached} tokens, not the 400 asked"
        )) && t.contains("too little text"),
        "{t}"
    );
}
