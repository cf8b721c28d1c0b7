//! topcoat's own tokenizers (`gpt2`, `bpe`) as a Hugging Face `tokenizer.json`, so a model
//! trained with one goes out (`export hf`) with a tokenizer the reference library loads: a
//! byte-level BPE with GPT-2's pre-tokenizer and decoder, the five special tokens as added
//! tokens at their ids, and topcoat's chat template written in Jinja. The ids are the same on
//! ordinary text (pretok.rs names the one known departure of topcoat's pre-tokenizer);
//! conversations render to the same ids and loss mask.
//!
//! GPT-2's merges are not stored by tiktoken: each token's merge is recovered as the two parts
//! that BPE with the lower-ranked tokens leaves of its bytes.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use super::{Inner, Tokenizer, SPECIAL_TOKENS};
use crate::data::error::{DataError, Result};

/// topcoat's template (chat.rs) in Jinja: `<|role|>content<|end|>` per message, then
/// `<|assistant|>` for a generation prompt.
pub(crate) const TOPCOAT_TEMPLATE: &str = "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}";

/// GPT-2's printable stand-in for every byte (what byte-level BPE vocabularies are keyed by).
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("a Latin-1 code point")
            } else {
                next += 1;
                char::from_u32(next - 1).expect("below U+0200")
            }
        })
        .collect()
}

/// The Hugging Face `tokenizer.json` of a `gpt2` or `bpe` tokenizer.
pub(crate) fn hf_json(tok: &Tokenizer) -> Result<Value> {
    let first_special = tok
        .first_special()
        .expect("only topcoat's own tokenizers are converted");
    let (bytes, merges): (Vec<Vec<u8>>, Vec<(u32, u32)>) = match &tok.inner {
        Inner::Bpe(bpe) => (
            (0..first_special)
                .map(|id| {
                    bpe.token_bytes(id)
                        .expect("ids below the specials")
                        .to_vec()
                })
                .collect(),
            bpe.merges().to_vec(),
        ),
        Inner::Gpt2(core) => {
            let bytes: Vec<Vec<u8>> = (0..first_special)
                .map(|id| core.decode_bytes(&[id]).expect("every GPT-2 id decodes"))
                .collect();
            let merges = recover_merges(&bytes)?;
            (bytes, merges)
        }
        Inner::Hf(_) => unreachable!("a Hugging Face tokenizer is written as read"),
    };
    let chars = byte_chars();
    let name = |b: &[u8]| -> String { b.iter().map(|&x| chars[x as usize]).collect() };
    let mut vocab = Map::new();
    for (id, b) in bytes.iter().enumerate() {
        if vocab.insert(name(b), id.into()).is_some() {
            return Err(DataError::InvalidArgument(format!(
                "token {id} has the same bytes {b:?} as an earlier token: a Hugging Face \
                 vocabulary cannot hold both"
            )));
        }
    }
    let merges: Vec<Value> = merges
        .iter()
        .map(|&(a, b)| json!([name(&bytes[a as usize]), name(&bytes[b as usize])]))
        .collect();
    let added: Vec<Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, s)| {
            json!({"id": first_special as usize + i, "content": s, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    Ok(json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}
    }))
}

/// The merge that made each multi-byte token, in id (rank) order: `bytes[id]` are token `id`'s
/// bytes, single bytes first.
fn recover_merges(bytes: &[Vec<u8>]) -> Result<Vec<(u32, u32)>> {
    let rank: HashMap<&[u8], u32> = bytes
        .iter()
        .enumerate()
        .map(|(i, b)| (b.as_slice(), i as u32))
        .collect();
    let mut merges = Vec::new();
    for (id, token) in bytes.iter().enumerate() {
        if token.len() < 2 {
            continue;
        }
        let id = id as u32;
        let mut parts: Vec<&[u8]> = (0..token.len()).map(|i| &token[i..i + 1]).collect();
        while parts.len() > 2 {
            let best = (0..parts.len() - 1)
                .filter_map(|i| {
                    let joined = &token[offset(&parts, i)..offset(&parts, i + 2)];
                    rank.get(joined).filter(|&&r| r < id).map(|&r| (r, i))
                })
                .min();
            let Some((_, i)) = best else { break };
            let joined = &token[offset(&parts, i)..offset(&parts, i + 2)];
            parts.splice(i..i + 2, [joined]);
        }
        match parts.as_slice() {
            [a, b] => merges.push((rank[a], rank[b])),
            _ => {
                return Err(DataError::InvalidArgument(format!(
                    "token {id} ({token:?}) is not a merge of two lower-ranked tokens"
                )))
            }
        }
    }
    Ok(merges)
}

/// Where part `i` starts in the token (the parts are consecutive slices of it).
fn offset(parts: &[&[u8]], i: usize) -> usize {
    parts[..i].iter().map(|p| p.len()).sum()
}
