//! Resume equivalence: a run that crashes after step k and is resumed from its checkpoint
//! produces the same losses and the same final weights as one that never stopped.

use std::path::Path;
use topcoat::commands::prepare::EMBEDDED_CORPUS;
use topcoat::commands::pretrain::{PretrainJob, PretrainStage};
use topcoat::commands::stage::{self, TrainJob};
use topcoat::data::{self, PrepareOptions, Tokenizer};
use topcoat::runtime::Runtime;
use topcoat::train::checkpoint;

fn small_data(dir: &Path) {
    // A slice of the real embedded corpus, a small BPE, shards.
    let text = String::from_utf8_lossy(&EMBEDDED_CORPUS[..300_000]).into_owned();
    let cut = text.rfind('\n').unwrap();
    let src = dir.join("src.jsonl");
    std::fs::write(&src, &text[..cut + 1]).unwrap();
    let docs = data::prepare::read_documents(&[&src]).unwrap();
    let tok = Tokenizer::train_bpe(docs.iter().map(String::as_str), 512, |_, _| {}).unwrap();
    data::prepare(
        &[&src],
        &tok,
        &PrepareOptions::new(dir.join("data")),
        &|_| {},
    )
    .unwrap();
    tok.save(dir.join("data/tokenizer.json")).unwrap();
}

fn job(dir: &Path, out: &str, resume: bool) -> PretrainJob {
    let run = topcoat::config::RunConfig {
        batch_size: 2,
        seq_len: 32,
        total_batch_tokens: 128, // two micro-batches per step: accumulation is part of the state
        max_steps: 8,
        warmup_steps: 2,
        checkpoint_every: 4,
        val_every: 4,
        val_batches: 2,
        ..Default::default()
    };
    let stage = PretrainStage {
        data: dir.join("data"),
    };
    TrainJob {
        run,
        resume,
        quiet: true,
        ..TrainJob::new(stage, dir.join(out))
    }
}

fn pretrain(
    job: &PretrainJob,
    progress: &dyn Fn(&str),
) -> Result<topcoat::train::TrainSummary, topcoat::commands::CommandError> {
    stage::train(&Runtime::cpu(), job, progress)
}

fn losses(run_dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

#[test]
fn resumed_run_matches_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().unwrap();
    small_data(tmp.path());

    let straight = pretrain(&job(tmp.path(), "straight", false), &|_| {}).unwrap();
    assert_eq!(straight.final_step, 8);

    // The same run, crashed somewhere after step 4: only the step-4 checkpoint survived.
    pretrain(&job(tmp.path(), "crashed", false), &|_| {}).unwrap();
    let crashed = tmp.path().join("crashed");
    std::fs::remove_dir_all(checkpoint::dir_for(&crashed, 8)).unwrap();
    let resumed = pretrain(&job(tmp.path(), "crashed", true), &|_| {}).unwrap();
    assert_eq!(
        resumed.train_losses.first().map(|x| x.0),
        Some(5),
        "resume starts after step 4"
    );

    let a = losses(&tmp.path().join("straight"));
    let b = losses(&crashed);
    assert_eq!(a.len(), 8);
    assert_eq!(a, b, "per-step losses differ after resume");

    let wa = std::fs::read(
        checkpoint::dir_for(&tmp.path().join("straight"), 8).join("model.safetensors"),
    )
    .unwrap();
    let wb = std::fs::read(checkpoint::dir_for(&crashed, 8).join("model.safetensors")).unwrap();
    assert!(wa == wb, "final weights differ after resume");
}

#[test]
fn resuming_with_a_different_model_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    small_data(tmp.path());
    let mut j = job(tmp.path(), "run", false);
    j.run.max_steps = 4;
    pretrain(&j, &|_| {}).unwrap();
    let before = std::fs::read(checkpoint::dir_for(&j.out, 4).join("model.safetensors")).unwrap();

    let mut other = job(tmp.path(), "run", true);
    other.run.preset = "small".into();
    let err = pretrain(&other, &|_| {}).unwrap_err().to_string();
    assert!(
        err.contains("config.json") && err.contains("n_layer is 4 in the checkpoint but 6"),
        "{err}"
    );
    let after = std::fs::read(checkpoint::dir_for(&j.out, 4).join("model.safetensors")).unwrap();
    assert!(
        before == after,
        "a refused resume must not touch the checkpoint"
    );
}
