//! The run directory survives misuse: one process at a time (a lock that a killed process
//! does not leave behind), no fresh run over an earlier one without `--overwrite`, a diverging
//! run that keeps a good checkpoint to resume from, and resumes that refuse settings the data
//! position cannot carry over. Each case runs the binary and checks the named error and that
//! no file of the run changed.

mod common;
use common::cli::{fails, ok, prepare_small_corpus, snapshot};

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use topcoat::backend::cpu::CpuBackend;
use topcoat::train::checkpoint;

/// A small pretraining command on `DIR/data` into `out`, then `extra` flags (which replace
/// the small defaults they name).
fn pretrain_args(dir: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let (data, out) = (dir.join("data"), out.to_string_lossy());
    let mut args: Vec<String> = vec![
        "pretrain".into(),
        "--data".into(),
        data.to_string_lossy().into_owned(),
        "--out".into(),
        out.into_owned(),
        "--device".into(),
        "cpu".into(),
    ];
    for (flag, value) in [
        ("--batch-size", "2"),
        ("--seq-len", "32"),
        ("--val-every", "0"),
        ("--warmup-steps", "1"),
    ] {
        if !extra.contains(&flag) {
            args.extend([flag.to_string(), value.to_string()]);
        }
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn steps_logged(run: &Path) -> Vec<u64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect()
}

#[test]
fn a_second_process_on_a_locked_run_directory_is_refused_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    prepare_small_corpus(tmp.path());
    let run = tmp.path().join("run");
    ok(&strs(&pretrain_args(
        tmp.path(),
        &run,
        &["--max-steps", "2"],
    )));

    // Another process holds the lock (this test, writing what topcoat writes there).
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(run.join(".lock"))
        .unwrap();
    lock.try_lock().unwrap();
    std::fs::write(run.join(".lock"), "4242 topcoat pretrain --out elsewhere\n").unwrap();
    let before = snapshot(&run);
    let err = fails(&strs(&pretrain_args(
        tmp.path(),
        &run,
        &["--max-steps", "4", "--resume"],
    )));
    assert!(
        err.contains(&format!(
            "run directory {} is in use by another topcoat process (pid 4242, topcoat pretrain \
             --out elsewhere); wait for it to finish or choose another --out",
            run.display()
        )),
        "{err}"
    );
    assert!(before == snapshot(&run), "a refused run changed the run");
    drop(lock);
    ok(&strs(&pretrain_args(
        tmp.path(),
        &run,
        &["--max-steps", "4", "--resume"],
    )));
    assert_eq!(steps_logged(&run), vec![1, 2, 3, 4]);
}

#[test]
fn a_killed_run_holds_the_lock_while_alive_and_leaves_none_behind() {
    let tmp = tempfile::tempdir().unwrap();
    prepare_small_corpus(tmp.path());
    let run = tmp.path().join("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_topcoat"))
        .args(strs(&pretrain_args(
            tmp.path(),
            &run,
            &["--max-steps", "1000000", "--checkpoint-every", "3"],
        )))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();
    let started = Instant::now();
    while !std::fs::read_to_string(run.join(".lock")).is_ok_and(|s| s.starts_with(&pid))
        || !run.join("metrics.jsonl").exists()
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the run never started"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = fails(&strs(&pretrain_args(
        tmp.path(),
        &tmp.path().join("run"),
        &["--max-steps", "2", "--overwrite"],
    )));
    assert!(
        err.contains(&format!(
            "is in use by another topcoat process (pid {pid}, "
        )) && err.contains("pretrain"),
        "{err}"
    );
    // kill -9: the .lock file stays, with the dead process's pid in it, and must not block.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(std::fs::read_to_string(run.join(".lock"))
        .unwrap()
        .starts_with(&pid));
    ok(&strs(&pretrain_args(
        tmp.path(),
        &run,
        &["--max-steps", "2", "--overwrite"],
    )));
    assert_eq!(steps_logged(&run), vec![1, 2]);
    assert_eq!(
        checkpoint::list(&run).unwrap().len(),
        1,
        "{:?}",
        names(&run)
    );
}

#[test]
fn a_fresh_run_over_an_earlier_one_is_refused_unless_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    prepare_small_corpus(tmp.path());
    let run = tmp.path().join("run");
    ok(&strs(&pretrain_args(
        tmp.path(),
        &run,
        &["--max-steps", "4", "--checkpoint-every", "2"],
    )));
    let before = snapshot(&run);
    let err = fails(&strs(&pretrain_args(
        tmp.path(),
        &run,
        &["--max-steps", "3"],
    )));
    assert!(
        err.contains(&format!(
            "run directory {} already holds a run (ckpt_000002, ckpt_000004, metrics.jsonl); \
             continue it with --resume, or start over with --overwrite (which deletes them), or \
             choose another --out",
            run.display()
        )),
        "{err}"
    );
    assert!(before == snapshot(&run), "a refused run changed the run");

    let err = fails(&strs(&pretrain_args(
        tmp.path(),
        &run,
        &["--max-steps", "3", "--overwrite", "--resume"],
    )));
    assert!(
        err.contains("--overwrite") && err.contains("--resume") && err.contains("cannot be used"),
        "{err}"
    );
    assert!(before == snapshot(&run), "a refused run changed the run");

    ok(&strs(&pretrain_args(
        tmp.path(),
        &run,
        &["--max-steps", "3", "--overwrite", "--checkpoint-every", "0"],
    )));
    assert_eq!(names(&run), vec![".lock", "ckpt_000003", "metrics.jsonl"]);
    assert_eq!(steps_logged(&run), vec![1, 2, 3]);
}

