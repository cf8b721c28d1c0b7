//! Sampling text from a model: temperature, top-k, top-p, a seed, and a stop token, with a
//! key/value cache ([`generate`], [`Session`], many prompts at once: [`generate_many`], one
//! batch of equal-length prompts, as RL's rollouts sample: [`generate_group`]) or without one
//! ([`generate_uncached`]).
//!
//! The cached path prefills the prompt once, then runs one position per new token
//! ([`Gpt::extend`]) and draws it on the device ([`crate::backend::Backend::sample_tokens`]).
//! The uncached path reruns the whole context for every token and draws on the host with the
//! same rule (`backend/cpu/sample.rs`); it is the reference the cached path is tested against.
//!
//! Window: the model sees at most `max_seq_len` tokens. A longer prompt keeps its last
//! `max_seq_len`; when the window is full and another token arrives, both paths drop the oldest
//! tokens, keeping the newest half (`ceil(max_seq_len / 2)`, the new token included) and
//! prefilling that again. Both paths follow the same rule ([`window_start`]), so they see the
//! same contexts at every step and greedy decoding gives the same tokens whatever the length.
//!
//! Random numbers: one uniform in `[0, 1)` per drawn token from a seeded [`Rng`], drawn even
//! for greedy decoding, so a seed always gives the same stream.

use crate::backend::cpu::sample::sample_row;
use crate::backend::{Backend, SampleParams};
use crate::data::Tokenizer;
use crate::model::{Gpt, KvCache, ModelError, Result};
use crate::rng::Rng;

#[derive(Clone, Debug)]
pub struct SampleOptions {
    pub max_tokens: usize,
    /// 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 keeps all).
    pub top_k: usize,
    /// Keep the fewest most likely tokens whose probability reaches `top_p` (1 keeps all).
    pub top_p: f32,
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
            top_p: 1.0,
            seed: 42,
            stop: None,
        }
    }
}

impl SampleOptions {
    /// The per-token sampling rule.
    pub fn params(&self) -> SampleParams {
        SampleParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
        }
    }
}

/// Picks a token id from `logits` (the real vocabulary) per `params`, drawing one uniform from
/// `rng`: the host-side twin of the device sampler, same rule (`backend/cpu/sample.rs`).
pub fn pick_token(logits: &[f32], params: &SampleParams, rng: &mut Rng) -> u32 {
    let u = rng.next_f32();
    sample_row(logits, params, u)
}

/// Where the window of a context of `len` tokens starts, given where it started before the
/// last token arrived: unchanged while at most `tmax` tokens are in it, else the newest
/// `ceil(tmax / 2)` (see the module header). A prompt's first window: [`prompt_start`].
pub fn window_start(start: usize, len: usize, tmax: usize) -> usize {
    if len - start > tmax {
        len - tmax.div_ceil(2)
    } else {
        start
    }
}

/// Where a prompt of `len` tokens starts its window: its last `tmax` tokens.
pub fn prompt_start(len: usize, tmax: usize) -> usize {
    len.saturating_sub(tmax)
}

/// Checks the prompt and the sampling options; returns the sampling parameters and the
/// generator seeded from `opts.seed`.
fn sampling_start(prompt: &[u32], opts: &SampleOptions) -> Result<(SampleParams, Rng)> {
    if prompt.is_empty() {
        return Err(ModelError::Invalid(
            "an empty prompt: give at least one token (e.g. the end-of-text token)".into(),
        ));
    }
    let params = opts.params();
    params
        .check("generate")
        .map_err(|e| ModelError::Invalid(e.to_string()))?;
    Ok((params, Rng::new(opts.seed)))
}

/// A context held in a KV cache (one row): what the model has seen, and the next-token logits.
pub struct Session<'m, B: Backend> {
    be: &'m B,
    model: &'m Gpt<B>,
    cache: KvCache<B>,
    /// The tokens in the cache, in order.
    ids: Vec<u32>,
}

impl<'m, B: Backend> Session<'m, B> {
    pub fn new(be: &'m B, model: &'m Gpt<B>) -> Result<Self> {
        Ok(Self {
            be,
            model,
            cache: KvCache::new(be, &model.cfg, 1)?,
            ids: Vec::new(),
        })
    }

    /// The tokens the model currently sees.
    pub fn context(&self) -> &[u32] {
        &self.ids
    }

    /// Most tokens the model can see (`max_seq_len`).
    pub fn capacity(&self) -> usize {
        self.cache.capacity()
    }

    /// Makes the context exactly `ids` (non-empty, at most `capacity`): keeps the cached
    /// prefix it shares with the current context, and prefills the rest.
    pub fn set_context(&mut self, ids: &[u32]) -> Result<()> {
        if ids.is_empty() || ids.len() > self.capacity() {
            return Err(ModelError::Invalid(format!(
                "a context of {} tokens (need 1 ..= {})",
                ids.len(),
                self.capacity()
            )));
        }
        let mut common = self.ids.iter().zip(ids).take_while(|(a, b)| a == b).count();
        if common == ids.len() {
            // Nothing new, but the logits must be those of the last token: redo that one.
            common -= 1;
        }
        self.cache.truncate(common);
        self.ids.truncate(common);
        let new: Vec<i32> = ids[common..].iter().map(|&x| x as i32).collect();
        self.model
            .extend(self.be, &mut self.cache, &new, new.len())?;
        self.ids.extend_from_slice(&ids[common..]);
        Ok(())
    }

