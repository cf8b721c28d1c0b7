//! `import hf DIR --out RUN`: a Hugging Face model directory into a topcoat checkpoint
//! directory (weights only: `model.safetensors`, `config.json`, `tokenizer.json`, the
//! manifest), written atomically by the checkpoint writer, that every command takes as
//! `--init` or `--checkpoint`.
//!
//! Every tensor the layout needs must be there with its shape; a tensor left over is an error
//! (it means a graph topcoat would not compute), except the buffers of [`names::is_buffer`] and
//! a tied head's `lm_head.weight` equal to the embedding.

use super::config::{self, Arch, HfModel};
use super::names::{self, Mapping};
use super::read::HfWeights;
use super::{HfError, Result};
use crate::backend::cpu::CpuBackend;
use crate::config::{pad_vocab, ModelConfig};
use crate::data::Tokenizer;
use crate::model::{Gpt, ParamLayout};
use crate::train::checkpoint;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// What `import hf` takes besides the two directories.
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// `--tokenizer gpt2`: GPT-2's tokenizer instead of the directory's `tokenizer.json`.
    pub gpt2_tokenizer: bool,
}

/// What an import did, for the command's report.
#[derive(Clone, Debug)]
pub struct ImportSummary {
    pub arch: Arch,
    pub cfg: ModelConfig,
    /// Hugging Face tensors read, and their bytes in the files.
    pub tensors: usize,
    pub bytes: u64,
    /// Safetensors files read.
    pub files: usize,
    /// Tensors skipped: buffers, a tied duplicate head.
    pub skipped: Vec<String>,
    /// The vocabulary rows the tokenizer added beyond the model's (zero at first), if any.
    pub added_rows: usize,
    pub out: PathBuf,
}

/// A Hugging Face model read into topcoat's layout, before any tokenizer is attached.
pub struct HfImport {
    pub arch: Arch,
    /// The topcoat shape (vocabulary as `config.json` gives it).
    pub cfg: ModelConfig,
    /// Every tensor in [`ParamLayout`] order, padded rows zero.
    pub values: Vec<Vec<f32>>,
    /// Hugging Face tensors read, and the bytes and number of files holding them.
    pub tensors: usize,
    pub bytes: u64,
    pub files: usize,
    /// Tensors skipped: buffers, a tied duplicate head.
    pub skipped: Vec<String>,
}

/// Reads the model in `dir` (config.json and the weights) into topcoat's layout.
pub fn read_model(dir: &Path, progress: &dyn Fn(&str)) -> Result<HfImport> {
    check_is_model(dir)?;
    let HfModel { arch, cfg } = config::read(&config::path_in(dir))?;
    let weights = HfWeights::open(dir)?;
    progress(&format!(
        "{}: {} ({} layers, width {}, vocabulary {}), {} tensors in {} file(s), {:.1} MB",
        dir.display(),
        arch.class(),
        cfg.n_layer,
        cfg.n_embd,
        cfg.vocab_size,
        weights.names().count(),
        weights.files().len(),
        weights.total_bytes() as f64 / 1e6
    ));
    let prefix = match arch {
        Arch::Gpt2 if weights.names().any(|n| n == "transformer.wte.weight") => "transformer.",
        _ => "",
    };
    let maps = names::mappings(&cfg, cfg.vocab_size, prefix);
    let (values, read) = read_all(&cfg, &maps, &weights, progress)?;
    let skipped = check_leftovers(&cfg, &maps, &weights, &read, &values)?;
    Ok(HfImport {
        arch,
        cfg,
        values,
        tensors: read.len(),
        bytes: weights.total_bytes(),
        files: weights.files().len(),
        skipped,
    })
}

/// Gives `m` `vocab_size` vocabulary rows (more than it has): the new rows of the embedding
/// and of an untied head are zero, inside the padding or beyond it.
fn grow_vocab(m: &mut HfImport, vocab_size: usize) {
    let layout = ParamLayout::new(&m.cfg);
    let c = m.cfg.n_embd;
    m.cfg.vocab_size = vocab_size;
    m.cfg.padded_vocab_size = pad_vocab(vocab_size).max(m.cfg.padded_vocab_size);
    for i in [Some(layout.wte), layout.lm_head].into_iter().flatten() {
        m.values[i].resize(m.cfg.padded_vocab_size * c, 0.0);
    }
}

/// Imports the model in `dir` as checkpoint directory `out`, which must not exist.
pub fn import_hf(
    dir: &Path,
    out: &Path,
    opts: &ImportOptions,
    progress: &dyn Fn(&str),
) -> Result<ImportSummary> {
    if out.exists() {
        return Err(HfError::OutputExists {
            path: out.to_path_buf(),
        });
    }
    // Refuse a directory that is not a model, or has no tokenizer, before reading gigabytes
    // of weights.
    check_is_model(dir)?;
    config::read(&config::path_in(dir))?;
    if !opts.gpt2_tokenizer && !dir.join("tokenizer.json").is_file() {
        return Err(HfError::NoTokenizer {
            dir: dir.to_path_buf(),
        });
    }
    let mut m = read_model(dir, progress)?;
    let tokenizer = tokenizer(dir, opts)?;
    // A tokenizer with more ids than the model's rows (topcoat's GPT-2 tokenizer adds four
    // chat tokens to GPT-2's 50257) gets zero rows for them.
    let added_rows = tokenizer.vocab_size().saturating_sub(m.cfg.vocab_size);
    if added_rows > 0 {
        grow_vocab(&mut m, tokenizer.vocab_size());
    }
    let be = CpuBackend::new();
    let model = Gpt::from_values(&be, &m.cfg, std::mem::take(&mut m.values))?;
    // The writer syncs the parent directory: a bare relative name has an empty one.
    let dest = std::path::absolute(out).map_err(super::io_err(out))?;
    checkpoint::save(&be, &dest, &model, &tokenizer, None)?;
    Ok(ImportSummary {
        arch: m.arch,
        cfg: m.cfg,
        tensors: m.tensors,
        bytes: m.bytes,
        files: m.files,
        skipped: m.skipped,
        added_rows,
        out: out.to_path_buf(),
    })
}

