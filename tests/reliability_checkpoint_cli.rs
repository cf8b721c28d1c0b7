//! Checkpoint integrity where a user meets it, on the command line: a corrupt newest
//! checkpoint, a run directory of another stage, a reward model as `--init` and a stale
//! temporary directory, each a named error (or no obstacle) that changes no file.

mod common;
use common::cli::{assert_unchanged, copy_dir, fails, ok, prepare_small_corpus, s, snapshot};
use common::safetensors_data_start as data_start;

use std::path::Path;
use topcoat::backend::cpu::CpuBackend;
use topcoat::train::checkpoint::{self};
use topcoat::train::manifest::Manifest;

// ---------------------------------------------------------------- helpers

/// Flips 64 bytes of tensor data in `path`.
fn flip_64_data_bytes(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let start = data_start(&bytes) + 16;
    assert!(bytes.len() >= start + 64, "{}: too small", path.display());
    for b in &mut bytes[start..start + 64] {
        *b ^= 0xA5;
    }
    std::fs::write(path, bytes).unwrap();
}

const RUN_FLAGS: [&str; 12] = [
    "--device",
    "cpu",
    "--batch-size",
    "2",
    "--seq-len",
    "16",
    "--val-every",
    "0",
    "--warmup-steps",
    "1",
    "--checkpoint-every",
    "2",
];

/// `dir/data` (a corpus with a 280-token BPE), `dir/pre` (a 4-step pretrain run: ckpt_000002
/// and ckpt_000004).
fn pretrain_run(dir: &Path) {
    prepare_small_corpus(dir);
    let mut args = vec![
        "pretrain".to_string(),
        "--data".into(),
        s(&dir.join("data")),
        "--out".into(),
        s(&dir.join("pre")),
        "--max-steps".into(),
        "4".into(),
    ];
    args.extend(RUN_FLAGS.iter().map(|a| a.to_string()));
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

/// `pretrain --resume` of `run` with the flags of [`pretrain_run`] (4 steps).
fn pretrain_resume_args(dir: &Path, run: &Path) -> Vec<String> {
    let mut args = vec![
        "pretrain".to_string(),
        "--data".into(),
        s(&dir.join("data")),
        "--out".into(),
        s(run),
        "--max-steps".into(),
        "4".into(),
        "--resume".into(),
    ];
    args.extend(RUN_FLAGS.iter().map(|a| a.to_string()));
    args
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

// ---------------------------------------------------------------- CLI: corrupt files

#[test]
fn resume_refuses_a_corrupt_newest_checkpoint_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pretrain_run(dir);
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let run = dir.join(format!("run_{file}"));
        copy_dir(&dir.join("pre"), &run);
        let newest = run.join("ckpt_000004");
        flip_64_data_bytes(&newest.join(file));
        let before = snapshot(&run);
        let t = fails(&strs(&pretrain_resume_args(dir, &run)));
        assert!(
            t.contains(&format!(
                "checkpoint {}: {file} is corrupt (SHA-256 mismatch",
                newest.display()
            )) && t.contains(&format!("move {} aside", newest.display())),
            "{file}: {t}"
        );
        assert_unchanged(&run, &before);
        assert!(
            run.join("ckpt_000002").is_dir(),
            "the older checkpoint is kept"
        );

        // The advice works: with the corrupt one moved aside, the run resumes from step 2.
        std::fs::rename(&newest, dir.join(format!("aside_{file}"))).unwrap();
        let t = ok(&strs(&pretrain_resume_args(dir, &run)));
        assert!(t.contains("ckpt_000002 (step 2)"), "{t}");
        assert!(
            checkpoint::load_config(&newest).is_ok(),
            "step 4 saved again"
        );
    }
}

// ---------------------------------------------------------------- CLI: stages

