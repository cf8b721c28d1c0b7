//! The stage runner: the set-up every training command shares, written once.
//!
//! A training command (`pretrain`, `sft`, `reward`, `dpo`, `rl`) is a [`TrainJob`]: the run
//! config, the run directory and what is the stage's own (a [`Stage`]: its starting weights,
//! its data, its objective). [`run_stage`] does the rest in one order for every stage:
//! 1. take the rank and world size from the runtime (the launcher's), refusing a run config
//!    that names others;
//! 2. resolve the starting checkpoint (a checkpoint, or a run directory's newest) and load its
//!    tokenizer and model config (refusing a reward model where a policy is meant, and shape
//!    overrides that differ from the checkpoint's), or, for a fresh model, the data's
//!    tokenizer and the preset with the shape overrides ([`RunConfig::model_config`]);
//! 3. the preflight (`preflight.rs`): the run config's values, the memory plan against the
//!    device (printed as a budget; a run that does not fit is refused with the flag that
//!    would make it fit), and on `--resume` the checkpoint's tokenizer against the data's;
//!    then refuse data prepared with a different tokenizer, naming the command that
//!    prepares it;
//! 4. refuse a `seq_len` past the model's context;
//! 5. rank 0 alone: lock the run directory (`train::run_dir`; held until the loop returns) and
//!    refuse a fresh run over an earlier one unless `overwrite`;
//! 6. open the stage's objective on the backend ([`Stage::open`]), then, with `overwrite`,
//!    rank 0 deletes the earlier run's files; the other ranks wait until rank 0 has done its
//!    set-up, and a failure there reaches them through the collective;
//! 7. build the model (fresh, from the checkpoint, or with a reward head; with `lora_rank`,
//!    the checkpoint frozen with fresh adapters beside it, a reward head training in full),
//!    set its activation recompute level, let the stage finish its set-up with the model
//!    ([`Stage::with_model`]: DPO's reference pass with the adapters off), and run the shared
//!    loop (`train::train`); then print the measured peak memory beside the plan's total.
//!
//! Adding a stage: its objective in `stages/`, a [`Stage`] impl in a command module, its CLI
//! arguments, and one line where the binary lists the commands.

use super::inputs::{check_tokenizers, data_tokenizer, resolve_checkpoint};
use super::CommandError;
use crate::backend::Backend;
use crate::config::{lora_line, ConfigError, ModelConfig, RunConfig};
use crate::data::Tokenizer;
use crate::dist::{Collective, DistError, RankInfo};
use crate::model::{BatchFlag, Gpt};
use crate::runtime::Runtime;
use crate::stages::PreparedData;
use crate::train::run_dir::{self, RunDirLock};
use crate::train::{self, checkpoint, Objective, TrainOptions, TrainSummary};
use std::path::{Path, PathBuf};
use std::rc::Rc;

pub type Result<T> = std::result::Result<T, CommandError>;

