//! `prepare prefs`: preference pairs JSONL -> `prefs_train.bin` / `prefs_val.bin` token shards
//! (the usual shard format) plus a sidecar per shard, `prefs_train.idx` / `prefs_val.idx`, with
//! the sequence boundaries, where each response starts, and the response loss mask (format in
//! docs/FORMATS.md). Reading and batching the pairs is `pairs.rs`.
//!
//! Input line: `{"prompt": P, "chosen": R, "rejected": R}`. A string prompt is one user turn; a
//! list is messages (`{"role", "content"}`, chat.rs rules; it may be empty). A string response is
//! the assistant's reply; a list is messages that must end with an assistant turn. A system
//! message may only open the whole conversation. Every malformed line is an error naming the
//! file, the 1-based line and the field.
//!
//! Rendering: each side is the chat template over prompt ++ response (chat.rs); the response
//! starts right after the rendered prompt, and the sequence ends with the `<|end|>` closing the
//! last assistant turn (the token a reward model reads). The mask is the chat template's
//! assistant-only loss mask, restricted to the response. With a model's own template the
//! sequence likewise ends with the end-of-turn token closing the last reply (what RL stops
//! at): text the template writes after it (ChatML's newline) is dropped.
//!
//! Length rule: nothing is ever cut (cutting a response would move the token the reward is read
//! at; cutting a prompt changes what is being judged). A pair whose chosen or rejected sequence
//! is longer than `max_len` tokens is dropped and counted (`too_long`). A pair whose two
//! sequences render to the same tokens carries no preference and is dropped and counted
//! (`identical`). Split: as `prepare sft` (a seeded shuffle picks `round(n * val_fraction)`
//! pairs, at least one when the fraction is positive and there are two or more); both splits keep
//! file order. The dataset (shards, sidecars, tokenizer, `dataset.json`) is written aside and
//! switched in at the end as a whole (`dataset.rs`).

use std::path::{Path, PathBuf};

use super::chat::{json_line, parse_messages, read_jsonl, render, Message, Role};
use super::dataset::{DatasetKind, Staging};
use super::error::{DataError, Result};
use super::prepared::{
    check_options, split_train_val, write_sidecar, SidecarFormat, SidecarSeq, IDX_HEADER,
};
use super::shard::write_shard;
use super::tokenizer::Tokenizer;

/// Pair sidecar magic and version (the first two little-endian i32 of a prefs `.idx` file).
pub const PAIR_IDX_MAGIC: i32 = 20240602;
pub const PAIR_IDX_VERSION: i32 = 1;
/// Bytes before the offsets: magic, version, pair count (u64), token count (u64).
pub const PAIR_IDX_HEADER: usize = IDX_HEADER;

/// The pair sidecar: two sequences per pair, each with its response start.
pub(crate) const PAIR_SIDECAR: SidecarFormat = SidecarFormat {
    magic: PAIR_IDX_MAGIC,
    version: PAIR_IDX_VERSION,
    seqs_per_item: 2,
    fields_per_seq: 1,
    min_items: 1,
    items: "pairs",
    seq: "sequence",
    hint: " (a preference-pair sidecar from `topcoat prepare prefs`)",
};

/// One parsed preference line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preference {
    pub prompt: Vec<Message>,
    pub chosen: Vec<Message>,
    pub rejected: Vec<Message>,
}

/// One side of a pair, rendered: ids, where the response starts, and the response loss mask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairSeq {
    pub ids: Vec<u32>,
    /// Index of the response's first token (the prompt is `ids[..response_start]`).
    pub response_start: usize,
    /// Per id: an assistant token of the response (content or its closing `<|end|>`).
    pub mask: Vec<bool>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedPair {
    pub chosen: PairSeq,
    pub rejected: PairSeq,
}

#[derive(Clone, Debug)]
pub struct PrefsPrepareOptions {
    pub out: PathBuf,
    /// Most tokens per sequence (prompt + response); longer pairs are dropped.
    pub max_len: usize,
    pub val_fraction: f64,
    pub seed: u64,
}

