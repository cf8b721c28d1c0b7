//! The library side of `topcoat prepare`: text files, directories and JSONL -> token shards for a
//! train and a validation split.
//!
//! Inputs: a file is read as one document, except `*.jsonl`, where each non-blank line is one
//! `{"text": "..."}` document. A directory is walked recursively for files ending in
//! [`TEXT_EXTENSIONS`], in sorted path order. Each document is encoded as ordinary text and followed
//! by `<|endoftext|>`.
//!
//! Split: with `k = round(1 / val_fraction)`, documents `k-1, 2k-1, ...` (0-based, in input order)
//! go to validation; when there are fewer than `k` but at least 2 documents, the last one does, so
//! the validation split is never empty then. `val_fraction = 0` disables it.
//!
//! Explicit validation inputs (`PrepareOptions::val_inputs`): their documents, and only they, go
//! to validation; `val_fraction` is not used then.
//!
//! A leading UTF-8 byte order mark of a file is not part of the text (nor of a JSONL first line).
//!
//! Output: `{out}/train_000000.bin, ...` and `{out}/val_000000.bin, ...`, each at most
//! `shard_tokens` tokens (documents may span shards), the tokenizer and `dataset.json`. The whole
//! dataset is written into a staging directory beside `{out}` and switched in at the end in one
//! step (`dataset.rs`), so `{out}` always holds one complete dataset, old or new, and an error
//! leaves the old one untouched. Tokenization runs in parallel over documents; the output does
//! not depend on the number of threads.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::chat::json_line;
use super::dataset::{strip_bom, DatasetKind, Staging};
use super::error::{DataError, Result};
use super::shard::ShardWriter;
use super::tokenizer::Tokenizer;

/// File endings taken from a directory.
pub const TEXT_EXTENSIONS: [&str; 5] = ["txt", "md", "rst", "text", "jsonl"];

/// Text read before a parallel tokenization pass.
const GROUP_BYTES: usize = 32 << 20;

#[derive(Clone, Debug)]
pub struct PrepareOptions {
    pub out_dir: PathBuf,
    /// Fraction of documents for validation (default 0.05); 0 disables the split.
    pub val_fraction: f64,
    /// Maximum tokens per shard file (default 100M).
    pub shard_tokens: usize,
    /// When set, the validation split is exactly the documents of these inputs (files or
    /// directories, read after the training inputs) and `val_fraction` is not used.
    pub val_inputs: Option<Vec<PathBuf>>,
}

impl PrepareOptions {
    pub fn new(out_dir: impl Into<PathBuf>) -> Self {
        Self {
            out_dir: out_dir.into(),
            val_fraction: 0.05,
            shard_tokens: 100_000_000,
            val_inputs: None,
        }
    }

