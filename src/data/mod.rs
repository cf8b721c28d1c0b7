//! The data layer: token shards on disk, the window loader that feeds training, tokenizers
//! (GPT-2, a trainable byte-level BPE, and Hugging Face's tokenizer.json), `prepare` (text ->
//! shards), the chat templates (topcoat's own, and a model's Jinja template: template.rs) and
//! `prepare sft` (conversations -> shards + loss masks), `prepare prefs` (preference pairs ->
//! a pair shard; what the two share, the `.idx` sidecar included, is `prepared.rs`) and the pair
//! batches that feed the preference stages.

pub mod bpe;
pub mod chat;
pub mod dataset;
pub mod error;
pub mod loader;
pub mod pairs;
pub mod prefs;
pub mod prepare;
pub(crate) mod prepared;
pub mod pretok;
pub mod ranks;
pub mod sft;
pub mod shard;
pub mod template;
pub mod tokenizer;

pub use bpe::Bpe;
pub use dataset::{DatasetKind, Manifest};
pub use error::DataError;
pub use loader::{Batch, Loader, LoaderPosition};
pub use pairs::{fill_pair_batch, PairBatch, PairLoader, PairPosition, PairSplit, SeqRef};
pub use prefs::{prepare_prefs, PrefsPrepareOptions, PrefsPrepareSummary};
pub use prepare::{prepare, PrepareOptions, PrepareSummary, ProgressEvent};
pub use ranks::RankSlice;
pub use sft::{prepare_sft, SftPrepareOptions, SftPrepareSummary, SftSplit};
pub use shard::{write_shard, Shard, ShardWriter, MAGIC_U16, MAGIC_U32};
pub use tokenizer::{Tokenizer, TokenizerKind, SPECIAL_TOKENS};
