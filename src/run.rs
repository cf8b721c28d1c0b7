//! What the CLI commands do, as library calls: device choice, the embedded default corpus,
//! `pretrain`, `sample` and `info`; `prepare sft` and `sft` in `run/sft.rs`, `prepare prefs`
//! in `run/prefs.rs`, `reward` in `run/reward.rs`, `dpo` in `run/dpo.rs`, `rl` in `run/rl.rs`,
//! `chat` in `run/chat.rs`, `eval` in `run/eval.rs`. The binary only parses flags and prints.

mod chat;
mod dpo;
mod eval;
mod prefs;
mod reward;
mod rl;
mod sft;
pub use chat::{chat, ChatOptions};
pub use dpo::{dpo, dpo_run_defaults, DpoJob};
pub use eval::{
    eval_generate, eval_loss, eval_pairs, EvalGenerateJob, EvalLossJob, EvalPairsJob, GenExample,
    GenReport, LossReport, PairReport,
};
pub use prefs::prepare_prefs;
pub use reward::{reward, reward_run_defaults, RewardJob};
pub use rl::{read_prompts, rl, rl_run_defaults, RlJob};
pub use sft::{load_tokenizer_arg, prepare_sft, sft, sft_run_defaults, SftJob};

use crate::backend::{cpu::CpuBackend, cuda, Backend, BackendError};
use crate::config::{ModelConfig, RunConfig};
use crate::data::{self, DataError, PrepareOptions, ProgressEvent, Shard, Tokenizer};
use crate::generate::{self, SampleOptions};
use crate::model::Gpt;
use crate::stages::pretrain::{split_files, Pretrain};
use crate::train::{self, checkpoint, io_err, Objective, TrainError, TrainOptions, TrainSummary};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The embedded default corpus (data/corpus/, see its README and LICENSES.md), JSONL with one
/// `{"text": ...}` document per line.
pub const EMBEDDED_CORPUS: &[u8] = include_bytes!("../data/corpus/corpus.jsonl");

/// Vocabulary of the BPE trained on the embedded corpus.
pub const EMBEDDED_VOCAB: usize = 4096;

/// Where a run executes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    /// CUDA device 0.
    Cuda,
}

/// Resolves `--device` (`auto`, `cpu`, `cuda`) and says what was chosen and why.
///
/// `auto` picks CUDA device 0 when this build has kernels and a driver finds a device, else the
/// CPU; the returned text says which and why, and every command prints it.
pub fn resolve_device(name: &str) -> Result<(DeviceKind, String), BackendError> {
    match name {
        "cpu" => Ok((DeviceKind::Cpu, "cpu (f32 reference backend)".into())),
        "cuda" => Ok((DeviceKind::Cuda, format!("cuda: {}", cuda::probe()?))),
        "auto" => Ok(match cuda::probe() {
            Ok(info) => (
                DeviceKind::Cuda,
                format!("cuda: {info} (found by --device auto)"),
            ),
            Err(e) => (
                DeviceKind::Cpu,
                format!("cpu (f32 reference backend; no CUDA: {e})"),
            ),
        }),
        other => Err(BackendError::Device(format!(
            "unknown device `{other}` (expected auto, cpu or cuda)"
        ))),
    }
}

/// Makes sure `dir` holds the embedded corpus prepared with a BPE tokenizer trained on it
/// (`tokenizer.json`, `train_*.bin`, `val_*.bin`), preparing it on first use.
pub fn prepare_embedded(dir: &Path, progress: &dyn Fn(&str)) -> Result<PathBuf, TrainError> {
    if dir.join("tokenizer.json").exists() && split_files(dir, "train").is_ok() {
        return Ok(dir.to_path_buf());
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let corpus = dir.join("embedded_corpus.jsonl");
    std::fs::write(&corpus, EMBEDDED_CORPUS).map_err(io_err(&corpus))?;
    let docs = data::prepare::read_documents(&[&corpus])?;
    progress(&format!(
        "embedded corpus: {} documents, {:.1} MB; training a {EMBEDDED_VOCAB}-token BPE",
        docs.len(),
        EMBEDDED_CORPUS.len() as f64 / 1e6
    ));
    let tok = Tokenizer::train_bpe(docs.iter().map(String::as_str), EMBEDDED_VOCAB, |_, _| {})?;
    let summary = data::prepare(&[&corpus], &tok, &PrepareOptions::new(dir), &|_| {})?;
    tok.save(dir.join("tokenizer.json"))?;
    progress(&format!(
        "prepared {}: {} train tokens, {} val tokens",
        dir.display(),
        summary.tokens_train,
        summary.tokens_val
    ));
    Ok(dir.to_path_buf())
}

/// A pretraining run as the CLI describes it.
pub struct PretrainJob {
    pub run: RunConfig,
    /// Prepared data directory; `None` uses the embedded corpus (prepared under `out/data`).
    pub data: Option<PathBuf>,
    pub out: PathBuf,
    pub resume: bool,
    pub device: DeviceKind,
    pub quiet: bool,
}

/// Loads the tokenizer a prepared data directory was made with.
pub fn data_tokenizer(dir: &Path) -> Result<Tokenizer, DataError> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Err(DataError::InvalidArgument(format!(
            "{}: no tokenizer.json; prepare the directory with `topcoat prepare` first",
            dir.display()
        )));
    }
    Tokenizer::load(path)
}

