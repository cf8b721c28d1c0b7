//! A prepared dataset directory as one unit: the `dataset.json` manifest (what kind of dataset it
//! is, its files and their sizes, its tokenizer file), the staging directory every `prepare`
//! writes into, and the atomic switch that replaces the old dataset with the new one; and the
//! readers' check that a directory holds the kind of dataset they need.
//!
//! Switch: a prepare of `<parent>/<name>` writes everything into the sibling
//! `<parent>/.<name>.prepare-<pid>`, then, when every file is complete and synced, renames the
//! staging directory to `<name>` (no dataset there yet) or exchanges the two directories with one
//! `renameat2(RENAME_EXCHANGE)` (Linux). Where the file system refuses the exchange (EINVAL,
//! ENOSYS) or on other systems it falls back to two renames, old -> `.<name>.prepare-<pid>.old`
//! then staging -> `<name>`: between the two, `<name>` is briefly missing (both datasets are
//! complete on disk; the next prepare removes the leftovers). The old dataset, now under a
//! staging name, is then removed. A staging sibling whose process is gone (a killed prepare) is
//! removed by the next prepare of the same directory. A directory holding anything that is not
//! part of a topcoat dataset, or a dataset of another kind, is never replaced.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{DataError, Result};
use super::prepared::write_atomic;
use super::tokenizer::Tokenizer;

/// The manifest's file name, in the dataset directory.
pub const MANIFEST: &str = "dataset.json";
/// The tokenizer's file name, in the dataset directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
const MANIFEST_FORMAT: &str = "topcoat-dataset";
const MANIFEST_VERSION: u32 = 1;

/// What a dataset directory holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    /// `train_*.bin` / `val_*.bin` token shards (`topcoat prepare`).
    Text,
    /// `sft_{train,val}.{bin,idx}` (`topcoat prepare sft`).
    Sft,
    /// `prefs_{train,val}.{bin,idx}` (`topcoat prepare prefs`).
    Prefs,
}

impl DatasetKind {
    /// In words, for errors.
    pub fn describe(self) -> &'static str {
        match self {
            DatasetKind::Text => "a text dataset (train_*.bin token shards)",
            DatasetKind::Sft => "an SFT dataset (sft_train.bin + .idx conversations)",
            DatasetKind::Prefs => "a preference-pair dataset (prefs_train.bin + .idx pairs)",
        }
    }

    /// The command that prepares this kind.
    pub fn command(self) -> &'static str {
        match self {
            DatasetKind::Text => "topcoat prepare TEXT_FILES --out DIR",
            DatasetKind::Sft => "topcoat prepare sft CONVERSATIONS.jsonl --out DIR",
            DatasetKind::Prefs => "topcoat prepare prefs PAIRS.jsonl --out DIR",
        }
    }
}

/// One file of the dataset and its size in bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    pub name: String,
    pub bytes: u64,
}

/// `dataset.json`: written last into the staging directory, so a dataset that has one is complete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub kind: DatasetKind,
    /// The tokenizer file's name (in the same directory).
    pub tokenizer: String,
    /// Every other file of the dataset, sorted by name.
    pub files: Vec<ManifestFile>,
}

impl Manifest {
    /// Reads and checks `dir/dataset.json`; `None` when there is none (a dataset prepared before
    /// manifests existed).
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(MANIFEST);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(DataError::io(&path, "read", e)),
        };
        let bad = |msg: String| DataError::Manifest {
            path: path.clone(),
            msg,
        };
        let m: Manifest = serde_json::from_slice(strip_bom(&bytes))
            .map_err(|e| bad(format!("invalid JSON: {e}")))?;
        if m.format != MANIFEST_FORMAT || m.version != MANIFEST_VERSION {
            return Err(bad(format!(
                "format {:?} version {}, expected {MANIFEST_FORMAT:?} version {MANIFEST_VERSION}",
                m.format, m.version
            )));
        }
        Ok(Some(m))
    }
}

/// `bytes` without a leading UTF-8 byte order mark.
pub fn strip_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)
}

