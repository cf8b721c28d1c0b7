//! The chat template and its loss mask, and the conversation JSONL parser (docs/FORMATS.md).
//!
//! Template: each message renders as `<|role|>` + the encoded content + `<|end|>`, where role is
//! `system`, `user` or `assistant` (one special token each). A system message is optional and
//! only first. Nothing is added between messages and nothing after the last one.
//!
//! Loss mask: true exactly on the tokens of each assistant message's content and on that
//! message's closing `<|end|>` (so the model learns to stop); false on every role tag, on system
//! and user content, and on their `<|end|>`. A mask entry belongs to the token at that index: in
//! training, the target `ids[i]` counts when `loss_mask[i]` is true.
//!
//! Generation: [`render_prompt`] renders the messages, then `<|assistant|>`; sample until `<|end|>`.
//!
//! A tokenizer with its own chat template (a Hugging Face model's, template.rs) renders with
//! that instead: the text `apply_chat_template` writes, tokenized with its added tokens
//! recognised. Its loss mask: for each assistant message `i`, the text between the render of
//! `messages[..i]` with the generation prompt and the render of `messages[..=i]` (the reply and
//! whatever closes its turn) is trained on; a token is masked in exactly when its byte span
//! in the text (untrimmed, see tokenizer/hf.rs) is not empty and lies inside such a text. A
//! template for which those renders are not prefixes of the whole conversation's (one that
//! rewrites earlier turns) is an error naming it. The prompt for generation is the render with
//! the generation prompt; a reply ends at [`Tokenizer::end_of_turn`].

use std::path::Path;

use super::error::{DataError, Result};
use super::tokenizer::Tokenizer;

/// Who speaks a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    /// The role's special token string, e.g. `<|user|>`.
    pub fn tag(self) -> &'static str {
        match self {
            Role::System => "<|system|>",
            Role::User => "<|user|>",
            Role::Assistant => "<|assistant|>",
        }
    }

    /// `system`, `user` or `assistant`.
    pub fn name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// A rendered conversation: token ids and, per id, whether it is trained on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    pub ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
}

fn special(tok: &Tokenizer, name: &str) -> u32 {
    tok.special(name)
        .expect("every tokenizer has the five chat special tokens")
}

/// Renders `messages` with the chat template (the tokenizer's own, else topcoat's) and the
/// assistant-only loss mask.
pub fn render(tok: &Tokenizer, messages: &[Message]) -> Result<Rendered> {
    if tok.chat_template().is_some() {
        return render_with_template(tok, messages);
    }
    missing_template(tok)?;
    let end = special(tok, "<|end|>");
    let mut out = Rendered {
        ids: Vec::new(),
        loss_mask: Vec::new(),
    };
    for m in messages {
        let learn = m.role == Role::Assistant;
        out.ids.push(special(tok, m.role.tag()));
        out.loss_mask.push(false);
        let content = tok.encode(&m.content);
        out.loss_mask
            .extend(std::iter::repeat_n(learn, content.len()));
        out.ids.extend(content);
        out.ids.push(end);
        out.loss_mask.push(learn);
    }
    Ok(out)
}

/// The prompt for generating the next assistant turn: the messages, then `<|assistant|>` (or
/// the tokenizer's template with its generation prompt).
pub fn render_prompt(tok: &Tokenizer, messages: &[Message]) -> Result<Vec<u32>> {
    if let Some(t) = tok.chat_template() {
        let text = t.render(messages, true, &tok.template_tokens())?;
        return tok.try_encode(&text);
    }
    let mut ids = render(tok, messages)?.ids;
    ids.push(special(tok, "<|assistant|>"));
    Ok(ids)
}

/// A Hugging Face tokenizer without a chat template cannot render topcoat's (it lacks the
/// five chat tokens): an error saying where a template goes.
fn missing_template(tok: &Tokenizer) -> Result<()> {
    if tok.special("<|end|>").is_some() {
        return Ok(());
    }
    Err(DataError::InvalidArgument(
        "this Hugging Face tokenizer has no chat template (and none of topcoat's chat tokens): \
         give a tokenizer_config.json with a \"chat_template\" (or a chat_template.jinja beside \
         it)"
        .into(),
    ))
}