/// The tokenizer the checkpoint gets: GPT-2's when asked, else the directory's own.
fn tokenizer(dir: &Path, opts: &ImportOptions) -> Result<Tokenizer> {
    if opts.gpt2_tokenizer {
        return Ok(Tokenizer::gpt2());
    }
    let json = dir.join("tokenizer.json");
    if !json.is_file() {
        return Err(HfError::NoTokenizer {
            dir: dir.to_path_buf(),
        });
    }
    let cfg = dir.join("tokenizer_config.json");
    Ok(Tokenizer::from_hf_files(
        &json,
        cfg.is_file().then_some(cfg.as_path()),
    )?)
}

/// Reads and assembles every topcoat tensor, in layout order; returns them and the names of
/// the Hugging Face tensors read.
fn read_all(
    cfg: &ModelConfig,
    maps: &[Mapping],
    weights: &HfWeights,
    progress: &dyn Fn(&str),
) -> Result<(Vec<Vec<f32>>, BTreeSet<String>)> {
    let layout = ParamLayout::new(cfg);
    let total: usize = maps.iter().map(|m| m.parts.len()).sum();
    let mut read = BTreeSet::new();
    let mut values = Vec::with_capacity(maps.len());
    let (mut elems, mut next_report) = (0usize, 0usize);
    let all_elems: usize = layout.specs.iter().map(|s| s.numel()).sum();
    for m in maps {
        let parts = m
            .parts
            .iter()
            .map(|p| weights.read_f32(&p.name, &p.shape))
            .collect::<Result<Vec<_>>>()?;
        read.extend(m.parts.iter().map(|p| p.name.clone()));
        let numel = layout.specs[m.spec].numel();
        values.push(names::assemble(m, parts, numel));
        elems += numel;
        // A line per tenth of the model: a multi-gigabyte import shows it is moving.
        if elems * 10 >= next_report * all_elems && all_elems > 50_000_000 {
            progress(&format!(
                "  read {}/{total} tensors ({:.0}%)",
                read.len(),
                100.0 * elems as f64 / all_elems as f64
            ));
            next_report = elems * 10 / all_elems + 1;
        }
    }
    Ok((values, read))
}

/// Refuses a tensor the layout did not read, unless it is a buffer or a tied head's copy of
/// the embedding; returns those skipped.
fn check_leftovers(
    cfg: &ModelConfig,
    maps: &[Mapping],
    weights: &HfWeights,
    read: &BTreeSet<String>,
    values: &[Vec<f32>],
) -> Result<Vec<String>> {
    let layout = ParamLayout::new(cfg);
    let mut skipped = Vec::new();
    for name in weights.names().filter(|n| !read.contains(*n)) {
        if names::is_buffer(name) {
            skipped.push(name.to_string());
            continue;
        }
        if name == "lm_head.weight" && layout.lm_head.is_none() {
            // A tied head saved anyway: harmless only when it is the embedding.
            let wte = &maps[layout.wte].parts[0];
            let head = weights.read_f32(name, &wte.shape)?;
            if head[..] == values[layout.wte][..head.len()] {
                skipped.push(name.to_string());
                continue;
            }
            return Err(HfError::UnexpectedTensor {
                file: weights.file_of(name).to_path_buf(),
                tensor: name.into(),
                why: format!(
                    "config.json ties the output head to {} (tie_word_embeddings), but this \
                     head differs from it",
                    wte.name
                ),
            });
        }
        return Err(HfError::UnexpectedTensor {
            file: weights.file_of(name).to_path_buf(),
            tensor: name.into(),
            why: "it is not part of the graph topcoat computes for this config".into(),
        });
    }
    Ok(skipped)
}

/// A named error for a directory that is no Hugging Face model: one without `config.json`,
/// a PEFT adapter (pointed at `--adapter`), or a topcoat checkpoint or run (its `config.json`
/// is topcoat's own; a tired user's likely mix-up), pointed at `--init`, which takes it as
/// it is.
fn check_is_model(dir: &Path) -> Result<()> {
    let topcoat = dir.join("manifest.json").is_file()
        || std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("ckpt_"))
        });
    if topcoat {
        return Err(HfError::NotAModel {
            dir: dir.to_path_buf(),
            what: "a topcoat checkpoint or run, not a Hugging Face model directory: give it to \
                   --init or --checkpoint as it is",
        });
    }
    if dir.join(super::peft::ADAPTER_CONFIG).is_file() {
        return Err(HfError::NotAModel {
            dir: dir.to_path_buf(),
            what: "a PEFT adapter directory (adapter_config.json), not a model: import its base \
                   model with `import hf`, give that to --init and this directory to --adapter",
        });
    }
    if !config::path_in(dir).is_file() {
        return Err(HfError::NotAModel {
            dir: dir.to_path_buf(),
            what: "no config.json, so not a Hugging Face model directory",
        });
    }
    Ok(())
}
