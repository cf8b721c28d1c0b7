//! Sampling text from a model: temperature, top-k, a seed, and a stop token.
//!
//! Each new token runs the model on the last `max_seq_len` tokens of the context (no KV cache
//! yet): simple and exact, quadratic in the length, fine for the lengths `sample` is used at.

use crate::backend::Backend;
use crate::model::{Gpt, Result};
use crate::rng::Rng;

#[derive(Clone, Debug)]
pub struct SampleOptions {
    pub max_tokens: usize,
    /// 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 keeps all).
    pub top_k: usize,
    pub seed: u64,
    /// Stop after emitting this token (it is included in the output).
    pub stop: Option<u32>,
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self {
            max_tokens: 100,
            temperature: 0.8,
            top_k: 40,
            seed: 42,
            stop: None,
        }
    }
}

/// Picks a token id from `logits` per the options, drawing from `rng`.
pub fn pick_token(logits: &[f32], temperature: f32, top_k: usize, rng: &mut Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
                if x > best.1 {
                    (i, x)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if temperature <= 0.0 || top_k == 1 {
        return argmax();
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    if top_k > 0 && top_k < logits.len() {
        idx.select_nth_unstable_by(top_k - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
        idx.truncate(top_k);
    }
    let max = idx
        .iter()
        .map(|&i| logits[i])
        .fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = idx
        .iter()
        .map(|&i| (((logits[i] - max) / temperature) as f64).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut r = rng.next_f64() * total;
    for (&i, w) in idx.iter().zip(&weights) {
        r -= w;
        if r <= 0.0 {
            return i as u32;
        }
    }
    *idx.last().expect("non-empty vocabulary") as u32
}

/// Continues `prompt` by up to `opts.max_tokens` tokens, calling `on_token` as each arrives.
/// Returns the new tokens.
pub fn generate<B: Backend>(
    be: &B,
    model: &mut Gpt<B>,
    prompt: &[u32],
    opts: &SampleOptions,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    let mut rng = Rng::new(opts.seed);
    let mut context: Vec<i32> = prompt.iter().map(|&x| x as i32).collect();
    let mut out = Vec::new();
    let window = model.cfg.max_seq_len;
    for _ in 0..opts.max_tokens {
        let start = context.len().saturating_sub(window);
        let ctx = &context[start..];
        model.forward(be, ctx, 1, ctx.len())?;
        let logits = model.logits_at(be, 0, ctx.len() - 1)?;
        let tok = pick_token(&logits, opts.temperature, opts.top_k, &mut rng);
        out.push(tok);
        on_token(tok);
        context.push(tok as i32);
        if Some(tok) == opts.stop {
            break;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_and_top_k_never_leaves_the_top() {
        let logits = [0.1, 3.0, -1.0, 2.9, 0.0];
        let mut rng = Rng::new(5);
        assert_eq!(pick_token(&logits, 0.0, 0, &mut rng), 1);
        for _ in 0..200 {
            let t = pick_token(&logits, 1.0, 2, &mut rng);
            assert!(t == 1 || t == 3, "top-2 drew {t}");
        }
    }

    #[test]
    fn temperature_sampling_follows_the_softmax() {
        let logits = [0.0, (3.0f32).ln()]; // probabilities 1/4 and 3/4
        let mut rng = Rng::new(9);
        let ones = (0..20_000)
            .filter(|_| pick_token(&logits, 1.0, 0, &mut rng) == 1)
            .count();
        let frac = ones as f64 / 20_000.0;
        assert!(
            (frac - 0.75).abs() < 0.015,
            "drew token 1 with frequency {frac}"
        );
    }
}
