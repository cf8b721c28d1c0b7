//! `DataError`: every failure of the data layer, each naming the file and what is wrong.

use std::path::PathBuf;

use super::dataset::DatasetKind;

/// Errors of the data layer. Each variant names the file (or directory) it is about and states
/// what was expected and what was found.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: file is {len} bytes, shorter than the 1024-byte shard header")]
    ShardTooShort { path: PathBuf, len: u64 },

    #[error(
        "{path}: bad shard magic {found}, expected {expected_u16} (u16 tokens) or {expected_u32} (u32 tokens)"
    )]
    BadMagic {
        path: PathBuf,
        found: i32,
        expected_u16: i32,
        expected_u32: i32,
    },

    #[error("{path}: unknown shard version {found} (magic {magic}), expected version {expected}")]
    BadVersion {
        path: PathBuf,
        magic: i32,
        found: i32,
        expected: i32,
    },

    #[error("{path}: header token count is negative ({count})")]
    NegativeCount { path: PathBuf, count: i32 },

    #[error(
        "{path}: file is {which} than its header says: header counts {count} tokens of {width} bytes, \
         so expected {expected} bytes, found {found} bytes"
    )]
    ShardSize {
        path: PathBuf,
        which: &'static str,
        count: u64,
        width: usize,
        expected: u64,
        found: u64,
    },

    #[error("{path}: token id {id} at token offset {offset} is out of range: vocab size is {vocab_size}")]
    TokenOutOfRange {
        path: PathBuf,
        offset: u64,
        id: u32,
        vocab_size: usize,
    },

    #[error("{path}: too many tokens for one shard: {count} (the header holds at most {max})")]
    ShardTooLarge { path: PathBuf, count: u64, max: u64 },

    #[error("no shard files given ({what})")]
    NoShards { what: String },

    #[error(
        "no window of T+1 = {need} tokens in any of the {count} shards: {files} (a shorter \
         --seq-len, or more text, makes one)"
    )]
    NoWindow {
        need: usize,
        count: usize,
        files: String,
    },

    #[error("{path}: line {line}: {msg}")]
    Jsonl {
        path: PathBuf,
        line: usize,
        msg: String,
    },

    #[error("{path}: not valid UTF-8 (first bad byte at offset {offset})")]
    Utf8 { path: PathBuf, offset: usize },

    #[error("{path}: no input files (expected files ending in {exts}) in this directory")]
    EmptyDir { path: PathBuf, exts: String },

    #[error("{path}: tokenizer file: {msg}")]
    TokenizerFile { path: PathBuf, msg: String },

    /// A chat template that does not compile or render, or whose turns cannot be masked;
    /// `origin` names the file (and key) it was read from.
    #[error("{origin}: chat template: {msg}")]
    ChatTemplate { origin: String, msg: String },

    #[error("{path}: is a directory, expected {expected}")]
    NotAFile {
        path: PathBuf,
        expected: &'static str,
    },

    #[error("{path}: {msg}")]
    Sidecar { path: PathBuf, msg: String },

    #[error("{path}: dataset manifest: {msg}")]
    Manifest { path: PathBuf, msg: String },

    #[error(
        "{path}: holds {}, but this needs {}; prepare one with `{}`",
        found.describe(),
        expected.describe(),
        expected.command()
    )]
    WrongDataset {
        path: PathBuf,
        found: DatasetKind,
        expected: DatasetKind,
    },

    #[error(
        "{path}: not replaced: it holds \"{entry}\", which is not part of a topcoat dataset \
         (nothing was changed); move it away or choose another --out"
    )]
    NotADataset { path: PathBuf, entry: String },

    #[error(
        "{path}: not replaced: it holds {}, and this prepares {} (nothing was changed); \
         choose another --out, or remove the directory first",
        found.describe(),
        kind.describe()
    )]
    OtherDataset {
        path: PathBuf,
        found: DatasetKind,
        kind: DatasetKind,
    },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            op,
            source,
        }
    }
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;
