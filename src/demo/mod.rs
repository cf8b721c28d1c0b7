//! `topcoat demo`: the three rounds of training on the embedded demo data, measured.
//!
//! One command runs pretrain -> SFT -> reward model -> DPO -> RL on the data set of
//! `data/demo/` (WordNet definitions and FAQ pages, `data.rs`), at sizes picked for the device
//! (`plan.rs`), measures each round's model as it finishes (`rounds.rs`, `measure.rs`) and ends
//! with the report card (`card.rs`), written to `RUN/report_card.json`, and its HTML page
//! (`crate::report`, `RUN/report.html`). Layout of `RUN`:
//! `data/` (the source files and the prepared shards), `base/`, `sft/`, `reward/`, `dpo/`,
//! `rl/` (each a run directory with `metrics.jsonl` and checkpoints).
//!
//! Restarting: a stage whose final checkpoint exists is reused, one with an earlier checkpoint
//! resumes from it, so a stopped demo continues where it stopped; the measurements are taken
//! again (they are deterministic), and the card is written atomically at the end.

pub mod card;
mod data;
mod measure;
mod plan;
mod rounds;
pub mod table; // the card as Markdown tables (rounds, stage timings, samples)

pub use card::ReportCard;
pub use data::{read_questions, FILES};
pub use measure::{is_question, token_f1, Question};
pub use plan::{plan, DemoPlan};

use crate::backend::{cpu::CpuBackend, cuda::CudaBackend, Backend};
use crate::config::RunConfig;
use crate::data::{
    self as dataset, DataError, PrefsPrepareOptions, PrepareOptions, SftPrepareOptions,
};
use crate::model::RewardModel;
use crate::report::{write_report, Metrics, ReportError, METRICS_FILE, REPORT_FILE};
use crate::run::{self, DeviceKind, DpoJob, PretrainJob, RewardJob, RlJob, SftJob};
use crate::stages::dpo::DpoLoss;
use crate::train::{checkpoint, io_err, TrainError};
use card::{BaseRound, Sample, SftRound, StageRun, CARD_FILE};
use measure::Style;
use rounds::{load, Evaluation};
use std::path::{Path, PathBuf};
use std::time::Instant;

type Result<T> = std::result::Result<T, TrainError>;

/// A demo run as the CLI describes it.
pub struct DemoJob {
    /// The demo run directory.
    pub out: PathBuf,
    /// A demo data directory (the files of [`FILES`]); `None` uses the embedded set.
    pub data: Option<PathBuf>,
    pub device: DeviceKind,
    /// What `resolve_device` said about the device (recorded in the card).
    pub device_name: String,
    /// A reduced run of a few minutes.
    pub quick: bool,
    pub seed: u64,
}

/// Why a demo stopped.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Report(#[from] ReportError),
}

/// Runs the demo and returns its card (also written to `out/report_card.json`, and rendered
/// to `out/report.html`).
pub fn demo(job: &DemoJob, progress: &dyn Fn(&str)) -> std::result::Result<ReportCard, DemoError> {
    let card = match job.device {
        DeviceKind::Cpu => demo_on(&CpuBackend, job, progress),
        DeviceKind::Cuda => CudaBackend::new(0)
            .map_err(TrainError::from)
            .and_then(|be| demo_on(&be, job, progress)),
    }?;
    let page = job.out.join(REPORT_FILE);
    let summary = write_report(&job.out, &page)?;
    progress(&format!(
        "wrote {} ({} plots)",
        summary.path.display(),
        summary.plots
    ));
    Ok(card)
}

/// Trains one stage unless its final checkpoint exists (resuming from an earlier one), then
/// reads its timing from `metrics.jsonl`.
fn stage(
    n: usize,
    name: &str,
    dir: &Path,
    run: &RunConfig,
    progress: &dyn Fn(&str),
    train: impl FnOnce(bool) -> Result<()>,
) -> Result<StageRun> {
    let done = checkpoint::list(dir)?;
    if done.iter().any(|(s, _)| *s == run.max_steps) {
        progress(&format!(
            "[{n}/5] {name}: {} holds the final checkpoint (step {}); reusing it",
            dir.display(),
            run.max_steps
        ));
    } else {
        progress(&format!(
            "[{n}/5] {name}: {} steps of {} rows x {} tokens{} -> {}",
            run.max_steps,
            run.batch_size,
            run.seq_len,
            if done.is_empty() {
                String::new()
            } else {
                format!(", resuming from step {}", done[done.len() - 1].0)
            },
            dir.display()
        ));
        train(!done.is_empty())?;
    }
    stage_timing(name, dir)
}