/// The kinds of dataset in `dir`: its manifest's, else those its file names show (directories
/// prepared before manifests, where one directory could hold several); empty when neither says.
pub fn detect_kinds(dir: &Path) -> Result<Vec<DatasetKind>> {
    if let Some(m) = Manifest::read(dir)? {
        return Ok(vec![m.kind]);
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let has = |f: &dyn Fn(&str) -> bool| names.iter().any(|n| f(n));
    let mut kinds = Vec::new();
    if has(&|n| n.starts_with("train_") && n.ends_with(".bin")) {
        kinds.push(DatasetKind::Text);
    }
    if has(&|n| n == "sft_train.bin") {
        kinds.push(DatasetKind::Sft);
    }
    if has(&|n| n == "prefs_train.bin") {
        kinds.push(DatasetKind::Prefs);
    }
    Ok(kinds)
}

/// Refuses a directory that holds another kind of dataset than `expected`, naming what it holds
/// and the command that prepares the right kind. A directory of unknown content passes (the
/// reader's own error names the missing file).
pub fn expect_kind(dir: &Path, expected: DatasetKind) -> Result<()> {
    let kinds = detect_kinds(dir)?;
    match kinds.first() {
        Some(&found) if !kinds.contains(&expected) => Err(DataError::WrongDataset {
            path: dir.to_path_buf(),
            found,
            expected,
        }),
        _ => Ok(()),
    }
}

/// Whether `name` (an entry of a dataset directory) is something a topcoat prepare writes:
/// manifest, tokenizer, shards, sidecars, their temp files, or what older versions left there.
fn is_dataset_entry(name: &str, is_file: bool) -> bool {
    let shard = |p: &str| {
        name.strip_prefix(p)
            .and_then(|r| r.strip_suffix(".bin"))
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
    };
    let sidecar_split = ["sft_train", "sft_val", "prefs_train", "prefs_val"]
        .iter()
        .any(|s| name == format!("{s}.bin") || name == format!("{s}.idx"));
    // Older versions: the staging folder of the text prepare, and the embedded corpus file.
    if !is_file {
        return name.starts_with(".prepare-") && name.ends_with(".tmp");
    }
    name == MANIFEST
        || name == TOKENIZER_FILE
        || name == "embedded_corpus.jsonl"
        || shard("train_")
        || shard("val_")
        || sidecar_split
        || (name.starts_with('.') && name.ends_with(".tmp"))
}

/// A new dataset being written into a staging directory beside its destination. Dropped without
/// [`Staging::commit`], the staging directory is removed and the destination is untouched.
pub struct Staging {
    out: PathBuf,
    dir: PathBuf,
    done: bool,
}

/// `(parent, name)` of the destination, resolving a symlinked destination to its target (the
/// switch renames directories, not links).
fn split_out(out: &Path) -> Result<(PathBuf, String)> {
    let out = match fs::symlink_metadata(out) {
        Ok(m) if m.file_type().is_symlink() => {
            fs::canonicalize(out).map_err(|e| DataError::io(out, "resolve link", e))?
        }
        _ => out.to_path_buf(),
    };
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| n != "." && n != "..")
        .ok_or_else(|| {
            DataError::InvalidArgument(format!(
                "{}: the output must name a directory (e.g. data/mine), not a root or `..`",
                out.display()
            ))
        })?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name))
}

/// Whether process `pid` is alive (a staging directory of a running prepare is left alone).
fn alive(pid: u32) -> bool {
    pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists()
}

