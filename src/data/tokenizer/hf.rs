//! A Hugging Face tokenizer: `tokenizer.json` through the `tokenizers` crate, with what
//! `tokenizer_config.json` adds (the chat template, `bos_token`, `eos_token`).
//!
//! Encoding never adds the post-processor's special tokens (`add_special_tokens=False`, as
//! `apply_chat_template` tokenizes its rendered text); added tokens written in the text (e.g.
//! `<|im_start|>` in a rendered template) are recognised, as the reference library does. The
//! end-of-text id ([`HfTokenizer::eos_id`]) is `eos_token`'s; the end of an assistant turn is
//! the first special token the template writes after a reply (`<|im_end|>`, `<|eot_id|>`), or
//! the end-of-text token.
//!
//! Offsets (for the chat loss mask) are byte ranges of the text, untrimmed: the
//! post-processor is not run (without added special tokens it changes no id), nor the file's
//! truncation or padding.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::data::chat::{Message, Role};
use crate::data::error::{DataError, Result};
use crate::data::template::{ChatTemplate, TemplateTokens};

/// End-of-text strings looked for when no `tokenizer_config.json` names an `eos_token`.
const EOS_GUESSES: [&str; 5] = [
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
    "<eos>",
    "<|im_end|>",
];

/// A token's byte range `[start, end)` in the encoded text.
pub(crate) type Span = (usize, usize);

pub(crate) struct HfTokenizer {
    tk: tokenizers::Tokenizer,
    /// `tokenizer.json` as read: what is saved and written back.
    pub(crate) json: serde_json::Value,
    pub(crate) template: Option<ChatTemplate>,
    pub(crate) tokens: TemplateTokens,
    pub(crate) eos_id: u32,
    pub(crate) end_of_turn: u32,
    pub(crate) vocab_size: usize,
    /// Cached: hashing a large vocabulary's JSON takes a while.
    pub(crate) fingerprint: OnceLock<String>,
}

/// What `tokenizer_config.json` says (or a topcoat tokenizer file carries).
#[derive(Default)]
pub(crate) struct HfExtras {
    pub chat_template: Option<String>,
    /// Where the template was read, for its errors.
    pub template_origin: String,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

impl HfTokenizer {
    /// Builds the tokenizer from `tokenizer.json`'s content (read from `path`, which names
    /// every error) and the extras.
    pub(crate) fn new(json: serde_json::Value, path: &Path, extras: HfExtras) -> Result<Self> {
        let bad = |msg: String| DataError::TokenizerFile {
            path: path.to_path_buf(),
            msg,
        };
        let mut tk: tokenizers::Tokenizer = serde_json::from_value(json.clone())
            .map_err(|e| bad(format!("not a Hugging Face tokenizer.json: {e}")))?;
        // Without special tokens added the post-processor only trims whitespace off offsets
        // (GPT-2's ByteLevel `trim_offsets`), which would leave a reply's space tokens empty
        // and out of the loss mask; the ids are the same without it. A file's truncation or
        // padding is for its model's callers, not for encoding a corpus.
        tk.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
        tk.with_padding(None);
        tk.with_truncation(None)
            .map_err(|e| bad(format!("cannot turn truncation off: {e}")))?;
        let vocab = tk.get_vocab(true);
        let vocab_size = vocab.values().map(|&i| i as usize + 1).max().unwrap_or(0);
        if vocab_size == 0 {
            return Err(bad("the vocabulary is empty".into()));
        }
        let eos_id = match &extras.eos_token {
            Some(eos) => tk.token_to_id(eos).ok_or_else(|| {
                bad(format!(
                    "eos_token {eos:?} (from {}) is not in the vocabulary",
                    extras.template_origin
                ))
            })?,
            None => EOS_GUESSES
                .iter()
                .find_map(|s| tk.token_to_id(s))
                .ok_or_else(|| {
                    bad(format!(
                        "no eos_token: no tokenizer_config.json names one and none of {} is in \
                         the vocabulary",
                        EOS_GUESSES.join(", ")
                    ))
                })?,
        };
        let template = extras
            .chat_template
            .as_deref()
            .map(|src| ChatTemplate::new(src, extras.template_origin.clone()))
            .transpose()?;
        let mut hf = Self {
            tk,
            json,
            template,
            tokens: TemplateTokens {
                bos_token: extras.bos_token,
                eos_token: extras.eos_token,
            },
            eos_id,
            end_of_turn: eos_id,
            vocab_size,
            fingerprint: OnceLock::new(),
        };
        hf.end_of_turn = hf.find_end_of_turn().unwrap_or(eos_id);
        Ok(hf)
    }

    /// Reads `tokenizer.json` and, if given, `tokenizer_config.json` (its `chat_template`, a
    /// string or a list of `{"name", "template"}` of which "default" is taken, else a
    /// `chat_template.jinja` beside it; `bos_token` and `eos_token`, strings or
    /// `{"content": ...}` objects).
    pub(crate) fn from_files(tokenizer_json: &Path, config: Option<&Path>) -> Result<Self> {
        let bytes =
            std::fs::read(tokenizer_json).map_err(|e| DataError::io(tokenizer_json, "read", e))?;
        let json: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| DataError::TokenizerFile {
                path: tokenizer_json.to_path_buf(),
                msg: format!("invalid JSON: {e}"),
            })?;
        let extras = match config {
            Some(c) => read_config(c)?,
            None => HfExtras::default(),
        };
        Self::new(json, tokenizer_json, extras)
    }