/// Where a stage's starting weights come from.
#[derive(Clone, Copy, Debug)]
pub enum Init<'a> {
    /// GPT-2 initialisation of the run config's preset, drawn from the run's seed; the
    /// tokenizer is the data directory's.
    Fresh { data: &'a Path },
    /// The weights and tokenizer of this checkpoint (or run directory: its newest checkpoint).
    Checkpoint(&'a Path),
    /// As `Checkpoint`, plus a scalar reward head: the checkpoint's own, or a new one drawn
    /// from the run's seed.
    CheckpointWithRewardHead(&'a Path),
}

/// What the runner resolved before the stage opens its objective.
pub struct StageContext<'a> {
    pub run: &'a RunConfig,
    /// The run directory.
    pub out: &'a Path,
    pub resume: bool,
    /// The starting checkpoint, resolved (`None` for a fresh model).
    pub checkpoint: Option<PathBuf>,
    /// The model's shape (the checkpoint's, or the preset's for the tokenizer's vocabulary);
    /// with LoRA, the checkpoint's with the run's adapters (`model.lora`).
    pub model: ModelConfig,
    /// The model's tokenizer.
    pub tokenizer: Tokenizer,
}

impl StageContext<'_> {
    /// The prepared data in `dir`, drawn as the run config says.
    pub fn prepared<'d>(&self, dir: &'d Path) -> PreparedData<'d> {
        PreparedData {
            dir,
            batch_size: self.run.batch_size,
            seq_len: self.run.seq_len,
            seed: self.run.seed,
            vocab_size: self.model.vocab_size,
            pad: self.tokenizer.eot(),
            val_batches: self.run.val_batches,
            ranks: crate::data::RankSlice {
                rank: self.run.rank,
                world: self.run.world_size,
            },
        }
    }

    /// The resolved starting checkpoint of a stage that starts from one (`--init`).
    pub fn starting_checkpoint(&self) -> Result<&Path> {
        self.checkpoint.as_deref().ok_or_else(|| {
            ConfigError::Invalid("this stage starts from a checkpoint, and none was given".into())
                .into()
        })
    }
}

/// What one training stage adds to the shared set-up.
pub trait Stage {
    /// The stage's name: its log lines and its checkpoints' `train_state.stage`.
    const NAME: &'static str;

    /// The stage's objective on backend `B`.
    type Objective<B: Backend + 'static>: Objective<B>;

    /// The run config this stage starts from (a TOML file and the flags override it).
    fn defaults() -> RunConfig;

    /// Where the starting weights come from.
    fn init(&self) -> Init<'_>;

    /// The prepared data this stage reads and the command that prepares it (`prepare sft`),
    /// checked against the model's tokenizer; `None` when it reads none that way.
    fn data(&self) -> Option<(&Path, &'static str)>;

    /// How the stage counts `--batch-size` (rows per unit, its step) and whether it takes
    /// `--lora-rank`: the memory plan's rows and the flag its advice names.
    fn batch_flag(&self) -> BatchFlag {
        BatchFlag::ROWS_LORA
    }

    /// The models `open` will hold beside the trained one, for the memory plan (none by
    /// default; RL: its reward model, and its reference without LoRA).
    fn held_models(&self, ctx: &StageContext) -> Result<Vec<super::preflight::HeldModel>> {
        let _ = ctx;
        Ok(Vec::new())
    }

    /// Opens the objective (its data, and any models it holds on `be`), printing what it found.
    fn open<B: Backend + 'static>(
        &self,
        be: &B,
        ctx: &StageContext,
        progress: &dyn Fn(&str),
    ) -> Result<Self::Objective<B>>;

    /// The stage's set-up that needs the model the loop trains, once it is built (before a
    /// resume restores its weights): DPO's reference pass of a LoRA run, with the adapters
    /// off. Nothing by default.
    fn with_model<B: Backend + 'static>(
        &self,
        be: &B,
        ctx: &StageContext,
        objective: &mut Self::Objective<B>,
        model: &mut Gpt<B>,
        progress: &dyn Fn(&str),
    ) -> Result<()> {
        let _ = (be, ctx, objective, model, progress);
        Ok(())
    }
}

/// The fine-tuning stages' starting run config (`tiny` preset): 100 steps with 5 of warm-up,
/// validation every 25 and a checkpoint every 50, at peak rate `learning_rate`.
pub fn tuning_defaults(learning_rate: f32) -> RunConfig {
    RunConfig {
        learning_rate,
        max_steps: 100,
        warmup_steps: 5,
        val_every: 25,
        checkpoint_every: 50,
        ..RunConfig::default()
    }
}

/// A training command: the shared run settings and the stage's own.
pub struct TrainJob<S> {
    pub run: RunConfig,
    /// The run directory: metrics.jsonl and checkpoints.
    pub out: PathBuf,
    /// Continue from the newest checkpoint in `out`.
    pub resume: bool,
    /// Start afresh in an `out` that holds an earlier run, deleting its checkpoints and metrics
    /// (without it such a run is refused).
    pub overwrite: bool,
    /// Keep only the newest this many checkpoints (0 keeps all).
    pub keep_checkpoints: usize,
    /// No progress lines from the loop (tests).
    pub quiet: bool,
    pub stage: S,
}

