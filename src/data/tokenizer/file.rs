//! topcoat's `tokenizer.json` (docs/FORMATS.md): what [`Tokenizer::save`] writes and
//! [`Tokenizer::load`] checks, the fingerprint over it, and a Hugging Face `tokenizer.json`
//! read in its place.

use std::borrow::Cow;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::hf::{self, HfExtras, HfTokenizer};
use super::{Inner, Tokenizer, TokenizerKind};
use crate::data::bpe::Bpe;
use crate::data::error::{DataError, Result};

/// `tokenizer.json`.
#[derive(Serialize, Deserialize)]
struct TokenizerFile<'a> {
    format: String,
    version: u32,
    kind: TokenizerKind,
    vocab_size: usize,
    special_tokens: Vec<SpecialEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    merges: Option<Vec<[u32; 2]>>,
    /// Kind hf: the Hugging Face `tokenizer.json`, whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hf: Option<Cow<'a, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    chat_template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bos_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    eos_token: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct SpecialEntry {
    name: String,
    id: u32,
}

const FILE_FORMAT: &str = "topcoat-tokenizer";
const FILE_VERSION: u32 = 1;

impl Tokenizer {
    /// SHA-256 of the canonical `tokenizer.json` content (what [`Tokenizer::save`] writes):
    /// two tokenizers are the same exactly when their fingerprints are, whatever their files'
    /// whitespace or key order. Lower-case hex, 64 digits.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let compute = || {
            let json = serde_json::to_vec(&self.file()).expect("a tokenizer file serializes");
            Sha256::digest(&json)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        };
        match &self.inner {
            Inner::Hf(h) => h.fingerprint.get_or_init(compute).clone(),
            _ => compute(),
        }
    }

    /// The first 12 hex digits of [`Tokenizer::fingerprint`], for messages.
    pub fn short_fingerprint(&self) -> String {
        self.fingerprint()[..12].to_string()
    }

    /// The `tokenizer.json` content of this tokenizer.
    fn file(&self) -> TokenizerFile<'_> {
        let hf = self.hf();
        TokenizerFile {
            format: FILE_FORMAT.into(),
            version: FILE_VERSION,
            kind: self.kind(),
            vocab_size: self.vocab_size(),
            special_tokens: self
                .special_tokens()
                .into_iter()
                .map(|(name, id)| SpecialEntry {
                    name: name.into(),
                    id,
                })
                .collect(),
            merges: match &self.inner {
                Inner::Gpt2(_) | Inner::Hf(_) => None,
                Inner::Bpe(bpe) => Some(bpe.merges().iter().map(|&(a, b)| [a, b]).collect()),
            },
            hf: hf.map(|h| Cow::Borrowed(&h.json)),
            chat_template: hf.and_then(|h| Some(h.template.as_ref()?.source().to_string())),
            bos_token: hf.and_then(|h| h.tokens.bos_token.clone()),
            eos_token: hf.and_then(|h| h.tokens.eos_token.clone()),
        }
    }

    /// Writes `tokenizer.json` atomically (temp file + rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let json = serde_json::to_vec(&self.file()).map_err(|e| DataError::TokenizerFile {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        let tmp = crate::data::shard::temp_sibling(path);
        std::fs::write(&tmp, json).map_err(|e| DataError::io(&tmp, "write", e))?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            DataError::io(path, "rename", e)
        })
    }

    /// Reads a `tokenizer.json` written by [`Tokenizer::save`], checking it for consistency;
    /// or a Hugging Face `tokenizer.json` (no `"format"` key, a `"model"`), with the
    /// `tokenizer_config.json` beside it when there is one.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bad = |msg: String| DataError::TokenizerFile {
            path: path.to_path_buf(),
            msg,
        };
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, "read", e))?;
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        if value.get("format").is_none() && value.get("model").is_some() {
            let config = path.with_file_name("tokenizer_config.json");
            let config = config.is_file().then_some(config);
            let extras = match &config {
                Some(c) => hf::read_config(c)?,
                None => HfExtras::default(),
            };
            return Ok(Self::from_hf(HfTokenizer::new(value, path, extras)?));
        }
        let file: TokenizerFile =
            serde_json::from_value(value).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        if file.format != FILE_FORMAT {
            return Err(bad(format!(
                "format is {:?}, expected {FILE_FORMAT:?}",
                file.format
            )));
        }
        if file.version != FILE_VERSION {
            return Err(bad(format!(
                "version is {}, expected {FILE_VERSION}",
                file.version
            )));
        }
        if file.kind != TokenizerKind::Hf
            && (file.hf.is_some()
                || file.chat_template.is_some()
                || file.bos_token.is_some()
                || file.eos_token.is_some())
        {
            return Err(bad(format!(
                "kind {:?} must not have \"hf\", \"chat_template\", \"bos_token\" or \
                 \"eos_token\"",
                file.kind
            )));
        }
        let tok = match (file.kind, file.merges) {
            (TokenizerKind::Hf, Some(_)) => {
                return Err(bad("kind hf must not have \"merges\"".into()))
            }
            (TokenizerKind::Hf, None) => {
                let json = file
                    .hf
                    .ok_or_else(|| bad("kind hf needs \"hf\" (the tokenizer.json)".into()))?
                    .into_owned();
                let extras = HfExtras {
                    chat_template: file.chat_template,
                    template_origin: format!("{} (\"chat_template\")", path.display()),
                    bos_token: file.bos_token,
                    eos_token: file.eos_token,
                };
                Self::from_hf(HfTokenizer::new(json, path, extras)?)
            }
            (TokenizerKind::Gpt2, None) => Self::gpt2(),
            (TokenizerKind::Gpt2, Some(_)) => {
                return Err(bad("kind gpt2 must not have \"merges\"".into()))
            }
            (TokenizerKind::Bpe, None) => return Err(bad("kind bpe needs \"merges\"".into())),
            (TokenizerKind::Bpe, Some(m)) => Self::from_bpe(
                Bpe::from_merges(m.into_iter().map(|[a, b]| (a, b)).collect()).map_err(bad)?,
            ),
        };
        if file.vocab_size != tok.vocab_size() {
            return Err(bad(format!(
                "vocab_size is {}, but the merges and specials give {}",
                file.vocab_size,
                tok.vocab_size()
            )));
        }
        let want = tok.special_tokens();
        let found: Vec<(&str, u32)> = file
            .special_tokens
            .iter()
            .map(|s| (s.name.as_str(), s.id))
            .collect();
        if found != want {
            return Err(bad(format!(
                "special_tokens are {found:?}, expected {want:?}"
            )));
        }
        Ok(tok)
    }
}
