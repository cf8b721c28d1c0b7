//! What the demo measures on a model: its replies to `What does 'X' mean?` (a question or an
//! answer; normalised exact match and token F1 against the gloss), which side of a preference
//! pair it gives the higher log-probability, reward-model scores of replies, and a sampled
//! estimate of the KL divergence between two models.
//!
//! A reply is a *question* when its first sentence (up to the first `.`, `?`, `!` or line
//! break) ends with `?`, or, cut off before any of them, starts with an interrogative word; it
//! is an *answer* when it is non-empty and not a question. The base model is asked the plain
//! question followed by a line break and its reply is the first non-empty line it writes; the
//! tuned models are asked through the chat template and reply until `<|end|>`.

use crate::backend::{Backend, SampleParams};
use crate::commands::report::card::{AnswerScore, Replies};
use crate::data::chat::{render_prompt, Message, Role};
use crate::data::Tokenizer;
use crate::generate::generate_many;
use crate::model::{Gpt, ModelError, RewardModel};
use crate::rng::Rng;
use crate::scoring::{normalize, normalized_match};
use std::collections::BTreeMap;

type Result<T> = std::result::Result<T, ModelError>;

/// Rows decoded or scored together.
pub const BATCH_ROWS: usize = 64;

/// One evaluation question (a line of `eval_questions.jsonl`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    pub prompt: String,
    pub reference: String,
    pub lemma: String,
    /// `train`, `heldout` or `control`.
    pub group: String,
}

/// How a model is asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// The question as plain text and a line break (a base model knows no chat template).
    Plain,
    /// The question as one user turn of the chat template.
    Chat,
}

/// Replies of one model to a list of questions.
#[derive(Clone, Debug, Default)]
pub struct Asked {
    /// Prompt token ids, as the model saw them.
    pub prompts: Vec<Vec<u32>>,
    /// Generated ids, the stop token removed.
    pub ids: Vec<Vec<u32>>,
    /// The reply text that is scored (for `Plain`, the first non-empty line).
    pub texts: Vec<String>,
}

/// The prompt ids of `question` in `style`.
pub fn prompt_ids(tok: &Tokenizer, question: &str, style: Style) -> Result<Vec<u32>> {
    Ok(match style {
        Style::Plain => tok.encode(&format!("{question}\n")),
        Style::Chat => render_prompt(tok, &[Message::new(Role::User, question)])
            .map_err(|e| crate::model::ModelError::Invalid(e.to_string()))?,
    })
}

/// The tokens that end a reply in `style`.
pub fn stops(tok: &Tokenizer, style: Style) -> Vec<u32> {
    let mut s = vec![tok.eot()];
    if style == Style::Chat {
        s.push(tok.end_of_turn());
    }
    s
}

/// Generates a reply to every question (`params`: greedy when the temperature is 0).
#[allow(clippy::too_many_arguments)]
pub fn ask<B: Backend>(
    be: &B,
    model: &Gpt<B>,
    tok: &Tokenizer,
    questions: &[&str],
    style: Style,
    max_new: usize,
    params: &SampleParams,
    rng: &mut Rng,
) -> Result<Asked> {
    let prompts: Vec<Vec<u32>> = questions
        .iter()
        .map(|q| prompt_ids(tok, q, style))
        .collect::<Result<_>>()?;
    let stop = stops(tok, style);
    let mut ids = generate_many(be, model, &prompts, max_new, &stop, params, rng, BATCH_ROWS)?;
    for r in &mut ids {
        if r.last().is_some_and(|t| stop.contains(t)) {
            r.pop();
        }
    }
    let texts = ids
        .iter()
        .map(|r| {
            let text = tok.decode(r);
            match style {
                Style::Plain => first_line(&text).to_string(),
                Style::Chat => text.trim().to_string(),
            }
        })
        .collect();
    Ok(Asked {
        prompts,
        ids,
        texts,
    })
}

/// The first non-empty line of `text`, trimmed.
pub fn first_line(text: &str) -> &str {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
}

const INTERROGATIVES: &[&str] = &[
    "what", "how", "why", "who", "whom", "whose", "where", "when", "which", "is", "are", "do",
    "does", "did", "can", "could", "should", "would", "will", "may",
];

