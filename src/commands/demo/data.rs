//! The demo's data: the small set committed in `data/demo/` (built by
//! `scripts/make_demo_data.py`, see its README) compiled into the binary, or a directory holding
//! the same files (`topcoat demo --data DIR`, e.g. a larger build for a GPU); and the readers of
//! its evaluation files.
//!
//! Pretraining validation: `corpus.jsonl` holds every document the base model learns from, so
//! the validation split must not take any of them away (a held-out lemma's definition has to
//! stay in training). The validation documents are instead every `VAL_EVERY`-th document whose
//! `source` is not a WordNet lemma (FAQ pages and lists of questions), moved out of the
//! training input before `prepare`.

use super::measure::Question;
use crate::data::DataError;
use crate::train::io_err;
use crate::train::TrainError;
use std::path::{Path, PathBuf};

/// One validation document per this many non-lemma documents.
pub const VAL_EVERY: usize = 10;

/// The files of a demo data set, in `data/demo/`.
pub const FILES: [&str; 8] = [
    "corpus.jsonl",
    "sft.jsonl",
    "prefs.jsonl",
    "eval_questions.jsonl",
    "eval_prefs.jsonl",
    "eval_probe.jsonl",
    "rl_prompts.jsonl",
    "splits.json",
];

/// The committed data set, in [`FILES`] order.
const EMBEDDED: [&[u8]; 8] = [
    include_bytes!("../../../data/demo/corpus.jsonl"),
    include_bytes!("../../../data/demo/sft.jsonl"),
    include_bytes!("../../../data/demo/prefs.jsonl"),
    include_bytes!("../../../data/demo/eval_questions.jsonl"),
    include_bytes!("../../../data/demo/eval_prefs.jsonl"),
    include_bytes!("../../../data/demo/eval_probe.jsonl"),
    include_bytes!("../../../data/demo/rl_prompts.jsonl"),
    include_bytes!("../../../data/demo/splits.json"),
];

/// Where the demo's source files are: `dir/NAME` for each of [`FILES`].
#[derive(Clone, Debug)]
pub struct Sources {
    pub dir: PathBuf,
}

impl Sources {
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Writes the embedded data set to `dir` (rewriting a file only when its bytes differ).
pub fn write_embedded(dir: &Path) -> Result<Sources, TrainError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    for (name, bytes) in FILES.iter().zip(EMBEDDED) {
        let path = dir.join(name);
        if std::fs::read(&path).ok().as_deref() != Some(bytes) {
            std::fs::write(&path, bytes).map_err(io_err(&path))?;
        }
    }
    Ok(Sources {
        dir: dir.to_path_buf(),
    })
}

/// Checks that `dir` holds every file of a demo data set.
pub fn open_dir(dir: &Path) -> Result<Sources, DataError> {
    let missing: Vec<&str> = FILES
        .iter()
        .copied()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    if !missing.is_empty() {
        return Err(DataError::InvalidArgument(format!(
            "{}: not a demo data directory: missing {} (build one with scripts/make_demo_data.py)",
            dir.display(),
            missing.join(", ")
        )));
    }
    Ok(Sources {
        dir: dir.to_path_buf(),
    })
}

fn jsonl_lines(path: &Path) -> Result<Vec<(usize, serde_json::Value)>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, "read", e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v = serde_json::from_str(line).map_err(|e| DataError::Jsonl {
            path: path.to_path_buf(),
            line: i + 1,
            msg: format!("invalid JSON: {e}"),
        })?;
        out.push((i + 1, v));
    }
    Ok(out)
}

fn string_field(
    path: &Path,
    line: usize,
    v: &serde_json::Value,
    key: &str,
) -> Result<String, DataError> {
    v.get(key)
        .and_then(|x| x.as_str())
        .map(str::to_string)
        .ok_or_else(|| DataError::Jsonl {
            path: path.to_path_buf(),
            line,
            msg: format!("missing string field \"{key}\""),
        })
}

/// Reads `eval_questions.jsonl`: `{"prompt", "reference", "lemma", "group"}` per line.
pub fn read_questions(path: &Path) -> Result<Vec<Question>, DataError> {
    let mut out = Vec::new();
    for (line, v) in jsonl_lines(path)? {
        let f = |k| string_field(path, line, &v, k);
        out.push(Question {
            prompt: f("prompt")?,
            reference: f("reference")?,
            lemma: f("lemma")?,
            group: f("group")?,
        });
    }
    if out.is_empty() {
        return Err(DataError::InvalidArgument(format!(
            "{}: no questions",
            path.display()
        )));
    }
    Ok(out)
}

/// One string field of every pair of a preference file, in file order: `kind` (`hard`,
/// `question`, `random`) or `group` (`heldout`, `control`).
pub fn read_pair_field(path: &Path, key: &str) -> Result<Vec<String>, DataError> {
    jsonl_lines(path)?
        .into_iter()
        .map(|(line, v)| string_field(path, line, &v, key))
        .collect()
}

/// Splits `corpus.jsonl` into the training input (every lemma document and most others) and
/// the validation documents (see the module header), written as two JSONL files.
pub fn split_corpus(corpus: &Path, train: &Path, val: &Path) -> Result<(usize, usize), DataError> {
    let text = std::fs::read_to_string(corpus).map_err(|e| DataError::io(corpus, "read", e))?;
    let (mut tr, mut va) = (String::new(), String::new());
    let mut others = 0usize;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| DataError::Jsonl {
            path: corpus.to_path_buf(),
            line: i + 1,
            msg: format!("invalid JSON: {e}"),
        })?;
        let source = v.get("source").and_then(|s| s.as_str()).unwrap_or("");
        let to_val = !source.starts_with("wordnet") && {
            others += 1;
            others.is_multiple_of(VAL_EVERY)
        };
        let dst = if to_val { &mut va } else { &mut tr };
        dst.push_str(line);
        dst.push('\n');
    }
    let (ntr, nva) = (tr.lines().count(), va.lines().count());
    if ntr == 0 || nva == 0 {
        return Err(DataError::InvalidArgument(format!(
            "{}: {ntr} training and {nva} validation documents; need both (a validation \
             document is every {VAL_EVERY}th one whose source is not a WordNet lemma)",
            corpus.display()
        )));
    }
    std::fs::write(train, tr).map_err(|e| DataError::io(train, "write", e))?;
    std::fs::write(val, va).map_err(|e| DataError::io(val, "write", e))?;
    Ok((ntr, nva))
}