/// A stage's `metrics.jsonl` (the report's reader; a bad line is an error naming it).
fn stage_metrics(dir: &Path) -> Result<Metrics> {
    Metrics::read(&dir.join(METRICS_FILE))
        .map_err(|e| DataError::InvalidArgument(e.to_string()).into())
}

/// Steps, wall time and throughput of a finished stage, from its `metrics.jsonl`.
fn stage_timing(name: &str, dir: &Path) -> Result<StageRun> {
    let m = stage_metrics(dir)?;
    let elapsed = m.series("elapsed_s");
    let (steps, wall) = elapsed.last().copied().unwrap_or((0.0, 0.0));
    let tokens: f64 = m.series("tokens").iter().map(|&(_, t)| t).sum();
    Ok(StageRun {
        name: name.into(),
        dir: dir
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        steps: steps as usize,
        wall_s: wall,
        tokens_per_s: if wall > 0.0 { tokens / wall } else { 0.0 },
    })
}

/// The first and last validation loss of a run's `metrics.jsonl`.
fn val_loss_span(dir: &Path) -> Result<(f64, f64)> {
    let vals = stage_metrics(dir)?.series("val_loss");
    match (vals.first(), vals.last()) {
        (Some(&(_, a)), Some(&(_, b))) => Ok((a, b)),
        _ => Err(DataError::InvalidArgument(format!(
            "{}: no validation record (`val_every` must be positive)",
            dir.join(METRICS_FILE).display()
        ))
        .into()),
    }
}

/// The pretraining shards: a BPE trained on the corpus, the corpus minus the validation
/// documents as the train split, those documents as the val split (`data.rs`).
fn prepare_pretrain(
    src: &data::Sources,
    dir: &Path,
    vocab: usize,
    progress: &dyn Fn(&str),
) -> Result<PathBuf> {
    if dir.join("tokenizer.json").exists() && dir.join("val_000000.bin").exists() {
        return Ok(dir.to_path_buf());
    }
    let split = dir.join("split");
    std::fs::create_dir_all(&split).map_err(io_err(&split))?;
    let (train_in, val_in) = (split.join("train.jsonl"), split.join("val.jsonl"));
    let (ntr, nva) = data::split_corpus(&src.file("corpus.jsonl"), &train_in, &val_in)?;
    let docs = dataset::prepare::read_documents(&[&train_in])?;
    progress(&format!(
        "corpus: {ntr} training documents, {nva} validation documents; training a {vocab}-token BPE"
    ));
    let tok = dataset::Tokenizer::train_bpe(docs.iter().map(String::as_str), vocab, |_, _| {})?;
    let no_val = |out: &Path| PrepareOptions {
        val_fraction: 0.0,
        ..PrepareOptions::new(out)
    };
    let tr = dataset::prepare(&[&train_in], &tok, &no_val(dir), &|_| {})?;
    let val_dir = split.join("val");
    let va = dataset::prepare(&[&val_in], &tok, &no_val(&val_dir), &|_| {})?;
    // `train_files` are full paths: the val input was prepared as a train split of its own.
    for (i, from) in va.train_files.iter().enumerate() {
        let to = dir.join(format!("val_{i:06}.bin"));
        std::fs::rename(from, &to).map_err(io_err(from))?;
    }
    tok.save(dir.join("tokenizer.json"))?;
    progress(&format!(
        "prepared {}: {} train tokens, {} val tokens",
        dir.display(),
        tr.tokens_train,
        va.tokens_train
    ));
    Ok(dir.to_path_buf())
}

/// Writes `card` to `dir/report_card.json` through a temporary file and a rename.
pub fn write_card(dir: &Path, card: &ReportCard) -> Result<PathBuf> {
    let path = dir.join(CARD_FILE);
    let tmp = dir.join(format!(".{CARD_FILE}.tmp"));
    let text = serde_json::to_string_pretty(card).expect("the card serialises");
    std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    Ok(path)
}

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

