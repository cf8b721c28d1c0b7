//! The demo's arc on one backend: each round's stage trained through the stage runner (a
//! finished stage reused, a stopped one resumed), then its model measured into the card.

use super::data::{self, Sources};
use super::measure::Asked;
use super::measure::Style;
use super::plan::{plan, DemoPlan};
use super::rounds::{load, Evaluation};
use super::{write_card, DemoJob};
use crate::backend::Backend;
use crate::commands::dpo::DpoStage;
use crate::commands::inputs::{data_tokenizer, TokenizerArg};
use crate::commands::prepare::{prepare_prefs, prepare_sft};
use crate::commands::pretrain::PretrainStage;
use crate::commands::report::card::{BaseRound, Replies, ReportCard, Sample, SftRound, StageRun};
use crate::commands::report::{Metrics, METRICS_FILE};
use crate::commands::reward::RewardStage;
use crate::commands::rl::RlStage;
use crate::commands::sft::SftStage;
use crate::commands::stage::{run_stage, Stage, TrainJob};
use crate::commands::CommandError;
use crate::config::RunConfig;
use crate::data::{
    self as dataset, DataError, PrefsPrepareOptions, PrepareOptions, SftPrepareOptions,
};
use crate::model::{Gpt, RewardModel};
use crate::runtime::Runtime;
use crate::stages::dpo::DpoLoss;
use crate::train::{checkpoint, io_err};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

type Result<T> = std::result::Result<T, CommandError>;

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// One demo run in progress on backend `be`.
struct Demo<'a, B: Backend> {
    be: &'a B,
    job: &'a DemoJob,
    plan: DemoPlan,
    src: Sources,
    eval: Evaluation,
    /// The prepared pretraining data (its tokenizer is every round's).
    pretrain_data: PathBuf,
    card: ReportCard,
    progress: &'a dyn Fn(&str),
}

/// Runs the whole arc on `be` and writes the card.
pub fn run<B: Backend + 'static>(
    be: &B,
    rt: &Runtime,
    job: &DemoJob,
    progress: &dyn Fn(&str),
) -> Result<ReportCard> {
    let start = Instant::now();
    let mut demo = Demo::open(be, rt, job, progress)?;
    let base_asked = demo.base_round()?;
    let (sft_asked, mut sft_model) = demo.sft_round()?;
    let mut rm = demo.reward_round()?;
    let dpo_asked = demo.dpo_round(&mut sft_model, &mut rm, &sft_asked)?;
    let rl_asked = demo.rl_round(&mut sft_model, &mut rm, &sft_asked)?;
    demo.samples(&[
        ("base", &base_asked),
        ("sft", &sft_asked),
        ("dpo", &dpo_asked),
        ("rl", &rl_asked),
    ]);
    demo.card.wall_s = start.elapsed().as_secs_f64();
    let path = write_card(&job.out, &demo.card)?;
    progress(&format!("wrote {}", path.display()));
    Ok(demo.card)
}

