//! Checkpoints: a directory `ckpt_<step>` per save, written atomically and checksummed.
//!
//! Contents (docs/FORMATS.md): `model.safetensors` (weights, f32, layout names),
//! `config.json` (the [`ModelConfig`]), `tokenizer.json`, for training checkpoints
//! `optimizer.safetensors` (AdamW moments `m.<name>`, `v.<name>`) and `train_state.json`
//! ([`TrainState`]: step, RNG, data position, run config, stage), and last `manifest.json`
//! (the size and SHA-256 of every other file, [`manifest`](super::manifest)).
//!
//! Saving: the files are written and fsynced in a temporary directory `.ckpt_<step>.tmp`, the
//! manifest last, the directory fsynced, then renamed into place; a crash leaves either the
//! old set or the new one, never a half-written checkpoint. On any error the temporary
//! directory is removed; a stale one left by a killed process is never read and is replaced
//! by the next save. A full disk is [`CheckpointError::DiskFull`].
//!
//! Loading: every file read is checked against the manifest (the bytes already read are
//! hashed, nothing is read twice); a checkpoint without a manifest is refused
//! ([`CheckpointError::NoManifest`]): it is incomplete, or older than manifests, and either
//! way its files cannot be verified. A resume checks the stage that wrote the run.
//!
//! A model with a reward head saves and loads it like any other parameter
//! (`reward_head.weight`, `reward_head.bias`); such a checkpoint cannot start another stage
//! than `reward` ([`refuse_reward_model`]).

use super::manifest::{self, sha256_hex, Entry, Manifest};
use super::{io_err, Result, TrainError};
use crate::backend::Backend;
use crate::config::{ModelConfig, RunConfig};
use crate::data::Tokenizer;
use crate::model::{reward, Gpt, ParamLayout, ParamSpec};
use crate::optim::AdamW;
use crate::rng::Rng;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;

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
}

fn previous_text(previous: &Option<PathBuf>) -> String {
    match previous {
        Some(p) => format!("the previous checkpoint {} is intact", p.display()),
        None => "no earlier checkpoint was touched".into(),
    }
}

const PREFIX: &str = "ckpt_";

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

/// A save's serialized safetensors file (for errors: `path`).
fn safetensors_bytes(path: &Path, tensors: Vec<(String, Vec<usize>, &[f32])>) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(data))
                .map(|v| (name.clone(), v))
                .map_err(|e| ckpt_err(path, format!("tensor {name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, &None).map_err(|e| ckpt_err(path, e.to_string()))
}

/// How a save writes one file: all of `bytes` to a new file at `path`, durably. A parameter
/// of [`save_with`] so that tests can make a write fail as a full disk does.
pub type WriteFile<'a> = dyn Fn(&Path, &[u8]) -> std::io::Result<()> + 'a;

/// Writes `bytes` to a new file at `path` and fsyncs it.
pub fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Whether `e` or an error it wraps is "no space left on device" (ENOSPC).
fn is_disk_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.raw_os_error() == Some(28) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// The temporary directory of a save in progress: removed when dropped unless committed, so
/// an error anywhere in the save leaves nothing behind.
struct TempDir {
    path: PathBuf,
    committed: bool,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Removes whatever is at `path` (a stale temporary directory or file), if anything.
fn remove_any(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path).map_err(io_err(path)),
        Ok(_) => std::fs::remove_file(path).map_err(io_err(path)),
        Err(_) => Ok(()),
    }
}

/// Writes a checkpoint of `model` (and, for training, the optimizer and the state) to
/// `dest`, atomically. Returns `dest`.
pub fn save<B: Backend>(
    be: &B,
    dest: &Path,
    model: &Gpt<B>,
    tokenizer: &Tokenizer,
    training: Option<(&AdamW<B>, &TrainState)>,
) -> Result<PathBuf> {
    save_with(be, dest, model, tokenizer, training, &write_synced)
}

/// [`save`], writing each file (but `tokenizer.json`, which the tokenizer writes itself)
/// with `write`.
pub fn save_with<B: Backend>(
    be: &B,
    dest: &Path,
    model: &Gpt<B>,
    tokenizer: &Tokenizer,
    training: Option<(&AdamW<B>, &TrainState)>,
    write: &WriteFile<'_>,
) -> Result<PathBuf> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.tmp"));
    // A stale temporary directory (a save killed part-way) is never a checkpoint: replace it.
    remove_any(&tmp)?;
    std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    let mut guard = TempDir {
        path: tmp.clone(),
        committed: false,
    };

    let failed = |file: &str, e: std::io::Error| -> TrainError {
        if is_disk_full(&e) {
            CheckpointError::DiskFull {
                dir: dest.to_path_buf(),
                file: file.into(),
                previous: previous_checkpoint(parent, dest),
            }
            .into()
        } else {
            io_err(tmp.join(file))(e)
        }
    };
    let mut written: Vec<Entry> = Vec::new();
    let mut put = |file: &str, bytes: &[u8]| -> Result<()> {
        write(&tmp.join(file), bytes).map_err(|e| failed(file, e))?;
        written.push(Entry {
            name: file.into(),
            bytes: bytes.len() as u64,
            sha256: sha256_hex(bytes),
        });
        Ok(())
    };

    let specs = &model.layout.specs;
    let values = model.param_values(be)?;
    let file = "model.safetensors";
    let bytes = safetensors_bytes(
        &tmp.join(file),
        specs
            .iter()
            .zip(&values)
            .map(|(s, v)| (s.name.clone(), s.shape.clone(), v.as_slice()))
            .collect(),
    )?;
    drop(values);
    put(file, &bytes)?;
    drop(bytes);
    put("config.json", &json_bytes(dest, &model.cfg)?)?;
    let tok_path = tmp.join("tokenizer.json");
    tokenizer.save(&tok_path).map_err(|e| {
        if is_disk_full(&e) {
            failed("tokenizer.json", std::io::Error::from_raw_os_error(28))
        } else {
            e.into()
        }
    })?;
    std::fs::File::open(&tok_path)
        .and_then(|f| f.sync_all())
        .map_err(|e| failed("tokenizer.json", e))?;
    if let Some((opt, state)) = training {
        let m = opt
            .m
            .iter()
            .map(|b| be.download(b))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let v = opt
            .v
            .iter()
            .map(|b| be.download(b))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut tensors = Vec::with_capacity(2 * specs.len());
        for (s, data) in specs.iter().zip(&m) {
            tensors.push((format!("m.{}", s.name), s.shape.clone(), data.as_slice()));
        }
        for (s, data) in specs.iter().zip(&v) {
            tensors.push((format!("v.{}", s.name), s.shape.clone(), data.as_slice()));
        }
        let file = "optimizer.safetensors";
        let bytes = safetensors_bytes(&tmp.join(file), tensors)?;
        drop((m, v));
        put(file, &bytes)?;
        put("train_state.json", &json_bytes(dest, state)?)?;
    }
    // The manifest last: a directory holding one holds everything it lists.
    let listing = Manifest::of_dir(&tmp, &written)?;
    write(&tmp.join(manifest::FILE), &listing.to_bytes()).map_err(|e| failed(manifest::FILE, e))?;
    sync_dir(&tmp)?;

    // Swap into place: an existing checkpoint of the same name is moved aside first and
    // removed only once the new one is in place.
    let old = parent.join(format!(".{name}.old"));
    if dest.exists() {
        remove_any(&old)?;
        std::fs::rename(dest, &old).map_err(io_err(dest))?;
    }
    if let Err(e) = std::fs::rename(&tmp, dest) {
        if old.exists() {
            let _ = std::fs::rename(&old, dest);
        }
        return Err(io_err(dest)(e));
    }
    guard.committed = true;
    sync_dir(parent)?;
    remove_any(&old)?;
    Ok(dest.to_path_buf())
}

