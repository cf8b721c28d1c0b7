//! Checkpoints: a directory `ckpt_<step>` per save, written atomically.
//!
//! Contents (docs/FORMATS.md): `model.safetensors` (weights, f32, layout names),
//! `config.json` (the [`ModelConfig`]), `tokenizer.json`, and for training checkpoints
//! `optimizer.safetensors` (AdamW moments `m.<name>`, `v.<name>`) and `train_state.json`
//! ([`TrainState`]: step, RNG, data position, run config). The directory is assembled under a
//! temporary name and renamed into place, so a crash leaves either the old set or the new
//! one, never a half-written checkpoint. A model with a reward head saves and loads it like any
//! other parameter (`reward_head.weight`, `reward_head.bias`).

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
use std::path::{Path, PathBuf};

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

/// Completed checkpoints in `run_dir`, oldest first.
pub fn list(run_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
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
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest completed checkpoint, if any.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list(run_dir)?.pop().map(|(_, p)| p))
}

fn write_safetensors(path: &Path, tensors: Vec<(String, Vec<usize>, &[f32])>) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(data))
                .map(|v| (name.clone(), v))
                .map_err(|e| ckpt_err(path, format!("tensor {name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, &None, path).map_err(|e| ckpt_err(path, e.to_string()))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| ckpt_err(path, e.to_string()))?;
    std::fs::write(path, text).map_err(io_err(path))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|e| ckpt_err(path, format!("invalid JSON: {e}")))
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
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;

    let specs = &model.layout.specs;
    let values = model.param_values(be)?;
    write_safetensors(
        &tmp.join("model.safetensors"),
        specs
            .iter()
            .zip(&values)
            .map(|(s, v)| (s.name.clone(), s.shape.clone(), v.as_slice()))
            .collect(),
    )?;
    write_json(&tmp.join("config.json"), &model.cfg)?;
    tokenizer.save(tmp.join("tokenizer.json"))?;
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
        write_safetensors(&tmp.join("optimizer.safetensors"), tensors)?;
        write_json(&tmp.join("train_state.json"), state)?;
    }

    // Swap into place: an existing checkpoint of the same name is moved aside first and
    // removed only once the new one is in place.
    let old = parent.join(format!(".{name}.old"));
    if dest.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
        }
        std::fs::rename(dest, &old).map_err(io_err(dest))?;
    }
    std::fs::rename(&tmp, dest).map_err(io_err(dest))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
    }
    Ok(dest.to_path_buf())
}

/// Removes all but the newest `keep` checkpoints of `run_dir` (0 keeps all).
pub fn prune(run_dir: &Path, keep: usize) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let all = list(run_dir)?;
    for (_, path) in all.iter().take(all.len().saturating_sub(keep)) {
        std::fs::remove_dir_all(path).map_err(io_err(path))?;
    }
    Ok(())
}

/// Reads a checkpoint's model config.
pub fn load_config(dir: &Path) -> Result<ModelConfig> {
    if !dir.is_dir() {
        return Err(ckpt_err(
            dir,
            "not a checkpoint directory (expected config.json, model.safetensors, tokenizer.json)",
        ));
    }
    let cfg: ModelConfig = read_json(&dir.join("config.json"))?;
    cfg.validate()
        .map_err(|e| ckpt_err(&dir.join("config.json"), e.to_string()))?;
    Ok(cfg)
}

/// Reads a checkpoint's tokenizer.
pub fn load_tokenizer(dir: &Path) -> Result<Tokenizer> {
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

/// Reads tensors named `prefix + spec.name` for every spec of `layout`, checking shapes.
fn read_tensors(path: &Path, layout: &ParamLayout, prefix: &str) -> Result<Vec<Vec<f32>>> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| ckpt_err(path, format!("invalid safetensors: {e}")))?;
    tensors_of(path, &st, &layout.specs, prefix)
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

/// Loads a checkpoint's weights onto `be`; when `wanted` is given, the checkpoint's config must match it.
pub fn load_model<B: Backend>(be: &B, dir: &Path, wanted: Option<&ModelConfig>) -> Result<Gpt<B>> {
    let cfg = load_config(dir)?;
    if let Some(w) = wanted {
        check_config(dir, &cfg, w)?;
    }
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| ckpt_err(&path, format!("invalid safetensors: {e}")))?;
    let values = tensors_of(&path, &st, &ParamLayout::new(&cfg).specs, "")?;
    let mut model = Gpt::from_values(be, &cfg, values)?;
    // A reward checkpoint also holds the reward head.
    if st.tensor(reward::HEAD_WEIGHT).is_ok() {
        let head = tensors_of(&path, &st, &reward::head_specs(cfg.n_embd), "")?;
        model.add_reward_head(be, &head[0], head[1][0])?;
    }
    Ok(model)
}

/// Restores the optimizer moments and the training state of a training checkpoint.
pub fn load_training<B: Backend>(
    be: &B,
    dir: &Path,
    model: &Gpt<B>,
) -> Result<(AdamW<B>, TrainState)> {
    let state_path = dir.join("train_state.json");
    if !state_path.exists() {
        return Err(ckpt_err(
            dir,
            "has no train_state.json: it is a weights-only checkpoint and cannot be resumed",
        ));
    }
    let state: TrainState = read_json(&state_path)?;
    let path = dir.join("optimizer.safetensors");
    let m = read_tensors(&path, &model.layout, "m.")?;
    let v = read_tensors(&path, &model.layout, "v.")?;
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