/// Runs pretraining; returns the summary (the checkpoint is in `job.out`).
pub fn pretrain(job: &PretrainJob, progress: &dyn Fn(&str)) -> Result<TrainSummary, TrainError> {
    // Refuse an unknown preset before spending time on data.
    ModelConfig::preset(&job.run.preset, 64)?;
    let data_dir = match &job.data {
        Some(d) => d.clone(),
        None => prepare_embedded(&job.out.join("data"), progress)?,
    };
    let tokenizer = data_tokenizer(&data_dir)?;
    let cfg = ModelConfig::preset(&job.run.preset, tokenizer.vocab_size())?;
    let run = &job.run;
    if run.seq_len > cfg.max_seq_len {
        return Err(crate::config::ConfigError::Invalid(format!(
            "seq_len {} exceeds the {} preset's max_seq_len {}",
            run.seq_len, run.preset, cfg.max_seq_len
        ))
        .into());
    }
    let mut objective = Pretrain::open(
        &data_dir,
        run.batch_size,
        run.seq_len,
        run.seed,
        run.rank,
        run.world_size,
        cfg.vocab_size,
        run.val_batches,
    )?;
    let opts = TrainOptions {
        run: run.clone(),
        out_dir: job.out.clone(),
        resume: job.resume,
        keep_checkpoints: 3,
        quiet: job.quiet,
    };
    train_on_device(
        job.device,
        ModelInit::Fresh(&cfg),
        &mut objective,
        &tokenizer,
        &opts,
        progress,
    )
}