/// The model's template: the rendered text, tokenized; the mask from the assistant spans.
fn render_with_template(tok: &Tokenizer, messages: &[Message]) -> Result<Rendered> {
    let t = tok.chat_template().expect("checked by the caller");
    let hf = tok
        .hf()
        .expect("only Hugging Face tokenizers carry a template");
    let tokens = tok.template_tokens();
    let full = t.render(messages, false, &tokens)?;
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != Role::Assistant {
            continue;
        }
        let before = t.render(&messages[..i], true, &tokens)?;
        let through = t.render(&messages[..=i], false, &tokens)?;
        if !through.starts_with(&before) || !full.starts_with(&through) {
            return Err(t.error(format!(
                "cannot mask assistant message {i}: the render of messages[..{i}] with the \
                 generation prompt, then of messages[..={i}], are not prefixes of the whole \
                 conversation's render (the template rewrites earlier turns), so the reply's \
                 tokens cannot be told apart"
            )));
        }
        spans.push(before.len()..through.len());
    }
    let (ids, offsets) = hf.encode_offsets(&full)?;
    let loss_mask = offsets
        .iter()
        .map(|&(a, b)| spans.iter().any(|s| a < b && s.start <= a && b <= s.end))
        .collect();
    Ok(Rendered { ids, loss_mask })
}

/// Line `line` (1-based) of the JSONL file `path` parsed as JSON, and the maker of that line's
/// errors for the checks that follow.
pub fn json_line<'a>(
    path: &'a Path,
    line: usize,
    text: &str,
) -> Result<(serde_json::Value, impl Fn(String) -> DataError + 'a)> {
    let err = move |msg: String| DataError::Jsonl {
        path: path.to_path_buf(),
        line,
        msg,
    };
    let v = serde_json::from_str(text).map_err(|e| err(format!("invalid JSON: {e}")))?;
    Ok((v, err))
}

/// Parses one conversation line `{"messages": [{"role": ..., "content": ...}, ...]}` of `path`
/// (`line` is 1-based), checking the template's rules: known roles, a system message only
/// first, non-empty assistant content, at least one assistant message.
pub fn parse_line(path: &Path, line: usize, text: &str) -> Result<Vec<Message>> {
    let (v, err) = json_line(path, line, text)?;
    let list = v
        .get("messages")
        .ok_or_else(|| err("missing field \"messages\" (expected {\"messages\": [...]})".into()))?;
    let messages = parse_messages(list).map_err(|e| err(format!("field \"messages\": {e}")))?;
    if let Some(i) = messages.iter().skip(1).position(|m| m.role == Role::System) {
        return Err(err(format!(
            "message {}: a system message may only come first",
            i + 1
        )));
    }
    if !messages.iter().any(|m| m.role == Role::Assistant) {
        return Err(err("no assistant message: nothing to train on".into()));
    }
    Ok(messages)
}

/// Parses a JSON list of `{"role", "content"}` messages, checking each one: string `role` and
/// `content`, a known role, non-empty assistant content. The error text names the message by
/// its 0-based index; where a system message may stand is the caller's rule.
pub fn parse_messages(list: &serde_json::Value) -> std::result::Result<Vec<Message>, String> {
    let list = list.as_array().ok_or("not a list of messages")?;
    let mut messages = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let field = |name: &str| -> std::result::Result<&str, String> {
            m.get(name)
                .ok_or_else(|| format!("message {i}: missing field \"{name}\""))?
                .as_str()
                .ok_or_else(|| format!("message {i}: field \"{name}\" is not a string"))
        };
        let role_name = field("role")?;
        let role = Role::parse(role_name).ok_or_else(|| {
            format!(
                "message {i}: unknown role \"{role_name}\" (expected system, user or assistant)"
            )
        })?;
        let content = field("content")?;
        if role == Role::Assistant && content.trim().is_empty() {
            return Err(format!("message {i}: empty assistant content"));
        }
        messages.push(Message::new(role, content));
    }
    Ok(messages)
}

