//! Kill-and-resume soak: the `topcoat` binary is killed (SIGKILL) at random moments of training,
//! checkpointing and `prepare`, and every time the run directory or dataset it leaves behind
//! must be consistent and the resumed run must continue bit for bit.
//!
//! - Training: a pretrain run that checkpoints every step is killed `TOPCOAT_SOAK_KILLS` times
//!   (default 20) and resumed with `--resume` each time until it finishes. Its per-step metrics
//!   and its final weights must equal those of the same run done without a stop, and after
//!   every kill each checkpoint left behind must load whole (every file matching its manifest).
//! - Prepare: a dataset directory is re-prepared from one of two inputs, alternately, and killed
//!   at random moments. After every kill the directory must equal, file for file and byte for
//!   byte, one of the two complete preparations.
//!
//! `TOPCOAT_SOAK_SEED` picks the kill moments (default fixed); `scripts/soak.sh` runs this file
//! with many kills and fresh seeds for as long as asked.

mod common;
use common::cli::snapshot;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use topcoat::backend::cpu::CpuBackend;
use topcoat::train::checkpoint;

fn command() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_topcoat"));
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// splitmix64: the kill moments, reproducible from the seed.
struct Moments(u64);

impl Moments {
    fn next_below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n.max(1)
    }
}

/// Runs `cmd` to completion, panicking with its stderr when it fails.
fn run_ok(cmd: &mut Command, what: &str) -> Duration {
    let start = Instant::now();
    let out = cmd.output().expect("running topcoat");
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    start.elapsed()
}

/// Starts `cmd` and kills it after `after`; returns whether it finished on its own first
/// (panicking if it failed on its own).
fn run_and_kill(cmd: &mut Command, after: Duration, what: &str) -> bool {
    let mut child = cmd.spawn().expect("starting topcoat");
    let deadline = Instant::now() + after;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for topcoat") {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            assert!(status.success(), "{what} failed on its own:\n{err}");
            return true;
        }
        if Instant::now() >= deadline {
            child.kill().expect("SIGKILL");
            child.wait().expect("reaping topcoat");
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A small corpus of `docs` documents whose words depend on `salt`.
fn corpus(path: &Path, docs: usize, salt: usize) {
    let words = [
        "river", "stone", "lantern", "harbor", "meadow", "copper", "violet", "thunder", "orchard",
        "glacier", "saddle", "whisper",
    ];
    let mut text = String::new();
    for d in 0..docs {
        let body: Vec<&str> = (0..120)
            .map(|i| words[(d * 7 + i * (salt + 3) + i / 5) % words.len()])
            .collect();
        text.push_str(&serde_json::json!({ "text": body.join(" ") + "." }).to_string());
        text.push('\n');
    }
    std::fs::write(path, text).unwrap();
}

/// The training records of metrics.jsonl without their clock-dependent fields.
fn records(run_dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("metrics.jsonl line {l:?}: {e}"));
            let obj = v.as_object_mut().unwrap();
            obj.retain(|k, _| !k.contains("per_s") && !k.ends_with("elapsed_s"));
            v
        })
        .collect()
}

