//! Misuse of the command line meets a named error, a non-zero exit and no panic, and leaves
//! every file of the run and the dataset as it was: nonsense hyper-parameters, negative flag
//! values, an absurd thread count or batch, a tokenizer of the same size but other content,
//! a missing path, and an I/O error's OS message (said once).

mod common;
use common::cli::{fails, ok, s, snapshot};

use std::path::{Path, PathBuf};

/// Owned arguments from strings and paths alike.
macro_rules! args {
    ($($a:expr),* $(,)?) => { vec![$(AsRef::<std::ffi::OsStr>::as_ref(&$a).to_string_lossy().into_owned()),*] };
}

/// Owned copies of `xs`, to extend an [`args!`] list.
fn own(xs: impl IntoIterator<Item = impl AsRef<str>>) -> impl Iterator<Item = String> {
    xs.into_iter().map(|x| x.as_ref().to_string())
}

/// `dir/name`: ten documents of `sentence`, prepared with a 280-id BPE trained on them.
fn prepare(dir: &Path, name: &str, sentence: &str) -> PathBuf {
    let docs = dir.join(format!("{name}_docs"));
    std::fs::create_dir_all(&docs).unwrap();
    for i in 0..10 {
        let body = format!("{sentence} Number {i}. ").repeat(30);
        std::fs::write(docs.join(format!("{i}.txt")), body).unwrap();
    }
    let out = dir.join(name);
    ok(&[
        "prepare",
        &s(&docs),
        "--out",
        &s(&out),
        "--tokenizer",
        "bpe",
        "--vocab-size",
        "280",
    ]);
    out
}

const SMALL: [&str; 8] = [
    "--device",
    "cpu",
    "--batch-size",
    "2",
    "--seq-len",
    "16",
    "--warmup-steps",
    "1",
];

/// Each nonsense hyper-parameter, from a flag (negative values without `=`) or the TOML file,
/// is refused naming its TOML key and flag, before the run directory is made.
#[test]
fn nonsense_hyper_parameters_are_named_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path(), "data", "A cat is a small animal.");
    let before = snapshot(tmp.path());
    let run = s(&tmp.path().join("run"));
    let flag_cases: [(&[&str], &str); 9] = [
        (
            &["--lr", "-1"],
            "learning_rate (--lr) is -1: must be finite and > 0",
        ),
        (
            &["--lr", "NaN"],
            "learning_rate (--lr) is NaN: must be finite and > 0",
        ),
        (
            &["--lr", "inf"],
            "learning_rate (--lr) is inf: must be finite and > 0",
        ),
        (&["--lr=-0.5"], "learning_rate (--lr) is -0.5"),
        (
            &["--weight-decay", "-0.1"],
            "weight_decay (--weight-decay) is -0.1: must be finite and >= 0",
        ),
        (
            &["--grad-clip", "-1"],
            "grad_clip (--grad-clip) is -1: must be finite and >= 0",
        ),
        (
            &["--batch-size", "0"],
            "batch_size (--batch-size) is 0: must be at least 1",
        ),
        (
            &["--max-steps", "0"],
            "max_steps (--max-steps) is 0: must be at least 1",
        ),
        (
            &["--max-steps", "-3"],
            "invalid value '-3' for '--max-steps",
        ),
    ];
    for (extra, want) in flag_cases {
        let mut args = args!["pretrain", "--data", data, "--out", run];
        args.extend(own(["--device", "cpu"]));
        args.extend(own(extra));
        let t = fails(&args);
        assert!(t.contains(want), "{extra:?}: want {want:?} in\n{t}");
        assert!(!t.contains("unexpected argument"), "{extra:?}: {t}");
    }
    let toml_cases = [
        ("beta2 = 1.5", "beta2 is 1.5: must be in [0, 1)"),
        ("beta1 = -0.1", "beta1 is -0.1: must be in [0, 1)"),
        (
            "min_lr_ratio = -3.0",
            "min_lr_ratio is -3: must be in [0, 1]",
        ),
        ("eps = 0.0", "eps is 0: must be finite and > 0"),
        ("learning_rate = nan", "learning_rate (--lr) is NaN"),
        (
            "val_batches = 0",
            "val_batches is 0: must be at least 1 while val_every (--val-every) is 50",
        ),
    ];
    let toml = tmp.path().join("run.toml");
    for (line, want) in toml_cases {
        std::fs::write(&toml, line).unwrap();
        let mut args = args!["pretrain", "--config", toml, "--data", data];
        args.extend(own(["--out", &run]));
        let t = fails(&args);
        assert!(t.contains(want), "{line}: want {want:?} in\n{t}");
        std::fs::remove_file(&toml).unwrap();
    }
    // The fine-tuning commands check the same values first, before their --init is resolved.
    let t = fails(&[
        "sft", "--init", &run, "--data", &run, "--out", &run, "--lr", "-1",
    ]);
    assert!(t.contains("learning_rate (--lr) is -1"), "{t}");
    let t = fails(&[
        "dpo",
        "--init",
        &run,
        "--data",
        &run,
        "--out",
        &run,
        "--grad-clip",
        "-2",
    ]);
    assert!(t.contains("grad_clip (--grad-clip) is -2"), "{t}");
    assert_eq!(snapshot(tmp.path()), before, "a refused run changed files");
}

