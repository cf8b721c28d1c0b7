//! `prepare` (raw text -> token shards), `prepare sft` (conversations -> SFT shards with loss
//! masks), `prepare prefs` (preference pairs -> a pair shard), `tokenizer train`, and the
//! embedded default corpus that `pretrain` prepares when it is given no data. Each hands the
//! tokenizer to the data layer, which saves it inside the dataset it switches in as a whole
//! (`data/dataset.rs`), so later commands can check they agree.

use super::inputs::TokenizerArg;
use super::CommandError;
use crate::data::{
    self, PrefsPrepareOptions, PrefsPrepareSummary, PrepareOptions, PrepareSummary, ProgressEvent,
    SftPrepareOptions, SftPrepareSummary, Tokenizer,
};
use crate::stages::pretrain::split_files;
use crate::train::{io_err, TrainError};
use std::path::{Path, PathBuf};

type Result<T> = std::result::Result<T, CommandError>;

/// The embedded default corpus (data/corpus/, see its README and LICENSES.md), JSONL with one
/// `{"text": ...}` document per line.
pub const EMBEDDED_CORPUS: &[u8] = include_bytes!("../../data/corpus/corpus.jsonl");

/// Vocabulary of the BPE trained on the embedded corpus.
pub const EMBEDDED_VOCAB: usize = 4096;

/// `prepare INPUTS --out DIR`: raw text into train/val token shards.
pub struct PrepareTextJob {
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    /// `gpt2`, `bpe` (trained on the inputs) or a tokenizer path.
    pub tokenizer: TokenizerArg,
    /// Vocabulary size of a trained BPE.
    pub vocab_size: usize,
    pub val_fraction: f64,
    pub shard_tokens: usize,
}

/// Prepares the text of `job`; `progress` gets each event, `note` status lines. Returns the
/// summary and the tokenizer (saved as `out/tokenizer.json`).
pub fn prepare_text(
    job: &PrepareTextJob,
    note: &dyn Fn(&str),
    progress: &dyn Fn(ProgressEvent),
) -> Result<(PrepareSummary, Tokenizer)> {
    let tok = match &job.tokenizer {
        TokenizerArg::TrainBpe => train_tokenizer(&job.inputs, job.vocab_size, note)?,
        other => other.load("prepare")?,
    };
    let opts = PrepareOptions {
        val_fraction: job.val_fraction,
        shard_tokens: job.shard_tokens,
        ..PrepareOptions::new(&job.out)
    };
    let summary = data::prepare(&job.inputs, &tok, &opts, progress)?;
    Ok((summary, tok))
}

/// `tokenizer train`, and `prepare --tokenizer bpe`: a byte-level BPE of `vocab_size` ids
/// trained on the documents of `inputs`.
pub fn train_tokenizer(
    inputs: &[PathBuf],
    vocab_size: usize,
    note: &dyn Fn(&str),
) -> Result<Tokenizer> {
    let docs = data::prepare::read_documents(inputs)?;
    note(&format!(
        "training a {vocab_size}-token BPE on {} documents",
        docs.len()
    ));
    let tok = Tokenizer::train_bpe(docs.iter().map(String::as_str), vocab_size, |_, _| {})?;
    if tok.vocab_size() < vocab_size {
        note(&format!(
            "the BPE reached {} tokens, not the {vocab_size} asked: the text ran out of byte pairs \
             to merge (too little text for that vocabulary); give more text or a smaller \
             --vocab-size",
            tok.vocab_size()
        ));
    }
    Ok(tok)
}

/// `prepare sft`: renders the conversations of `input` into `opts.out` with the tokenizer
/// named by `tokenizer` (saved in the dataset).
pub fn prepare_sft(
    input: &Path,
    tokenizer: &TokenizerArg,
    opts: &SftPrepareOptions,
) -> Result<SftPrepareSummary> {
    let tok = tokenizer.load("prepare sft")?;
    Ok(data::prepare_sft(input, &tok, opts)?)
}

/// `prepare prefs`: renders the pairs of `input` into `opts.out` with the tokenizer named by
/// `tokenizer` (saved in the dataset).
pub fn prepare_prefs(
    input: &Path,
    tokenizer: &TokenizerArg,
    opts: &PrefsPrepareOptions,
) -> Result<PrefsPrepareSummary> {
    let tok = tokenizer.load("prepare prefs")?;
    Ok(data::prepare_prefs(input, &tok, opts)?)
}

/// Makes sure `dir` holds the embedded corpus prepared with a BPE tokenizer trained on it
/// (`tokenizer.json`, `train_*.bin`, `val_*.bin`), preparing it on first use.
pub(super) fn prepare_embedded(
    dir: &Path,
    progress: &dyn Fn(&str),
) -> std::result::Result<PathBuf, TrainError> {
    if dir.join("tokenizer.json").exists() && split_files(dir, "train").is_ok() {
        return Ok(dir.to_path_buf());
    }
    // The corpus file is an input, not part of the dataset: it lives beside the dataset
    // directory while the dataset is made, and is removed after.
    let name = dir
        .file_name()
        .map_or("data".into(), |n| n.to_string_lossy());
    let corpus = dir.with_file_name(format!(".{name}.embedded_corpus.jsonl"));
    if let Some(parent) = corpus.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    std::fs::write(&corpus, EMBEDDED_CORPUS).map_err(io_err(&corpus))?;
    struct Remove<'a>(&'a Path);
    impl Drop for Remove<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0);
        }
    }
    let _remove = Remove(&corpus);
    let docs = data::prepare::read_documents(&[&corpus])?;
    progress(&format!(
        "embedded corpus: {} documents, {:.1} MB; training a {EMBEDDED_VOCAB}-token BPE",
        docs.len(),
        EMBEDDED_CORPUS.len() as f64 / 1e6
    ));
    let tok = Tokenizer::train_bpe(docs.iter().map(String::as_str), EMBEDDED_VOCAB, |_, _| {})?;
    let summary = data::prepare(&[&corpus], &tok, &PrepareOptions::new(dir), &|_| {})?;
    progress(&format!(
        "prepared {}: {} train tokens, {} val tokens",
        dir.display(),
        summary.tokens_train,
        summary.tokens_val
    ));
    Ok(dir.to_path_buf())
}
