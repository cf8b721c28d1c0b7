//! `import hf` and `export hf` as library calls: resolve what the user named, then
//! [`crate::hf`] does the work on the CPU (no device is opened: it is a file conversion).

use super::inputs::resolve_checkpoint;
use super::CommandError;
use crate::hf::{self, ExportOptions, ExportSummary, HfDtype, ImportOptions, ImportSummary};
use std::path::Path;

/// `import hf DIR --out RUN [--tokenizer gpt2]`.
pub fn import(
    dir: &Path,
    out: &Path,
    gpt2_tokenizer: bool,
    progress: &dyn Fn(&str),
) -> Result<ImportSummary, CommandError> {
    if !dir.is_dir() {
        return Err(CommandError::arg(
            "DIR",
            format!(
                "{}: not a directory (expected a Hugging Face model directory)",
                dir.display()
            ),
        ));
    }
    let opts = ImportOptions { gpt2_tokenizer };
    Ok(hf::import_hf(dir, out, &opts, progress)?)
}

/// `export hf RUN --out DIR [--dtype f32|bf16|f16] [--merge]`: RUN is a checkpoint or a run
/// directory (its newest checkpoint). A LoRA run's exports as a PEFT adapter directory, or
/// with `merge` as the merged full model; `merge` on any other run is an error.
pub fn export(
    run: &Path,
    out: &Path,
    dtype: HfDtype,
    merge: bool,
    progress: &dyn Fn(&str),
) -> Result<ExportSummary, CommandError> {
    let ckpt = resolve_checkpoint(run)?;
    if merge && crate::train::checkpoint::load_config(&ckpt)?.lora.is_none() {
        return Err(CommandError::arg(
            "--merge",
            format!(
                "{} is not a LoRA run's checkpoint (its config.json has no \"lora\"), so \
                 there are no adapters to merge; drop --merge",
                ckpt.display()
            ),
        ));
    }
    Ok(hf::export_hf(
        &ckpt,
        out,
        &ExportOptions { dtype, merge },
        progress,
    )?)
}