/// Whether every weight and optimizer moment of checkpoint `dir` is finite.
fn all_finite(dir: &Path) -> bool {
    let be = CpuBackend::new();
    let mut model = checkpoint::load_model(&be, dir, None).unwrap();
    let (opt, _) = checkpoint::load_training(&be, dir, &mut model, "pretrain").unwrap();
    let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
    model.param_values(&be).unwrap().iter().all(|v| finite(v))
        && opt
            .m
            .iter()
            .chain(&opt.v)
            .flatten()
            .all(|b| finite(&topcoat::backend::Backend::download(&be, b).unwrap()))
}

#[test]
fn a_diverging_run_keeps_a_good_checkpoint_that_resume_continues() {
    let tmp = tempfile::tempdir().unwrap();
    prepare_small_corpus(tmp.path());
    let run = tmp.path().join("run");
    ok(&strs(&pretrain_args(
        tmp.path(),
        &run,
        &["--max-steps", "3", "--checkpoint-every", "1"],
    )));
    // Resumed with an absurd learning rate and a checkpoint every step: the first update
    // explodes the weights, the next step's loss shows it.
    let err = fails(&strs(&pretrain_args(
        tmp.path(),
        &run,
        &[
            "--max-steps",
            "10",
            "--checkpoint-every",
            "1",
            "--lr",
            "1000",
            "--resume",
        ],
    )));
    let good = checkpoint::dir_for(&run, 3);
    assert!(
        err.contains("training diverged at step 5: loss ")
            && err.contains("(lowest so far ")
            && err.contains(&format!(
                "the last good checkpoint is {}; lower the learning rate and resume",
                good.display()
            )),
        "{err}"
    );
    // The step-4 checkpoint holds the exploded weights: set aside, not resumable.
    assert!(
        run.join("ckpt_000004.diverged").is_dir(),
        "{:?}",
        names(&run)
    );
    let kept: Vec<usize> = checkpoint::list(&run)
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    // Pruning (keep 3) removed step 1 when step 4 was saved; step 3, the last good one, stays.
    assert_eq!(kept, vec![2, 3], "{:?}", names(&run));
    for (_, dir) in checkpoint::list(&run).unwrap() {
        assert!(
            all_finite(&dir),
            "{} holds non-finite values",
            dir.display()
        );
    }

    let out = ok(&strs(&pretrain_args(
        tmp.path(),
        &run,
        &["--max-steps", "5", "--resume", "--lr", "0.003"],
    )));
    assert!(
        out.contains("resuming from") && out.contains("(step 3)"),
        "{out}"
    );
    assert_eq!(steps_logged(&run), vec![1, 2, 3, 4, 5]);
}

#[test]
fn a_run_that_diverges_from_the_start_saves_nothing_resumable() {
    let tmp = tempfile::tempdir().unwrap();
    prepare_small_corpus(tmp.path());
    let run = tmp.path().join("run");
    let err = fails(&strs(&pretrain_args(
        tmp.path(),
        &run,
        &[
            "--max-steps",
            "10",
            "--checkpoint-every",
            "1",
            "--lr",
            "1000",
        ],
    )));
    assert!(
        err.contains("training diverged at step 2: loss ")
            && err.contains("no checkpoint of this run is known good; lower the learning rate and start over with --overwrite"),
        "{err}"
    );
    assert!(
        checkpoint::list(&run).unwrap().is_empty(),
        "{:?}",
        names(&run)
    );
}

#[test]
fn resume_refuses_a_new_batch_size_and_notes_a_new_learning_rate() {
    let tmp = tempfile::tempdir().unwrap();
    prepare_small_corpus(tmp.path());
    let run = tmp.path().join("run");
    ok(&strs(&pretrain_args(
        tmp.path(),
        &run,
        &["--max-steps", "2", "--checkpoint-every", "1"],
    )));
    let before = snapshot(&run);
    let err = fails(&strs(&pretrain_args(
        tmp.path(),
        &run,
        &[
            "--max-steps",
            "4",
            "--resume",
            "--batch-size",
            "4",
            "--seed",
            "9",
        ],
    )));
    assert!(
        err.contains(&format!(
            "cannot resume from {}: it was trained with other data settings (batch_size 2 -> 4, \
             seed 1337 -> 9)",
            checkpoint::dir_for(&run, 2).display()
        )) && err.contains("resume with the original values, or start a new run in another --out"),
        "{err}"
    );
    assert!(before == snapshot(&run), "a refused resume changed the run");

    let err = fails(&strs(&pretrain_args(
        tmp.path(),
        &run,
        &["--max-steps", "1", "--resume"],
    )));
    assert!(
        err.contains("it is at step 2, past the requested max_steps 1"),
        "{err}"
    );
    assert!(before == snapshot(&run), "a refused resume changed the run");

    let out = ok(&strs(&pretrain_args(
        tmp.path(),
        &run,
        &[
            "--max-steps",
            "4",
            "--resume",
            "--lr",
            "0.001",
            "--checkpoint-every",
            "1",
        ],
    )));
    assert!(
        out.contains("(step 2) with learning_rate 0.003 -> 0.001, max_steps 2 -> 4"),
        "{out}"
    );
    assert_eq!(steps_logged(&run), vec![1, 2, 3, 4]);
}
