//! Data-parallel training as users start it: `topcoat launch` and the torchrun variables set by
//! hand give what one process gives with the same global batch (pretrain, ZeRO-1, sft packed or
//! not, dpo), a killed rank stops the others and the run resumes at another world size, and
//! set-up failures and `--collective nccl` on the CPU are named.

mod common;

use common::cli::{fails, prepare_small_corpus, s};
use std::path::Path;
use topcoat::train;

#[test]
fn nccl_on_the_cpu_is_refused_at_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    prepare_small_corpus(dir.path());
    let e = fails(&[
        "pretrain",
        "--data",
        &s(&dir.path().join("data")),
        "--out",
        &s(&dir.path().join("run")),
        "--device",
        "cpu",
        "--collective",
        "nccl",
    ]);
    assert!(e.contains("--collective nccl"), "{e}");
}

// ---- processes: `topcoat launch` and the torchrun variables by hand ------------------------

const BIN: &str = env!("CARGO_BIN_EXE_topcoat");

/// `pretrain` on the CPU, B=2, T=16, `steps` steps with a checkpoint every 2, global batch
/// `total` tokens, no validation.
fn pretrain(data: &Path, out: &Path, steps: usize, total: usize, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "pretrain",
        "--data",
        &s(data),
        "--out",
        &s(out),
        "--device",
        "cpu",
        "--max-steps",
        &steps.to_string(),
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--total-batch-tokens",
        &total.to_string(),
        "--val-every",
        "0",
        "--checkpoint-every",
        "2",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

fn launch(n: usize, args: &[String]) -> String {
    let mut a = vec![
        "launch".to_string(),
        "--nproc-per-node".into(),
        n.to_string(),
        "--".into(),
        BIN.into(),
    ];
    a.extend(args.iter().cloned());
    common::cli::ok(&a)
}

/// Each step record's step, loss and gradient norm, as written (no times).
fn curve(out: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get("loss").is_some())
        .map(|r| format!("{} {} {}", r["step"], r["loss"], r["grad_norm"]))
        .collect()
}