    /// Appends one token (a decode step); when the window is full, keeps its newest half.
    pub fn push(&mut self, tok: u32) -> Result<()> {
        if self.ids.len() < self.capacity() {
            self.model
                .extend(self.be, &mut self.cache, &[tok as i32], 1)?;
            self.ids.push(tok);
            return Ok(());
        }
        let len = self.ids.len() + 1;
        let start = window_start(0, len, self.capacity());
        let mut window = self.ids[start..].to_vec();
        window.push(tok);
        self.set_context(&window)
    }

    /// The next token after the context, drawn on the device with one uniform from `rng`.
    pub fn sample(&self, params: &SampleParams, rng: &mut Rng) -> Result<u32> {
        let u = rng.next_f32();
        Ok(self.cache.sample(self.be, params, &[u])?[0])
    }

    /// The next-token logits over the real vocabulary.
    pub fn logits(&self) -> Result<Vec<f32>> {
        self.cache.logits_row(self.be, 0)
    }
}

/// Continues `prompt` by up to `opts.max_tokens` tokens with a KV cache, calling `on_token` as
/// each arrives. Returns the new tokens.
pub fn generate<B: Backend>(
    be: &B,
    model: &Gpt<B>,
    prompt: &[u32],
    opts: &SampleOptions,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    let (params, mut rng) = sampling_start(prompt, opts)?;
    let mut session = Session::new(be, model)?;
    session.set_context(&prompt[prompt_start(prompt.len(), session.capacity())..])?;
    let mut out = Vec::new();
    for i in 0..opts.max_tokens {
        let tok = session.sample(&params, &mut rng)?;
        out.push(tok);
        on_token(tok);
        if Some(tok) == opts.stop || i + 1 == opts.max_tokens {
            break;
        }
        session.push(tok)?;
    }
    Ok(out)
}

/// [`generate`] without a cache: every token reruns the model on the whole window and is
/// drawn on the host. Quadratic in the length; the reference for the cached path.
pub fn generate_uncached<B: Backend>(
    be: &B,
    model: &mut Gpt<B>,
    prompt: &[u32],
    opts: &SampleOptions,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    let (params, mut rng) = sampling_start(prompt, opts)?;
    let tmax = model.cfg.max_seq_len;
    let mut context: Vec<i32> = prompt.iter().map(|&x| x as i32).collect();
    let mut start = prompt_start(context.len(), tmax);
    let mut out = Vec::new();
    for _ in 0..opts.max_tokens {
        let ctx = &context[start..];
        model.forward(be, ctx, 1, ctx.len())?;
        let logits = model.logits_at(be, 0, ctx.len() - 1)?;
        let tok = pick_token(&logits, &params, &mut rng);
        out.push(tok);
        on_token(tok);
        if Some(tok) == opts.stop {
            break;
        }
        context.push(tok as i32);
        start = window_start(start, context.len(), tmax);
    }
    Ok(out)
}

/// Continues every prompt by up to `max_new` tokens (no window sliding: each prompt plus
/// `max_new` must fit in `max_seq_len`). A row stops at the first token in `stops`, which is
/// kept as the row's last token. Prompts of equal length are decoded together in one KV cache
/// of up to `rows` rows, in the order of the sorted lengths; every step draws one uniform per
/// row from `rng`, so a seed and the same inputs give the same outputs. Returns one
/// continuation per prompt, in the prompts' order.
#[allow(clippy::too_many_arguments)]
pub fn generate_many<B: Backend>(
    be: &B,
    model: &Gpt<B>,
    prompts: &[Vec<u32>],
    max_new: usize,
    stops: &[u32],
    params: &SampleParams,
    rng: &mut Rng,
    rows: usize,
) -> Result<Vec<Vec<u32>>> {
    let tmax = model.cfg.max_seq_len;
    if let Some(i) = prompts
        .iter()
        .position(|p| p.is_empty() || p.len() + max_new > tmax)
    {
        return Err(ModelError::Invalid(format!(
            "prompt {i} has {} tokens: with {max_new} new tokens it must fit in the context of {tmax}",
            prompts[i].len()
        )));
    }
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| (prompts[i].len(), i));
    let mut out = vec![Vec::new(); prompts.len()];
    let mut start = 0;
    while start < order.len() {
        let len = prompts[order[start]].len();
        let end = (start..order.len())
            .take(rows.max(1))
            .take_while(|&j| prompts[order[j]].len() == len)
            .last()
            .map_or(start + 1, |j| j + 1);
        let group: Vec<&[u32]> = order[start..end]
            .iter()
            .map(|&i| prompts[i].as_slice())
            .collect();
        let continuations = generate_group(be, model, &group, max_new, stops, params, rng)?;
        for (&i, c) in order[start..end].iter().zip(continuations) {
            out[i] = c;
        }
        start = end;
    }
    Ok(out)
}

