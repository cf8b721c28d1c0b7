//! Checkpoints: a directory `ckpt_<step>` per save, written atomically and checksummed.
//!
//! Contents (docs/FORMATS.md): `model.safetensors` (weights, f32, layout names),
//! `config.json` (the [`ModelConfig`]), `tokenizer.json`, for training checkpoints
//! `optimizer.safetensors` (AdamW moments `m.<name>`, `v.<name>`) and `train_state.json`
//! ([`TrainState`]: step, RNG, data position, run config, stage), and last `manifest.json`
//! (the size and SHA-256 of every other file, [`manifest`](super::manifest)).
//!
//! Saving (`save.rs`): the files are written and fsynced in a temporary directory
//! `.ckpt_<step>.tmp`, the manifest last, the directory fsynced, then renamed into place; a
//! crash leaves either the old set or the new one, never a half-written checkpoint. On any
//! error the temporary directory is removed; a stale one left by a killed process is never
//! read and is replaced by the next save. A full disk is [`CheckpointError::DiskFull`].
//! Deleting ([`remove`]) renames a checkpoint aside before deleting it.
//!
//! Loading: every file read is checked against the manifest (the bytes already read are
//! hashed, nothing is read twice); a checkpoint without a manifest is refused
//! ([`CheckpointError::NoManifest`]): it is incomplete, or older than manifests, and either
//! way its files cannot be verified. A resume checks the stage that wrote the run.
//!
//! A LoRA run's checkpoint (its `config.json` has `"lora"`) holds every tensor, the frozen
//! base's included, so that it loads and resumes on its own; the optimizer file holds the
//! moments of the trained tensors only (the frozen ones have none), and a copy of the adapters
//! in PEFT's layout sits in `adapter/` ([`adapter`]), outside the manifest.
//!
//! A model with a reward head saves and loads it like any other parameter
//! (`reward_head.weight`, `reward_head.bias`); such a checkpoint cannot start another stage
//! than `reward` ([`refuse_reward_model`]).

use super::manifest::{self, Manifest};
use super::{io_err, Result, TrainError};
use crate::backend::Backend;
use crate::config::{ModelConfig, RunConfig};
use crate::data::Tokenizer;
use crate::dist::Collective;
use crate::model::{reward, Gpt, ParamLayout, ParamSpec};
use crate::optim::AdamW;
use crate::rng::Rng;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use thiserror::Error;

pub mod adapter;
mod ranked;
mod save;
pub use adapter::ADAPTER_DIR;
pub use ranked::{resume_ranked, save_ranked};
pub use save::{remove, remove_stale, save, save_with, write_synced, WriteFile};

/// Everything besides tensors that an exact resume needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: usize,
    pub rng: Rng,
    /// The objective's data position (e.g. the loader's epoch and cursor).
    pub data: serde_json::Value,
    pub run: RunConfig,
    pub tokens_seen: u64,
    /// Wall time spent training before this checkpoint, seconds.
    pub elapsed_s: f64,
    /// Name of the stage that wrote it ("pretrain", ...).
    pub stage: String,
}