fn newest_checkpoint(run_dir: &Path) -> PathBuf {
    let mut ckpts: Vec<PathBuf> = std::fs::read_dir(run_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("ckpt_"))
                .is_some_and(|s| s.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    ckpts.sort();
    ckpts.pop().expect("a checkpoint")
}

/// Every `ckpt_<step>` a killed run left must load whole: weights, moments and state, each
/// file matching its manifest.
fn every_checkpoint_loads(run_dir: &Path) {
    let be = CpuBackend::new();
    for (step, dir) in checkpoint::list(run_dir).unwrap() {
        let mut model = checkpoint::load_model(&be, &dir, None)
            .unwrap_or_else(|e| panic!("checkpoint of step {step} after a kill: {e}"));
        let (_, state) = checkpoint::load_training(&be, &dir, &mut model, "pretrain")
            .unwrap_or_else(|e| panic!("checkpoint of step {step} after a kill: {e}"));
        assert_eq!(state.step, step);
    }
}

#[test]
fn killed_training_resumes_bit_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s).to_string_lossy().into_owned();
    corpus(&tmp.path().join("corpus.jsonl"), 40, 0);
    run_ok(
        command().args([
            "prepare",
            &p("corpus.jsonl"),
            "--out",
            &p("data"),
            "--tokenizer",
            "bpe",
            "--vocab-size",
            "300",
        ]),
        "prepare",
    );
    let train = |out: &str| {
        let mut c = command();
        c.args([
            "pretrain",
            "--data",
            &p("data"),
            "--out",
            &p(out),
            "--resume",
            "--device",
            "cpu",
            "--threads",
            "1",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--max-steps",
            "30",
            "--checkpoint-every",
            "1",
            "--val-every",
            "5",
        ]);
        c
    };
    let straight_took = run_ok(&mut train("straight"), "the uninterrupted run");

    let kills = env_or("TOPCOAT_SOAK_KILLS", 20);
    let mut moments = Moments(env_or("TOPCOAT_SOAK_SEED", 0x50A6));
    // Kill moments spread over a whole run's length, start-up included.
    let span_ms = straight_took.as_millis() as u64 + 50;
    let mut killed = 0;
    while killed < kills {
        let after = Duration::from_millis(moments.next_below(span_ms));
        if run_and_kill(&mut train("killed"), after, "a resumed run") {
            // It finished before the kill: start over so every kill lands inside a run.
            std::fs::remove_dir_all(tmp.path().join("killed")).unwrap();
        } else {
            killed += 1;
            every_checkpoint_loads(&tmp.path().join("killed"));
        }
    }
    run_ok(&mut train("killed"), "the last resume");

    let (a, b) = (tmp.path().join("straight"), tmp.path().join("killed"));
    assert_eq!(
        records(&a),
        records(&b),
        "metrics differ after {kills} kills"
    );
    let weights = |d: &Path| std::fs::read(newest_checkpoint(d).join("model.safetensors")).unwrap();
    assert!(
        weights(&a) == weights(&b),
        "final weights differ after {kills} kills"
    );
    assert_eq!(newest_checkpoint(&b).file_name().unwrap(), "ckpt_000030");
}

#[test]
fn killed_prepare_leaves_one_whole_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |s: &str| tmp.path().join(s).to_string_lossy().into_owned();
    corpus(&tmp.path().join("a.jsonl"), 300, 0);
    corpus(&tmp.path().join("b.jsonl"), 200, 5);
    run_ok(
        command().args([
            "tokenizer",
            "train",
            &p("a.jsonl"),
            "--out",
            &p("tok.json"),
            "--vocab-size",
            "300",
        ]),
        "tokenizer train",
    );
    let prepare = |input: &str, out: &str| {
        let mut c = command();
        c.args([
            "prepare",
            &p(input),
            "--out",
            &p(out),
            "--tokenizer",
            &p("tok.json"),
            "--shard-tokens",
            "2000",
        ]);
        c
    };
    let took = run_ok(&mut prepare("a.jsonl", "ref_a"), "prepare a");
    run_ok(&mut prepare("b.jsonl", "ref_b"), "prepare b");
    let (ref_a, ref_b) = (
        snapshot(&tmp.path().join("ref_a")),
        snapshot(&tmp.path().join("ref_b")),
    );
    assert!(ref_a != ref_b);
    run_ok(&mut prepare("a.jsonl", "data"), "the first prepare");

    let kills = env_or("TOPCOAT_SOAK_KILLS", 20);
    let mut moments = Moments(env_or("TOPCOAT_SOAK_SEED", 0x50A6) ^ 0xDA7A);
    let span_ms = took.as_millis() as u64 + 20;
    for i in 0..kills {
        let input = if i % 2 == 0 { "b.jsonl" } else { "a.jsonl" };
        let after = Duration::from_millis(moments.next_below(span_ms));
        run_and_kill(&mut prepare(input, "data"), after, "prepare");
        let now = snapshot(&tmp.path().join("data"));
        assert!(
            now == ref_a || now == ref_b,
            "after kill {i} ({after:?} into a prepare of {input}) the dataset is neither \
             preparation: {:?}",
            now.keys().collect::<Vec<_>>()
        );
        // Nothing stranded beside it but what the next prepare clears.
        let stray: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".data") && !n.contains("prepare") && !n.ends_with("lock"))
            .collect();
        assert!(stray.is_empty(), "stray files after kill {i}: {stray:?}");
    }
    // The next prepare clears whatever a killed one left beside the dataset.
    run_ok(&mut prepare("a.jsonl", "data"), "a prepare after the kills");
    assert!(snapshot(&tmp.path().join("data")) == ref_a);
    let left: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".data") && n.contains("prepare"))
        .collect();
    assert!(
        left.is_empty(),
        "staging left after a finished prepare: {left:?}"
    );
}
