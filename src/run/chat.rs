//! `topcoat chat`: a conversation with a checkpoint, one user message per input line.
//!
//! Each line is a user message. The conversation (an optional system message, then the turns
//! so far, then the new message and `<|assistant|>`) is rendered with the chat template of
//! `data/chat.rs`; the reply is sampled with a KV cache and written out token by token as it is
//! decoded, until `<|end|>` (or end-of-text), `max_new_tokens`, or a full context. The reply's
//! tokens, closed by `<|end|>`, stay in the conversation for the next turn; since the template
//! renders messages one after another, the cached prefix carries over and only the new message
//! is prefilled. When the next turn would not fit (its message plus `max_new_tokens` past the
//! model's context), the oldest turns are dropped (the system message stays) and the
//! conversation is prefilled again. Blank lines are skipped; end of input ends the chat.

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::path::Path;

use super::{resolve_checkpoint, DeviceKind};
use crate::backend::{cpu::CpuBackend, cuda, Backend, SampleParams};
use crate::data::chat::{render, render_prompt, Message, Role};
use crate::generate::{Session, TextStream};
use crate::model::ModelError;
use crate::rng::Rng;
use crate::train::{checkpoint, io_err, TrainError};

/// How `chat` samples and what it starts with.
#[derive(Clone, Debug)]
pub struct ChatOptions {
    /// A system message placed before the conversation.
    pub system: Option<String>,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    /// Most tokens per reply.
    pub max_new_tokens: usize,
    pub seed: u64,
    pub device: DeviceKind,
    /// Write `> ` before reading each message (for a terminal).
    pub show_prompt: bool,
}

/// Runs a chat reading messages from `input` and writing replies (one line each, streamed) to
/// `out`; `note` gets status lines. Returns the number of replies.
pub fn chat(
    ckpt: &Path,
    opts: &ChatOptions,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    note: &dyn Fn(&str),
) -> Result<usize, TrainError> {
    match opts.device {
        DeviceKind::Cpu => chat_with(&CpuBackend, ckpt, opts, input, out, note),
        DeviceKind::Cuda => chat_with(&cuda::CudaBackend::new(0)?, ckpt, opts, input, out, note),
    }
}

fn invalid(msg: String) -> TrainError {
    TrainError::Model(ModelError::Invalid(msg))
}

fn chat_with<B: Backend>(
    be: &B,
    ckpt: &Path,
    opts: &ChatOptions,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    note: &dyn Fn(&str),
) -> Result<usize, TrainError> {
    let params = SampleParams {
        temperature: opts.temperature,
        top_k: opts.top_k,
        top_p: opts.top_p,
    };
    params.check("chat").map_err(|e| invalid(e.to_string()))?;
    if opts.max_new_tokens == 0 {
        return Err(invalid("max_new_tokens must be at least 1".into()));
    }
    let dir = resolve_checkpoint(ckpt)?;
    let tok = checkpoint::load_tokenizer(&dir)?;
    let model = checkpoint::load_model(be, &dir, None)?;
    let special = |name: &str| {
        tok.special(name).ok_or_else(|| {
            invalid(format!(
                "{}: the tokenizer has no {name} token",
                dir.display()
            ))
        })
    };
    let end = special("<|end|>")?;
    let eot = tok.eot();
    let cap = model.cfg.max_seq_len;
    let system: Vec<u32> = match &opts.system {
        Some(s) => render(&tok, &[Message::new(Role::System, s.as_str())]).ids,
        None => Vec::new(),
    };
    if system.len() + 2 >= cap {
        return Err(invalid(format!(
            "the system message is {} tokens: no room left in the model's context of {cap}",
            system.len()
        )));
    }
    note(&format!(
        "chat: {} ({} layers, d={}, context {cap} tokens) on {}; one message per line, end of input quits",
        dir.display(),
        model.cfg.n_layer,
        model.cfg.n_embd,
        be.name()
    ));

    let mut session = Session::new(be, &model)?;
    let mut rng = Rng::new(opts.seed);
    let mut turns: VecDeque<Vec<u32>> = VecDeque::new();
    let stdout_err = || io_err("<stdout>");
    let mut replies = 0;
    let mut n = 0;
    loop {
        if opts.show_prompt {
            out.write_all(b"> ").map_err(stdout_err())?;
            out.flush().map_err(stdout_err())?;
        }
        let mut line = String::new();
        if input.read_line(&mut line).map_err(io_err("<stdin>"))? == 0 {
            break;
        }
        n += 1;
        let text = line.trim_end_matches(['\r', '\n']);
        if text.trim().is_empty() {
            continue;
        }
        let user = render_prompt(&tok, &[Message::new(Role::User, text)]);
        if system.len() + user.len() >= cap {
            note(&format!(
                "message on line {n} skipped: it is {} tokens, and with the system message it \
                 does not fit the model's context of {cap} tokens",
                user.len()
            ));
            continue;
        }
        let held = |turns: &VecDeque<Vec<u32>>| turns.iter().map(Vec::len).sum::<usize>();
        let mut dropped = 0;
        while !turns.is_empty()
            && system.len() + held(&turns) + user.len() + opts.max_new_tokens > cap
        {
            turns.pop_front();
            dropped += 1;
        }
        if dropped > 0 {
            note(&format!(
                "dropped the {dropped} oldest turn(s) to fit the context of {cap} tokens"
            ));
        }
        let mut context = system.clone();
        for t in &turns {
            context.extend_from_slice(t);
        }
        context.extend_from_slice(&user);
        session.set_context(&context)?;

        let mut reply: Vec<u32> = Vec::new();
        let mut stream = TextStream::new(&tok);
        loop {
            let t = session.sample(&params, &mut rng)?;
            if t == end || t == eot {
                break;
            }
            reply.push(t);
            let piece = stream.push(t);
            if !piece.is_empty() {
                out.write_all(piece.as_bytes()).map_err(stdout_err())?;
                out.flush().map_err(stdout_err())?;
            }
            if reply.len() >= opts.max_new_tokens {
                break;
            }
            if session.context().len() >= cap {
                note("the reply filled the model's context");
                break;
            }
            session.push(t)?;
        }
        writeln!(out).map_err(stdout_err())?;
        out.flush().map_err(stdout_err())?;
        let mut turn = user;
        turn.extend_from_slice(&reply);
        turn.push(end);
        turns.push_back(turn);
        replies += 1;
    }
    Ok(replies)
}
