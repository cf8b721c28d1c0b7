//! `sample` as a library call: a continuation of a prompt from a checkpoint, generated with a
//! KV cache and streamed as text.

use super::inputs::{check_sampling, resolve_checkpoint};
use super::CommandError;
use crate::backend::Backend;
use crate::generate::{self, SampleOptions, TextStream};
use crate::runtime::Runtime;
use crate::train::checkpoint;
use std::path::Path;

/// Generates a continuation of `prompt` from `ckpt` (a checkpoint or run directory; with
/// `adapter`, a PEFT adapter merged into it), streaming text to `on_text` as it is decoded;
/// returns the whole continuation. It stops at end-of-text unless `opts.stop` names another
/// token.
pub fn sample(
    rt: &Runtime,
    ckpt: &Path,
    adapter: Option<&Path>,
    prompt: &str,
    opts: &SampleOptions,
    on_text: impl FnMut(&str),
) -> Result<String, CommandError> {
    check_sampling(opts.temperature, opts.top_p, opts.max_tokens)?;
    crate::on_backend!(rt, be => sample_on(be, ckpt, adapter, prompt, opts, on_text))
}

fn sample_on<B: Backend>(
    be: &B,
    ckpt: &Path,
    adapter: Option<&Path>,
    prompt: &str,
    opts: &SampleOptions,
    mut on_text: impl FnMut(&str),
) -> Result<String, CommandError> {
    let dir = resolve_checkpoint(ckpt)?;
    let tokenizer = checkpoint::load_tokenizer(&dir)?;
    let model = super::adapter::load_model_with_adapter(be, &dir, adapter)?;
    let mut ids = tokenizer.encode(prompt);
    if ids.is_empty() {
        ids.push(tokenizer.eot());
    }
    let opts = SampleOptions {
        stop: opts.stop.or(Some(tokenizer.eot())),
        ..opts.clone()
    };
    let mut stream = TextStream::new(&tokenizer);
    generate::generate(be, &model, &ids, &opts, |tok| {
        let text = stream.push(tok);
        if !text.is_empty() {
            on_text(&text);
        }
    })?;
    Ok(stream.text())
}