/// Continues prompts of one length together, one row each of a single KV cache, by up to
/// `max_new` tokens (no window sliding). A row stops at the first token in `stops`, kept as its
/// last token. Every step draws one uniform per row from `rng`, in row order, until every row
/// has stopped or `max_new` tokens are drawn. Returns one continuation per prompt, in order.
pub fn generate_group<B: Backend>(
    be: &B,
    model: &Gpt<B>,
    prompts: &[&[u32]],
    max_new: usize,
    stops: &[u32],
    params: &SampleParams,
    rng: &mut Rng,
) -> Result<Vec<Vec<u32>>> {
    let Some(len) = prompts.first().map(|p| p.len()) else {
        return Ok(Vec::new());
    };
    if prompts.iter().any(|p| p.len() != len) {
        return Err(ModelError::Invalid(
            "a decoding group needs prompts of one length".into(),
        ));
    }
    let b = prompts.len();
    let mut cache = KvCache::new(be, &model.cfg, b)?;
    let ids: Vec<i32> = prompts
        .iter()
        .flat_map(|p| p.iter().map(|&x| x as i32))
        .collect();
    model.extend(be, &mut cache, &ids, len)?;
    let mut out = vec![Vec::new(); b];
    let mut done = vec![false; b];
    for step in 0..max_new {
        let u: Vec<f32> = (0..b).map(|_| rng.next_f32()).collect();
        let toks = cache.sample(be, params, &u)?;
        for ((o, d), &tok) in out.iter_mut().zip(done.iter_mut()).zip(&toks) {
            if !*d {
                o.push(tok);
                *d = stops.contains(&tok);
            }
        }
        if step + 1 == max_new || done.iter().all(|&d| d) {
            break;
        }
        let next: Vec<i32> = toks.iter().map(|&x| x as i32).collect();
        model.extend(be, &mut cache, &next, 1)?;
    }
    Ok(out)
}

/// Turns a stream of token ids into text as it arrives: each [`TextStream::push`] returns the
/// text not shown yet, holding back a character split across tokens until it is whole.
pub struct TextStream<'t> {
    tok: &'t Tokenizer,
    ids: Vec<u32>,
    shown: String,
}

impl<'t> TextStream<'t> {
    pub fn new(tok: &'t Tokenizer) -> Self {
        Self {
            tok,
            ids: Vec::new(),
            shown: String::new(),
        }
    }

    /// Adds a token; returns the newly completed text (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        // Decode the whole stream so multi-byte characters split across tokens print whole.
        let text = self.tok.decode(&self.ids);
        if text.len() > self.shown.len()
            && text.starts_with(self.shown.as_str())
            && !text.ends_with('\u{FFFD}')
        {
            let new = text[self.shown.len()..].to_string();
            self.shown = text;
            new
        } else {
            String::new()
        }
    }

    /// Everything decoded so far.
    pub fn text(&self) -> String {
        self.tok.decode(&self.ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32) -> SampleParams {
        SampleParams {
            temperature,
            top_k,
            top_p,
        }
    }

    #[test]
    fn greedy_takes_the_argmax_and_top_k_never_leaves_the_top() {
        let logits = [0.1, 3.0, -1.0, 2.9, 0.0];
        let mut rng = Rng::new(5);
        assert_eq!(pick_token(&logits, &params(0.0, 0, 1.0), &mut rng), 1);
        for _ in 0..200 {
            let t = pick_token(&logits, &params(1.0, 2, 1.0), &mut rng);
            assert!(t == 1 || t == 3, "top-2 drew {t}");
        }
    }

    #[test]
    fn temperature_sampling_follows_the_softmax() {
        let logits = [0.0, (3.0f32).ln()]; // probabilities 1/4 and 3/4
        let mut rng = Rng::new(9);
        let ones = (0..20_000)
            .filter(|_| pick_token(&logits, &params(1.0, 0, 1.0), &mut rng) == 1)
            .count();
        let frac = ones as f64 / 20_000.0;
        assert!(
            (frac - 0.75).abs() < 0.015,
            "drew token 1 with frequency {frac}"
        );
    }

    #[test]
    fn window_keeps_the_newest_half_when_full() {
        assert_eq!(prompt_start(5, 8), 0);
        assert_eq!(prompt_start(11, 8), 3);
        assert_eq!(window_start(0, 8, 8), 0);
        assert_eq!(window_start(0, 9, 8), 5); // the newest 4 tokens
        assert_eq!(window_start(5, 12, 8), 5);
        assert_eq!(window_start(5, 14, 8), 10);
        assert_eq!(window_start(0, 2, 1), 1);
    }
}
