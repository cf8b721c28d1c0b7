//! The run directory's safety: one process at a time ([`RunDirLock`] on `RUN/.lock`), no fresh
//! run over an old one ([`check_fresh`], [`clear_earlier_run`]), resumes only with settings the saved data position
//! can carry ([`resume_changes`]), and pruning that never removes the last known-good
//! checkpoint ([`prune_keeping`]).

use super::checkpoint;
use super::{io_err, Result, TrainError};
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};

mod resume;

/// The lock file's name inside a run directory.
pub const LOCK_FILE: &str = ".lock";
/// The suffix a checkpoint written after the last known-good one gets when the run diverges.
pub const DIVERGED_SUFFIX: &str = ".diverged";

/// An exclusive lock on a run directory, held until the last handle is dropped. The OS
/// releases it when the process ends however it ends, so a `.lock` left by a killed process
/// never blocks.
///
/// The same thread may take it again while it holds it (the command line locks before it
/// prepares the embedded corpus in the run directory, then the stage runner locks for the
/// run): it gets another handle on the one lock. Another thread or process is refused.
#[derive(Debug)]
pub struct RunDirLock {
    held: Rc<Held>,
}

#[derive(Debug)]
struct Held {
    dir: PathBuf,
    file: File,
}

thread_local! {
    /// The run directories this thread holds, by canonical path.
    static HELD: RefCell<HashMap<PathBuf, Weak<Held>>> = RefCell::new(HashMap::new());
}

impl RunDirLock {
    /// Creates `dir` if needed and locks `dir/.lock`, writing this process's pid and command
    /// into it; a directory locked by another process (or thread) is a
    /// [`TrainError::RunDirInUse`].
    pub fn acquire(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let key = std::fs::canonicalize(dir).map_err(io_err(dir))?;
        let mine = HELD.with(|h| h.borrow().get(&key).and_then(Weak::upgrade));
        if let Some(held) = mine {
            return Ok(Self { held });
        }
        let held = Rc::new(Self::lock(dir)?);
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            h.retain(|_, w| w.strong_count() > 0);
            h.insert(key, Rc::downgrade(&held));
        });
        Ok(Self { held })
    }

    /// The lock itself: `dir/.lock`, locked and signed.
    fn lock(dir: &Path) -> Result<Held> {
        let path = dir.join(LOCK_FILE);
        // Never truncated on open: the holder's pid and command are the second process's message.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(TrainError::RunDirInUse {
                    dir: dir.to_path_buf(),
                    holder: match holder.split_once(' ') {
                        Some((pid, cmd)) => format!("pid {pid}, {cmd}"),
                        None if !holder.is_empty() => format!("pid {holder}"),
                        None => "pid unknown".into(),
                    },
                });
            }
            Err(TryLockError::Error(e)) => return Err(io_err(&path)(e)),
        }
        let command = std::env::args().collect::<Vec<_>>().join(" ");
        file.set_len(0).map_err(io_err(&path))?;
        file.rewind().map_err(io_err(&path))?;
        writeln!(file, "{} {command}", std::process::id()).map_err(io_err(&path))?;
        Ok(Held {
            dir: dir.to_path_buf(),
            file,
        })
    }

    /// The locked run directory (as the first handle named it).
    pub fn dir(&self) -> &Path {
        &self.held.dir
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // Emptied so that a finished run leaves the same bytes behind every time; the file
        // itself stays (removing it would let two processes lock two different files).
        let _ = self.file.set_len(0);
    }
}

/// Whether `name` (an entry of a run directory) is something a training run writes there:
/// checkpoints (finished, temporary, set aside), metrics and the DPO reference cache.
fn is_run_file(name: &str) -> bool {
    name.starts_with("ckpt_")
        || (name.starts_with(".ckpt_")
            && [".tmp", ".old", ".removed"]
                .iter()
                .any(|end| name.ends_with(end)))
        || name.starts_with("metrics.jsonl")
        || name == "ref_logps.bin"
}