impl<S: Stage> TrainJob<S> {
    /// A job with the stage's defaults, keeping the newest 3 checkpoints, with progress output.
    pub fn new(stage: S, out: impl Into<PathBuf>) -> Self {
        Self {
            run: S::defaults(),
            out: out.into(),
            resume: false,
            overwrite: false,
            keep_checkpoints: 3,
            quiet: false,
            stage,
        }
    }
}

/// Runs `job` on the runtime's backend; returns the summary (checkpoints in `job.out`).
pub fn train<S: Stage>(
    rt: &Runtime,
    job: &TrainJob<S>,
    progress: &dyn Fn(&str),
) -> Result<TrainSummary> {
    crate::on_backend!(rt, be, comm => run_stage(be, comm, job, progress))
}

/// `run` with the launcher's rank and world size; a run config that names others (anything
/// but the single-process defaults) is refused, naming the launcher's values.
pub fn ranked(run: &RunConfig, info: &RankInfo, stage: &str) -> Result<RunConfig> {
    let named = (run.rank, run.world_size);
    if named != (0, 1) && named != (info.rank, info.world_size) {
        return Err(ConfigError::Invalid(format!(
            "{stage}: the run config sets rank = {}, world_size = {}, but this process is rank \
             {} of {} ({}); remove rank and world_size from the config (the launcher sets them: \
             `topcoat launch`, torchrun, srun or mpirun)",
            run.rank, run.world_size, info.rank, info.world_size, info.launcher
        ))
        .into());
    }
    Ok(RunConfig {
        rank: info.rank,
        world_size: info.world_size,
        ..run.clone()
    })
}

/// Runs `job` on `be`: the shared set-up of the module header, then the loop.
pub fn run_stage<S: Stage, B: Backend + 'static>(
    be: &B,
    comm: &Rc<dyn Collective<B>>,
    job: &TrainJob<S>,
    progress: &dyn Fn(&str),
) -> Result<TrainSummary> {
    let run = &ranked(&job.run, comm.info(), S::NAME)?;
    let writer = comm.info().is_writer();
    let quiet = |_: &str| {};
    let progress: &dyn Fn(&str) = if writer { progress } else { &quiet };
    let ctx = resolve(job, run)?;
    let data = job.stage.data().map(|(dir, _)| dir);
    let held = job.stage.held_models(&ctx)?;
    let plan = super::preflight::check(be, &ctx, data, job.stage.batch_flag(), &held)?;
    let bytes = |r| be.element_bytes(r);
    let storage = super::plan::storage_name(&bytes);
    let budget = super::plan::budget(&ctx.model, &plan, &storage, be.memory_available());
    progress(budget.trim_end());
    if let Some((data, prepared_by)) = job.stage.data() {
        if let Some(ckpt) = &ctx.checkpoint {
            check_tokenizers(
                ckpt,
                &ctx.tokenizer,
                data,
                &data_tokenizer(data)?,
                prepared_by,
            )?;
        }
    }
    if run.seq_len > ctx.model.max_seq_len {
        return Err(ConfigError::Invalid(format!(
            "seq_len {} exceeds the model's context (max_seq_len {}) of {}",
            run.seq_len,
            ctx.model.max_seq_len,
            ctx.checkpoint.as_ref().map_or_else(
                || match run.context {
                    Some(n) => format!("the {} preset with context (--context) {n}", run.preset),
                    None => format!("the {} preset", run.preset),
                },
                |c| c.display().to_string()
            )
        ))
        .into());
    }
    let (_lock, mut objective) = if writer {
        let set_up = || -> Result<_> {
            // Held until the loop returns (a caller on this thread that holds it shares it).
            let lock = RunDirLock::acquire(&job.out)?;
            let earlier = run_dir::check_fresh(&lock, job.resume, job.overwrite)?;
            let objective = job.stage.open(be, &ctx, progress)?;
            run_dir::clear_earlier_run(&lock, &earlier)?;
            Ok((Some(lock), objective))
        };
        let done = set_up();
        if comm.world_size() > 1 {
            let said = done
                .as_ref()
                .err()
                .map_or(Vec::new(), |e| e.to_string().into_bytes());
            comm.broadcast_bytes(said, 0)
                .map_err(train::TrainError::from)?;
        }
        done?
    } else {
        let objective = job.stage.open(be, &ctx, progress)?;
        // Waits here until rank 0 has locked (and, with --overwrite, cleared) the run directory.
        let said = comm
            .broadcast_bytes(Vec::new(), 0)
            .map_err(train::TrainError::from)?;
        if !said.is_empty() {
            return Err(train::TrainError::from(DistError::Peer {
                rank: 0,
                msg: format!(
                    "{} failed to set up the run in {}: {}",
                    S::NAME,
                    job.out.display(),
                    String::from_utf8_lossy(&said)
                ),
            })
            .into());
        }
        (None, objective)
    };
    let mut model = build_model(be, &ctx, job.stage.init(), run, progress)?;
    job.stage
        .with_model(be, &ctx, &mut objective, &mut model, progress)?;
    let opts = TrainOptions {
        run: run.clone(),
        out_dir: job.out.clone(),
        resume: job.resume,
        keep_checkpoints: job.keep_checkpoints,
        quiet: job.quiet,
    };
    let summary = train::train(be, comm, &mut model, &mut objective, &ctx.tokenizer, &opts)?;
    progress(&super::plan::peak_line(be.peak_memory(), &plan));
    Ok(summary)
}