impl Staging {
    /// Checks that `out` is absent, empty or a topcoat dataset of the same `kind` (nothing else
    /// is ever replaced), removes staging leftovers of killed prepares of `out`, and creates a
    /// fresh staging directory.
    pub fn begin(out: &Path, kind: DatasetKind) -> Result<Self> {
        let (parent, name) = split_out(out)?;
        let out = parent.join(&name);
        match fs::symlink_metadata(&out) {
            Ok(m) if !m.is_dir() => {
                return Err(DataError::InvalidArgument(format!(
                    "{}: exists and is not a directory; choose another --out",
                    out.display()
                )))
            }
            Ok(_) => {
                let entries = fs::read_dir(&out).map_err(|e| DataError::io(&out, "list", e))?;
                for e in entries {
                    let e = e.map_err(|e| DataError::io(&out, "list", e))?;
                    let is_file = e.file_type().is_ok_and(|t| t.is_file());
                    let n = e.file_name().to_string_lossy().into_owned();
                    if !is_dataset_entry(&n, is_file) {
                        return Err(DataError::NotADataset {
                            path: out.clone(),
                            entry: n,
                        });
                    }
                }
                // Another kind of dataset is someone's data too (e.g. the text shards an SFT
                // tokenizer was taken from): never replaced behind the user's back.
                if let Some(found) = detect_kinds(&out)?.into_iter().find(|&k| k != kind) {
                    return Err(DataError::OtherDataset {
                        path: out,
                        found,
                        kind,
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(DataError::io(&out, "stat", e)),
        }
        fs::create_dir_all(&parent).map_err(|e| DataError::io(&parent, "create directory", e))?;
        let prefix = format!(".{name}.prepare-");
        if let Ok(entries) = fs::read_dir(&parent) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                let Some(rest) = n.strip_prefix(&prefix) else {
                    continue;
                };
                let pid = rest.strip_suffix(".old").unwrap_or(rest);
                if pid.parse::<u32>().is_ok_and(|p| !alive(p)) {
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = parent.join(format!("{prefix}{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).map_err(|e| DataError::io(&dir, "create directory", e))?;
        Ok(Self {
            out,
            dir,
            done: false,
        })
    }

    /// Where the new dataset's files go.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The final path of the staged file `name`.
    pub fn final_path(&self, name: &str) -> PathBuf {
        self.out.join(name)
    }

    /// Saves the tokenizer and the manifest into the staging directory, then switches it in
    /// (see the module header) and removes the old dataset.
    pub fn commit(mut self, kind: DatasetKind, tok: &Tokenizer) -> Result<()> {
        tok.save(self.dir.join(TOKENIZER_FILE))?;
        let mut files = Vec::new();
        for e in fs::read_dir(&self.dir).map_err(|e| DataError::io(&self.dir, "list", e))? {
            let e = e.map_err(|e| DataError::io(&self.dir, "list", e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name == TOKENIZER_FILE {
                continue;
            }
            let bytes = e
                .metadata()
                .map_err(|err| DataError::io(e.path(), "stat", err))?
                .len();
            files.push(ManifestFile { name, bytes });
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        let m = Manifest {
            format: MANIFEST_FORMAT.into(),
            version: MANIFEST_VERSION,
            kind,
            tokenizer: TOKENIZER_FILE.into(),
            files,
        };
        let json = serde_json::to_vec_pretty(&m).expect("a manifest serializes");
        write_atomic(&self.dir.join(MANIFEST), &json)?;
        sync_dir(&self.dir)?;
        self.switch()?;
        self.done = true;
        Ok(())
    }

    fn switch(&self) -> Result<()> {
        let parent = self.out.parent().unwrap_or(Path::new("."));
        if !self.out.exists() {
            fs::rename(&self.dir, &self.out).map_err(|e| DataError::io(&self.out, "rename", e))?;
        } else {
            match exchange(&self.dir, &self.out) {
                Ok(()) => {}
                Err(e) if matches!(e.raw_os_error(), Some(EINVAL) | Some(ENOSYS)) => {
                    let old = self.dir.with_file_name(format!(
                        "{}.old",
                        self.dir.file_name().unwrap().to_string_lossy()
                    ));
                    fs::rename(&self.out, &old)
                        .map_err(|e| DataError::io(&self.out, "rename", e))?;
                    fs::rename(&self.dir, &self.out)
                        .map_err(|e| DataError::io(&self.out, "rename", e))?;
                    fs::rename(&old, &self.dir).map_err(|e| DataError::io(&old, "rename", e))?;
                }
                Err(e) => return Err(DataError::io(&self.out, "exchange directories", e)),
            }
            // The old dataset is now under the staging name.
            let _ = fs::remove_dir_all(&self.dir);
        }
        sync_dir(parent)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| DataError::io(dir, "sync directory", e))
}

#[cfg(target_os = "linux")]
const EINVAL: i32 = libc::EINVAL;
#[cfg(target_os = "linux")]
const ENOSYS: i32 = libc::ENOSYS;
#[cfg(not(target_os = "linux"))]
const EINVAL: i32 = 22;
#[cfg(not(target_os = "linux"))]
const ENOSYS: i32 = 38;

/// Swaps directories `a` and `b` in one step (Linux `renameat2(RENAME_EXCHANGE)`).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let (ca, cb) = (c(a)?, c(b)?);
    // SAFETY: both pointers are NUL-terminated strings that live across the call; the syscall
    // only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from_raw_os_error(ENOSYS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_entries_are_recognised_and_others_are_not() {
        for n in [
            "dataset.json",
            "tokenizer.json",
            "train_000000.bin",
            "val_000012.bin",
            "sft_val.idx",
            "prefs_train.bin",
            ".train_000000.bin.77.tmp",
        ] {
            assert!(is_dataset_entry(n, true), "{n}");
        }
        for n in ["notes.txt", "train_.bin", "train_00x.bin", "sft_test.bin"] {
            assert!(!is_dataset_entry(n, true), "{n}");
        }
        assert!(!is_dataset_entry("train_000000.bin", false));
        assert!(is_dataset_entry(".prepare-12.tmp", false));
    }

    #[test]
    fn an_older_directory_holding_two_kinds_serves_both_and_is_not_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("mixed");
        fs::create_dir(&dir).unwrap();
        for n in ["train_000000.bin", "sft_train.bin", "sft_train.idx"] {
            fs::write(dir.join(n), b"x").unwrap();
        }
        expect_kind(&dir, DatasetKind::Text).unwrap();
        expect_kind(&dir, DatasetKind::Sft).unwrap();
        let e = expect_kind(&dir, DatasetKind::Prefs)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("holds a text dataset") && e.contains("prepare prefs"),
            "{e}"
        );
        let e = Staging::begin(&dir, DatasetKind::Sft)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not replaced: it holds a text dataset"), "{e}");
        assert_eq!(
            fs::read_dir(tmp.path()).unwrap().count(),
            1,
            "no staging left"
        );
    }

    #[test]
    fn bom_is_stripped_once() {
        assert_eq!(strip_bom(b"\xEF\xBB\xBFab"), b"ab");
        assert_eq!(strip_bom(b"ab"), b"ab");
    }
}
