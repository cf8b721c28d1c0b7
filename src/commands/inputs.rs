//! What a user names on the command line, resolved: a checkpoint or a run directory (its newest
//! checkpoint), a prepared data directory's tokenizer, a `--tokenizer` argument (the same
//! values for every command that takes one), and the check that a model and its data share a
//! tokenizer; on `--resume`, the LoRA settings the run directory's checkpoint was trained with.

use super::CommandError;
use crate::config::{resume_lora, LoraConfig};
use crate::data::{DataError, Tokenizer};
use crate::train::{checkpoint, TrainError};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A checkpoint directory, or a run directory (its newest checkpoint).
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf, TrainError> {
    if path.join("config.json").exists() {
        return Ok(path.to_path_buf());
    }
    if !path.exists() {
        return Err(TrainError::Checkpoint {
            path: path.to_path_buf(),
            msg: "does not exist (expected a checkpoint directory or a run directory)".into(),
        });
    }
    checkpoint::latest(path)?.ok_or_else(|| TrainError::Checkpoint {
        path: path.to_path_buf(),
        msg: "neither a checkpoint (no config.json) nor a run directory with ckpt_* checkpoints"
            .into(),
    })
}

/// The tokenizer a prepared data directory was made with (its `tokenizer.json`).
pub fn data_tokenizer(dir: &Path) -> Result<Tokenizer, DataError> {
    let path = dir.join("tokenizer.json");
    if !dir.exists() {
        return Err(DataError::InvalidArgument(format!(
            "data directory {} does not exist; make it with `topcoat prepare`",
            dir.display()
        )));
    }
    if !path.exists() {
        return Err(DataError::InvalidArgument(format!(
            "{}: no tokenizer.json; prepare the directory with `topcoat prepare` first",
            dir.display()
        )));
    }
    Tokenizer::load(path)
}

/// `--tokenizer`: `gpt2` (GPT-2's BPE), `bpe` (train a byte-level BPE on the inputs: only
/// `prepare` of raw text can), or a path: a `tokenizer.json` (topcoat's, or a Hugging Face one,
/// read with the `tokenizer_config.json` beside it), a Hugging Face model directory, or a
/// checkpoint, run or prepared data directory (its tokenizer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizerArg {
    Gpt2,
    TrainBpe,
    Path(PathBuf),
}

impl FromStr for TokenizerArg {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "gpt2" => Self::Gpt2,
            "bpe" => Self::TrainBpe,
            path => Self::Path(path.into()),
        })
    }
}

impl std::fmt::Display for TokenizerArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Gpt2 => f.write_str("gpt2"),
            Self::TrainBpe => f.write_str("bpe"),
            Self::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

impl TokenizerArg {
    /// The tokenizer named, for a command that cannot train one (`bpe` is refused, naming
    /// `command`).
    pub fn load(&self, command: &str) -> Result<Tokenizer, CommandError> {
        match self {
            Self::Gpt2 => Ok(Tokenizer::gpt2()),
            Self::TrainBpe => Err(CommandError::Argument {
                arg: "--tokenizer",
                msg: format!(
                    "`bpe` trains a new tokenizer on raw text, which only `topcoat prepare` \
                     does; `{command}` needs the tokenizer of the model it is for: gpt2, a \
                     tokenizer.json, or a checkpoint, run or prepared data directory"
                ),
            }),
            Self::Path(path) => Ok(load_tokenizer_at(path)?),
        }
    }
}

/// A `tokenizer.json` (topcoat's or Hugging Face's), or the tokenizer of a Hugging Face model
/// directory, a prepared data directory, a checkpoint or a run directory.
fn load_tokenizer_at(path: &Path) -> Result<Tokenizer, TrainError> {
    if path.is_file() {
        return Ok(Tokenizer::load(path)?);
    }
    if path.join("tokenizer.json").is_file() {
        return Ok(Tokenizer::load(path.join("tokenizer.json"))?);
    }
    let dir = resolve_checkpoint(path)?;
    checkpoint::load_tokenizer(&dir)
}