/// A warm-up longer than the run is legal (quick runs use the stage's default warm-up) but
/// said: the run never reaches its peak rate.
#[test]
fn warmup_past_max_steps_is_a_note() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path(), "data", "A cat is a small animal.");
    let run = s(&tmp.path().join("run"));
    let mut args = args!["pretrain", "--data", data, "--out", run];
    args.extend(own([
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
    ]));
    args.extend(own([
        "--max-steps",
        "1",
        "--warmup-steps",
        "5",
        "--val-every",
        "0",
    ]));
    let t = ok(&args);
    assert!(
        t.contains("warmup_steps (--warmup-steps) 5 is more than max_steps (--max-steps) 1"),
        "{t}"
    );
}

/// `--threads` is bounded (100,000 hung the pool's start), and `info` builds no pool.
#[test]
fn threads_are_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = s(&tmp.path().join("nothing"));
    for n in ["100000", "0", "-4"] {
        let t = fails(&["--threads", n, "info", &missing]);
        assert!(
            t.contains("--threads") && t.contains("from 1 to 1024"),
            "--threads {n}: {t}"
        );
    }
    let t = fails(&["info", &missing, "--threads", "1024"]);
    assert!(t.contains("does not exist"), "{t}");
    assert!(!tmp.path().join("nothing").exists());
}

/// A batch no machine holds is refused from the memory plan, before any allocation: by the
/// training commands, `bench` and `eval loss`.
#[test]
fn a_batch_too_large_for_memory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare(tmp.path(), "data", "A cat is a small animal.");
    let run = tmp.path().join("run");
    let want = |t: &str| {
        assert!(
            t.contains("the run needs about")
                && t.contains("batch_size 100000000 x seq_len 16")
                && t.contains("GiB available")
                && t.contains("lower --batch-size"),
            "{t}"
        );
    };
    let before = snapshot(tmp.path());
    let mut args = args!["pretrain", "--data", data, "--out", run];
    args.extend(own([
        "--device",
        "cpu",
        "--seq-len",
        "16",
        "--batch-size",
        "100000000",
    ]));
    want(&fails(&args));
    assert_eq!(snapshot(tmp.path()), before, "a refused run changed files");
    want(&fails(&[
        "bench",
        "--device",
        "cpu",
        "--seq-len",
        "16",
        "--batch-size",
        "100000000",
    ]));
    // eval loss: a real checkpoint, then a batch it cannot hold.
    let mut args = args!["pretrain", "--data", data, "--out", run];
    args.extend(own(SMALL));
    args.extend(own(["--max-steps", "1", "--val-every", "0"]));
    ok(&args);
    let before = snapshot(tmp.path());
    let mut eval = args!["eval", "loss", "--checkpoint", run, "--data", data,];
    eval.extend(own([
        "--device",
        "cpu",
        "--seq-len",
        "16",
        "--batch-size",
        "100000000",
    ]));
    want(&fails(&eval));
    assert_eq!(snapshot(tmp.path()), before);
}