/// Where a run's starting weights come from.
pub(crate) enum ModelInit<'a> {
    /// GPT-2 initialisation of this shape, drawn from the run's seed.
    Fresh(&'a ModelConfig),
    /// The weights of this checkpoint.
    Checkpoint(&'a Path),
    /// The weights of this checkpoint plus a reward head (a new one drawn from the run's seed
    /// unless the checkpoint has one).
    CheckpointWithRewardHead(&'a Path),
}

/// Builds the model on `device` and runs the shared training loop with `objective`.
pub(crate) fn train_on_device<O>(
    device: DeviceKind,
    init: ModelInit,
    objective: &mut O,
    tokenizer: &Tokenizer,
    opts: &TrainOptions,
    progress: &dyn Fn(&str),
) -> Result<TrainSummary, TrainError>
where
    O: Objective<CpuBackend> + Objective<cuda::CudaBackend>,
{
    match device {
        DeviceKind::Cpu => train_with(&CpuBackend, init, objective, tokenizer, opts, progress),
        DeviceKind::Cuda => train_with(
            &cuda::CudaBackend::new(0)?,
            init,
            objective,
            tokenizer,
            opts,
            progress,
        ),
    }
}

pub(crate) fn train_with<B: Backend, O: Objective<B>>(
    be: &B,
    init: ModelInit,
    objective: &mut O,
    tokenizer: &Tokenizer,
    opts: &TrainOptions,
    progress: &dyn Fn(&str),
) -> Result<TrainSummary, TrainError> {
    let (mut model, source) = match init {
        ModelInit::Fresh(cfg) => (
            Gpt::init(be, cfg, opts.run.seed)?,
            format!("{} preset", opts.run.preset),
        ),
        ModelInit::Checkpoint(dir) => (
            checkpoint::load_model(be, dir, None)?,
            dir.display().to_string(),
        ),
        ModelInit::CheckpointWithRewardHead(dir) => {
            let mut model = checkpoint::load_model(be, dir, None)?;
            let head = if model.reward_head().is_some() {
                "its reward head"
            } else {
                model.init_reward_head(be, opts.run.seed ^ 0x4EAD)?;
                "a new reward head"
            };
            (model, format!("{} with {head}", dir.display()))
        }
    };
    let cfg = &model.cfg;
    progress(&format!(
        "model: {source}, {:.2} M parameters, vocab {} (padded {}), {} layers, d={}, on {}",
        cfg.num_params() as f64 / 1e6,
        cfg.vocab_size,
        cfg.padded_vocab_size,
        cfg.n_layer,
        cfg.n_embd,
        be.name()
    ));
    train::train(be, &mut model, objective, tokenizer, opts)
}

/// A checkpoint directory, or a run directory (its newest checkpoint).
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf, TrainError> {
    if path.join("config.json").exists() {
        return Ok(path.to_path_buf());
    }
    checkpoint::latest(path)?.ok_or_else(|| TrainError::Checkpoint {
        path: path.to_path_buf(),
        msg: "neither a checkpoint (no config.json) nor a run directory with ckpt_* checkpoints"
            .into(),
    })
}

/// Generates a continuation of `prompt` from a checkpoint on `device` (with a KV cache),
/// streaming text to `on_text`.
pub fn sample(
    ckpt: &Path,
    prompt: &str,
    opts: &SampleOptions,
    device: DeviceKind,
    on_text: impl FnMut(&str),
) -> Result<String, TrainError> {
    match device {
        DeviceKind::Cpu => sample_with(&CpuBackend, ckpt, prompt, opts, on_text),
        DeviceKind::Cuda => sample_with(&cuda::CudaBackend::new(0)?, ckpt, prompt, opts, on_text),
    }
}

fn sample_with<B: Backend>(
    be: &B,
    ckpt: &Path,
    prompt: &str,
    opts: &SampleOptions,
    mut on_text: impl FnMut(&str),
) -> Result<String, TrainError> {
    let dir = resolve_checkpoint(ckpt)?;
    let tokenizer = checkpoint::load_tokenizer(&dir)?;
    let model = checkpoint::load_model(be, &dir, None)?;
    let mut ids = tokenizer.encode(prompt);
    if ids.is_empty() {
        ids.push(tokenizer.eot());
    }
    let opts = SampleOptions {
        stop: opts.stop.or(Some(tokenizer.eot())),
        ..opts.clone()
    };
    let mut stream = generate::TextStream::new(&tokenizer);
    generate::generate(be, &model, &ids, &opts, |tok| {
        let text = stream.push(tok);
        if !text.is_empty() {
            on_text(&text);
        }
    })?;
    Ok(stream.text())
}

/// A human-readable description of a shard file, a checkpoint, or a run directory.
pub fn info(path: &Path) -> Result<String, TrainError> {
    let mut s = String::new();
    if path.is_file() {
        let shard = Shard::open(path)?;
        let n = shard.len();
        let head: Vec<u32> = (0..n.min(16)).map(|i| shard.get(i)).collect();
        let max = (0..n).map(|i| shard.get(i)).max().unwrap_or(0);
        let _ = writeln!(s, "token shard {}", path.display());
        let _ = writeln!(s, "  tokens: {n} ({}-bit ids)", shard.width() * 8);
        let _ = writeln!(s, "  largest id: {max}");
        let _ = writeln!(s, "  first ids: {head:?}");
        return Ok(s);
    }
    let dir = resolve_checkpoint(path)?;
    let cfg = checkpoint::load_config(&dir)?;
    let _ = writeln!(s, "checkpoint {}", dir.display());
    let _ = writeln!(
        s,
        "  model: {} layers, {} heads, d={}, max_seq_len {}",
        cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.max_seq_len
    );
    let _ = writeln!(
        s,
        "  vocab: {} (padded {})",
        cfg.vocab_size, cfg.padded_vocab_size
    );
    let _ = writeln!(
        s,
        "  parameters: {} ({:.2} M)",
        cfg.num_params(),
        cfg.num_params() as f64 / 1e6
    );
    if let Ok(tok) = checkpoint::load_tokenizer(&dir) {
        let _ = writeln!(
            s,
            "  tokenizer: {:?}, {} ids, eot {}",
            tok.kind(),
            tok.vocab_size(),
            tok.eot()
        );
    }
    let state = dir.join("train_state.json");
    if state.exists() {
        let text = std::fs::read_to_string(&state).map_err(io_err(&state))?;
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let _ = writeln!(
            s,
            "  training state: stage {}, step {}, {} tokens seen, {:.0} s",
            v["stage"].as_str().unwrap_or("?"),
            v["step"],
            v["tokens_seen"],
            v["elapsed_s"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(s)
}

/// Progress text for `prepare`.
pub fn describe_progress(ev: &ProgressEvent) -> String {
    match ev {
        ProgressEvent::Start { files, docs, bytes } => {
            format!(
                "{files} files, {docs} documents, {:.1} MB",
                *bytes as f64 / 1e6
            )
        }
        ProgressEvent::Progress {
            docs_done,
            docs_total,
            bytes_done,
            bytes_total,
            tokens,
        } => format!(
            "{:5.1}% | {docs_done}/{docs_total} documents | {:.1}/{:.1} MB | {tokens} tokens",
            100.0 * *bytes_done as f64 / (*bytes_total).max(1) as f64,
            *bytes_done as f64 / 1e6,
            *bytes_total as f64 / 1e6
        ),
        ProgressEvent::ShardDone { name, tokens } => format!("wrote {name} ({tokens} tokens)"),
    }
}
