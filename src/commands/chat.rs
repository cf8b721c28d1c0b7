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
//!
//! A checkpoint whose tokenizer has its own chat template (a Hugging Face model's) renders the
//! whole conversation with it for every turn (the replies kept as text), as such templates need
//! not render turn by turn; the KV cache still keeps the prefix the new render shares with the
//! old. A reply ends at the template's end-of-turn token (e.g. `<|im_end|>`, `<|eot_id|>`) or
//! the end-of-text token.

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::path::Path;

use super::inputs::{check_sampling, resolve_checkpoint};
use super::CommandError;
use crate::backend::{Backend, SampleParams};
use crate::data::chat::{render, render_prompt, Message, Role};
use crate::data::Tokenizer;
use crate::generate::{Session, TextStream};
use crate::rng::Rng;
use crate::runtime::Runtime;
use crate::train::{checkpoint, io_err};

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
    /// Write `> ` before reading each message (for a terminal).
    pub show_prompt: bool,
    /// A PEFT adapter directory merged into the checkpoint (`--adapter`).
    pub adapter: Option<std::path::PathBuf>,
}

/// Runs a chat on the runtime's backend, reading messages from `input` and writing replies
/// (one line each, streamed) to `out`; `note` gets status lines. Returns the number of replies.
pub fn chat(
    rt: &Runtime,
    ckpt: &Path,
    opts: &ChatOptions,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    note: &dyn Fn(&str),
) -> Result<usize, CommandError> {
    check_sampling(opts.temperature, opts.top_p, opts.max_new_tokens)?;
    crate::on_backend!(rt, be => chat_on(be, ckpt, opts, input, out, note))
}

fn chat_on<B: Backend>(
    be: &B,
    ckpt: &Path,
    opts: &ChatOptions,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    note: &dyn Fn(&str),
) -> Result<usize, CommandError> {
    let dir = resolve_checkpoint(ckpt)?;
    let tok = checkpoint::load_tokenizer(&dir)?;
    let model = super::adapter::load_model_with_adapter(be, &dir, opts.adapter.as_deref())?;
    let end = tok.end_of_turn();
    let cap = model.cfg.max_seq_len;
    let system_msg: Vec<Message> = opts
        .system
        .iter()
        .map(|s| Message::new(Role::System, s.as_str()))
        .collect();
    let system: Vec<u32> = match tok.chat_template() {
        Some(_) if !system_msg.is_empty() => render_prompt(&tok, &system_msg)?,
        Some(_) => Vec::new(),
        None => render(&tok, &system_msg)?.ids,
    };
    if system.len() + 2 >= cap {
        return Err(CommandError::arg(
            "--system",
            format!(
                "the system message is {} tokens: no room left in the model's context of {cap}",
                system.len()
            ),
        ));
    }
    note(&format!(
        "chat: {} ({} layers, d={}, context {cap} tokens) on {}; one message per line, end of input quits",
        dir.display(),
        model.cfg.n_layer,
        model.cfg.n_embd,
        be.name()
    ));
    let mut chat = Conversation {
        session: Session::new(be, &model)?,
        rng: Rng::new(opts.seed),
        params: SampleParams {
            temperature: opts.temperature,
            top_k: opts.top_k,
            top_p: opts.top_p,
        },
        tok: &tok,
        end,
        cap,
        max_new_tokens: opts.max_new_tokens,
        system,
        system_msg,
        turns: VecDeque::new(),
    };
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
        if chat.turn(n, text, out, note)? {
            replies += 1;
        }
    }
    Ok(replies)
}

/// A conversation in progress: the model's session, the turns it holds, how it samples.
struct Conversation<'a, B: Backend> {
    session: Session<'a, B>,
    rng: Rng,
    params: SampleParams,
    tok: &'a Tokenizer,
    /// `<|end|>`, which closes a reply.
    end: u32,
    /// The model's context.
    cap: usize,
    max_new_tokens: usize,
    /// The rendered system message (empty without one).
    system: Vec<u32>,
    /// The system message (for a tokenizer's own template).
    system_msg: Vec<Message>,
    /// Each earlier turn.
    turns: VecDeque<Turn>,
}