impl<'a, B: Backend + 'static> Demo<'a, B> {
    /// The plan for the runtime's device, the data (written or opened, pretraining shards
    /// prepared) and the evaluation sets.
    fn open(be: &'a B, rt: &Runtime, job: &'a DemoJob, progress: &'a dyn Fn(&str)) -> Result<Self> {
        let plan = plan(rt.kind(), job.quick, job.seed);
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
        let pretrain_data = prepare_pretrain(
            &src,
            &out.join("data").join("pretrain"),
            plan.vocab_size,
            progress,
        )?;
        let tok = data_tokenizer(&pretrain_data)?;
        let eval = Evaluation::open(&src, tok, &plan)?;
        let card = ReportCard {
            version: 1,
            device: rt.description().to_string(),
            preset: plan.pretrain.preset.clone(),
            data: job
                .data
                .as_ref()
                .map_or("embedded (data/demo)".into(), |d| d.display().to_string()),
            ..ReportCard::default()
        };
        Ok(Self {
            be,
            job,
            plan,
            src,
            eval,
            pretrain_data,
            card,
            progress,
        })
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.job.out.join(name)
    }

    /// Trains stage `n` of 5 into `dir` unless its final checkpoint exists (resuming from an
    /// earlier one), then reads its timing from `metrics.jsonl` into the card.
    fn train<S: Stage>(
        &mut self,
        n: usize,
        dir: &str,
        stage: S,
        run: &RunConfig,
        keep_checkpoints: usize,
    ) -> Result<()> {
        let (dir, progress) = (self.dir(dir), self.progress);
        let done = checkpoint::list(&dir)?;
        if done.iter().any(|(s, _)| *s == run.max_steps) {
            progress(&format!(
                "[{n}/5] {}: {} holds the final checkpoint (step {}); reusing it",
                S::NAME,
                dir.display(),
                run.max_steps
            ));
        } else {
            progress(&format!(
                "[{n}/5] {}: {} steps of {} rows x {} tokens{} -> {}",
                S::NAME,
                run.max_steps,
                run.batch_size,
                run.seq_len,
                match done.last() {
                    None => String::new(),
                    Some((step, _)) => format!(", resuming from step {step}"),
                },
                dir.display()
            ));
            let job = TrainJob {
                run: run.clone(),
                out: dir.clone(),
                // A stage stopped before its first checkpoint starts afresh (`--resume` on a
                // directory with no checkpoint), its partial metrics replaced.
                resume: true,
                overwrite: false,
                keep_checkpoints,
                quiet: false,
                stage,
            };
            run_stage(self.be, &crate::train::solo(), &job, progress)?;
        }
        self.card.stages.push(stage_timing(S::NAME, &dir)?);
        Ok(())
    }

    /// Round one: pretraining, then the base model asked plainly and probed for knowledge.
    fn base_round(&mut self) -> Result<Asked> {
        let stage = PretrainStage {
            data: self.pretrain_data.clone(),
        };
        let run = self.plan.pretrain.clone();
        self.train(1, "base", stage, &run, 3)?;
        let (val_start, val_end) = val_loss_span(&self.dir("base"))?;
        let be = self.be;
        let mut model = load(be, &self.dir("base"))?;
        let asked = self.eval.ask(be, &model, Style::Plain)?;
        self.card.base = BaseRound {
            val_loss_start: val_start,
            val_loss: val_end,
            replies: self.eval.replies(&asked),
            knowledge_probe: self.eval.knowledge_probe(be, &mut model)?,
        };
        let base = &self.card.base;
        (self.progress)(&format!(
            "base: val loss {val_start:.3} -> {val_end:.3}; asked `What does 'X' mean?`, it goes \
             on with a question {} of the time, answers {}; knows the right gloss of held-out \
             lemmas {}, of control lemmas {}",
            pct(base.replies.question_rate),
            pct(base.replies.answer_rate),
            probe(&base.knowledge_probe, "heldout"),
            probe(&base.knowledge_probe, "control")
        ));
        Ok(asked)
    }

    /// Round two: instruction tuning from the base model, then the SFT model asked in the chat
    /// template and probed.
    fn sft_round(&mut self) -> Result<(Asked, Gpt<B>)> {
        let data = self.job.out.join("data").join("sft");
        let opts = SftPrepareOptions {
            max_len: self.plan.sft.seq_len + 1,
            seed: self.job.seed,
            ..SftPrepareOptions::new(&data)
        };
        let tokenizer = TokenizerArg::Path(self.pretrain_data.clone());
        prepare_sft(&self.src.file("sft.jsonl"), &tokenizer, &opts)?;
        let stage = SftStage {
            init: self.dir("base"),
            data,
        };
        let run = self.plan.sft.clone();
        self.train(2, "sft", stage, &run, 3)?;
        let be = self.be;
        let mut model = load(be, &self.dir("sft"))?;
        let asked = self.eval.ask(be, &model, Style::Chat)?;
        self.card.sft = SftRound {
            replies: self.eval.replies(&asked),
            heldout_pref_accuracy: self.eval.heldout_pref_accuracy(be, &mut model)?,
            knowledge_probe: self.eval.knowledge_probe(be, &mut model)?,
        };
        let sft = &self.card.sft;
        let f1 = |r: &Replies, g: &str| r.groups.get(g).map_or(0.0, |s| s.f1);
        (self.progress)(&format!(
            "sft: answers {} of questions; token F1 train {:.3}, held-out {:.3}, control {:.3}; \
             knows the right gloss of held-out lemmas {}, of control lemmas {}",
            pct(sft.replies.answer_rate),
            f1(&sft.replies, "train"),
            f1(&sft.replies, "heldout"),
            f1(&sft.replies, "control"),
            probe(&sft.knowledge_probe, "heldout"),
            probe(&sft.knowledge_probe, "control")
        ));
        Ok((asked, model))
    }

    /// Round three, first part: the reward model on the preference pairs, measured on pairs.
    fn reward_round(&mut self) -> Result<RewardModel<B>> {
        let prefs = self.prefs_data();
        let opts = PrefsPrepareOptions {
            max_len: self.plan.reward.seq_len,
            seed: self.job.seed,
            ..PrefsPrepareOptions::new(&prefs)
        };
        let tokenizer = TokenizerArg::Path(self.pretrain_data.clone());
        prepare_prefs(&self.src.file("prefs.jsonl"), &tokenizer, &opts)?;
        let stage = RewardStage {
            init: self.dir("sft"),
            data: prefs,
        };
        let run = self.plan.reward.clone();
        self.train(3, "reward", stage, &run, 3)?;
        let mut rm = RewardModel::new(load(self.be, &self.dir("reward"))?)?;
        self.card.reward = self.eval.reward_round(self.be, &mut rm)?;
        (self.progress)(&format!(
            "reward model: held-out pair accuracy {} (training pairs {})",
            pct(self.card.reward.heldout_pair_accuracy),
            pct(self.card.reward.train_pair_accuracy)
        ));
        Ok(rm)
    }

    fn prefs_data(&self) -> PathBuf {
        self.job.out.join("data").join("prefs")
    }

    /// Round three, DPO: from the SFT model on the same pairs, measured against SFT.
    fn dpo_round(
        &mut self,
        sft_model: &mut Gpt<B>,
        rm: &mut RewardModel<B>,
        sft_asked: &Asked,
    ) -> Result<Asked> {
        let stage = DpoStage {
            init: self.dir("sft"),
            data: self.prefs_data(),
            beta: self.plan.dpo_beta,
            loss: DpoLoss::Sigmoid,
        };
        let run = self.plan.dpo.clone();
        self.train(4, "dpo", stage, &run, 3)?;
        let be = self.be;
        let mut policy = load(be, &self.dir("dpo"))?;
        let (round, asked) = self
            .eval
            .policy_round(be, &mut policy, sft_model, rm, sft_asked)?;
        self.card.dpo = round;
        let (dpo, sft) = (&self.card.dpo, &self.card.sft);
        (self.progress)(&format!(
            "dpo: held-out preference accuracy {} (sft {}), win rate vs sft {}, KL {:.2}",
            pct(dpo.heldout_pref_accuracy),
            pct(sft.heldout_pref_accuracy),
            pct(dpo.win_rate_vs_sft),
            dpo.kl_to_sft
        ));
        Ok(asked)
    }

    /// Round three, RL: from the SFT model against the reward model, measured against SFT;
    /// every checkpoint kept becomes a point of the reward-vs-KL trajectory.
    fn rl_round(
        &mut self,
        sft_model: &mut Gpt<B>,
        rm: &mut RewardModel<B>,
        sft_asked: &Asked,
    ) -> Result<Asked> {
        let plan = &self.plan;
        let stage = RlStage {
            k: plan.rl_k,
            kl_coef: plan.rl_kl_coef,
            max_new_tokens: plan.rl_max_new,
            ..RlStage::new(
                self.dir("sft"),
                self.dir("reward"),
                self.src.file("rl_prompts.jsonl"),
            )
        };
        let run = plan.rl.clone();
        self.train(5, "rl", stage, &run, 0)?;
        let be = self.be;
        let mut policy = load(be, &self.dir("rl"))?;
        let (round, asked) = self
            .eval
            .policy_round(be, &mut policy, sft_model, rm, sft_asked)?;
        self.card.rl = round;
        (self.progress)("rl: evaluating every checkpoint for the reward-vs-KL trajectory");
        let mut sft_again = load(be, &self.dir("sft"))?;
        let start = self.eval.rl_point(be, 0, &mut sft_again, sft_model, rm)?;
        self.card.rl_trajectory.push(start);
        for (step, path) in checkpoint::list(&self.dir("rl"))? {
            let mut policy = checkpoint::load_model(be, &path, None)?;
            let point = self.eval.rl_point(be, step, &mut policy, sft_model, rm)?;
            self.card.rl_trajectory.push(point);
        }
        let rl = &self.card.rl;
        (self.progress)(&format!(
            "rl: held-out preference accuracy {}, win rate vs sft {}, KL {:.2}",
            pct(rl.heldout_pref_accuracy),
            pct(rl.win_rate_vs_sft),
            rl.kl_to_sft
        ));
        Ok(asked)
    }

    /// The sample questions with every round's reply, side by side.
    fn samples(&mut self, rounds: &[(&str, &Asked)]) {
        for i in self.eval.sample_indices() {
            let q = &self.eval.questions[i];
            self.card.samples.push(Sample {
                prompt: q.prompt.clone(),
                group: q.group.clone(),
                reference: q.reference.clone(),
                replies: rounds
                    .iter()
                    .map(|(round, a)| (round.to_string(), a.texts[i].clone()))
                    .collect(),
            });
        }
    }
}