/// Whether a reply is a question (see the module header); `None` for an empty reply.
pub fn is_question(reply: &str) -> Option<bool> {
    let reply = reply.trim();
    if reply.is_empty() {
        return None;
    }
    match reply.find(['.', '?', '!', '\n']) {
        Some(i) => Some(reply[i..].starts_with('?')),
        None => {
            let first = reply.split_whitespace().next().unwrap_or("").to_lowercase();
            Some(INTERROGATIVES.contains(&first.trim_matches(|c: char| !c.is_alphanumeric())))
        }
    }
}

/// Token F1 of `output` against `reference`: both [`normalize`]d and split on spaces, the
/// overlap counted as a multiset. Two empty texts score 1.
pub fn token_f1(output: &str, reference: &str) -> f64 {
    let (out, refr) = (normalize(output), normalize(reference));
    let out: Vec<&str> = out.split_whitespace().collect();
    let refr: Vec<&str> = refr.split_whitespace().collect();
    if out.is_empty() || refr.is_empty() {
        return f64::from(u8::from(out.is_empty() && refr.is_empty()));
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for w in &refr {
        *counts.entry(w).or_default() += 1;
    }
    let mut common = 0usize;
    for w in &out {
        if let Some(c) = counts.get_mut(w).filter(|c| **c > 0) {
            *c -= 1;
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let (p, r) = (
        common as f64 / out.len() as f64,
        common as f64 / refr.len() as f64,
    );
    2.0 * p * r / (p + r)
}

/// Question rate, answer rate, reply length and answer scores by group.
pub fn score_replies(questions: &[Question], asked: &Asked) -> Replies {
    let n = questions.len().max(1) as f64;
    let kinds: Vec<Option<bool>> = asked.texts.iter().map(|t| is_question(t)).collect();
    let mut groups: BTreeMap<String, AnswerScore> = BTreeMap::new();
    for (q, text) in questions.iter().zip(&asked.texts) {
        let g = groups.entry(q.group.clone()).or_default();
        g.n += 1;
        g.exact += f64::from(u8::from(normalized_match(text, &q.reference)));
        g.f1 += token_f1(text, &q.reference);
    }
    for g in groups.values_mut() {
        g.exact /= g.n as f64;
        g.f1 /= g.n as f64;
    }
    Replies {
        question_rate: kinds.iter().filter(|k| **k == Some(true)).count() as f64 / n,
        answer_rate: kinds.iter().filter(|k| **k == Some(false)).count() as f64 / n,
        mean_tokens: asked.ids.iter().map(Vec::len).sum::<usize>() as f64 / n,
        groups,
    }
}

/// The summed log-probability of each sequence's masked-in tokens (`mask[j]`: token `j` is
/// scored, predicted from the tokens before it), `rows` sequences per forward pass.
pub fn masked_logps<B: Backend>(
    be: &B,
    model: &mut Gpt<B>,
    seqs: &[(Vec<u32>, Vec<bool>)],
    pad: u32,
    rows: usize,
) -> Result<Vec<f64>> {
    let tmax = model.cfg.max_seq_len;
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(rows.max(1)) {
        let t = chunk.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0) - 1;
        if t == 0 || t > tmax {
            return Err(ModelError::Invalid(format!(
                "a sequence of {} tokens: scoring needs 2 ..= {} tokens",
                t + 1,
                tmax + 1
            )));
        }
        let b = chunk.len();
        let mut inputs = vec![pad as i32; b * t];
        let mut targets = vec![-1i32; b * t];
        for (row, (ids, mask)) in chunk.iter().enumerate() {
            for j in 0..ids.len() - 1 {
                inputs[row * t + j] = ids[j] as i32;
                if mask[j + 1] {
                    targets[row * t + j] = ids[j + 1] as i32;
                }
            }
        }
        let logps = model.token_logps(be, &inputs, &targets, b, t)?;
        out.extend(
            logps
                .chunks(t)
                .map(|r| r.iter().map(|&x| f64::from(x)).sum::<f64>()),
        );
    }
    Ok(out)
}

/// `prompt + completion` with the completion's tokens masked in.
pub fn completion_row(prompt: &[u32], completion: &[u32]) -> (Vec<u32>, Vec<bool>) {
    let ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    let mask = (0..ids.len()).map(|j| j >= prompt.len()).collect();
    (ids, mask)
}

/// Fraction of `(chosen, rejected)` log-probability pairs with the chosen side strictly higher.
pub fn preference_accuracy(pairs: &[(f64, f64)]) -> f64 {
    pairs.iter().filter(|(c, r)| c > r).count() as f64 / pairs.len().max(1) as f64
}

/// The reward model's score of each sequence, `rows` per forward pass.
pub fn reward_scores<B: Backend>(
    be: &B,
    rm: &mut RewardModel<B>,
    seqs: &[Vec<u32>],
    pad: u32,
    rows: usize,
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(rows.max(1)) {
        let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
        out.extend(rm.score(be, &refs, pad)?.into_iter().map(f64::from));
    }
    Ok(out)
}

/// Chat prompt, reply and `<|end|>`: the sequence a reward model scores.
pub fn scored_reply(prompt: &[u32], reply: &[u32], end: u32) -> Vec<u32> {
    prompt
        .iter()
        .chain(reply)
        .copied()
        .chain(std::iter::once(end))
        .collect()
}

/// Mean over `prompts` of the summed `logp_policy - logp_reference` of one completion sampled
/// from the policy at temperature 1 (a Monte Carlo estimate of `KL(policy || reference)`).
#[allow(clippy::too_many_arguments)]
pub fn sampled_kl<B: Backend>(
    be: &B,
    policy: &mut Gpt<B>,
    reference: &mut Gpt<B>,
    prompts: &[Vec<u32>],
    max_new: usize,
    stop: &[u32],
    pad: u32,
    seed: u64,
) -> Result<f64> {
    let params = SampleParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
    };
    let mut rng = Rng::new(seed);
    let completions = generate_many(
        be, policy, prompts, max_new, stop, &params, &mut rng, BATCH_ROWS,
    )?;
    let rows: Vec<(Vec<u32>, Vec<bool>)> = prompts
        .iter()
        .zip(&completions)
        .map(|(p, c)| completion_row(p, c))
        .collect();
    let pi = masked_logps(be, policy, &rows, pad, BATCH_ROWS)?;
    let re = masked_logps(be, reference, &rows, pad, BATCH_ROWS)?;
    Ok(pi.iter().zip(&re).map(|(a, b)| a - b).sum::<f64>() / rows.len().max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn questions_and_answers_are_told_apart() {
        assert_eq!(is_question("What does 'cat' mean? It is"), Some(true));
        assert_eq!(is_question("A small animal. Is it?"), Some(false));
        assert_eq!(is_question("how do I"), Some(true));
        assert_eq!(is_question("a feline"), Some(false));
        assert_eq!(is_question("   "), None);
        assert_eq!(first_line("\n\n  What is it?\nno"), "What is it?");
    }

    #[test]
    fn token_f1_counts_overlap_as_a_multiset() {
        assert_eq!(token_f1("The cat.", "the CAT"), 1.0);
        assert_eq!(token_f1("dog", "a cat"), 0.0);
        // "the the cat" vs "the cat sat": 2 common; p = 2/3, r = 2/3.
        assert!((token_f1("the the cat", "the cat sat") - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(token_f1("", ""), 1.0);
        assert_eq!(token_f1("", "cat"), 0.0);
    }

    #[test]
    fn replies_are_scored_by_group() {
        let q = |g: &str, r: &str| Question {
            prompt: "What does 'x' mean?".into(),
            reference: r.into(),
            lemma: "x".into(),
            group: g.into(),
        };
        let questions = [
            q("train", "A cat."),
            q("train", "A dog."),
            q("control", "A cow."),
        ];
        let asked = Asked {
            prompts: vec![vec![1]; 3],
            ids: vec![vec![1, 2], vec![3], vec![]],
            texts: vec!["a cat".into(), "What is a dog?".into(), String::new()],
        };
        let r = score_replies(&questions, &asked);
        assert!((r.answer_rate - 1.0 / 3.0).abs() < 1e-12);
        assert!((r.question_rate - 1.0 / 3.0).abs() < 1e-12);
        assert!((r.mean_tokens - 1.0).abs() < 1e-12);
        assert_eq!(r.groups["train"].n, 2);
        assert!((r.groups["train"].exact - 0.5).abs() < 1e-12);
        assert_eq!(r.groups["control"].f1, 0.0);
    }
}