/// One earlier turn: the user message and the reply as text, and (topcoat's template) its
/// tokens, the reply's as sampled, closed by `<|end|>`.
struct Turn {
    user: String,
    reply: String,
    ids: Vec<u32>,
}

impl<B: Backend> Conversation<'_, B> {
    /// Answers the message of input line `n`, streaming the reply to `out`; false when the
    /// message was skipped (too long for the context).
    fn turn(
        &mut self,
        n: usize,
        text: &str,
        out: &mut dyn Write,
        note: &dyn Fn(&str),
    ) -> Result<bool, CommandError> {
        let cap = self.cap;
        let user = render_prompt(self.tok, &[Message::new(Role::User, text)])?;
        let alone = match self.tok.chat_template() {
            Some(_) => self.context(text, 0)?.len(),
            None => self.system.len() + user.len(),
        };
        if alone >= cap {
            note(&format!(
                "message on line {n} skipped: it is {} tokens, and with the system message it \
                 does not fit the model's context of {cap} tokens",
                alone.saturating_sub(self.system.len())
            ));
            return Ok(false);
        }
        let mut context = self.context(text, self.turns.len())?;
        let mut dropped = 0;
        while !self.turns.is_empty() && context.len() + self.max_new_tokens > cap {
            self.turns.pop_front();
            dropped += 1;
            context = self.context(text, self.turns.len())?;
        }
        if dropped > 0 {
            note(&format!(
                "dropped the {dropped} oldest turn(s) to fit the context of {cap} tokens"
            ));
        }
        self.session.set_context(&context)?;
        let reply = self.stream_reply(out, note)?;
        let mut ids = user;
        ids.extend_from_slice(&reply);
        ids.push(self.end);
        self.turns.push_back(Turn {
            user: text.to_string(),
            reply: self.tok.decode(&reply),
            ids,
        });
        Ok(true)
    }

    /// The context for a new user message `text` after the last `keep` turns: the system
    /// message, those turns, the message and what opens the reply.
    fn context(&self, text: &str, keep: usize) -> Result<Vec<u32>, CommandError> {
        let kept = self.turns.iter().skip(self.turns.len() - keep);
        if self.tok.chat_template().is_none() {
            let mut context = self.system.clone();
            for t in kept {
                context.extend_from_slice(&t.ids);
            }
            context.extend(render_prompt(self.tok, &[Message::new(Role::User, text)])?);
            return Ok(context);
        }
        let mut messages = self.system_msg.clone();
        for t in kept {
            messages.push(Message::new(Role::User, t.user.as_str()));
            messages.push(Message::new(Role::Assistant, t.reply.as_str()));
        }
        messages.push(Message::new(Role::User, text));
        Ok(render_prompt(self.tok, &messages)?)
    }

    /// Samples a reply after the context set, writing its text to `out` as it is decoded.
    fn stream_reply(
        &mut self,
        out: &mut dyn Write,
        note: &dyn Fn(&str),
    ) -> Result<Vec<u32>, CommandError> {
        let stdout_err = || io_err("<stdout>");
        let eot = self.tok.eot();
        let mut reply: Vec<u32> = Vec::new();
        let mut stream = TextStream::new(self.tok);
        loop {
            let t = self.session.sample(&self.params, &mut self.rng)?;
            if t == self.end || t == eot {
                break;
            }
            reply.push(t);
            let piece = stream.push(t);
            if !piece.is_empty() {
                out.write_all(piece.as_bytes()).map_err(stdout_err())?;
                out.flush().map_err(stdout_err())?;
            }
            if reply.len() >= self.max_new_tokens {
                break;
            }
            if self.session.context().len() >= self.cap {
                note("the reply filled the model's context");
                break;
            }
            self.session.push(t)?;
        }
        writeln!(out).map_err(stdout_err())?;
        out.flush().map_err(stdout_err())?;
        Ok(reply)
    }
}
