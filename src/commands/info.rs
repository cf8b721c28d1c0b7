//! `info` as a library call: a human-readable description of a token shard, a prepared data
//! directory, a checkpoint, or a run directory (its newest checkpoint); and [`kernels_text`],
//! the kernel code this build holds and the code the CUDA card here would run.

use super::inputs::resolve_checkpoint;
use crate::backend::cuda::kernels::{MODULES, NVCC_VERSION};
use crate::backend::cuda::{self, arch, BuildCode, KernelVariants};
use crate::data::{DataError, Shard};
use crate::train::{checkpoint, io_err, TrainError};
use std::fmt::Write as _;
use std::path::Path;

/// A human-readable description of a shard file, a checkpoint, or a run directory.
pub fn info(path: &Path) -> Result<String, TrainError> {
    let mut s = String::new();
    if !path.exists() {
        return Err(DataError::InvalidArgument(format!(
            "{} does not exist: `topcoat info` takes a token shard (.bin), a checkpoint \
             directory or a run directory",
            path.display()
        ))
        .into());
    }
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
    if path.join("tokenizer.json").is_file() && !path.join("config.json").exists() {
        return data_dir_info(path);
    }
    let dir = resolve_checkpoint(path)?;
    let cfg = checkpoint::load_config(&dir)?;
    let _ = writeln!(s, "checkpoint {}", dir.display());
    let _ = writeln!(
        s,
        "  model: {} layers, {} heads, d={}, max_seq_len {}",
        cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.max_seq_len
    );
    if let Some(line) = super::plan::family_line(&cfg) {
        let _ = writeln!(s, "{line}");
    }
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
        let _ = writeln!(s, "{}", tokenizer_line(&tok));
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

/// Two lines: the code the embedded fatbins hold, and the CUDA device here (its name, compute
/// capability, memory, and the code it would run with `variants`), or why there is none.
pub fn kernels_text(variants: KernelVariants) -> String {
    let build = BuildCode::of(MODULES);
    let mut s = match &build {
        Ok(code) => format!("kernels: nvcc {NVCC_VERSION}, {code}\n"),
        Err(_) if !cuda::BUILT_WITH_NVCC => "kernels: none (built without nvcc: CPU only)\n".into(),
        Err(e) => format!("kernels: {e}\n"),
    };
    let device = match cuda::probe() {
        Err(e) => format!("none ({e})"),
        Ok(info) => match build
            .and_then(|code| arch::choose(&info.name, info.compute_capability, &code, variants))
        {
            Ok(code) => format!("{info}, kernels: {code}"),
            Err(e) => format!("{info}: {e}"),
        },
    };
    let _ = writeln!(s, "cuda device: {device}");
    s
}

/// The line that describes a tokenizer: its kind, size, end-of-text id and fingerprint.
fn tokenizer_line(tok: &crate::data::Tokenizer) -> String {
    format!(
        "  tokenizer: {:?}, {} ids, eot {}, sha256 {}",
        tok.kind(),
        tok.vocab_size(),
        tok.eot(),
        tok.short_fingerprint()
    )
}

/// A prepared data directory: its tokenizer (with its fingerprint) and its files.
fn data_dir_info(dir: &Path) -> Result<String, TrainError> {
    let tok = crate::data::Tokenizer::load(dir.join("tokenizer.json"))?;
    let mut s = String::new();
    let _ = writeln!(s, "prepared data {}", dir.display());
    let _ = writeln!(s, "{}", tokenizer_line(&tok));
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "tokenizer.json")
        .collect();
    names.sort();
    let shown = names.len().min(8);
    let more = names.len() - shown;
    let _ = write!(s, "  files: {}", names[..shown].join(", "));
    let _ = writeln!(
        s,
        "{}",
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    );
    Ok(s)
}