/// The entries of `dir` a run wrote, sorted (empty when `dir` does not exist).
pub fn run_files(dir: &Path) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir)(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let name = entry.map_err(io_err(dir))?.file_name();
        let name = name.to_string_lossy();
        if is_run_file(&name) {
            names.push(name.into_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Before a run opens its data in the locked directory: a fresh run (not `resume`) refuses a
/// directory holding an earlier run unless `overwrite`. Returns the earlier run's files, for
/// [`clear_earlier_run`] once the new run's inputs have opened (so that a bad input does not
/// cost the old run).
pub fn check_fresh(lock: &RunDirLock, resume: bool, overwrite: bool) -> Result<Vec<String>> {
    if resume {
        return Ok(Vec::new());
    }
    let dir = lock.dir();
    let files = run_files(dir)?;
    if !files.is_empty() && !overwrite {
        return Err(TrainError::RunDirNotEmpty {
            dir: dir.to_path_buf(),
            files: files.join(", "),
        });
    }
    Ok(files)
}

/// Deletes `files` of the earlier run (from [`check_fresh`]) but `ref_logps.bin`, which a
/// fresh DPO run has just written anew while opening.
pub fn clear_earlier_run(lock: &RunDirLock, files: &[String]) -> Result<()> {
    let dir = lock.dir();
    for name in files.iter().filter(|n| *n != "ref_logps.bin") {
        let path = dir.join(name);
        if name.starts_with("ckpt_") {
            checkpoint::remove(&path)?;
        } else if path.is_dir() {
            std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
        } else {
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}

pub use resume::resume_changes;

/// The set-aside name of checkpoint `dir` (`ckpt_000012.diverged`).
pub fn diverged_name(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(DIVERGED_SUFFIX);
    dir.with_file_name(name)
}

/// Moves checkpoint `dir` aside as [`diverged_name`], replacing an earlier one of that name.
pub fn set_aside(dir: &Path) -> Result<PathBuf> {
    let to = diverged_name(dir);
    if to.exists() {
        std::fs::remove_dir_all(&to).map_err(io_err(&to))?;
    }
    std::fs::rename(dir, &to).map_err(io_err(dir))?;
    Ok(to)
}

/// Removes all but the newest `keep` checkpoints of `run_dir` (0 keeps all), and never
/// `protect` (the last known-good checkpoint); first it finishes any removal a killed process
/// left half done.
pub fn prune_keeping(run_dir: &Path, keep: usize, protect: Option<&Path>) -> Result<()> {
    checkpoint::remove_stale(run_dir)?;
    if keep == 0 {
        return Ok(());
    }
    let all = checkpoint::list(run_dir)?;
    for (_, path) in all.iter().take(all.len().saturating_sub(keep)) {
        if Some(path.as_path()) != protect {
            checkpoint::remove(path)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty checkpoint directory that listing counts (it has a manifest file).
    fn fake_checkpoint(dir: &Path, step: usize) -> PathBuf {
        let ck = checkpoint::dir_for(dir, step);
        std::fs::create_dir_all(&ck).unwrap();
        std::fs::write(ck.join(crate::train::manifest::FILE), "{}").unwrap();
        ck
    }

    #[test]
    fn another_thread_is_refused_the_same_thread_shares_and_drop_frees() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let first = RunDirLock::acquire(&dir).unwrap();
        let again = RunDirLock::acquire(&dir.join(".")).unwrap();
        let other = |dir: PathBuf| std::thread::spawn(move || RunDirLock::acquire(&dir).map(drop));
        let err = other(dir.clone()).join().unwrap().unwrap_err().to_string();
        assert!(
            err.contains("in use by another topcoat process")
                && err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        assert!(other(dir.clone()).join().unwrap().is_err(), "still held");
        drop(again);
        other(dir.clone()).join().unwrap().unwrap();
        assert_eq!(std::fs::read(dir.join(LOCK_FILE)).unwrap(), b"");
    }

    #[test]
    fn diverged_checkpoints_are_not_listed() {
        let tmp = tempfile::tempdir().unwrap();
        let ck = fake_checkpoint(tmp.path(), 3);
        fake_checkpoint(tmp.path(), 2);
        let aside = set_aside(&ck).unwrap();
        assert!(aside.ends_with("ckpt_000003.diverged"));
        let listed: Vec<usize> = checkpoint::list(tmp.path())
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(listed, vec![2]);
        assert!(is_run_file("ckpt_000003.diverged"));
    }

    #[test]
    fn a_removal_never_leaves_a_listed_half_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        for s in 1..=3 {
            fake_checkpoint(tmp.path(), s);
        }
        // What a kill in the middle of a removal leaves: renamed aside, partly deleted.
        let half = tmp.path().join(".ckpt_000001.removed");
        std::fs::rename(checkpoint::dir_for(tmp.path(), 1), &half).unwrap();
        let steps = |dir: &Path| -> Vec<usize> {
            checkpoint::list(dir)
                .unwrap()
                .into_iter()
                .map(|(s, _)| s)
                .collect()
        };
        assert_eq!(steps(tmp.path()), vec![2, 3]);
        assert!(is_run_file(".ckpt_000001.removed"));
        prune_keeping(tmp.path(), 1, None).unwrap();
        assert_eq!(steps(tmp.path()), vec![3]);
        let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert_eq!(
            left.len(),
            1,
            "the half-removed and the pruned checkpoints are gone"
        );
    }

    #[test]
    fn pruning_keeps_the_protected_checkpoint() {
        let tmp = tempfile::tempdir().unwrap();
        for s in 1..=4 {
            fake_checkpoint(tmp.path(), s);
        }
        let good = checkpoint::dir_for(tmp.path(), 1);
        prune_keeping(tmp.path(), 2, Some(&good)).unwrap();
        let left: Vec<usize> = checkpoint::list(tmp.path())
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(left, vec![1, 3, 4]);
    }
}