fn demo_on<B: Backend>(be: &B, job: &DemoJob, progress: &dyn Fn(&str)) -> Result<ReportCard> {
    let start = Instant::now();
    let plan = plan(job.device, job.quick, job.seed);
    let out = &job.out;
    let src = match &job.data {
        Some(d) => data::open_dir(d)?,
        None => data::write_embedded(&out.join("data").join("src"))?,
    };
    progress(&format!(
        "demo: pretrain -> sft -> reward model -> dpo -> rl, `{}` preset{}, data {}",
        plan.pretrain.preset,
        if job.quick { " (quick)" } else { "" },
        src.dir.display()
    ));
    let pre_data = prepare_pretrain(
        &src,
        &out.join("data").join("pretrain"),
        plan.vocab_size,
        progress,
    )?;
    let tok = run::data_tokenizer(&pre_data)?;
    let eval = Evaluation::open(&src, tok.clone(), &plan)?;
    let dir = |name: &str| out.join(name);
    let mut card = ReportCard {
        version: 1,
        device: job.device_name.clone(),
        preset: plan.pretrain.preset.clone(),
        data: job
            .data
            .as_ref()
            .map_or("embedded (data/demo)".into(), |d| d.display().to_string()),
        ..ReportCard::default()
    };

    // Round one: pretraining.
    card.stages.push(stage(
        1,
        "pretrain",
        &dir("base"),
        &plan.pretrain,
        progress,
        |resume| {
            let job = PretrainJob {
                run: plan.pretrain.clone(),
                data: Some(pre_data.clone()),
                out: dir("base"),
                resume,
                device: job.device,
                quiet: false,
            };
            run::pretrain(&job, progress).map(|_| ())
        },
    )?);
    let (val_start, val_end) = val_loss_span(&dir("base"))?;
    let mut base_model = load(be, &dir("base"))?;
    let base_asked = eval.ask(be, &base_model, Style::Plain)?;
    card.base = BaseRound {
        val_loss_start: val_start,
        val_loss: val_end,
        replies: eval.replies(&base_asked),
        knowledge_probe: eval.knowledge_probe(be, &mut base_model)?,
    };
    drop(base_model);
    let probe = |p: &std::collections::BTreeMap<String, f64>, g: &str| {
        pct(p.get(g).copied().unwrap_or(0.0))
    };
    progress(&format!(
        "base: val loss {val_start:.3} -> {val_end:.3}; asked `What does 'X' mean?`, it goes on \
         with a question {} of the time, answers {}; knows the right gloss of held-out lemmas {}, \
         of control lemmas {}",
        pct(card.base.replies.question_rate),
        pct(card.base.replies.answer_rate),
        probe(&card.base.knowledge_probe, "heldout"),
        probe(&card.base.knowledge_probe, "control")
    ));

    // Round two: instruction tuning.
    let sft_data = out.join("data").join("sft");
    let sft_opts = SftPrepareOptions {
        max_len: plan.sft.seq_len + 1,
        seed: job.seed,
        ..SftPrepareOptions::new(&sft_data)
    };
    run::prepare_sft(&src.file("sft.jsonl"), &pre_data, &sft_opts)?;
    card.stages.push(stage(
        2,
        "sft",
        &dir("sft"),
        &plan.sft,
        progress,
        |resume| {
            let j = SftJob {
                run: plan.sft.clone(),
                init: dir("base"),
                data: sft_data.clone(),
                out: dir("sft"),
                resume,
                device: job.device,
                quiet: false,
            };
            run::sft(&j, progress).map(|_| ())
        },
    )?);
    let mut sft_model = load(be, &dir("sft"))?;
    let sft_asked = eval.ask(be, &sft_model, Style::Chat)?;
    card.sft = SftRound {
        replies: eval.replies(&sft_asked),
        heldout_pref_accuracy: eval.heldout_pref_accuracy(be, &mut sft_model)?,
        knowledge_probe: eval.knowledge_probe(be, &mut sft_model)?,
    };
    let f1 = |r: &card::Replies, g: &str| r.groups.get(g).map_or(0.0, |s| s.f1);
    progress(&format!(
        "sft: answers {} of questions; token F1 train {:.3}, held-out {:.3}, control {:.3}; \
         knows the right gloss of held-out lemmas {}, of control lemmas {}",
        pct(card.sft.replies.answer_rate),
        f1(&card.sft.replies, "train"),
        f1(&card.sft.replies, "heldout"),
        f1(&card.sft.replies, "control"),
        probe(&card.sft.knowledge_probe, "heldout"),
        probe(&card.sft.knowledge_probe, "control")
    ));

    // Round three: reward model, DPO, RL.
    let prefs_data = out.join("data").join("prefs");
    let prefs_opts = PrefsPrepareOptions {
        max_len: plan.reward.seq_len,
        seed: job.seed,
        ..PrefsPrepareOptions::new(&prefs_data)
    };
    run::prepare_prefs(&src.file("prefs.jsonl"), &pre_data, &prefs_opts)?;
    card.stages.push(stage(
        3,
        "reward",
        &dir("reward"),
        &plan.reward,
        progress,
        |resume| {
            let j = RewardJob {
                run: plan.reward.clone(),
                init: dir("sft"),
                data: prefs_data.clone(),
                out: dir("reward"),
                resume,
                device: job.device,
                quiet: false,
            };
            run::reward(&j, progress).map(|_| ())
        },
    )?);
    let mut rm = RewardModel::new(load(be, &dir("reward"))?)?;
    card.reward = eval.reward_round(be, &mut rm)?;
    progress(&format!(
        "reward model: held-out pair accuracy {} (training pairs {})",
        pct(card.reward.heldout_pair_accuracy),
        pct(card.reward.train_pair_accuracy)
    ));

    card.stages.push(stage(
        4,
        "dpo",
        &dir("dpo"),
        &plan.dpo,
        progress,
        |resume| {
            let j = DpoJob {
                run: plan.dpo.clone(),
                init: dir("sft"),
                data: prefs_data.clone(),
                out: dir("dpo"),
                resume,
                device: job.device,
                quiet: false,
                beta: plan.dpo_beta,
                loss: DpoLoss::Sigmoid,
            };
            run::dpo(&j, progress).map(|_| ())
        },
    )?);
    let (dpo_round, dpo_asked) = eval.policy_round(
        be,
        &mut load(be, &dir("dpo"))?,
        &mut sft_model,
        &mut rm,
        &sft_asked,
    )?;
    card.dpo = dpo_round;
    progress(&format!(
        "dpo: held-out preference accuracy {} (sft {}), win rate vs sft {}, KL {:.2}",
        pct(card.dpo.heldout_pref_accuracy),
        pct(card.sft.heldout_pref_accuracy),
        pct(card.dpo.win_rate_vs_sft),
        card.dpo.kl_to_sft
    ));

    card.stages
        .push(stage(5, "rl", &dir("rl"), &plan.rl, progress, |resume| {
            let j = RlJob {
                run: plan.rl.clone(),
                init: dir("sft"),
                reward: dir("reward"),
                prompts: src.file("rl_prompts.jsonl"),
                out: dir("rl"),
                resume,
                device: job.device,
                quiet: false,
                k: plan.rl_k,
                kl_coef: plan.rl_kl_coef,
                clip: 0.2,
                max_new: plan.rl_max_new,
                epochs: 2,
                keep_checkpoints: 0,
            };
            run::rl(&j, progress).map(|_| ())
        })?);
    let (rl_round, rl_asked) = eval.policy_round(
        be,
        &mut load(be, &dir("rl"))?,
        &mut sft_model,
        &mut rm,
        &sft_asked,
    )?;
    card.rl = rl_round;
    progress("rl: evaluating every checkpoint for the reward-vs-KL trajectory");
    let mut sft_again = load(be, &dir("sft"))?;
    card.rl_trajectory
        .push(eval.rl_point(be, 0, &mut sft_again, &mut sft_model, &mut rm)?);
    for (step, path) in checkpoint::list(&dir("rl"))? {
        let mut policy = checkpoint::load_model(be, &path, None)?;
        card.rl_trajectory
            .push(eval.rl_point(be, step, &mut policy, &mut sft_model, &mut rm)?);
    }
    progress(&format!(
        "rl: held-out preference accuracy {}, win rate vs sft {}, KL {:.2}",
        pct(card.rl.heldout_pref_accuracy),
        pct(card.rl.win_rate_vs_sft),
        card.rl.kl_to_sft
    ));

    for i in eval.sample_indices() {
        let q = &eval.questions[i];
        card.samples.push(Sample {
            prompt: q.prompt.clone(),
            group: q.group.clone(),
            reference: q.reference.clone(),
            replies: [
                ("base", &base_asked),
                ("sft", &sft_asked),
                ("dpo", &dpo_asked),
                ("rl", &rl_asked),
            ]
            .iter()
            .map(|(round, a)| (round.to_string(), a.texts[i].clone()))
            .collect(),
        });
    }
    card.wall_s = start.elapsed().as_secs_f64();
    let path = write_card(out, &card)?;
    progress(&format!("wrote {}", path.display()));
    Ok(card)
}