/// The newest complete checkpoint beside `dest`, other than `dest` (for a failed save's error).
fn previous_checkpoint(parent: &Path, dest: &Path) -> Option<PathBuf> {
    list(parent)
        .ok()?
        .into_iter()
        .map(|(_, p)| p)
        .rfind(|p| p != dest)
}

fn json_bytes<T: Serialize>(path: &Path, value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(value).map_err(|e| ckpt_err(path, e.to_string()))
}

/// Suffix of a checkpoint directory being deleted (`.ckpt_000012.removed`).
const REMOVED: &str = ".removed";

/// Deletes checkpoint `dir` without ever leaving a half-deleted `ckpt_<step>` that looks
/// complete: it is renamed to the hidden `.ckpt_<step>.removed` first (one atomic step, and
/// nothing lists that name), then deleted. A deletion that a kill interrupted is finished by
/// [`remove_stale`].
pub fn remove(dir: &Path) -> Result<()> {
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let doomed = dir.with_file_name(format!(".{name}{REMOVED}"));
    if doomed.exists() {
        std::fs::remove_dir_all(&doomed).map_err(io_err(&doomed))?;
    }
    std::fs::rename(dir, &doomed).map_err(io_err(dir))?;
    std::fs::remove_dir_all(&doomed).map_err(io_err(&doomed))
}

/// Finishes the deletions of [`remove`] that a killed process left in `run_dir`.
pub fn remove_stale(run_dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return Ok(());
    };
    for entry in entries {
        let path = entry.map_err(io_err(run_dir))?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with(&format!(".{PREFIX}")) && name.ends_with(REMOVED) {
            std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
        }
    }
    Ok(())
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
    let diffs: Vec<String> = fields
        .iter()
        .filter(|(_, f, w)| f != w)
        .map(|(name, f, w)| {
            format!("{name} is {f} in the checkpoint but {w} in the requested model")
        })
        .collect();
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
/// stage `stage`.
pub fn load_training<B: Backend>(
    be: &B,
    dir: &Path,
    model: &Gpt<B>,
    stage: &str,
) -> Result<(AdamW<B>, TrainState)> {
    let manifest = manifest_of(dir)?;
    let state = state_in(dir, &manifest, stage)?;
    let path = dir.join("optimizer.safetensors");
    let bytes = manifest.read_verified(dir, "optimizer.safetensors")?;
    let st = parse_safetensors(&path, &bytes)?;
    let m = tensors_of(&path, &st, &model.layout.specs, "m.")?;
    let v = tensors_of(&path, &st, &model.layout.specs, "v.")?;
    let mut opt = AdamW::new(be, model)?;
    for (buf, host) in opt.m.iter_mut().zip(&m) {
        be.write(buf, host)?;
    }
    for (buf, host) in opt.v.iter_mut().zip(&v) {
        be.write(buf, host)?;
    }
    opt.step = state.step as u64;
    Ok((opt, state))
}

/// Everything a resume of stage `stage` restores from checkpoint `dir`: the model (whose
/// config must be `wanted`), the optimizer and the state. The stage is checked first, so a
/// run directory of another stage is named as such, not as a config mismatch.
pub fn resume<B: Backend>(
    be: &B,
    dir: &Path,
    wanted: &ModelConfig,
    stage: &str,
) -> Result<(Gpt<B>, AdamW<B>, TrainState)> {
    load_state(dir, stage)?;
    let model = load_model(be, dir, Some(wanted))?;
    let (opt, state) = load_training(be, dir, &model, stage)?;
    Ok((model, opt, state))
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
