//! `prepare sft`: conversations JSONL -> `sft_train.bin` / `sft_val.bin` token shards (the usual
//! shard format) plus a sidecar per shard, `sft_train.idx` / `sft_val.idx`, holding the example
//! boundaries and the loss mask (format in docs/FORMATS.md); and [`SftSplit`], which reads them.
//!
//! Each conversation renders with the chat template (`chat.rs`) into one example; the examples
//! of a split are concatenated in the shard. Length rule: an example longer than `max_len` tokens
//! is cut to its first `max_len` tokens and kept (counted as truncated) when at least one
//! trained-on token survives the cut; otherwise (the prompt alone fills the context) it is
//! dropped and counted as dropped. Split: a seeded shuffle picks `round(n * val_fraction)`
//! examples for validation (at least one when the fraction is positive and there are two or more
//! examples); both splits keep file order. The dataset (shards, sidecars, tokenizer,
//! `dataset.json`) is written aside and switched in at the end as a whole (`dataset.rs`).

use std::path::{Path, PathBuf};

use super::chat::{read_conversations, render, Rendered};
use super::dataset::{expect_kind, DatasetKind, Staging};
use super::error::{DataError, Result};
use super::prepared::{
    check_options, read_sidecar, split_train_val, write_sidecar, SidecarFormat, SidecarSeq,
};
use super::shard::write_shard;
use super::tokenizer::Tokenizer;

/// Sidecar magic and version (the first two little-endian i32 of a `.idx` file).
pub const IDX_MAGIC: i32 = 20240601;
pub const IDX_VERSION: i32 = 1;

/// The SFT sidecar: one sequence per example, no per-sequence fields.
const SFT_SIDECAR: SidecarFormat = SidecarFormat {
    magic: IDX_MAGIC,
    version: IDX_VERSION,
    seqs_per_item: 1,
    fields_per_seq: 0,
    min_items: 0,
    items: "examples",
    seq: "example",
    hint: "",
};

#[derive(Clone, Debug)]
pub struct SftPrepareOptions {
    pub out: PathBuf,
    /// Most tokens per example (the context length the examples are meant for).
    pub max_len: usize,
    pub val_fraction: f64,
    pub seed: u64,
}

impl SftPrepareOptions {
    pub fn new(out: impl Into<PathBuf>) -> Self {
        Self {
            out: out.into(),
            max_len: 256,
            val_fraction: 0.1,
            seed: 1337,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SftPrepareSummary {
    pub conversations: usize,
    pub train_examples: usize,
    pub val_examples: usize,
    pub train_tokens: usize,
    pub val_tokens: usize,
    /// Trained-on (assistant) tokens in the training split.
    pub train_loss_tokens: usize,
    /// Examples cut to `max_len` tokens and kept.
    pub truncated: usize,
    /// Examples dropped because no trained-on token fit in `max_len`.
    pub dropped: usize,
}

/// Renders, cuts, splits and writes the conversations of `input` (see the module header).
pub fn prepare_sft(
    input: &Path,
    tok: &Tokenizer,
    opts: &SftPrepareOptions,
) -> Result<SftPrepareSummary> {
    check_options(opts.max_len, opts.val_fraction, "an example")?;
    let convs = read_conversations(input)?;
    let mut s = SftPrepareSummary {
        conversations: convs.len(),
        ..Default::default()
    };
    let mut examples = Vec::with_capacity(convs.len());
    for c in &convs {
        let mut r = render(tok, c)?;
        if r.ids.len() > opts.max_len {
            r.ids.truncate(opts.max_len);
            r.loss_mask.truncate(opts.max_len);
            // The first token is never a target, so its mask entry does not count.
            if !r.loss_mask[1..].iter().any(|&m| m) {
                s.dropped += 1;
                continue;
            }
            s.truncated += 1;
        }
        examples.push(r);
    }
    if examples.is_empty() {
        return Err(DataError::InvalidArgument(format!(
            "{}: no example left to train on ({} conversations, {} dropped as longer than max_len {})",
            input.display(),
            convs.len(),
            s.dropped,
            opts.max_len
        )));
    }
    let (train, val) = split_train_val(examples, opts.val_fraction, opts.seed);
    let staging = Staging::begin(&opts.out, DatasetKind::Sft)?;
    s.train_examples = train.len();
    s.val_examples = val.len();
    s.train_tokens = write_split(staging.dir(), "sft_train", &train, tok.vocab_size())?;
    s.train_loss_tokens = train
        .iter()
        .map(|r| r.loss_mask[1..].iter().filter(|&&m| m).count())
        .sum();
    if !val.is_empty() {
        s.val_tokens = write_split(staging.dir(), "sft_val", &val, tok.vocab_size())?;
    }
    staging.commit(DatasetKind::Sft, tok)?;
    Ok(s)
}

/// Writes `{name}.bin` and `{name}.idx`; returns the token count.
fn write_split(dir: &Path, name: &str, examples: &[Rendered], vocab: usize) -> Result<usize> {
    let ids: Vec<u32> = examples
        .iter()
        .flat_map(|r| r.ids.iter().copied())
        .collect();
    write_shard(dir.join(format!("{name}.bin")), &ids, vocab)?;
    let seqs: Vec<SidecarSeq> = examples
        .iter()
        .map(|r| SidecarSeq {
            len: r.ids.len(),
            fields: &[],
            mask: &r.loss_mask,
        })
        .collect();
    let path = dir.join(format!("{name}.idx"));
    write_sidecar(&path, &SFT_SIDECAR, examples.len(), &seqs)?;
    Ok(ids.len())
}

/// The examples of one prepared split, in memory.
#[derive(Clone, Debug)]
pub struct SftSplit {
    tokens: Vec<u32>,
    mask: Vec<bool>,
    /// Example `i` is `tokens[offsets[i]..offsets[i + 1]]`.
    offsets: Vec<usize>,
}

impl SftSplit {
    /// Reads `{dir}/{name}.bin` and `{dir}/{name}.idx` (name: `sft_train` or `sft_val`),
    /// checking that they agree and that every id is below `vocab_size`.
    pub fn open(dir: &Path, name: &str, vocab_size: usize) -> Result<Self> {
        expect_kind(dir, DatasetKind::Sft)?;
        let sidecar = read_sidecar(dir, name, vocab_size, &SFT_SIDECAR)?;
        Ok(Self {
            tokens: sidecar.tokens,
            mask: sidecar.mask,
            offsets: sidecar.offsets,
        })
    }

    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Example `i`: its ids and loss mask.
    pub fn example(&self, i: usize) -> (&[u32], &[bool]) {
        let (a, b) = (self.offsets[i], self.offsets[i + 1]);
        (&self.tokens[a..b], &self.mask[a..b])
    }
}
