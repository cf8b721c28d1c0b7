//! The data layer: token shards on disk, the window loader that feeds training, tokenizers (GPT-2
//! and a trainable byte-level BPE) and `prepare` (text -> shards).

pub mod bpe;
pub mod error;
pub mod loader;
pub mod prepare;
pub mod pretok;
pub mod shard;
pub mod tokenizer;

pub use bpe::Bpe;
pub use error::DataError;
pub use loader::{Batch, Loader, LoaderPosition};
pub use prepare::{prepare, PrepareOptions, PrepareSummary, ProgressEvent};
pub use shard::{write_shard, Shard, ShardWriter, MAGIC_U16, MAGIC_U32};
pub use tokenizer::{Tokenizer, TokenizerKind, SPECIAL_TOKENS};
