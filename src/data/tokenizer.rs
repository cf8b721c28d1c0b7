//! `Tokenizer`: GPT-2's BPE (tiktoken-rs `r50k_base`, offline) or a byte-level BPE trained by
//! topcoat, with topcoat's five special tokens; saved as `tokenizer.json` (docs/FORMATS.md).
//!
//! Special tokens, in this order: `<|endoftext|>`, `<|system|>`, `<|user|>`, `<|assistant|>`,
//! `<|end|>`. GPT-2: `<|endoftext|>` = 50256 as in OpenAI's vocabulary, the chat tokens
//! 50257..=50260 (vocab size 50261). Bpe: ids `0..256` are bytes, then one id per merge, then the
//! five specials last. `encode` treats text as ordinary text: a special token's string in the text
//! is encoded as plain characters, never as the special id.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tiktoken_rs::CoreBPE;

use super::bpe::Bpe;
use super::error::{DataError, Result};

/// The special tokens, in id order.
pub const SPECIAL_TOKENS: [&str; 5] = [
    "<|endoftext|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
];

/// GPT-2's end-of-text id.
pub const GPT2_EOT: u32 = 50256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    Gpt2,
    Bpe,
}

#[derive(Clone)]
enum Inner {
    Gpt2(&'static CoreBPE),
    Bpe(Bpe),
}

#[derive(Clone)]
pub struct Tokenizer {
    inner: Inner,
    /// Id of `SPECIAL_TOKENS[0]`; the others follow (GPT-2: 50256, then 50257..).
    first_special: u32,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind())
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

/// `tokenizer.json`.
#[derive(Serialize, Deserialize)]
struct TokenizerFile {
    format: String,
    version: u32,
    kind: TokenizerKind,
    vocab_size: usize,
    special_tokens: Vec<SpecialEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    merges: Option<Vec<[u32; 2]>>,
}

#[derive(Serialize, Deserialize)]
struct SpecialEntry {
    name: String,
    id: u32,
}

const FILE_FORMAT: &str = "topcoat-tokenizer";
const FILE_VERSION: u32 = 1;

impl Tokenizer {
    /// GPT-2's tokenizer (r50k_base) plus the four chat tokens.
    pub fn gpt2() -> Self {
        Self {
            inner: Inner::Gpt2(tiktoken_rs::r50k_base_singleton()),
            first_special: GPT2_EOT,
        }
    }

    /// Wraps a trained BPE; the specials take the ids after its merges.
    pub fn from_bpe(bpe: Bpe) -> Self {
        let first_special = bpe.num_tokens() as u32;
        Self {
            inner: Inner::Bpe(bpe),
            first_special,
        }
    }

    /// Trains a byte-level BPE whose vocabulary, specials included, has `vocab_size` ids (fewer if
    /// the text runs out of pairs to merge). `progress(merges_done, merges_wanted)`.
    pub fn train_bpe<'a>(
        texts: impl Iterator<Item = &'a str>,
        vocab_size: usize,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let min = 256 + SPECIAL_TOKENS.len();
        if vocab_size < min {
            return Err(DataError::InvalidArgument(format!(
                "BPE vocab size {vocab_size} is below the minimum {min} (256 bytes + {} specials)",
                SPECIAL_TOKENS.len()
            )));
        }
        let bpe = Bpe::train(texts, vocab_size - min, &mut progress);
        Ok(Self::from_bpe(bpe))
    }

    pub fn kind(&self) -> TokenizerKind {
        match self.inner {
            Inner::Gpt2(_) => TokenizerKind::Gpt2,
            Inner::Bpe(_) => TokenizerKind::Bpe,
        }
    }

    /// Number of ids, specials included.
    pub fn vocab_size(&self) -> usize {
        self.first_special as usize + SPECIAL_TOKENS.len()
    }

    /// The `<|endoftext|>` id.
    pub fn eot(&self) -> u32 {
        self.first_special
    }

    /// Id of a special token by its string, e.g. `special("<|user|>")`.
    pub fn special(&self, name: &str) -> Option<u32> {
        SPECIAL_TOKENS
            .iter()
            .position(|&s| s == name)
            .map(|i| self.first_special + i as u32)
    }

    /// `(name, id)` for every special token.
    pub fn special_tokens(&self) -> Vec<(&'static str, u32)> {
        SPECIAL_TOKENS
            .iter()
            .enumerate()
            .map(|(i, &s)| (s, self.first_special + i as u32))
            .collect()
    }