/// A checkpoint that is damaged, incomplete, or not for the command at hand; or a save that
/// failed for want of disk space. Each names the checkpoint, the file, and what to do.
#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error(
        "checkpoint {}: {file} is corrupt (SHA-256 mismatch: manifest.json says {expected}, \
         the file has {found}); to resume from an earlier checkpoint, move {} aside",
        .dir.display(), .dir.display()
    )]
    Corrupt {
        dir: PathBuf,
        file: String,
        expected: String,
        found: String,
    },
    #[error(
        "checkpoint {}: {file} is corrupt or truncated (manifest.json says {expected} bytes, \
         the file has {found}); to resume from an earlier checkpoint, move {} aside",
        .dir.display(), .dir.display()
    )]
    WrongSize {
        dir: PathBuf,
        file: String,
        expected: u64,
        found: u64,
    },
    #[error(
        "checkpoint {}: {file} is missing (manifest.json lists it); to resume from an earlier \
         checkpoint, move {} aside",
        .dir.display(), .dir.display()
    )]
    Missing { dir: PathBuf, file: String },
    #[error(
        "checkpoint {}: {file} is not listed in manifest.json, so it cannot be verified; \
         the checkpoint was altered after it was saved",
        .dir.display()
    )]
    Unlisted { dir: PathBuf, file: String },
    #[error(
        "checkpoint {}: no manifest.json: the checkpoint is incomplete or was written by a \
         topcoat older than checksummed checkpoints, so its files cannot be verified \
         (docs/FORMATS.md); to use an earlier checkpoint, move {} aside",
        .dir.display(), .dir.display()
    )]
    NoManifest { dir: PathBuf },
    #[error("checkpoint {}: manifest.json is invalid: {msg}", .dir.display())]
    BadManifest { dir: PathBuf, msg: String },
    #[error(
        "checkpoint {}: disk full while writing {file} (No space left on device); {}; \
         free space and resume with --resume",
        .dir.display(), previous_text(.previous)
    )]
    DiskFull {
        dir: PathBuf,
        file: String,
        /// The newest complete checkpoint beside it, untouched by the failed save.
        previous: Option<PathBuf>,
    },
    #[error(
        "run directory {} was written by `{found}` ({}/train_state.json stage), this is \
         `{expected}`; use a new --out or the `{found}` command",
        .run_dir.display(), .checkpoint.display()
    )]
    WrongStage {
        run_dir: PathBuf,
        checkpoint: PathBuf,
        found: String,
        expected: String,
    },
    #[error(
        "checkpoint {} holds a reward model ({}): it scores replies and cannot start `{stage}`; \
         start `{stage}` from the SFT run instead, and give the reward model to `rl --reward`",
        .dir.display(), reward::HEAD_WEIGHT
    )]
    RewardModelInit { dir: PathBuf, stage: String },
    /// A tensor holds a NaN or an infinity: no checkpoint is written with it.
    #[error("checkpoint {}: {what} is not finite, so it is not saved", .dir.display())]
    NotFinite { dir: PathBuf, what: String },
    /// Another rank (the writer, rank 0) failed to save the checkpoint all ranks gathered.
    #[error("checkpoint {}: rank {rank} failed to save it: {msg}", .dir.display())]
    RankFailed {
        dir: PathBuf,
        rank: usize,
        msg: String,
    },
    /// Ranks could not all read the checkpoint a data-parallel resume starts from.
    #[error(
        "checkpoint {}: {what}; every rank reads the checkpoint itself, so the run directory \
         must be on a filesystem all ranks share (docs/DISTRIBUTED.md)",
        .dir.display()
    )]
    RanksCannotRead { dir: PathBuf, what: String },
}

fn previous_text(previous: &Option<PathBuf>) -> String {
    match previous {
        Some(p) => format!("the previous checkpoint {} is intact", p.display()),
        None => "no earlier checkpoint was touched".into(),
    }
}

const PREFIX: &str = "ckpt_";

/// Host values of a model's tensors, one `Vec` per tensor in layout order.
pub(super) type Tensors = Vec<Vec<f32>>;