/// Two BPEs of the same size trained on other text are different tokenizers: `pretrain
/// --resume` on the other data, `sft --init` with data prepared by the other one, and `eval
/// loss` on it are refused, naming both tokenizers by kind, size and fingerprint.
#[test]
fn a_same_size_tokenizer_of_other_content_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let a = prepare(tmp.path(), "a", "A cat is a small animal.");
    let b = prepare(tmp.path(), "b", "The dog ran home fast!");
    let run = tmp.path().join("run");
    let mut args = args!["pretrain", "--data", a, "--out", run];
    args.extend(own(SMALL));
    args.extend(own(["--max-steps", "2", "--val-every", "0"]));
    ok(&args);
    let chat = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A dog."}]}"#;
    let chats = tmp.path().join("chats.jsonl");
    std::fs::write(&chats, format!("{chat}\n{chat}\n{chat}\n")).unwrap();
    let sft_b = tmp.path().join("sft_b");
    ok(&[
        "prepare",
        "sft",
        &s(&chats),
        "--out",
        &s(&sft_b),
        "--tokenizer",
        &s(&b),
    ]);
    let names_both = |t: &str| {
        let fps: Vec<&str> = t
            .match_indices("sha256 ")
            .map(|(i, _)| &t[i + 7..i + 19])
            .collect();
        assert!(
            t.contains("a bpe tokenizer with 280 ids") && fps.len() == 2 && fps[0] != fps[1],
            "{t}"
        );
    };
    let before = snapshot(tmp.path());

    let mut args = args!["pretrain", "--resume", "--data", b, "--out", run];
    args.extend(own(SMALL));
    args.extend(own(["--max-steps", "4", "--val-every", "0"]));
    let t = fails(&args);
    names_both(&t);
    assert!(
        t.contains("cannot resume") && t.contains("another --out"),
        "{t}"
    );

    let sft_out = tmp.path().join("sft_run");
    let mut args = args!["sft", "--init", run, "--data", sft_b, "--out", sft_out,];
    args.extend(own(SMALL));
    let t = fails(&args);
    names_both(&t);
    assert!(
        t.contains("tokenizer mismatch") && t.contains("prepare sft"),
        "{t}"
    );

    let mut eval = args!["eval", "loss", "--checkpoint", run, "--data", b];
    eval.extend(own([
        "--device",
        "cpu",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
    ]));
    let t = fails(&eval);
    names_both(&t);
    assert!(t.contains("tokenizer mismatch"), "{t}");
    // `info` shows the fingerprints that tell them apart: the run's is data a's.
    let fp = |dir: &Path| {
        let t = ok(&["info".to_string(), s(dir)]);
        let at = t.find("sha256 ").unwrap_or_else(|| panic!("{t}"));
        t[at + 7..at + 19].to_string()
    };
    assert_eq!(fp(&run), fp(&a));
    assert_ne!(fp(&a), fp(&b));
    assert_eq!(
        snapshot(tmp.path()),
        before,
        "a refused command changed files"
    );

    // The matching data passes the same checks.
    let mut eval = args!["eval", "loss", "--checkpoint", run, "--data", a];
    eval.extend(own([
        "--device",
        "cpu",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
    ]));
    assert!(ok(&eval).contains("| loss |"));
}

/// `info` on a path that is not there says so, and an OS error's message is said once.
#[test]
fn missing_paths_are_named_once() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("no_such_run");
    let t = fails(&["info", &s(&missing)]);
    assert!(
        t.contains(&format!("{} does not exist", missing.display())),
        "{t}"
    );
    let m = s(&missing);
    let t = fails(&["sft", "--init", &m, "--data", &m, "--out", &m]);
    assert!(t.contains(&format!("{m}: does not exist")), "{t}");
    let t = fails(&["pretrain", "--data", &m, "--out", &m, "--device", "cpu"]);
    assert!(
        t.contains(&format!("data directory {m} does not exist")),
        "{t}"
    );

    let t = fails(&["prepare", &s(&missing), "--out", &s(&tmp.path().join("d"))]);
    assert!(t.contains(&s(&missing)), "{t}");
    assert_eq!(t.matches("No such file or directory").count(), 1, "{t}");

    let toml = s(&tmp.path().join("absent.toml"));
    let t = fails(&[
        "pretrain",
        "--config",
        &toml,
        "--out",
        &s(&tmp.path().join("r")),
    ]);
    assert!(t.contains(&toml), "{t}");
    assert_eq!(t.matches("No such file or directory").count(), 1, "{t}");
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
}
