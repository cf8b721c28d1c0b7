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
//! examples); both splits keep file order. Every file is written to a temp file and renamed.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::chat::{read_conversations, render, Rendered};
use super::error::{DataError, Result};
use super::shard::{temp_sibling, write_shard, Shard};
use super::tokenizer::Tokenizer;
use crate::rng::Rng;

/// Sidecar magic and version (the first two little-endian i32 of a `.idx` file).
pub const IDX_MAGIC: i32 = 20240601;
pub const IDX_VERSION: i32 = 1;
const IDX_HEADER: usize = 24;

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
    if opts.max_len < 2 {
        return Err(DataError::InvalidArgument(format!(
            "max_len {} is too small: an example needs at least 2 tokens",
            opts.max_len
        )));
    }
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return Err(DataError::InvalidArgument(format!(
            "val_fraction {} is not in [0, 1)",
            opts.val_fraction
        )));
    }
    let convs = read_conversations(input)?;
    let mut s = SftPrepareSummary {
        conversations: convs.len(),
        ..Default::default()
    };
    let mut examples = Vec::with_capacity(convs.len());
    for c in &convs {
        let mut r = render(tok, c);
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
    let is_val = pick_val(examples.len(), opts.val_fraction, opts.seed);
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (r, v) in examples.into_iter().zip(is_val) {
        if v { &mut val } else { &mut train }.push(r);
    }
    std::fs::create_dir_all(&opts.out).map_err(|e| DataError::io(&opts.out, "create", e))?;
    s.train_examples = train.len();
    s.val_examples = val.len();
    s.train_tokens = write_split(&opts.out, "sft_train", &train, tok.vocab_size())?;
    s.train_loss_tokens = train
        .iter()
        .map(|r| r.loss_mask[1..].iter().filter(|&&m| m).count())
        .sum();
    if !val.is_empty() {
        s.val_tokens = write_split(&opts.out, "sft_val", &val, tok.vocab_size())?;
    }
    Ok(s)
}

/// Writes `{name}.bin` and `{name}.idx`; returns the token count.
fn write_split(dir: &Path, name: &str, examples: &[Rendered], vocab: usize) -> Result<usize> {
    let ids: Vec<u32> = examples
        .iter()
        .flat_map(|r| r.ids.iter().copied())
        .collect();
    write_shard(dir.join(format!("{name}.bin")), &ids, vocab)?;
    let mut bytes = Vec::with_capacity(IDX_HEADER + 8 * (examples.len() + 1) + ids.len());
    bytes.extend(IDX_MAGIC.to_le_bytes());
    bytes.extend(IDX_VERSION.to_le_bytes());
    bytes.extend((examples.len() as u64).to_le_bytes());
    bytes.extend((ids.len() as u64).to_le_bytes());
    let mut off = 0u64;
    bytes.extend(off.to_le_bytes());
    for r in examples {
        off += r.ids.len() as u64;
        bytes.extend(off.to_le_bytes());
    }
    bytes.extend(
        examples
            .iter()
            .flat_map(|r| r.loss_mask.iter().map(|&m| m as u8)),
    );
    write_atomic(&dir.join(format!("{name}.idx")), &bytes)?;
    Ok(ids.len())
}

/// Which of `n` items go to validation: a seeded shuffle picks `round(n * val_fraction)` of them
/// (at least one when the fraction is positive and `n >= 2`, never all).
pub(crate) fn pick_val(n: usize, val_fraction: f64, seed: u64) -> Vec<bool> {
    let mut n_val = (n as f64 * val_fraction).round() as usize;
    if val_fraction > 0.0 && n >= 2 {
        n_val = n_val.max(1);
    }
    n_val = n_val.min(n.saturating_sub(1));
    let mut order: Vec<usize> = (0..n).collect();
    Rng::new(seed).shuffle(&mut order);
    let mut is_val = vec![false; n];
    for &i in &order[..n_val] {
        is_val[i] = true;
    }
    is_val
}

/// Writes `bytes` to a temp file next to `path`, syncs it and renames it into place.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_sibling(path);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().map_err(|e| DataError::io(&tmp, "write", e))?;
    std::fs::rename(&tmp, path).map_err(|e| DataError::io(path, "rename", e))
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
        let shard = Shard::open(dir.join(format!("{name}.bin")))?;
        shard.validate_vocab(vocab_size)?;
        let path = dir.join(format!("{name}.idx"));
        let bytes = std::fs::read(&path).map_err(|e| DataError::io(&path, "read", e))?;
        let bad = |msg: String| DataError::InvalidArgument(format!("{}: {msg}", path.display()));
        if bytes.len() < IDX_HEADER {
            return Err(bad(format!(
                "{} bytes, shorter than the {IDX_HEADER}-byte header",
                bytes.len()
            )));
        }
        let i32_at = |o: usize| i32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
        if i32_at(0) != IDX_MAGIC || i32_at(4) != IDX_VERSION {
            return Err(bad(format!(
                "magic {} version {}, expected magic {IDX_MAGIC} version {IDX_VERSION}",
                i32_at(0),
                i32_at(4)
            )));
        }
        let (n, len) = (u64_at(8) as usize, u64_at(16) as usize);
        if len != shard.len() {
            return Err(bad(format!(
                "counts {len} tokens but its shard holds {}",
                shard.len()
            )));
        }
        let want = IDX_HEADER + 8 * (n + 1) + len;
        if bytes.len() != want {
            return Err(bad(format!(
                "{} bytes, expected {want} for {n} examples and {len} tokens",
                bytes.len()
            )));
        }
        let offsets: Vec<usize> = (0..=n)
            .map(|i| u64_at(IDX_HEADER + 8 * i) as usize)
            .collect();
        if offsets[0] != 0 || offsets[n] != len || offsets.windows(2).any(|w| w[0] >= w[1]) {
            return Err(bad(
                "example offsets are not increasing from 0 to the token count".into(),
            ));
        }
        let mask = bytes[IDX_HEADER + 8 * (n + 1)..]
            .iter()
            .map(|&b| b != 0)
            .collect();
        Ok(Self {
            tokens: shard.to_vec(),
            mask,
            offsets,
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
