//! `Tokenizer`: GPT-2's BPE (tiktoken-rs `r50k_base`, offline) or a byte-level BPE trained by
//! topcoat, with topcoat's five special tokens; or a Hugging Face `tokenizer.json` with its
//! chat template (hf.rs). Saved as topcoat's `tokenizer.json` (file.rs, docs/FORMATS.md),
//! which holds a Hugging Face tokenizer whole, so a checkpoint or dataset stays
//! self-contained.
//!
//! Special tokens, in this order: `<|endoftext|>`, `<|system|>`, `<|user|>`, `<|assistant|>`,
//! `<|end|>`. GPT-2: `<|endoftext|>` = 50256 as in OpenAI's vocabulary, the chat tokens
//! 50257..=50260 (vocab size 50261). Bpe: ids `0..256` are bytes, then one id per merge, then the
//! five specials last. `encode` treats text as ordinary text: a special token's string in the text
//! is encoded as plain characters, never as the special id. A Hugging Face tokenizer has none
//! of the five (its chat tokens are its template's); `special` is `None` for it.

mod file;
mod hf;
mod to_hf;

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tiktoken_rs::CoreBPE;

use super::bpe::Bpe;
use super::error::{DataError, Result};
use super::template::{ChatTemplate, TemplateTokens};
use hf::{HfExtras, HfTokenizer};

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
    /// A Hugging Face `tokenizer.json` (the `tokenizers` crate).
    Hf,
}

#[derive(Clone)]
enum Inner {
    Gpt2(&'static CoreBPE),
    Bpe(Bpe),
    Hf(Arc<HfTokenizer>),
}

#[derive(Clone)]
pub struct Tokenizer {
    inner: Inner,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind())
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

impl Tokenizer {
    /// GPT-2's tokenizer (r50k_base) plus the four chat tokens.
    pub fn gpt2() -> Self {
        Self {
            inner: Inner::Gpt2(tiktoken_rs::r50k_base_singleton()),
        }
    }

    /// Wraps a trained BPE; the specials take the ids after its merges.
    pub fn from_bpe(bpe: Bpe) -> Self {
        Self {
            inner: Inner::Bpe(bpe),
        }
    }

    /// A Hugging Face tokenizer: `tokenizer.json`, and `tokenizer_config.json` where given
    /// (its `chat_template`, a string or the list form's "default", else a
    /// `chat_template.jinja` beside it; `bos_token`; `eos_token`, strings or `{"content": ..}`).
    /// Without an `eos_token` a usual end-of-text string in the vocabulary is taken.
    pub fn from_hf_files(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Self> {
        Ok(Self::from_hf(HfTokenizer::from_files(
            tokenizer_json,
            tokenizer_config,
        )?))
    }

    /// A Hugging Face tokenizer from `tokenizer.json`'s content; `origin` names it in errors.
    pub fn from_hf_json(
        json: serde_json::Value,
        origin: &Path,
        chat_template: Option<&str>,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self> {
        let extras = HfExtras {
            chat_template: chat_template.map(str::to_string),
            template_origin: origin.display().to_string(),
            bos_token: bos_token.map(str::to_string),
            eos_token: eos_token.map(str::to_string),
        };
        Ok(Self::from_hf(HfTokenizer::new(json, origin, extras)?))
    }

    fn from_hf(hf: HfTokenizer) -> Self {
        Self {
            inner: Inner::Hf(Arc::new(hf)),
        }
    }

    /// Writes the tokenizer as Hugging Face's `tokenizer.json` and `tokenizer_config.json`
    /// (chat template, bos, eos) into `dir`: a Hugging Face tokenizer as it was read; `gpt2`
    /// and `bpe` converted (to_hf.rs), with topcoat's template and `<|endoftext|>` as bos and
    /// eos.
    pub fn write_hf_files(&self, dir: &Path) -> Result<()> {
        if let Inner::Hf(h) = &self.inner {
            return hf::write_files(h, dir);
        }
        let extras = HfExtras {
            chat_template: Some(to_hf::TOPCOAT_TEMPLATE.into()),
            template_origin: "topcoat's chat template".into(),
            bos_token: Some(SPECIAL_TOKENS[0].into()),
            eos_token: Some(SPECIAL_TOKENS[0].into()),
        };
        let h = HfTokenizer::new(to_hf::hf_json(self)?, &dir.join("tokenizer.json"), extras)?;
        hf::write_files(&h, dir)
    }

    /// The Hugging Face tokenizer, if this is one.
    pub(crate) fn hf(&self) -> Option<&HfTokenizer> {
        match &self.inner {
            Inner::Hf(h) => Some(h),
            _ => None,
        }
    }

    /// The model's own chat template (Hugging Face tokenizers that have one); `None` means
    /// topcoat's template (chat.rs).
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.hf().and_then(|h| h.template.as_ref())
    }

    /// The `bos_token` / `eos_token` strings a chat template may print.
    pub fn template_tokens(&self) -> TemplateTokens {
        self.hf().map(|h| h.tokens.clone()).unwrap_or_default()
    }

    /// The id that closes an assistant reply, where generation stops: `<|end|>` for topcoat's
    /// template; for a Hugging Face tokenizer the first special token its template writes
    /// after a reply (`<|im_end|>`, `<|eot_id|>`), else its end-of-text id.
    pub fn end_of_turn(&self) -> u32 {
        match &self.inner {
            Inner::Hf(h) => h.end_of_turn,
            _ => self
                .special("<|end|>")
                .expect("topcoat's tokenizers have <|end|>"),
        }
    }

    /// `gpt2`, `bpe` or `hf`.
    pub fn kind_name(&self) -> &'static str {
        match self.kind() {
            TokenizerKind::Gpt2 => "gpt2",
            TokenizerKind::Bpe => "bpe",
            TokenizerKind::Hf => "hf",
        }
    }

