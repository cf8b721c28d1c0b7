//! Helpers of the data-across-ranks tests (dist_stages*.rs): a small tokenizer, a tiny model,
//! and validation partial sums added in rank order.

use std::path::{Path, PathBuf};
use topcoat::backend::cpu::CpuBackend;
use topcoat::commands::prepare::EMBEDDED_CORPUS;
use topcoat::config::ModelConfig;
use topcoat::data::RankSlice;
use topcoat::data::Tokenizer;
use topcoat::model::Gpt;
use topcoat::stages::PreparedData;
use topcoat::train::ValPartial;

pub type Be = CpuBackend;

/// Ranks' partial sums added in rank order differ from one process's sum only by the order of
/// f64 additions of the same per-batch sums (the batches themselves are bit-identical).
pub const SUM_TOL: f64 = 1e-12;

pub fn tokenizer(dir: &Path) -> (Tokenizer, PathBuf) {
    let text = String::from_utf8_lossy(&EMBEDDED_CORPUS[..20_000]).into_owned();
    let tok = Tokenizer::train_bpe([text.as_str()].into_iter(), 300, |_, _| {}).unwrap();
    let path = dir.join("tokenizer.json");
    tok.save(&path).unwrap();
    (tok, path)
}

pub fn tiny(vocab: usize, t: usize, seed: u64) -> Gpt<Be> {
    let cfg = ModelConfig {
        vocab_size: vocab,
        padded_vocab_size: vocab.next_multiple_of(64),
        n_layer: 2,
        n_head: 2,
        n_embd: 16,
        max_seq_len: t,
        family: Default::default(),
        lora: None,
    };
    Gpt::init(&CpuBackend, &cfg, seed).unwrap()
}

/// The partials of every rank, added in rank order.
pub fn in_rank_order(parts: &[ValPartial]) -> ValPartial {
    let mut total = ValPartial::default();
    parts.iter().for_each(|p| total.add(p));
    total
}

pub fn assert_adds_up(what: &str, parts: &[ValPartial], one: ValPartial) {
    let total = in_rank_order(parts);
    assert_eq!(
        total.count, one.count,
        "{what}: counts {parts:?} vs {one:?}"
    );
    assert!(
        (total.sum - one.sum).abs() <= SUM_TOL * one.sum.abs(),
        "{what}: sums {parts:?} add to {}, one process {}",
        total.sum,
        one.sum
    );
    assert!(one.count > 0.0, "{what}: nothing validated");
}

/// Prepared data in `dir` drawn as B x T rows of a vocabulary of `v`, as rank slice `r` (seed 5,
/// 5 validation batches).
pub fn prepared(dir: &Path, b: usize, t: usize, v: usize, r: RankSlice) -> PreparedData<'_> {
    PreparedData {
        dir,
        batch_size: b,
        seq_len: t,
        seed: 5,
        vocab_size: v,
        pad: 0,
        val_batches: 5,
        ranks: r,
    }
}