/// Refuses data tokenized with a different tokenizer than the model was trained with;
/// `prepared_by` names the command that made the data (`prepare sft`, `prepare prefs`).
pub fn check_tokenizers(
    ckpt: &Path,
    model: &Tokenizer,
    data_dir: &Path,
    data: &Tokenizer,
    prepared_by: &str,
) -> Result<(), DataError> {
    if same_tokenizer(model, data) {
        return Ok(());
    }
    Err(DataError::InvalidArgument(format!(
        "tokenizer mismatch: checkpoint {} has {} but data {} was prepared with {}; re-run \
         `topcoat {prepared_by}` with --tokenizer {}",
        ckpt.display(),
        describe_tokenizer(model),
        data_dir.display(),
        describe_tokenizer(data),
        ckpt.display()
    )))
}

/// Refuses to resume the run in `out` when its newest checkpoint was trained with another
/// tokenizer than this run's (the data's for a fresh model, the `--init` checkpoint's
/// otherwise): the same ids would mean other text. Nothing to check without a checkpoint.
pub fn check_resume_tokenizer(
    out: &Path,
    tokenizer: &Tokenizer,
    data: Option<&Path>,
) -> Result<(), TrainError> {
    let Some(ckpt) = checkpoint::latest(out)? else {
        return Ok(());
    };
    let saved = checkpoint::load_tokenizer(&ckpt)?;
    if same_tokenizer(&saved, tokenizer) {
        return Ok(());
    }
    let (what, redo) = match data {
        Some(d) => (
            format!("data {} was prepared with", d.display()),
            format!(
                "resume with data prepared by `topcoat prepare ... --tokenizer {}`",
                ckpt.display()
            ),
        ),
        None => (
            "this run starts from".into(),
            "resume with the same --init".into(),
        ),
    };
    Err(TrainError::Checkpoint {
        path: ckpt,
        msg: format!(
            "cannot resume: the run was trained with {} but {what} {}; {redo}, or start a new \
             run in another --out",
            describe_tokenizer(&saved),
            describe_tokenizer(tokenizer)
        ),
    })
}

/// Whether two tokenizers are the same: the same content (fingerprint), not merely the same
/// kind and size (two BPEs of one size trained on other text map ids to other strings).
pub fn same_tokenizer(a: &Tokenizer, b: &Tokenizer) -> bool {
    a.fingerprint() == b.fingerprint()
}

/// `a bpe tokenizer with 300 ids (sha256 1a2b3c4d5e6f)`, for mismatch messages.
pub fn describe_tokenizer(t: &Tokenizer) -> String {
    let kind = format!("{:?}", t.kind()).to_lowercase();
    format!(
        "a {kind} tokenizer with {} ids (sha256 {})",
        t.vocab_size(),
        t.short_fingerprint()
    )
}

/// Checks the sampling flags of a generating command: `--temperature` finite and `>= 0`,
/// `--top-p` in `(0, 1]`, `--max-new-tokens` at least 1.
pub fn check_sampling(
    temperature: f32,
    top_p: f32,
    max_new_tokens: usize,
) -> Result<(), CommandError> {
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(CommandError::arg(
            "--temperature",
            format!("{temperature}: must be finite and >= 0 (0 is greedy)"),
        ));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(CommandError::arg(
            "--top-p",
            format!("{top_p}: must be in (0, 1] (1 keeps every token)"),
        ));
    }
    if max_new_tokens == 0 {
        return Err(CommandError::arg("--max-new-tokens", "must be at least 1"));
    }
    Ok(())
}

/// The adapters a `--resume` trains: the newest checkpoint's in `out` when the run asks for
/// none, else those asked, refused where any setting differs from the checkpoint's
/// ([`resume_lora`]).
pub fn resumed_lora(
    out: &Path,
    wanted: Option<LoraConfig>,
) -> Result<Option<LoraConfig>, CommandError> {
    let Some(latest) = checkpoint::latest(out)? else {
        return Ok(wanted);
    };
    let saved = checkpoint::load_config(&latest)?.lora;
    resume_lora(saved.as_ref(), wanted).map_err(|diffs| {
        TrainError::Checkpoint {
            path: latest,
            msg: format!(
                "cannot resume with other LoRA settings: {}; resume without the --lora-* flags \
                 (the checkpoint's are kept) or start a new run in another --out",
                diffs.join("; ")
            ),
        }
        .into()
    })
}
