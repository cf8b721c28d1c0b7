//! `--adapter DIR` of `sample`, `chat` and `eval`: a base checkpoint (`--checkpoint`) plus a
//! PEFT adapter directory (a LoRA run's `ckpt_*/adapter/`, or one PEFT wrote), merged into a
//! plain model on the host ([`crate::model::lora::merged`]) before it goes to the device, so
//! generation runs at the base model's speed.

use super::inputs::resolve_checkpoint;
use super::CommandError;
use crate::backend::Backend;
use crate::model::{lora, Gpt};
use crate::train::checkpoint::{self, ADAPTER_DIR};
use std::path::{Path, PathBuf};

/// The PEFT adapter directory `path` names: a directory with `adapter_config.json`, or a
/// LoRA run's checkpoint or run directory (its newest checkpoint's `adapter/`).
pub fn resolve_adapter(path: &Path) -> Result<PathBuf, CommandError> {
    if path.join("adapter_config.json").is_file() {
        return Ok(path.to_path_buf());
    }
    let found = resolve_checkpoint(path)
        .ok()
        .map(|c| c.join(ADAPTER_DIR))
        .filter(|d| d.join("adapter_config.json").is_file());
    found.ok_or_else(|| {
        CommandError::arg(
            "--adapter",
            format!(
                "{}: no adapter_config.json (expected a PEFT adapter directory, or a LoRA run's \
                 checkpoint or run directory, whose checkpoints hold one in {ADAPTER_DIR}/)",
                path.display()
            ),
        )
    })
}

/// The model of checkpoint `dir` on `be`, with the PEFT adapter `adapter` merged into it when
/// one is given (`dir` must then be a plain model: the adapter's base).
pub fn load_model_with_adapter<B: Backend>(
    be: &B,
    dir: &Path,
    adapter: Option<&Path>,
) -> Result<Gpt<B>, CommandError> {
    let Some(adapter) = adapter else {
        return Ok(checkpoint::load_model(be, dir, None)?);
    };
    let adapter = resolve_adapter(adapter)?;
    let base = checkpoint::load_values(dir)?;
    if base.cfg.lora.is_some() {
        return Err(CommandError::arg(
            "--adapter",
            format!(
                "--checkpoint {} is a LoRA run's checkpoint, which holds its adapters already; \
                 give the base model it was trained from as --checkpoint, or drop --adapter",
                dir.display()
            ),
        ));
    }
    if base.reward_head.is_some() {
        return Err(CommandError::arg(
            "--adapter",
            format!(
                "--checkpoint {} is a reward model; an adapter goes on the language model it \
                 was trained from",
                dir.display()
            ),
        ));
    }
    let (lora_cfg, adapters) = crate::hf::peft::read_adapter(&adapter, &base.cfg)?;
    let mut cfg = base.cfg.clone();
    cfg.lora = Some(lora_cfg);
    cfg.validate().map_err(|e| {
        CommandError::arg(
            "--adapter",
            format!("{}: does not fit {}: {e}", adapter.display(), dir.display()),
        )
    })?;
    let mut values = base.values;
    values.extend(adapters);
    let (base_cfg, merged) = lora::merged(&cfg, values);
    Ok(Gpt::from_values(be, &base_cfg, merged)?)
}