/// Reads every conversation of a JSONL file (blank lines skipped).
pub fn read_conversations(path: &Path) -> Result<Vec<Vec<Message>>> {
    read_jsonl(path, parse_line)
}

/// Parses every non-blank line of the JSONL file `path` with `parse(path, 1-based line, text)`;
/// a line that is not UTF-8 is an error naming it.
pub(crate) fn read_jsonl<T>(
    path: &Path,
    mut parse: impl FnMut(&Path, usize, &str) -> Result<T>,
) -> Result<Vec<T>> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, "read", e))?;
    // A leading byte order mark (some editors write one) is not part of the first line.
    let text = super::dataset::strip_bom(&bytes);
    let mut out = Vec::new();
    for (i, raw) in text.split(|&b| b == b'\n').enumerate() {
        if raw.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let line = std::str::from_utf8(raw).map_err(|e| DataError::Jsonl {
            path: path.to_path_buf(),
            line: i + 1,
            msg: format!("not valid UTF-8 at byte {} of the line", e.valid_up_to()),
        })?;
        out.push(parse(path, i + 1, line)?);
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small trained tokenizer that knows the template's special tokens.
    pub(crate) fn tok() -> Tokenizer {
        Tokenizer::train_bpe(["hello there, how are you?"].into_iter(), 270, |_, _| {}).unwrap()
    }

    #[test]
    fn mask_covers_assistant_content_and_its_end_only() {
        let t = tok();
        let msgs = vec![
            Message::new(Role::System, "be brief"),
            Message::new(Role::User, "hi"),
            Message::new(Role::Assistant, "hello"),
        ];
        let r = render(&t, &msgs).unwrap();
        let (sys, user, asst, end) = (
            t.special("<|system|>").unwrap(),
            t.special("<|user|>").unwrap(),
            t.special("<|assistant|>").unwrap(),
            t.special("<|end|>").unwrap(),
        );
        let mut want = vec![sys];
        want.extend(t.encode("be brief"));
        want.extend([end, user]);
        want.extend(t.encode("hi"));
        want.extend([end, asst]);
        let prefix = want.len();
        want.extend(t.encode("hello"));
        want.push(end);
        assert_eq!(r.ids, want);
        assert_eq!(r.ids.len(), r.loss_mask.len());
        for (i, &m) in r.loss_mask.iter().enumerate() {
            assert_eq!(m, i >= prefix, "mask at {i}");
        }
        assert_eq!(t.decode(&r.ids[prefix..]), "hello<|end|>");
        let p = render_prompt(&t, &msgs[..2]).unwrap();
        assert_eq!(p, want[..prefix].to_vec());
    }

    #[test]
    fn special_strings_in_content_stay_plain_text() {
        let t = tok();
        let r = render(
            &t,
            &[
                Message::new(Role::User, "<|end|>"),
                Message::new(Role::Assistant, "ok"),
            ],
        )
        .unwrap();
        let end = t.special("<|end|>").unwrap();
        assert_eq!(r.ids.iter().filter(|&&i| i == end).count(), 2);
    }

    #[test]
    fn bad_lines_name_file_line_and_problem() {
        let p = Path::new("chats.jsonl");
        let cases = [
            (
                r#"{"messages": [{"role": "bot", "content": "x"}]}"#,
                "unknown role \"bot\"",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}"#,
                "empty assistant content",
            ),
            (
                r#"{"messages": [{"role": "user"}]}"#,
                "missing field \"content\"",
            ),
            (r#"{"msgs": []}"#, "missing field \"messages\""),
            (
                r#"{"messages": [{"role": "user", "content": "x"}]}"#,
                "no assistant message",
            ),
            (
                r#"{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "x"}]}"#,
                "only come first",
            ),
            ("{not json", "invalid JSON"),
        ];
        for (line, want) in cases {
            let e = parse_line(p, 7, line).unwrap_err().to_string();
            assert!(e.starts_with("chats.jsonl: line 7: "), "{e}");
            assert!(e.contains(want), "{e} should mention {want}");
        }
        let ok = parse_line(
            p,
            1,
            r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#,
        )
        .unwrap();
        assert_eq!(ok[1], Message::new(Role::Assistant, "b"));
    }
}