/// Step 2 of the module header: the checkpoint, tokenizer and model shape.
fn resolve<'a, S: Stage>(job: &'a TrainJob<S>, run: &'a RunConfig) -> Result<StageContext<'a>> {
    let ctx = |checkpoint, model, tokenizer| StageContext {
        run,
        out: &job.out,
        resume: job.resume,
        checkpoint,
        model,
        tokenizer,
    };
    Ok(match job.stage.init() {
        Init::Fresh { .. } if run.lora_rank.is_some() => {
            return Err(ConfigError::Invalid(format!(
                "{}: LoRA (lora_rank / --lora-rank) trains adapters beside a frozen base model, \
                 and {} starts a fresh one; fine-tune a checkpoint with LoRA instead \
                 (`topcoat sft --init CHECKPOINT --lora-rank 16`)",
                S::NAME,
                S::NAME
            ))
            .into())
        }
        Init::Fresh { data } => {
            let tokenizer = data_tokenizer(data)?;
            let model = run.model_config(tokenizer.vocab_size())?;
            ctx(None, model, tokenizer)
        }
        Init::Checkpoint(path) | Init::CheckpointWithRewardHead(path) => {
            let ckpt = resolve_checkpoint(path)?;
            if let Init::Checkpoint(_) = job.stage.init() {
                checkpoint::refuse_reward_model(&ckpt, S::NAME)?;
            }
            let tokenizer = checkpoint::load_tokenizer(&ckpt)?;
            let mut model = checkpoint::load_config(&ckpt)?;
            let differ = job.run.shape_mismatches(&model);
            if !differ.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "{}: {} starts from {}, whose shape is fixed: {}; drop the shape flags \
                     (or keys) or start a fresh model with pretrain",
                    S::NAME,
                    S::NAME,
                    ckpt.display(),
                    differ.join(", ")
                ))
                .into());
            }
            let mut lora = run.lora(&model)?;
            if lora.is_some() && model.lora.is_some() {
                return Err(ConfigError::Invalid(format!(
                    "{}: --init {} is a LoRA run's checkpoint; LoRA trains adapters on a plain \
                     model: merge it first (`topcoat export hf {} --merge --out DIR`, then \
                     `topcoat import hf DIR`) or start from its base",
                    S::NAME,
                    ckpt.display(),
                    ckpt.display()
                ))
                .into());
            }
            if job.resume {
                lora = super::inputs::resumed_lora(&job.out, lora)?;
            }
            if lora.is_some() {
                model.lora = lora;
            }
            ctx(Some(ckpt), model, tokenizer)
        }
    })
}