impl PrefsPrepareOptions {
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
pub struct PrefsPrepareSummary {
    /// Pairs read from the file.
    pub pairs: usize,
    pub train_pairs: usize,
    pub val_pairs: usize,
    /// Tokens written (both sides of every pair).
    pub train_tokens: usize,
    pub val_tokens: usize,
    /// Pairs dropped because a side is longer than `max_len` tokens.
    pub too_long: usize,
    /// Pairs dropped because both sides render to the same tokens.
    pub identical: usize,
    /// The longest sequence read, kept or not (to choose `max_len`).
    pub longest: usize,
}

/// Parses a prompt field: a string (one user turn) or a message list (possibly empty).
fn parse_prompt(v: &serde_json::Value) -> std::result::Result<Vec<Message>, String> {
    match v {
        serde_json::Value::String(s) if s.trim().is_empty() => {
            Err("empty prompt string (use [] for no prompt)".into())
        }
        serde_json::Value::String(s) => Ok(vec![Message::new(Role::User, s.as_str())]),
        serde_json::Value::Array(_) => parse_messages(v),
        _ => Err("expected a string or a list of messages".into()),
    }
}

/// Parses a response field: a string (the assistant's reply) or a non-empty message list
/// ending with an assistant turn.
fn parse_response(v: &serde_json::Value) -> std::result::Result<Vec<Message>, String> {
    match v {
        serde_json::Value::String(s) if s.trim().is_empty() => Err("empty assistant reply".into()),
        serde_json::Value::String(s) => Ok(vec![Message::new(Role::Assistant, s.as_str())]),
        serde_json::Value::Array(_) => {
            let m = parse_messages(v)?;
            match m.last() {
                None => Err("empty list of messages".into()),
                Some(last) if last.role != Role::Assistant => Err(format!(
                    "the last message must be the assistant's, found {:?}",
                    last.role
                )),
                Some(_) => Ok(m),
            }
        }
        _ => Err("expected a string or a list of messages".into()),
    }
}

/// Parses one preference line of `path` (`line` is 1-based); see the module header for the rules.
pub fn parse_pref_line(path: &Path, line: usize, text: &str) -> Result<Preference> {
    let (v, err) = json_line(path, line, text)?;
    if !v.is_object() {
        return Err(err(
            "expected an object {\"prompt\", \"chosen\", \"rejected\"}".into(),
        ));
    }
    let field = |name: &str| {
        v.get(name).ok_or_else(|| {
            err(format!(
                "missing field \"{name}\" (expected {{\"prompt\", \"chosen\", \"rejected\"}})"
            ))
        })
    };
    let (p, c, r) = (field("prompt")?, field("chosen")?, field("rejected")?);
    let prompt = parse_prompt(p).map_err(|e| err(format!("field \"prompt\": {e}")))?;
    let chosen = parse_response(c).map_err(|e| err(format!("field \"chosen\": {e}")))?;
    let rejected = parse_response(r).map_err(|e| err(format!("field \"rejected\": {e}")))?;
    // A system message may only open the whole conversation.
    for (name, part, first) in [
        ("prompt", &prompt, 0),
        ("chosen", &chosen, prompt.len()),
        ("rejected", &rejected, prompt.len()),
    ] {
        if let Some(i) = part
            .iter()
            .enumerate()
            .position(|(i, m)| m.role == Role::System && first + i != 0)
        {
            return Err(err(format!(
                "field \"{name}\": message {i}: a system message may only open the conversation"
            )));
        }
    }
    Ok(Preference {
        prompt,
        chosen,
        rejected,
    })
}

/// Reads every preference line of a JSONL file (blank lines skipped).
pub fn read_preferences(path: &Path) -> Result<Vec<Preference>> {
    read_jsonl(path, parse_pref_line)
}

fn render_side(tok: &Tokenizer, prompt: &[Message], response: &[Message]) -> Result<PairSeq> {
    let response_start = render(tok, prompt)?.ids.len();
    let mut all = prompt.to_vec();
    all.extend_from_slice(response);
    let mut r = render(tok, &all)?;
    if tok.chat_template().is_some() {
        let end = tok.end_of_turn();
        if let Some(last) = r.ids.iter().rposition(|&t| t == end) {
            if last >= response_start {
                r.ids.truncate(last + 1);
                r.loss_mask.truncate(last + 1);
            }
        }
    }
    let mask = r
        .loss_mask
        .iter()
        .enumerate()
        .map(|(i, &m)| m && i >= response_start)
        .collect();
    Ok(PairSeq {
        ids: r.ids,
        response_start,
        mask,
    })
}

/// Renders both sides of a pair with the chat template.
pub fn render_pair(tok: &Tokenizer, p: &Preference) -> Result<RenderedPair> {
    Ok(RenderedPair {
        chosen: render_side(tok, &p.prompt, &p.chosen)?,
        rejected: render_side(tok, &p.prompt, &p.rejected)?,
    })
}

/// Renders, filters, splits and writes the pairs of `input` (see the module header).
pub fn prepare_prefs(
    input: &Path,
    tok: &Tokenizer,
    opts: &PrefsPrepareOptions,
) -> Result<PrefsPrepareSummary> {
    check_options(opts.max_len, opts.val_fraction, "a sequence")?;
    let prefs = read_preferences(input)?;
    let mut s = PrefsPrepareSummary {
        pairs: prefs.len(),
        ..Default::default()
    };
    let mut kept = Vec::with_capacity(prefs.len());
    for p in &prefs {
        let r = render_pair(tok, p)?;
        let longer = r.chosen.ids.len().max(r.rejected.ids.len());
        s.longest = s.longest.max(longer);
        if longer > opts.max_len {
            s.too_long += 1;
        } else if r.chosen.ids == r.rejected.ids {
            s.identical += 1;
        } else {
            kept.push(r);
        }
    }
    if kept.is_empty() {
        return Err(DataError::InvalidArgument(format!(
            "{}: no pair left ({} read, {} dropped as longer than max_len {} (longest {} tokens), \
             {} dropped as identical)",
            input.display(),
            s.pairs,
            s.too_long,
            opts.max_len,
            s.longest,
            s.identical
        )));
    }
    let (train, val) = split_train_val(kept, opts.val_fraction, opts.seed);
    let staging = Staging::begin(&opts.out, DatasetKind::Prefs)?;
    s.train_pairs = train.len();
    s.val_pairs = val.len();
    s.train_tokens = write_pairs(staging.dir(), "prefs_train", &train, tok.vocab_size())?;
    if !val.is_empty() {
        s.val_tokens = write_pairs(staging.dir(), "prefs_val", &val, tok.vocab_size())?;
    }
    staging.commit(DatasetKind::Prefs, tok)?;
    Ok(s)
}

/// Writes `{name}.bin` (chosen then rejected of each pair, back to back) and `{name}.idx`;
/// returns the token count.
pub fn write_pairs(dir: &Path, name: &str, pairs: &[RenderedPair], vocab: usize) -> Result<usize> {
    let seqs: Vec<&PairSeq> = pairs
        .iter()
        .flat_map(|p| [&p.chosen, &p.rejected])
        .collect();
    let ids: Vec<u32> = seqs.iter().flat_map(|s| s.ids.iter().copied()).collect();
    write_shard(dir.join(format!("{name}.bin")), &ids, vocab)?;
    let starts: Vec<[u64; 1]> = seqs.iter().map(|s| [s.response_start as u64]).collect();
    let sidecar: Vec<SidecarSeq> = seqs
        .iter()
        .zip(&starts)
        .map(|(s, start)| SidecarSeq {
            len: s.ids.len(),
            fields: start,
            mask: &s.mask,
        })
        .collect();
    let path = dir.join(format!("{name}.idx"));
    write_sidecar(&path, &PAIR_SIDECAR, pairs.len(), &sidecar)?;
    Ok(ids.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::chat::tests::tok;

    #[test]
    fn string_fields_render_as_one_user_turn_and_one_reply() {
        let t = tok();
        let p = parse_pref_line(
            Path::new("p.jsonl"),
            1,
            r#"{"prompt": "hi", "chosen": "hello", "rejected": "how"}"#,
        )
        .unwrap();
        let r = render_pair(&t, &p).unwrap();
        let want = render(
            &t,
            &[
                Message::new(Role::User, "hi"),
                Message::new(Role::Assistant, "hello"),
            ],
        )
        .unwrap();
        assert_eq!(r.chosen.ids, want.ids);
        let start = r.chosen.response_start;
        assert_eq!(start, render(&t, &p.prompt).unwrap().ids.len());
        assert_eq!(r.chosen.ids[start], t.special("<|assistant|>").unwrap());
        assert_eq!(*r.chosen.ids.last().unwrap(), t.special("<|end|>").unwrap());
        assert_eq!(r.chosen.ids[..start], r.rejected.ids[..start]);
        for (i, &m) in r.chosen.mask.iter().enumerate() {
            assert_eq!(m, i > start, "mask at {i}");
        }
    }

    #[test]
    fn message_lists_keep_prompt_assistant_turns_out_of_the_mask() {
        let t = tok();
        let p = parse_pref_line(
            Path::new("p.jsonl"),
            1,
            r#"{"prompt": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
                "chosen": [{"role": "assistant", "content": "yes"}],
                "rejected": [{"role": "assistant", "content": "no"}, {"role": "user", "content": "?"},
                {"role": "assistant", "content": "no!"}]}"#,
        )
        .unwrap();
        assert_eq!(p.prompt.len(), 4);
        let r = render_pair(&t, &p).unwrap();
        let start = r.rejected.response_start;
        assert!(r.rejected.mask[..start].iter().all(|&m| !m));
        let user = t.special("<|user|>").unwrap();
        let second_user = start
            + r.rejected.ids[start..]
                .iter()
                .position(|&i| i == user)
                .unwrap();
        assert!(
            !r.rejected.mask[second_user + 1],
            "user content of the response"
        );
        assert!(*r.rejected.mask.last().unwrap());
    }
}