/// A knowledge-probe group's rate, as a percentage.
fn probe(p: &BTreeMap<String, f64>, group: &str) -> String {
    pct(p.get(group).copied().unwrap_or(0.0))
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
    // Older versions kept the split inputs inside the dataset directory.
    let _ = std::fs::remove_dir_all(dir.join("split"));
    // The split inputs live beside the dataset, which is made in one prepare call.
    let name = dir
        .file_name()
        .map_or("pretrain".into(), |n| n.to_string_lossy());
    let split = dir.with_file_name(format!("{name}.split"));
    std::fs::create_dir_all(&split).map_err(io_err(&split))?;
    let (train_in, val_in) = (split.join("train.jsonl"), split.join("val.jsonl"));
    let (ntr, nva) = data::split_corpus(&src.file("corpus.jsonl"), &train_in, &val_in)?;
    let docs = dataset::prepare::read_documents(&[&train_in])?;
    progress(&format!(
        "corpus: {ntr} training documents, {nva} validation documents; training a {vocab}-token BPE"
    ));
    let tok = dataset::Tokenizer::train_bpe(docs.iter().map(String::as_str), vocab, |_, _| {})?;
    let opts = PrepareOptions {
        val_inputs: Some(vec![val_in.clone()]),
        ..PrepareOptions::new(dir)
    };
    let s = dataset::prepare(&[&train_in], &tok, &opts, &|_| {})?;
    progress(&format!(
        "prepared {}: {} train tokens, {} val tokens",
        dir.display(),
        s.tokens_train,
        s.tokens_val
    ));
    Ok(dir.to_path_buf())
}