/// Step 7 of the module header: the model the loop trains, described in one progress line.
fn build_model<B: Backend>(
    be: &B,
    ctx: &StageContext,
    init: Init,
    run: &RunConfig,
    progress: &dyn Fn(&str),
) -> Result<Gpt<B>> {
    let (model, source) = match (init, &ctx.checkpoint) {
        (_, Some(dir)) if ctx.model.lora.is_some() => lora_model(be, ctx, init, dir, run)?,
        (Init::Fresh { .. }, _) | (_, None) => (
            Gpt::init(be, &ctx.model, run.seed)?,
            format!("{} preset", run.preset),
        ),
        (Init::Checkpoint(_), Some(dir)) => (
            checkpoint::load_model(be, dir, None)?,
            dir.display().to_string(),
        ),
        (Init::CheckpointWithRewardHead(_), Some(dir)) => {
            let mut model = checkpoint::load_model(be, dir, None)?;
            let head = if model.reward_head().is_some() {
                "its reward head"
            } else {
                model.init_reward_head(be, run.seed ^ 0x4EAD)?;
                "a new reward head"
            };
            (model, format!("{} with {head}", dir.display()))
        }
    };
    let mut model = model;
    model.set_recompute(run.recompute)?;
    let cfg = &model.cfg;
    progress(&format!(
        "model: {source}, {:.2} M parameters, vocab {} (padded {}), {} layers, {} heads, d={}, \
         context {}, recompute {}, on {}",
        cfg.num_params() as f64 / 1e6,
        cfg.vocab_size,
        cfg.padded_vocab_size,
        cfg.n_layer,
        cfg.n_head,
        cfg.n_embd,
        cfg.max_seq_len,
        run.recompute,
        be.name()
    ));
    if let Some(line) = super::plan::family_line(cfg) {
        progress(line.trim_start());
    }
    if let Some(lora) = &cfg.lora {
        let specs = &model.layout.specs;
        let total = specs.iter().map(|s| s.numel()).sum();
        let trained = specs
            .iter()
            .filter(|s| s.trainable)
            .map(|s| s.numel())
            .sum();
        progress(&lora_line(lora, trained, total));
    }
    Ok(model)
}

/// A LoRA run's model: the checkpoint `dir`'s tensors frozen, fresh adapters beside them (A
/// drawn from the run's seed, B zero), and for the reward stage a head that trains in full
/// (the checkpoint's own, or a new one); with its description.
fn lora_model<B: Backend>(
    be: &B,
    ctx: &StageContext,
    init: Init,
    dir: &Path,
    run: &RunConfig,
) -> Result<(Gpt<B>, String)> {
    let lora = ctx.model.lora.clone().expect("a LoRA run");
    let base = checkpoint::load_values(dir)?;
    let mut model = Gpt::with_lora(be, &base.cfg, base.values, lora, run.seed ^ 0x10AA)?;
    let mut source = format!("{} (frozen) with LoRA adapters", dir.display());
    if let Init::CheckpointWithRewardHead(_) = init {
        let head = match &base.reward_head {
            Some(h) => {
                model.add_reward_head(be, &h[0], h[1][0])?;
                "its reward head"
            }
            None => {
                model.init_reward_head(be, run.seed ^ 0x4EAD)?;
                "a new reward head"
            }
        };
        source += &format!(" and {head} (trained in full)");
    }
    Ok((model, source))
}