fn ckpt_err(path: &Path, msg: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// The directory name of the checkpoint after `step` steps.
pub fn dir_for(run_dir: &Path, step: usize) -> PathBuf {
    run_dir.join(format!("{PREFIX}{step:06}"))
}

/// Every `ckpt_<step>` directory of `run_dir`, complete or not, oldest first.
fn scan(run_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(run_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(run_dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(run_dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix(PREFIX)
            .and_then(|s| s.parse::<usize>().ok())
        {
            if entry.path().is_dir() {
                out.push((step, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Whether checkpoint `dir` was saved completely (its manifest, written last, is there).
fn is_complete(dir: &Path) -> bool {
    dir.join(manifest::FILE).is_file()
}

/// Completed checkpoints in `run_dir` (those with a manifest), oldest first. Pruning counts
/// only these, so it never removes a directory it cannot vouch for.
pub fn list(run_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    Ok(scan(run_dir)?
        .into_iter()
        .filter(|(_, p)| is_complete(p))
        .collect())
}

/// The newest checkpoint of `run_dir`, if any. When the newest `ckpt_<step>` directory has no
/// manifest this is [`CheckpointError::NoManifest`] naming it, rather than a silent fall-back
/// to an older one (or, in a run of checkpoints older than manifests, to a fresh start).
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    match scan(run_dir)?.pop() {
        None => Ok(None),
        Some((_, dir)) if is_complete(&dir) => Ok(Some(dir)),
        Some((_, dir)) => Err(CheckpointError::NoManifest { dir }.into()),
    }
}

/// The manifest of checkpoint `dir` (which must be a directory).
fn manifest_of(dir: &Path) -> Result<Manifest> {
    if !dir.is_dir() {
        return Err(ckpt_err(
            dir,
            "not a checkpoint directory (expected config.json, model.safetensors, tokenizer.json)",
        ));
    }
    Manifest::read(dir)
}

fn parse_json<T: for<'de> Deserialize<'de>>(path: &Path, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| ckpt_err(path, format!("invalid JSON: {e}")))
}

fn config_in(dir: &Path, manifest: &Manifest) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    let cfg: ModelConfig = parse_json(&path, &manifest.read_verified(dir, "config.json")?)?;
    cfg.validate().map_err(|e| ckpt_err(&path, e.to_string()))?;
    Ok(cfg)
}

/// Reads a checkpoint's model config (verified against its manifest).
pub fn load_config(dir: &Path) -> Result<ModelConfig> {
    config_in(dir, &manifest_of(dir)?)
}

/// Reads a checkpoint's tokenizer (verified against its manifest).
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
    manifest_of(dir)?.read_verified(dir, "tokenizer.json")?;
    Ok(Tokenizer::load(dir.join("tokenizer.json"))?)
}

/// Checks that a checkpoint's config is the one a run asks for, naming every field that differs.
pub fn check_config(dir: &Path, found: &ModelConfig, wanted: &ModelConfig) -> Result<()> {
    let fields = [
        ("vocab_size", found.vocab_size, wanted.vocab_size),
        (
            "padded_vocab_size",
            found.padded_vocab_size,
            wanted.padded_vocab_size,
        ),
        ("n_layer", found.n_layer, wanted.n_layer),
        ("n_head", found.n_head, wanted.n_head),
        ("n_embd", found.n_embd, wanted.n_embd),
        ("max_seq_len", found.max_seq_len, wanted.max_seq_len),
    ];
    let mut diffs: Vec<String> = fields
        .iter()
        .filter(|(_, f, w)| f != w)
        .map(|(name, f, w)| {
            format!("{name} is {f} in the checkpoint but {w} in the requested model")
        })
        .collect();
    if found.family_name() != wanted.family_name() {
        diffs.push(format!(
            "family is {} in the checkpoint but {} in the requested model",
            found.family_name(),
            wanted.family_name()
        ));
    } else if found.family != wanted.family {
        diffs.push(format!(
            "the llama settings are {:?} in the checkpoint but {:?} in the requested model",
            found.llama(),
            wanted.llama()
        ));
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(ckpt_err(
            &dir.join("config.json"),
            format!("config does not match: {}", diffs.join("; ")),
        ))
    }
}

/// Parses a safetensors file already read (and verified) from `path`.
fn parse_safetensors<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| ckpt_err(path, format!("invalid safetensors: {e}")))
}

fn tensors_of(
    path: &Path,
    st: &SafeTensors,
    specs: &[ParamSpec],
    prefix: &str,
) -> Result<Vec<Vec<f32>>> {
    specs
        .iter()
        .map(|spec| {
            let name = format!("{prefix}{}", spec.name);
            let t = st
                .tensor(&name)
                .map_err(|_| ckpt_err(path, format!("missing tensor {name}")))?;
            if t.dtype() != Dtype::F32 || t.shape() != spec.shape.as_slice() {
                return Err(ckpt_err(
                    path,
                    format!(
                        "tensor {name} is {:?} {:?}, expected F32 {:?}",
                        t.dtype(),
                        t.shape(),
                        spec.shape
                    ),
                ));
            }
            Ok(t.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        })
        .collect()
}

/// A checkpoint's model on the host: its config, its tensors in layout order and, for a
/// reward model, the head (`[weight, bias]`).
pub struct HostModel {
    pub cfg: ModelConfig,
    pub values: Tensors,
    pub reward_head: Option<Tensors>,
}

/// Reads a checkpoint's config and weights onto the host (verified against its manifest),
/// with no backend: what a LoRA run starts from, and what export merges.
pub fn load_values(dir: &Path) -> Result<HostModel> {
    let manifest = manifest_of(dir)?;
    let cfg = config_in(dir, &manifest)?;
    let path = dir.join("model.safetensors");
    let bytes = manifest.read_verified(dir, "model.safetensors")?;
    let st = parse_safetensors(&path, &bytes)?;
    let values = tensors_of(&path, &st, &ParamLayout::new(&cfg).specs, "")?;
    let reward_head = match st.tensor(reward::HEAD_WEIGHT) {
        Ok(_) => Some(tensors_of(&path, &st, &reward::head_specs(cfg.n_embd), "")?),
        Err(_) => None,
    };
    Ok(HostModel {
        cfg,
        values,
        reward_head,
    })
}

/// Loads a checkpoint's weights onto `be`; when `wanted` is given, the checkpoint's config must
/// match it. Every file read is checked against the manifest first.
pub fn load_model<B: Backend>(be: &B, dir: &Path, wanted: Option<&ModelConfig>) -> Result<Gpt<B>> {
    let manifest = manifest_of(dir)?;
    let cfg = config_in(dir, &manifest)?;
    if let Some(w) = wanted {
        check_config(dir, &cfg, w)?;
    }
    let path = dir.join("model.safetensors");
    let bytes = manifest.read_verified(dir, "model.safetensors")?;
    let st = parse_safetensors(&path, &bytes)?;
    let values = tensors_of(&path, &st, &ParamLayout::new(&cfg).specs, "")?;
    let mut model = Gpt::from_values(be, &cfg, values)?;
    // A reward checkpoint also holds the reward head.
    if st.tensor(reward::HEAD_WEIGHT).is_ok() {
        let head = tensors_of(&path, &st, &reward::head_specs(cfg.n_embd), "")?;
        model.add_reward_head(be, &head[0], head[1][0])?;
    }
    Ok(model)
}

/// Reads a training checkpoint's state and checks that stage `stage` wrote it
/// ([`CheckpointError::WrongStage`] otherwise: a run directory belongs to one stage).
pub fn load_state(dir: &Path, stage: &str) -> Result<TrainState> {
    state_in(dir, &manifest_of(dir)?, stage)
}

fn state_in(dir: &Path, manifest: &Manifest, stage: &str) -> Result<TrainState> {
    let state_path = dir.join("train_state.json");
    if !state_path.exists() {
        return Err(ckpt_err(
            dir,
            "has no train_state.json: it is a weights-only checkpoint and cannot be resumed",
        ));
    }
    let state: TrainState = parse_json(
        &state_path,
        &manifest.read_verified(dir, "train_state.json")?,
    )?;
    if state.stage != stage {
        return Err(CheckpointError::WrongStage {
            run_dir: dir.parent().unwrap_or(dir).to_path_buf(),
            checkpoint: dir.to_path_buf(),
            found: state.stage,
            expected: stage.into(),
        }
        .into());
    }
    Ok(state)
}

/// Restores the optimizer moments and the training state of a training checkpoint written by
/// stage `stage`, for a process on its own (zero 0); [`resume_ranked`] is the data-parallel
/// form.
pub fn load_training<B: Backend>(
    be: &B,
    dir: &Path,
    model: &mut Gpt<B>,
    stage: &str,
) -> Result<(AdamW<B>, TrainState)> {
    let (m, v, state) = read_training(dir, &model.layout.specs, stage)?;
    let opt = sharded_optimizer(be, &crate::dist::Solo::new(), model, 0, m, v, &state)?;
    Ok((opt, state))
}

/// A training checkpoint's moments `m`, `v` (layout order) and state, verified, on the host.
fn read_training(
    dir: &Path,
    specs: &[ParamSpec],
    stage: &str,
) -> Result<(Tensors, Tensors, TrainState)> {
    let manifest = manifest_of(dir)?;
    let state = state_in(dir, &manifest, stage)?;
    let path = dir.join("optimizer.safetensors");
    let bytes = manifest.read_verified(dir, "optimizer.safetensors")?;
    let st = parse_safetensors(&path, &bytes)?;
    // Moments exist for the trained tensors only; a frozen one's are empty.
    let trained: Vec<ParamSpec> = specs.iter().filter(|s| s.trainable).cloned().collect();
    let spread = |t: Tensors| -> Tensors {
        let mut t = t.into_iter();
        specs
            .iter()
            .map(|s| match s.trainable {
                true => t.next().expect("one per trained tensor"),
                false => Vec::new(),
            })
            .collect()
    };
    let m = spread(tensors_of(&path, &st, &trained, "m.")?);
    let v = spread(tensors_of(&path, &st, &trained, "v.")?);
    Ok((m, v, state))
}

/// The optimizer of `model` for ZeRO stage `zero` on this rank, holding the saved moments
/// `m`, `v` of the tensors it owns (any world size: the shards are cut afresh).
fn sharded_optimizer<B: Backend>(
    be: &B,
    comm: &dyn Collective<B>,
    model: &mut Gpt<B>,
    zero: u8,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    state: &TrainState,
) -> Result<AdamW<B>> {
    let mut opt = AdamW::new(be, comm, model, zero)?;
    for (slot, host) in opt.m.iter_mut().zip(&m).chain(opt.v.iter_mut().zip(&v)) {
        // A frozen tensor has no saved moments (and, in the optimizer, none to restore).
        if let (Some(buf), false) = (slot, host.is_empty()) {
            be.write(buf, host)?;
        }
    }
    opt.step = state.step as u64;
    Ok(opt)
}

/// Everything a resume of stage `stage` restores from checkpoint `dir` in a process on its
/// own: the model (whose config must be `wanted`), the optimizer and the state. The stage is
/// checked first, so a run directory of another stage is named as such, not as a config
/// mismatch.
pub fn resume<B: Backend>(
    be: &B,
    dir: &Path,
    wanted: &ModelConfig,
    stage: &str,
) -> Result<(Gpt<B>, AdamW<B>, TrainState)> {
    resume_ranked(be, &crate::dist::Solo::new(), dir, wanted, stage, 0)
}

/// Reads only the safetensors header of `path`: the JSON that names the tensors. Checks the
/// stated length against the file's before allocating.
fn safetensors_header(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    use std::io::Read;
    let bad = |msg: String| ckpt_err(path, format!("invalid safetensors: {msg}"));
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    let mut head = [0u8; 8];
    file.read_exact(&mut head)
        .map_err(|_| bad(format!("{len} bytes, too short for a header")))?;
    let n = u64::from_le_bytes(head);
    if n > len.saturating_sub(8) {
        return Err(bad(format!(
            "header length {n} exceeds the file's {} bytes after it",
            len.saturating_sub(8)
        )));
    }
    let mut json = vec![0u8; n as usize];
    file.read_exact(&mut json).map_err(io_err(path))?;
    serde_json::from_slice(&json).map_err(|e| bad(format!("header is not a JSON object: {e}")))
}

/// Refuses to start stage `stage` from checkpoint `dir` when it holds a reward model (a
/// `reward_head.weight` tensor): [`CheckpointError::RewardModelInit`]. Reads only the header of
/// `model.safetensors`; the weights are verified when they are loaded.
pub fn refuse_reward_model(dir: &Path, stage: &str) -> Result<()> {
    let header = safetensors_header(&dir.join("model.safetensors"))?;
    if header.contains_key(reward::HEAD_WEIGHT) {
        return Err(CheckpointError::RewardModelInit {
            dir: dir.to_path_buf(),
            stage: stage.into(),
        }
        .into());
    }
    Ok(())
}
