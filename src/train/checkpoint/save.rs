//! Writing and deleting checkpoints: [`save`] assembles the files in `.ckpt_<step>.tmp`,
//! fsyncs them, writes the manifest last and renames the directory into place (a full disk
//! is [`CheckpointError::DiskFull`], and the temporary directory never outlives an error);
//! [`remove`] deletes one without ever leaving a listed half checkpoint.

use super::{ckpt_err, list, CheckpointError, Tensors, TrainState, PREFIX};
use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::data::Tokenizer;
use crate::model::{Gpt, ParamSpec};
use crate::optim::AdamW;
use crate::train::manifest::{self, sha256_hex, Entry, Manifest};
use crate::train::{io_err, Result, TrainError};
use safetensors::tensor::{Dtype, TensorView};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

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

/// Refuses tensors holding a NaN or an infinity (`kind` names what they are: "weight",
/// "first moment of"), naming the first such one.
fn refuse_non_finite(
    dest: &Path,
    kind: &str,
    specs: &[ParamSpec],
    values: &[Vec<f32>],
) -> Result<()> {
    match specs
        .iter()
        .zip(values)
        .find(|(_, v)| v.iter().any(|x| !x.is_finite()))
    {
        Some((spec, _)) => Err(CheckpointError::NotFinite {
            dir: dest.to_path_buf(),
            what: format!("the {kind} {}", spec.name),
        }
        .into()),
        None => Ok(()),
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
    let weights = model.param_values(be)?;
    let moments = match training {
        Some((opt, state)) => {
            let all = |bufs: &[Option<B::Buf>]| -> Result<Vec<Vec<f32>>> {
                bufs.iter()
                    .enumerate()
                    .map(|(i, b)| match b {
                        Some(b) => Ok(be.download(b)?),
                        // A frozen tensor (a LoRA model's base) has no moments.
                        None if !model.layout.specs[i].trainable => Ok(Vec::new()),
                        None => Err(ckpt_err(
                            dest,
                            format!(
                                "this rank does not hold the moments of {} (ZeRO-1); save \
                                 with checkpoint::save_ranked",
                                model.layout.specs[i].name
                            ),
                        )),
                    })
                    .collect()
            };
            Some((all(&opt.m)?, all(&opt.v)?, state))
        }
        None => None,
    };
    let contents = Contents {
        cfg: &model.cfg,
        specs: &model.layout.specs,
        weights,
        tokenizer,
        training: moments,
    };
    write_checkpoint(dest, contents, write)
}

/// A checkpoint's contents on the host: the weights and, for training, the moments `m`, `v`
/// (layout order) and the state.
pub(super) struct Contents<'a> {
    pub cfg: &'a ModelConfig,
    pub specs: &'a [ParamSpec],
    pub weights: Vec<Vec<f32>>,
    pub tokenizer: &'a Tokenizer,
    pub training: Option<(Tensors, Tensors, &'a TrainState)>,
}

/// Writes `contents` as checkpoint `dest`, atomically (the module header's procedure).
pub(super) fn write_checkpoint(
    dest: &Path,
    contents: Contents<'_>,
    write: &WriteFile<'_>,
) -> Result<PathBuf> {
    let Contents {
        cfg,
        specs,
        weights: values,
        tokenizer,
        training,
    } = contents;
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

    refuse_non_finite(dest, "weight", specs, &values)?;
    if cfg.lora.is_some() {
        super::adapter::write_beside(&tmp.join(super::ADAPTER_DIR), cfg, &values)?;
    }
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
    put("config.json", &json_bytes(dest, cfg)?)?;
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
    if let Some((m, v, state)) = training {
        refuse_non_finite(dest, "first moment of", specs, &m)?;
        refuse_non_finite(dest, "second moment of", specs, &v)?;
        let mut tensors = Vec::with_capacity(2 * specs.len());
        // Moments of the trained tensors only (a LoRA model's frozen base has none).
        for (s, data) in specs.iter().zip(&m).filter(|(s, _)| s.trainable) {
            tensors.push((format!("m.{}", s.name), s.shape.clone(), data.as_slice()));
        }
        for (s, data) in specs.iter().zip(&v).filter(|(s, _)| s.trainable) {
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