    pub(crate) fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_offsets(text)?.0)
    }

    /// Ids and, per id, its byte range in `text`.
    pub(crate) fn encode_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<Span>)> {
        let enc = self
            .tk
            .encode(text, false)
            .map_err(|e| DataError::InvalidArgument(format!("Hugging Face tokenizer: {e}")))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Special ids show as their strings; ids outside the vocabulary as U+FFFD.
    pub(crate) fn decode(&self, ids: &[u32]) -> String {
        let mut out = String::new();
        let mut start = 0;
        let known = |id: u32| self.tk.id_to_token(id).is_some();
        for (i, &id) in ids.iter().enumerate() {
            if !known(id) {
                out.push_str(&self.decode_run(&ids[start..i]));
                out.push('\u{FFFD}');
                start = i + 1;
            }
        }
        out.push_str(&self.decode_run(&ids[start..]));
        out
    }

    fn decode_run(&self, ids: &[u32]) -> String {
        if ids.is_empty() {
            return String::new();
        }
        self.tk
            .decode(ids, false)
            .unwrap_or_else(|_| "\u{FFFD}".repeat(ids.len()))
    }

    /// Renders a probe conversation and takes the first special token after the reply.
    fn find_end_of_turn(&self) -> Option<u32> {
        let t = self.template.as_ref()?;
        let reply = "Zq7";
        let user = [Message::new(Role::User, "Hello")];
        let both = [user[0].clone(), Message::new(Role::Assistant, reply)];
        let prompt = t.render(&user, true, &self.tokens).ok()?;
        let full = t.render(&both, false, &self.tokens).ok()?;
        let tail = full.strip_prefix(prompt.as_str())?;
        let after = &tail[tail.find(reply)? + reply.len()..];
        let specials = self.tk.get_added_tokens_decoder();
        self.encode(after)
            .ok()?
            .into_iter()
            .find(|id| specials.get(id).is_some_and(|t| t.special))
    }
}

/// `tokenizer_config.json`'s chat template, bos and eos.
pub(crate) fn read_config(path: &Path) -> Result<HfExtras> {
    let bad = |msg: String| DataError::TokenizerFile {
        path: path.to_path_buf(),
        msg,
    };
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, "read", e))?;
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let token = |key: &str| -> Result<Option<String>> {
        match v.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(o) => match o.get("content").and_then(|c| c.as_str()) {
                Some(s) => Ok(Some(s.to_string())),
                None => Err(bad(format!(
                    "\"{key}\" is neither a string nor an object with a string \"content\""
                ))),
            },
        }
    };
    let origin = format!("{}", path.display());
    let (chat_template, template_origin) = match v.get("chat_template") {
        None | Some(serde_json::Value::Null) => {
            let jinja = sibling(path, "chat_template.jinja");
            match std::fs::read_to_string(&jinja) {
                Ok(s) => (Some(s), jinja.display().to_string()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => (None, origin),
                Err(e) => return Err(DataError::io(&jinja, "read", e)),
            }
        }
        Some(serde_json::Value::String(s)) => (Some(s.clone()), origin),
        Some(serde_json::Value::Array(list)) => {
            let named = |want: &str| {
                list.iter().find_map(|t| {
                    (t.get("name")?.as_str()? == want)
                        .then(|| t.get("template")?.as_str().map(str::to_string))?
                })
            };
            match named("default") {
                Some(s) => (Some(s), format!("{origin} (template \"default\")")),
                None => {
                    let names: Vec<&str> = list
                        .iter()
                        .filter_map(|t| t.get("name")?.as_str())
                        .collect();
                    return Err(bad(format!(
                        "\"chat_template\" is a list without a \"default\" template (names: {})",
                        names.join(", ")
                    )));
                }
            }
        }
        Some(_) => {
            return Err(bad(
                "\"chat_template\" is neither a string nor a list of {\"name\", \"template\"}"
                    .into(),
            ))
        }
    };
    Ok(HfExtras {
        chat_template,
        template_origin,
        bos_token: token("bos_token")?,
        eos_token: token("eos_token")?,
    })
}

fn sibling(path: &Path, name: &str) -> PathBuf {
    path.parent().map_or_else(|| name.into(), |d| d.join(name))
}

/// Writes `tokenizer.json` and `tokenizer_config.json` into `dir` (what the reference
/// library's `AutoTokenizer.from_pretrained(dir)` reads).
pub(crate) fn write_files(hf: &HfTokenizer, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, "create", e))?;
    let mut config = serde_json::Map::new();
    config.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
    if let Some(b) = &hf.tokens.bos_token {
        config.insert("bos_token".into(), b.as_str().into());
    }
    let eos = hf.tokens.eos_token.clone().unwrap_or_else(|| {
        hf.tk
            .id_to_token(hf.eos_id)
            .expect("the eos id came from the vocabulary")
    });
    config.insert("eos_token".into(), eos.into());
    if let Some(t) = &hf.template {
        config.insert("chat_template".into(), t.source().into());
    }
    for (name, value) in [
        ("tokenizer.json", &hf.json),
        ("tokenizer_config.json", &serde_json::Value::Object(config)),
    ] {
        let path = dir.join(name);
        let text = serde_json::to_vec_pretty(value).map_err(|e| DataError::TokenizerFile {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        std::fs::write(&path, text).map_err(|e| DataError::io(&path, "write", e))?;
    }
    Ok(())
}
