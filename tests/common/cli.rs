//! Running the `topcoat` binary from a test: its output, success or a clean failure, and a
//! snapshot of a directory to prove that a refused command changed nothing.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `topcoat args...` to completion.
pub fn topcoat<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_topcoat"))
        .args(args)
        .output()
        .expect("running topcoat")
}

/// Standard output then standard error.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `topcoat args...`, which must succeed; returns its output.
pub fn ok<S: AsRef<OsStr> + Debug>(args: &[S]) -> String {
    let o = topcoat(args);
    assert!(o.status.success(), "topcoat {args:?} failed:\n{}", text(&o));
    text(&o)
}

/// Runs `topcoat args...`, which must fail cleanly (no panic, no backtrace); returns its output.
pub fn fails<S: AsRef<OsStr> + Debug>(args: &[S]) -> String {
    let o = topcoat(args);
    let t = text(&o);
    assert!(!o.status.success(), "topcoat {args:?} should fail:\n{t}");
    assert!(!t.contains("panicked"), "topcoat {args:?} panicked:\n{t}");
    assert!(!t.contains("RUST_BACKTRACE"), "topcoat {args:?}:\n{t}");
    t
}

/// A path as a command-line argument.
pub fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Every entry under `dir` by relative path: a file's bytes, or `None` for a directory.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Option<Vec<u8>>>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if p.is_dir() {
                out.insert(rel, None);
                walk(root, &p, out);
            } else {
                out.insert(rel, Some(std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// `DIR/data`: a one-document corpus prepared with a 280-token BPE trained on it.
pub fn prepare_small_corpus(dir: &Path) {
    let docs = dir.join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(docs.join("a.txt"), "A cat is a small animal. ".repeat(40)).unwrap();
    ok(&[
        "prepare",
        &s(&docs),
        "--out",
        &s(&dir.join("data")),
        "--tokenizer",
        "bpe",
        "--vocab-size",
        "280",
    ]);
}

/// Asserts that `dir` holds what `before` (its [`snapshot`]) recorded, naming what changed.
pub fn assert_unchanged(dir: &Path, before: &BTreeMap<PathBuf, Option<Vec<u8>>>) {
    let after = snapshot(dir);
    let names = |m: &BTreeMap<PathBuf, Option<Vec<u8>>>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(
        names(&after),
        names(before),
        "{}: listing changed",
        dir.display()
    );
    for (k, v) in before {
        assert!(after[k] == *v, "{}: {} changed", dir.display(), k.display());
    }
}

/// Copies directory `from` to `to`, recursively.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}
