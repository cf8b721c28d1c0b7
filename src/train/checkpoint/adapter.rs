//! The adapters of a LoRA checkpoint in PEFT's layout, in the folder `adapter/` inside it
//! (`adapter_config.json` + `adapter_model.safetensors`, [`crate::hf::peft`]): what `sample
//! --adapter`, PEFT's `PeftModel.from_pretrained` and `export hf` of a LoRA run read. It is a
//! copy for sharing: the checkpoint's own `model.safetensors` holds the same values and is
//! what a resume reads, so the folder stays outside the manifest.

use super::{ckpt_err, Tensors};
use crate::config::ModelConfig;
use crate::model::ParamLayout;
use crate::train::Result;
use std::path::Path;

/// The folder's name inside a checkpoint.
pub const ADAPTER_DIR: &str = "adapter";

/// The adapter tensors of `values` (a LoRA model's tensors in `cfg`'s layout), `A` then `B`
/// per adapter in layout order: what [`crate::hf::peft::write_adapter`] takes.
pub fn adapters_of(cfg: &ModelConfig, values: &[Vec<f32>]) -> Tensors {
    ParamLayout::new(cfg)
        .lora
        .iter()
        .flat_map(|s| [values[s.a].clone(), values[s.b].clone()])
        .collect()
}

/// Writes the adapters of `values` (in `cfg`'s layout; `cfg.lora` set) to `dir` in PEFT's
/// layout.
pub fn write_beside(dir: &Path, cfg: &ModelConfig, values: &[Vec<f32>]) -> Result<()> {
    let adapters = adapters_of(cfg, values);
    crate::hf::peft::write_adapter(dir, cfg, &adapters)
        .map_err(|e| ckpt_err(dir, format!("writing the PEFT adapter: {e}")))
}