#[test]
fn a_run_directory_belongs_to_one_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pretrain_run(dir);
    let p = |n: &str| s(&dir.join(n));
    let chat = r#"{"messages": [{"role": "user", "content": "a cat?"}, {"role": "assistant", "content": "A cat is a small animal."}]}"#;
    std::fs::write(dir.join("chats.jsonl"), format!("{chat}\n").repeat(8)).unwrap();
    ok(&[
        "prepare",
        "sft",
        &p("chats.jsonl"),
        "--out",
        &p("sftdata"),
        "--tokenizer",
        &p("data"),
    ]);
    let pair = r#"{"prompt": "a cat?", "chosen": "A cat is a small animal.", "rejected": "No."}"#;
    std::fs::write(dir.join("prefs.jsonl"), format!("{pair}\n").repeat(8)).unwrap();
    ok(&[
        "prepare",
        "prefs",
        &p("prefs.jsonl"),
        "--out",
        &p("prefs"),
        "--tokenizer",
        &p("data"),
    ]);
    let stage = |cmd: &str, init: &str, data: &str, out: &str, resume: bool| -> Vec<String> {
        let mut a: Vec<String> = [
            cmd,
            "--init",
            &p(init),
            "--data",
            &p(data),
            "--out",
            &p(out),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        a.extend(["--max-steps", "2"].map(String::from));
        a.extend(RUN_FLAGS.iter().map(|x| x.to_string()));
        if resume {
            a.push("--resume".into());
        }
        a
    };
    ok(&strs(&stage("sft", "pre", "sftdata", "sft", false)));
    ok(&strs(&stage("reward", "sft", "prefs", "rw", false)));
    let before: Vec<_> = ["pre", "sft", "rw", "data", "sftdata", "prefs"]
        .iter()
        .map(|n| (n.to_string(), snapshot(&dir.join(n))))
        .collect();

    // pretrain --resume on an sft run.
    let t = fails(&strs(&pretrain_resume_args(dir, &dir.join("sft"))));
    assert!(
        t.contains(&format!("run directory {} was written by `sft`", p("sft")))
            && t.contains("this is `pretrain`")
            && t.contains("train_state.json stage")
            && t.contains("use a new --out or the `sft` command"),
        "{t}"
    );
    // sft --resume on a reward run.
    let t = fails(&strs(&stage("sft", "pre", "sftdata", "rw", true)));
    assert!(
        t.contains(&format!(
            "run directory {} was written by `reward`",
            p("rw")
        )) && t.contains("this is `sft`"),
        "{t}"
    );
    // sft / dpo --init of a reward run: the reward model is a scorer.
    for (cmd, data) in [("sft", "sftdata"), ("dpo", "prefs")] {
        let out = format!("{cmd}_from_rw");
        let t = fails(&strs(&stage(cmd, "rw", data, &out, false)));
        assert!(
            t.contains("holds a reward model (reward_head.weight)")
                && t.contains(&format!("cannot start `{cmd}`"))
                && t.contains("rl --reward"),
            "{cmd}: {t}"
        );
        assert!(!dir.join(&out).exists(), "{cmd}: no run directory made");
    }
    for (name, snap) in &before {
        assert_unchanged(&dir.join(name), snap);
    }
}

// ---------------------------------------------------------------- CLI: stale temp dirs

#[test]
fn a_stale_temp_directory_does_not_block_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pretrain_run(dir);
    let run = dir.join("pre");
    // What a save of step 4 killed part-way leaves: ckpt_000002, and a temp dir with a
    // half-written file; and one named like the newest checkpoint, for good measure.
    std::fs::rename(run.join("ckpt_000004"), dir.join("aside")).unwrap();
    for name in [".ckpt_000002.tmp", ".ckpt_000004.tmp"] {
        std::fs::create_dir_all(run.join(name)).unwrap();
        std::fs::write(run.join(name).join("model.safetensors"), b"half").unwrap();
    }
    let t = ok(&strs(&pretrain_resume_args(dir, &run)));
    assert!(t.contains("ckpt_000002 (step 2)"), "{t}");
    assert!(
        !run.join(".ckpt_000004.tmp").exists(),
        "replaced by the save"
    );
    let ckpt4 = run.join("ckpt_000004");
    let m = Manifest::read(&ckpt4).unwrap();
    assert_eq!(m.files.len(), 5);
    let mut model = checkpoint::load_model(&CpuBackend, &ckpt4, None).unwrap();
    checkpoint::load_training(&CpuBackend, &ckpt4, &mut model, "pretrain").unwrap();
    // Exact resume: the same bytes as the uninterrupted run's step 4.
    for file in ["model.safetensors", "optimizer.safetensors"] {
        assert!(
            std::fs::read(ckpt4.join(file)).unwrap()
                == std::fs::read(dir.join("aside").join(file)).unwrap(),
            "{file}"
        );
    }
}