/// The newest checkpoint's model.safetensors.
fn final_weights(out: &Path) -> Vec<u8> {
    let dir = topcoat::train::checkpoint::latest(out)
        .unwrap()
        .expect("a checkpoint");
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

#[test]
fn launched_ranks_equal_one_process_bit_for_bit_and_zero_1_too() {
    let dir = tempfile::tempdir().unwrap();
    prepare_small_corpus(dir.path());
    let (data, p) = (dir.path().join("data"), |n: &str| dir.path().join(n));
    let zero = p("zero.toml");
    std::fs::write(&zero, "zero = 1\n").unwrap();
    for n in [2usize, 3] {
        let total = 2 * 16 * n;
        common::cli::ok(&pretrain(&data, &p(&format!("one{n}")), 4, total, &[]));
        let out = launch(n, &pretrain(&data, &p(&format!("dp{n}")), 4, total, &[]));
        assert!(
            out.contains(&format!("rank 0 of {n}")),
            "device line: {out}"
        );
        let one = curve(&p(&format!("one{n}")));
        assert_eq!(one.len(), 4);
        assert_eq!(curve(&p(&format!("dp{n}"))), one, "{n} ranks");
        assert!(final_weights(&p(&format!("dp{n}"))) == final_weights(&p(&format!("one{n}"))));
        let cfg = ["--config".to_string(), s(&zero)];
        let cfg: Vec<&str> = cfg.iter().map(|x| x.as_str()).collect();
        launch(n, &pretrain(&data, &p(&format!("z{n}")), 4, total, &cfg));
        assert_eq!(curve(&p(&format!("z{n}"))), one, "{n} ranks, zero 1");
        assert!(final_weights(&p(&format!("z{n}"))) == final_weights(&p(&format!("one{n}"))));
    }
}

/// A free TCP port on the loopback interface.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `topcoat args` as rank `rank` of `world` with torchrun's variables set by hand.
fn by_hand(
    rank: usize,
    world: usize,
    port: u16,
    args: &[String],
    extra_env: &[(&str, &str)],
) -> std::process::Child {
    let mut c = std::process::Command::new(BIN);
    c.args(args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in extra_env {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

/// Stated time for the surviving rank to exit after its peer dies (the dead rank's sockets
/// close at once; the collective names it on the next operation).
const FAULT_EXIT: std::time::Duration = std::time::Duration::from_secs(20);

#[test]
fn torchrun_variables_by_hand_train_and_a_killed_rank_stops_the_other_then_resume_continues() {
    let dir = tempfile::tempdir().unwrap();
    prepare_small_corpus(dir.path());
    let (data, p) = (dir.path().join("data"), |n: &str| dir.path().join(n));
    let total = 2 * 16 * 2;
    // The uninterrupted references: one process and two ranks, 6 steps.
    common::cli::ok(&pretrain(&data, &p("one"), 6, total, &[]));
    let port = free_port();
    let args = pretrain(&data, &p("hand"), 6, total, &[]);
    let kids: Vec<_> = (0..2).map(|r| by_hand(r, 2, port, &args, &[])).collect();
    for (r, k) in kids.into_iter().enumerate() {
        let o = k.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "rank {r}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert_eq!(curve(&p("hand")), curve(&p("one")));
    assert!(final_weights(&p("hand")) == final_weights(&p("one")));

    // Rank 1 aborts at step 3 (after the checkpoint of step 2): rank 0 exits with an error
    // naming rank 1, in the stated time, and the checkpoint of step 2 stays whole.
    let port = free_port();
    let args = pretrain(&data, &p("fault"), 6, total, &[]);
    let started = std::time::Instant::now();
    let kids: Vec<_> = (0..2)
        .map(|r| by_hand(r, 2, port, &args, &[(train::FAULT_ENV, "1:3")]))
        .collect();
    let outs: Vec<_> = kids
        .into_iter()
        .map(|k| k.wait_with_output().unwrap())
        .collect();
    let took = started.elapsed();
    let err0 = String::from_utf8_lossy(&outs[0].stderr).to_string();
    assert!(!outs[0].status.success() && !outs[1].status.success());
    assert!(err0.contains("rank 1"), "rank 0's error: {err0}");
    assert!(took < FAULT_EXIT, "{took:?}");
    let last = topcoat::train::checkpoint::latest(&p("fault"))
        .unwrap()
        .unwrap();
    assert!(
        last.ends_with(topcoat::train::checkpoint::dir_for(Path::new(""), 2)),
        "{}",
        last.display()
    );
    // (Resuming below reads it through its manifest's checksums.)

    // Resume it at world size 2 and at 1: both end with the uninterrupted run's weights.
    let copy = p("fault1");
    common::cli::copy_dir(&p("fault"), &copy);
    launch(2, &pretrain(&data, &p("fault"), 6, total, &["--resume"]));
    assert_eq!(
        curve(&p("fault")),
        curve(&p("one")),
        "resumed at world size 2"
    );
    assert!(final_weights(&p("fault")) == final_weights(&p("one")));
    common::cli::ok(&pretrain(&data, &copy, 6, total, &["--resume"]));
    assert_eq!(curve(&copy), curve(&p("one")), "resumed at world size 1");
    assert!(final_weights(&copy) == final_weights(&p("one")));
}

#[test]
fn launched_sft_ranks_equal_one_process_bit_for_bit_packed_or_not() {
    let dir = tempfile::tempdir().unwrap();
    prepare_small_corpus(dir.path());
    let (data, p) = (dir.path().join("data"), |n: &str| dir.path().join(n));
    common::cli::ok(&pretrain(&data, &p("base"), 2, 32, &[]));
    let words = ["one", "two", "three", "four", "five", "six", "seven"];
    let chats: Vec<String> = (0..40)
        .map(|i| {
            let ask = words[..1 + (i * 5) % 7].join(" ");
            format!(
                r#"{{"messages": [{{"role": "user", "content": "Repeat {ask} ({i})."}}, {{"role": "assistant", "content": "{ask}, done."}}]}}"#
            )
        })
        .collect();
    std::fs::write(p("chats.jsonl"), chats.join("\n")).unwrap();
    common::cli::ok(&[
        "prepare",
        "sft",
        &s(&p("chats.jsonl")),
        "--out",
        &s(&p("sft")),
        "--tokenizer",
        &s(&data),
    ]);
    for pack in [false, true] {
        let extra: &[&str] = if pack { &["--pack"] } else { &[] };
        let args = |out: &Path| tuning("sft", &p("base"), &p("sft"), out, extra);
        let what = format!("sft, pack = {pack}");
        two_ranks_equal_one(
            &args,
            &p(&format!("sft_one_{pack}")),
            &p(&format!("sft_dp_{pack}")),
            &what,
        );
    }
}

/// A fine-tuning command of these tests: `stage` from `init` on `data` into `out`, 3 steps of
/// 2 rows of 64 tokens, 256 tokens a step, no validation.
fn tuning(stage: &str, init: &Path, data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        stage,
        "--init",
        &s(init),
        "--data",
        &s(data),
        "--out",
        &s(out),
    ]
    .iter()
    .chain(&[
        "--device",
        "cpu",
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "--seq-len",
        "64",
        "--total-batch-tokens",
        "256",
        "--val-every",
        "0",
    ])
    .map(|x| x.to_string())
    .collect();
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

/// Runs `args(one)` in one process and `args(dp)` as two launched ranks: the same three step
/// records and the same final weights, bit for bit.
fn two_ranks_equal_one(args: &dyn Fn(&Path) -> Vec<String>, one: &Path, dp: &Path, what: &str) {
    common::cli::ok(&args(one));
    launch(2, &args(dp));
    let want = curve(one);
    assert_eq!(want.len(), 3, "{what}");
    assert_eq!(curve(dp), want, "{what}");
    assert!(final_weights(dp) == final_weights(one), "{what}");
}

/// dpo, reward and rl (each rank sampling its own prompts) as two launched ranks equal one
/// process with the same global batch.
#[test]
fn launched_preference_ranks_equal_one_process_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    prepare_small_corpus(dir.path());
    let (data, p) = (dir.path().join("data"), |n: &str| dir.path().join(n));
    common::cli::ok(&pretrain(&data, &p("base"), 2, 32, &[]));
    let things = [
        "the sky", "grass", "snow", "coal", "a lemon", "the sea", "milk", "a leaf",
    ];
    let lines: Vec<String> = (0..32)
        .map(|i| {
            let x = things[i % things.len()];
            serde_json::json!({
                "prompt": format!("What color is {x} ({i})?"),
                "chosen": format!("It is colour {i}."),
                "rejected": "no",
            })
            .to_string()
        })
        .collect();
    std::fs::write(p("prefs.jsonl"), lines.join("\n")).unwrap();
    common::cli::ok(&[
        "prepare",
        "prefs",
        &s(&p("prefs.jsonl")),
        "--out",
        &s(&p("prefs")),
        "--tokenizer",
        &s(&data),
    ]);
    for stage in ["dpo", "reward"] {
        let args = |out: &Path| tuning(stage, &p("base"), &p("prefs"), out, &[]);
        let (one, dp) = (p(&format!("{stage}_one")), p(&format!("{stage}_dp")));
        two_ranks_equal_one(&args, &one, &dp, stage);
    }
    let prompts: Vec<String> = lines
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            serde_json::json!({ "prompt": v["prompt"] }).to_string()
        })
        .collect();
    std::fs::write(p("prompts.jsonl"), prompts.join("\n")).unwrap();
    // tuning()'s `--data` becomes rl's `--reward`; 2 rows of 64 tokens are 2 prompts a step.
    let args = |out: &Path| {
        let mut a = tuning("rl", &p("base"), &p("reward_one"), out, &[]);
        a[3] = "--reward".into();
        a.extend(
            [
                "--prompts",
                &s(&p("prompts.jsonl")),
                "--max-new-tokens",
                "8",
            ]
            .map(String::from),
        );
        a
    };
    two_ranks_equal_one(&args, &p("rl_one"), &p("rl_dp"), "rl");
}

/// Set-up that writes shared files runs on rank 0 first; when it fails there, the other ranks
/// stop with rank 0's message rather than racing it or waiting out a timeout.
#[test]
fn a_set_up_failure_on_rank_0_stops_the_other_ranks_with_its_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let started = std::time::Instant::now();
    let t = common::cli::fails(&[
        "launch",
        "--nproc-per-node",
        "2",
        "--",
        BIN,
        "pretrain",
        "--out",
        &out.to_string_lossy(),
        "--device",
        "cpu",
        "--preset",
        "nope",
    ]);
    assert!(t.contains("unknown preset `nope`"), "{t}");
    assert!(
        t.contains("rank 0: failed before training: unknown preset `nope`"),
        "rank 1 names rank 0 and its error: {t}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "no rank waits for a timeout"
    );
    assert!(
        !out.join("data").exists(),
        "nothing was prepared for a run that cannot start"
    );
}

/// A launched run into a directory another process is using: rank 0 cannot lock it, says so,
/// and the other rank names rank 0 and the reason instead of training alone.
#[test]
fn a_launched_run_into_a_busy_directory_is_refused_on_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    prepare_small_corpus(dir.path());
    let out = dir.path().join("busy");
    let _held = topcoat::train::run_dir::RunDirLock::acquire(&out).unwrap();
    let mut args = vec!["launch", "--nproc-per-node", "2", "--", BIN];
    let run = pretrain(&dir.path().join("data"), &out, 2, 64, &[]);
    args.extend(run.iter().map(String::as_str));
    let t = fails(&args);
    assert!(t.contains("is in use by another topcoat process"), "{t}");
    assert!(
        t.contains("rank 0: pretrain failed to set up the run in"),
        "rank 1 names rank 0: {t}"
    );
    assert!(!out.join("metrics.jsonl").exists(), "nothing trained");
}