    /// Refuses a `val_fraction` outside `[0, 1)` and empty shards.
    fn check(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.val_fraction) {
            return Err(DataError::InvalidArgument(format!(
                "val_fraction must be in [0, 1), got {}",
                self.val_fraction
            )));
        }
        if self.shard_tokens == 0 {
            return Err(DataError::InvalidArgument(
                "shard_tokens must be >= 1".into(),
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub enum ProgressEvent {
    /// Inputs found: files, documents and bytes to read.
    Start {
        files: usize,
        docs: usize,
        bytes: u64,
    },
    /// After each tokenized group of documents.
    Progress {
        docs_done: usize,
        docs_total: usize,
        bytes_done: u64,
        bytes_total: u64,
        tokens: u64,
    },
    /// A shard is complete (still in the staging directory until the end).
    ShardDone { name: String, tokens: u64 },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrepareSummary {
    pub docs_train: usize,
    pub docs_val: usize,
    pub tokens_train: u64,
    pub tokens_val: u64,
    /// Shard files written, train first, in order.
    pub train_files: Vec<PathBuf>,
    pub val_files: Vec<PathBuf>,
}

/// Input files in processing order: directories expanded recursively (sorted, filtered by
/// [`TEXT_EXTENSIONS`]); an explicit file is taken whatever its name.
pub fn collect_inputs(inputs: &[impl AsRef<Path>]) -> Result<Vec<PathBuf>> {
    if inputs.is_empty() {
        return Err(DataError::InvalidArgument(
            "prepare needs at least one input".into(),
        ));
    }
    let mut files = Vec::new();
    for input in inputs {
        let input = input.as_ref();
        let meta = fs::metadata(input).map_err(|e| DataError::io(input, "stat", e))?;
        if meta.is_dir() {
            let before = files.len();
            walk(input, &mut files)?;
            if files.len() == before {
                return Err(DataError::EmptyDir {
                    path: input.to_path_buf(),
                    exts: TEXT_EXTENSIONS.map(|e| format!(".{e}")).join(" "),
                });
            }
        } else {
            files.push(input.to_path_buf());
        }
    }
    Ok(files)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, "read directory", e))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .map_err(|e| DataError::io(dir, "read directory", e))?;
    entries.sort();
    for p in entries {
        let meta = fs::metadata(&p).map_err(|e| DataError::io(&p, "stat", e))?;
        if meta.is_dir() {
            walk(&p, files)?;
        } else if has_text_extension(&p) {
            files.push(p);
        }
    }
    Ok(())
}

fn has_text_extension(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| TEXT_EXTENSIONS.contains(&e))
}

fn is_jsonl(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()) == Some("jsonl")
}

/// Documents in `path`: 1 for text, the non-blank lines for JSONL.
fn count_docs(path: &Path) -> Result<usize> {
    if !is_jsonl(path) {
        return Ok(1);
    }
    let mut n = 0;
    for_each_nonblank_line(path, |_, _, _| {
        n += 1;
        Ok(())
    })?;
    Ok(n)
}

/// Calls `each(line, line_no, bytes_read)` for every line of `path` that is not all white space
/// (`line_no` 1-based, counting blank lines too; `bytes_read` with the newline).
fn for_each_nonblank_line(
    path: &Path,
    mut each: impl FnMut(&[u8], usize, u64) -> Result<()>,
) -> Result<()> {
    let f = fs::File::open(path).map_err(|e| DataError::io(path, "open", e))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut buf = Vec::new();
    let mut line_no = 0;
    loop {
        buf.clear();
        let got = r
            .read_until(b'\n', &mut buf)
            .map_err(|e| DataError::io(path, "read", e))?;
        if got == 0 {
            return Ok(());
        }
        line_no += 1;
        if line_no == 1 && buf.starts_with(b"\xEF\xBB\xBF") {
            buf.drain(..3);
        }
        if !buf.iter().all(|b| b.is_ascii_whitespace()) {
            each(&buf, line_no, got as u64)?;
        }
    }
}

/// Calls `each(file_index, text, source_bytes)` for every document of `files`, in order: a
/// whole file, or each non-blank line of a JSONL file.
fn for_each_document(
    files: &[PathBuf],
    mut each: impl FnMut(usize, String, u64) -> Result<()>,
) -> Result<()> {
    for (fi, f) in files.iter().enumerate() {
        if !is_jsonl(f) {
            let bytes = fs::read(f).map_err(|e| DataError::io(f, "read", e))?;
            let n = bytes.len() as u64;
            let text = std::str::from_utf8(strip_bom(&bytes))
                .map_err(|e| DataError::Utf8 {
                    path: f.clone(),
                    offset: e.valid_up_to() + (bytes.len() - strip_bom(&bytes).len()),
                })?
                .to_owned();
            each(fi, text, n)?;
            continue;
        }
        for_each_nonblank_line(f, |buf, line_no, got| {
            let line = std::str::from_utf8(buf).map_err(|e| DataError::Jsonl {
                path: f.clone(),
                line: line_no,
                msg: format!("not valid UTF-8 at byte {} of the line", e.valid_up_to()),
            })?;
            each(fi, parse_jsonl_line(f, line_no, line)?, got)
        })?;
    }
    Ok(())
}

/// Every document of `inputs` (files, directories, JSONL) as text, in `prepare`'s order; used
/// to train a tokenizer on the same documents that will be tokenized.
pub fn read_documents(inputs: &[impl AsRef<Path>]) -> Result<Vec<String>> {
    let files = collect_inputs(inputs)?;
    let mut docs = Vec::new();
    for_each_document(&files, |_, text, _| {
        docs.push(text);
        Ok(())
    })?;
    Ok(docs)
}

/// The `text` of one JSONL line.
fn parse_jsonl_line(path: &Path, line_no: usize, line: &str) -> Result<String> {
    let (v, err) = json_line(path, line_no, line)?;
    let obj = v.as_object().ok_or_else(|| {
        err(format!(
            "expected an object {{\"text\": ...}}, found {}",
            kind(&v)
        ))
    })?;
    match obj.get("text") {
        None => Err(err("missing field \"text\"".into())),
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(err(format!(
            "field \"text\" is {}, expected a string",
            kind(other)
        ))),
    }
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Shards of one split, rolled over every `shard_tokens` tokens.
struct SplitWriter {
    prefix: &'static str,
    dir: PathBuf,
    vocab_size: usize,
    shard_tokens: u64,
    current: Option<ShardWriter>,
    done: Vec<String>,
    tokens: u64,
    docs: usize,
}

impl SplitWriter {
    /// A writer of `{prefix}_NNNNNN.bin` shards into `dir`.
    fn new(prefix: &'static str, dir: &Path, vocab_size: usize, opts: &PrepareOptions) -> Self {
        Self {
            prefix,
            dir: dir.to_path_buf(),
            vocab_size,
            shard_tokens: opts.shard_tokens as u64,
            current: None,
            done: Vec::new(),
            tokens: 0,
            docs: 0,
        }
    }

    fn write(&mut self, mut tokens: &[u32], progress: &dyn Fn(ProgressEvent)) -> Result<()> {
        while !tokens.is_empty() {
            if self.current.is_none() {
                let name = format!("{}_{:06}.bin", self.prefix, self.done.len());
                self.current = Some(ShardWriter::create(self.dir.join(name), self.vocab_size)?);
            }
            let w = self.current.as_mut().unwrap();
            let room = (self.shard_tokens - w.len()) as usize;
            let n = room.min(tokens.len());
            w.write(&tokens[..n])?;
            self.tokens += n as u64;
            tokens = &tokens[n..];
            if w.len() == self.shard_tokens {
                self.close(progress)?;
            }
        }
        Ok(())
    }

    fn close(&mut self, progress: &dyn Fn(ProgressEvent)) -> Result<()> {
        if let Some(w) = self.current.take() {
            let tokens = w.len();
            let path = w.finish()?;
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            progress(ProgressEvent::ShardDone {
                name: name.clone(),
                tokens,
            });
            self.done.push(name);
        }
        Ok(())
    }
}

/// Documents and bytes in `files`, for progress.
fn survey(files: &[PathBuf]) -> Result<(usize, u64)> {
    let mut docs_total = 0;
    let mut bytes_total = 0u64;
    for f in files {
        docs_total += count_docs(f)?;
        bytes_total += fs::metadata(f)
            .map_err(|e| DataError::io(f, "stat", e))?
            .len();
    }
    Ok((docs_total, bytes_total))
}

/// Whether document `i` (0-based, in reading order) of `docs_total` goes to validation: every
/// `round(1 / val_fraction)`-th one, or the last when there are fewer documents than that.
fn val_rule(val_fraction: f64, docs_total: usize) -> impl Fn(usize) -> bool {
    let k = if val_fraction == 0.0 {
        0
    } else {
        ((1.0 / val_fraction).round() as usize).max(1)
    };
    move |i: usize| {
        k != 0 && (i % k == k - 1 || (docs_total >= 2 && docs_total < k && i == docs_total - 1))
    }
}

/// Tokenizes `inputs` into train/val shards under `opts.out_dir` (see the module doc).
pub fn prepare(
    inputs: &[impl AsRef<Path>],
    tokenizer: &Tokenizer,
    opts: &PrepareOptions,
    progress: &dyn Fn(ProgressEvent),
) -> Result<PrepareSummary> {
    opts.check()?;
    let mut files = collect_inputs(inputs)?;
    // Files from this index on are the explicit validation inputs.
    let first_val_file = files.len();
    if let Some(v) = &opts.val_inputs {
        files.extend(collect_inputs(v)?);
    }
    let (docs_total, bytes_total) = survey(&files)?;
    progress(ProgressEvent::Start {
        files: files.len(),
        docs: docs_total,
        bytes: bytes_total,
    });
    let rule = val_rule(opts.val_fraction, docs_total);
    let explicit = opts.val_inputs.is_some();
    let is_val = |doc: usize, file: usize| {
        if explicit {
            file >= first_val_file
        } else {
            rule(doc)
        }
    };

    let staging = Staging::begin(&opts.out_dir, DatasetKind::Text)?;
    let eot = tokenizer.eot();
    let mk = |prefix| SplitWriter::new(prefix, staging.dir(), tokenizer.vocab_size(), opts);
    let (mut train, mut val) = (mk("train"), mk("val"));

    let mut group: Vec<(String, u64, usize)> = Vec::new();
    let mut group_bytes = 0usize;
    let mut docs_done = 0usize;
    let mut bytes_done = 0u64;
    let mut flush = |group: &mut Vec<(String, u64, usize)>,
                     train: &mut SplitWriter,
                     val: &mut SplitWriter|
     -> Result<()> {
        let encoded: Vec<Vec<u32>> = group
            .par_iter()
            .map(|(d, _, _)| tokenizer.try_encode(d))
            .collect::<Result<_>>()?;
        for (mut ids, (_, src_bytes, file)) in encoded.into_iter().zip(group.drain(..)) {
            ids.push(eot);
            let split = if is_val(docs_done, file) {
                &mut *val
            } else {
                &mut *train
            };
            split.write(&ids, progress)?;
            split.docs += 1;
            docs_done += 1;
            bytes_done += src_bytes;
        }
        progress(ProgressEvent::Progress {
            docs_done,
            docs_total,
            bytes_done,
            bytes_total,
            tokens: train.tokens + val.tokens,
        });
        Ok(())
    };

    for_each_document(&files, |file, text, src_bytes| {
        group_bytes += text.len();
        group.push((text, src_bytes, file));
        if group_bytes >= GROUP_BYTES {
            flush(&mut group, &mut train, &mut val)?;
            group_bytes = 0;
        }
        Ok(())
    })?;
    if !group.is_empty() {
        flush(&mut group, &mut train, &mut val)?;
    }
    train.close(progress)?;
    val.close(progress)?;

    // Every input has been read: switch the whole dataset in.
    let path_of = |names: &[String]| -> Vec<PathBuf> {
        names.iter().map(|n| staging.final_path(n)).collect()
    };
    let summary = PrepareSummary {
        docs_train: train.docs,
        docs_val: val.docs,
        tokens_train: train.tokens,
        tokens_val: val.tokens,
        train_files: path_of(&train.done),
        val_files: path_of(&val.done),
    };
    staging.commit(DatasetKind::Text, tokenizer)?;
    Ok(summary)
}