    /// Encodes ordinary text; special-token strings are encoded as plain text.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match &self.inner {
            Inner::Gpt2(core) => core.encode_ordinary(text),
            Inner::Bpe(bpe) => bpe.encode(text),
        }
    }

    /// Decodes ids to text: special ids become their strings, invalid UTF-8 and unknown ids
    /// become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        let mut run_start = 0;
        let flush = |bytes: &mut Vec<u8>, run: &[u32]| {
            if run.is_empty() {
                return;
            }
            match &self.inner {
                Inner::Gpt2(core) => match core.decode_bytes(run) {
                    Ok(b) => bytes.extend_from_slice(&b),
                    Err(_) => {
                        for &id in run {
                            match core.decode_bytes(&[id]) {
                                Ok(b) => bytes.extend_from_slice(&b),
                                Err(_) => bytes.extend_from_slice("\u{FFFD}".as_bytes()),
                            }
                        }
                    }
                },
                Inner::Bpe(bpe) => {
                    for &id in run {
                        match bpe.token_bytes(id) {
                            Some(b) => bytes.extend_from_slice(b),
                            None => bytes.extend_from_slice("\u{FFFD}".as_bytes()),
                        }
                    }
                }
            }
        };
        for (i, &id) in ids.iter().enumerate() {
            let special = id.checked_sub(self.first_special).map(|k| k as usize);
            match special {
                Some(k) if k < SPECIAL_TOKENS.len() => {
                    flush(&mut bytes, &ids[run_start..i]);
                    bytes.extend_from_slice(SPECIAL_TOKENS[k].as_bytes());
                    run_start = i + 1;
                }
                Some(_) => {
                    flush(&mut bytes, &ids[run_start..i]);
                    bytes.extend_from_slice("\u{FFFD}".as_bytes());
                    run_start = i + 1;
                }
                None => {}
            }
        }
        flush(&mut bytes, &ids[run_start..]);
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// SHA-256 of the canonical `tokenizer.json` content (what [`Tokenizer::save`] writes):
    /// two tokenizers are the same exactly when their fingerprints are, whatever their files'
    /// whitespace or key order. Lower-case hex, 64 digits.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let json = serde_json::to_vec(&self.file()).expect("a tokenizer file serializes");
        Sha256::digest(&json)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The first 12 hex digits of [`Tokenizer::fingerprint`], for messages.
    pub fn short_fingerprint(&self) -> String {
        self.fingerprint()[..12].to_string()
    }

    /// The `tokenizer.json` content of this tokenizer.
    fn file(&self) -> TokenizerFile {
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
                Inner::Gpt2(_) => None,
                Inner::Bpe(bpe) => Some(bpe.merges().iter().map(|&(a, b)| [a, b]).collect()),
            },
        }
    }

    /// Writes `tokenizer.json` atomically (temp file + rename).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let json = serde_json::to_vec(&self.file()).map_err(|e| DataError::TokenizerFile {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        let tmp = super::shard::temp_sibling(path);
        std::fs::write(&tmp, json).map_err(|e| DataError::io(&tmp, "write", e))?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            DataError::io(path, "rename", e)
        })
    }

    /// Reads a `tokenizer.json` written by [`Tokenizer::save`], checking it for consistency.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bad = |msg: String| DataError::TokenizerFile {
            path: path.to_path_buf(),
            msg,
        };
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, "read", e))?;
        let file: TokenizerFile =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("invalid JSON: {e}")))?;
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
        let tok = match (file.kind, file.merges) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn bpe(text: &str) -> Tokenizer {
        Tokenizer::train_bpe(std::iter::once(text), 270, |_, _| {}).unwrap()
    }

    /// Same kind and size but other merges: other fingerprints; a saved and loaded copy keeps
    /// its fingerprint.
    #[test]
    fn fingerprint_is_the_content() {
        let a = bpe(&"the cat sat on the mat. ".repeat(30));
        let b = bpe(&"a dog ran in the fog! ".repeat(30));
        assert_eq!((a.kind(), a.vocab_size()), (b.kind(), b.vocab_size()));
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 64);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        a.save(&path).unwrap();
        assert_eq!(
            Tokenizer::load(&path).unwrap().fingerprint(),
            a.fingerprint()
        );
        assert_eq!(
            Tokenizer::gpt2().fingerprint(),
            Tokenizer::gpt2().fingerprint()
        );
        assert_ne!(Tokenizer::gpt2().fingerprint(), a.fingerprint());
        assert_eq!(a.short_fingerprint(), a.fingerprint()[..12]);
    }
}