    /// Id of `SPECIAL_TOKENS[0]` (GPT-2: 50256, then 50257..; BPE: after its merges).
    fn first_special(&self) -> Option<u32> {
        match &self.inner {
            Inner::Gpt2(_) => Some(GPT2_EOT),
            Inner::Bpe(bpe) => Some(bpe.num_tokens() as u32),
            Inner::Hf(_) => None,
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
            Inner::Hf(_) => TokenizerKind::Hf,
        }
    }

    /// Number of ids, specials included (a Hugging Face tokenizer's added tokens too).
    pub fn vocab_size(&self) -> usize {
        match (&self.inner, self.first_special()) {
            (Inner::Hf(h), _) => h.vocab_size,
            (_, Some(first)) => first as usize + SPECIAL_TOKENS.len(),
            (_, None) => unreachable!("only hf tokenizers lack topcoat's specials"),
        }
    }

    /// The end-of-text id: `<|endoftext|>`, or a Hugging Face tokenizer's `eos_token`.
    pub fn eot(&self) -> u32 {
        match &self.inner {
            Inner::Hf(h) => h.eos_id,
            _ => self
                .first_special()
                .expect("topcoat's tokenizers have specials"),
        }
    }

    /// Id of a special token by its string, e.g. `special("<|user|>")`; always `None` for a
    /// Hugging Face tokenizer (see [`Tokenizer::end_of_turn`] and the chat renderer).
    pub fn special(&self, name: &str) -> Option<u32> {
        let first = self.first_special()?;
        SPECIAL_TOKENS
            .iter()
            .position(|&s| s == name)
            .map(|i| first + i as u32)
    }

    /// `(name, id)` for every one of topcoat's special tokens (none for Hugging Face's).
    pub fn special_tokens(&self) -> Vec<(&'static str, u32)> {
        let Some(first) = self.first_special() else {
            return Vec::new();
        };
        SPECIAL_TOKENS
            .iter()
            .enumerate()
            .map(|(i, &s)| (s, first + i as u32))
            .collect()
    }

    /// Encodes ordinary text; special-token strings are encoded as plain text, except by a
    /// Hugging Face tokenizer, which recognises its added tokens in the text as its reference
    /// library does (and adds no bos/eos of its post-processor).
    ///
    /// # Panics
    /// Only if a Hugging Face tokenizer's model fails ([`Tokenizer::try_encode`] returns that).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.try_encode(text).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Tokenizer::encode`], with a Hugging Face tokenizer's failure (e.g. an unknown
    /// character and no `unk_token` in its vocabulary) as an error.
    pub fn try_encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(match &self.inner {
            Inner::Gpt2(core) => core.encode_ordinary(text),
            Inner::Bpe(bpe) => bpe.encode(text),
            Inner::Hf(h) => h.encode(text)?,
        })
    }

    /// Decodes ids to text: special ids become their strings, invalid UTF-8 and unknown ids
    /// become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        let first_special = match &self.inner {
            Inner::Hf(h) => return h.decode(ids),
            _ => self
                .first_special()
                .expect("topcoat's tokenizers have specials"),
        };
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
                Inner::Hf(_) => unreachable!("decoded above"),
            }
        };
        for (i, &id) in ids.iter().enumerate() {
            let special = id.checked_sub(first_special).map(|k| k as usize);
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
