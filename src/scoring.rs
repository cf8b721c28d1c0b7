//! Scoring helpers of `topcoat eval`: answer normalisation and matching, the prompts file of
//! `eval generate` (format in docs/FORMATS.md), and the pair-accuracy tally shared by the
//! reward-model and DPO modes. The command itself (models, devices, tables) is `run/eval.rs`.
//!
//! Matching: `exact` is string equality of the decoded reply and the reference, nothing
//! changed. `normalised` compares [`normalize`] of both: lowercase, punctuation removed (ASCII
//! punctuation and the common Unicode quotes, dashes and ellipsis), runs of whitespace collapsed
//! to one space, surrounding whitespace trimmed.
//!
//! Pair rule: a pair counts as correct only when the chosen side's reward is strictly higher
//! than the rejected side's; a tie counts as wrong.

use crate::data::chat::{json_line, parse_messages, Message, Role};
use crate::data::DataError;
use std::path::Path;

/// Characters removed by [`normalize`] beside ASCII punctuation.
const UNICODE_PUNCTUATION: &[char] = &[
    '\u{2018}', '\u{2019}', '\u{201C}', '\u{201D}', '\u{2013}', '\u{2014}', '\u{2026}', '\u{00AB}',
    '\u{00BB}', '\u{00BF}', '\u{00A1}',
];

/// Lowercases, drops punctuation, collapses whitespace runs to one space and trims.
pub fn normalize(s: &str) -> String {
    let kept: String = s
        .to_lowercase()
        .chars()
        .filter(|c| !c.is_ascii_punctuation() && !UNICODE_PUNCTUATION.contains(c))
        .collect();
    kept.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether `output` equals `reference` exactly.
pub fn exact_match(output: &str, reference: &str) -> bool {
    output == reference
}

/// Whether `output` equals `reference` after [`normalize`].
pub fn normalized_match(output: &str, reference: &str) -> bool {
    normalize(output) == normalize(reference)
}

/// One line of an `eval generate` prompts file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvalPrompt {
    /// 1-based line in the file.
    pub line: usize,
    /// The conversation the reply continues (rendered with `render_prompt`).
    pub messages: Vec<Message>,
    pub reference: String,
}

/// Parses one prompts line (`line` is 1-based): `{"prompt": P, "reference": R}` where `P` is a
/// string (one user turn) or a list of messages, or `{"messages": [...]}` whose last message is
/// the assistant's reference reply.
pub fn parse_prompt_line(path: &Path, line: usize, text: &str) -> Result<EvalPrompt, DataError> {
    let (v, err) = json_line(path, line, text)?;
    let (messages, reference) = if let Some(list) = v.get("messages") {
        let mut m = parse_messages(list).map_err(|e| err(format!("field \"messages\": {e}")))?;
        match m.pop() {
            Some(last) if last.role == Role::Assistant => (m, last.content),
            _ => {
                return Err(err(
                    "field \"messages\": the last message must be the assistant's reference reply"
                        .into(),
                ))
            }
        }
    } else {
        let prompt = v.get("prompt").ok_or_else(|| {
            err("missing field \"prompt\" (expected {\"prompt\": ..., \"reference\": ...} or {\"messages\": [...]})".into())
        })?;
        let messages = match prompt {
            serde_json::Value::String(s) => vec![Message::new(Role::User, s.as_str())],
            serde_json::Value::Array(_) => {
                parse_messages(prompt).map_err(|e| err(format!("field \"prompt\": {e}")))?
            }
            _ => {
                return Err(err(
                    "field \"prompt\": expected a string or a list of messages".into(),
                ))
            }
        };
        let reference = v
            .get("reference")
            .ok_or_else(|| err("missing field \"reference\"".into()))?
            .as_str()
            .ok_or_else(|| err("field \"reference\" is not a string".into()))?
            .to_string();
        (messages, reference)
    };
    if messages.is_empty() {
        return Err(err("no prompt message before the reply".into()));
    }
    if let Some(i) = messages.iter().skip(1).position(|m| m.role == Role::System) {
        return Err(err(format!(
            "message {}: a system message may only come first",
            i + 1
        )));
    }
    Ok(EvalPrompt {
        line,
        messages,
        reference,
    })
}

/// Reads every non-blank line of a prompts file; the first bad line is an error naming the file
/// and the line.
pub fn read_prompts(path: &Path) -> Result<Vec<EvalPrompt>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::Io {
        path: path.to_path_buf(),
        op: "read",
        source: e,
    })?;
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate() {
        if !l.trim().is_empty() {
            out.push(parse_prompt_line(path, i + 1, l)?);
        }
    }
    if out.is_empty() {
        return Err(DataError::InvalidArgument(format!(
            "{}: no prompts (expected one JSON object per line)",
            path.display()
        )));
    }
    Ok(out)
}

/// Running totals over scored pairs (rows `2i` chosen, `2i + 1` rejected).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PairTally {
    pub pairs: usize,
    /// Pairs with the chosen reward strictly higher (ties are wrong).
    pub correct: usize,
    pub chosen_sum: f64,
    pub rejected_sum: f64,
    /// Sum over pairs of `reward_chosen - reward_rejected`.
    pub margin_sum: f64,
    /// Sum over pairs of `-log sigmoid(reward_chosen - reward_rejected)`.
    pub loss_sum: f64,
}

impl PairTally {
    /// Adds the pairs of `rewards` (chosen, rejected, chosen, ...), `pairs` of them.
    pub fn add(&mut self, rewards: &[f64], pairs: usize) {
        for k in 0..pairs {
            let (c, r) = (rewards[2 * k], rewards[2 * k + 1]);
            self.pairs += 1;
            self.correct += usize::from(c > r);
            self.chosen_sum += c;
            self.rejected_sum += r;
            self.margin_sum += c - r;
            self.loss_sum += neg_log_sigmoid(c - r);
        }
    }

    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.pairs.max(1) as f64
    }

    /// Mean of `reward_chosen - reward_rejected`.
    pub fn margin(&self) -> f64 {
        self.margin_sum / self.pairs.max(1) as f64
    }

    /// Mean of `-log sigmoid(margin)`: the Bradley-Terry loss for a reward model, the DPO
    /// sigmoid loss for implicit rewards.
    pub fn loss(&self) -> f64 {
        self.loss_sum / self.pairs.max(1) as f64
    }

    pub fn mean_chosen(&self) -> f64 {
        self.chosen_sum / self.pairs.max(1) as f64
    }

    pub fn mean_rejected(&self) -> f64 {
        self.rejected_sum / self.pairs.max(1) as f64
    }
}

/// `-log sigmoid(x)`, stable for large `|x|`.
fn neg_log_sigmoid(x: f64) -> f64 {
    (-x).max(0.0) + (-x.abs()).exp().ln_1p()
}
