//! `prepare prefs` as a library call: resolves the tokenizer, writes the pair shards and copies
//! the tokenizer next to them.

use super::load_tokenizer_arg;
use crate::data::{self, PrefsPrepareOptions, PrefsPrepareSummary};
use crate::train::TrainError;
use std::path::Path;

/// `topcoat prepare prefs`: renders the pairs of `input` into `opts.out` with the tokenizer of
/// `tokenizer` (a tokenizer.json, a checkpoint, a run or a prepared data directory).
pub fn prepare_prefs(
    input: &Path,
    tokenizer: &Path,
    opts: &PrefsPrepareOptions,
) -> Result<PrefsPrepareSummary, TrainError> {
    let tok = load_tokenizer_arg(tokenizer)?;
    let summary = data::prepare_prefs(input, &tok, opts)?;
    tok.save(opts.out.join("tokenizer.json"))?;
    Ok(summary)
}
