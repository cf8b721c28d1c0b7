//! The run directory's safety: one process at a time ([`RunDirLock`] on `RUN/.lock`), no fresh
//! run over an old one ([`check_fresh`], [`clear_earlier_run`]), resumes only with settings the saved data position
//! can carry ([`resume_changes`]), and pruning that never removes the last known-good
//! checkpoint ([`prune_keeping`]).

use super::checkpoint;
use super::{io_err, Result, TrainError};
use crate::config::RunConfig;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};

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

/// A run config's fields as `(name, value)` text, in declaration order.
fn fields(run: &RunConfig) -> Vec<(String, String)> {
    match serde_json::to_value(run) {
        Ok(serde_json::Value::Object(map)) => map
            .into_iter()
            .map(|(k, v)| {
                let text = match v {
                    serde_json::Value::String(s) => s,
                    // The config's reals are f32: shown as written (0.003, not 0.003000000026).
                    serde_json::Value::Number(n) if n.is_f64() => {
                        (n.as_f64().unwrap_or(f64::NAN) as f32).to_string()
                    }
                    other => other.to_string(),
                };
                (k, text)
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Fields the saved data position depends on: a resume must keep them. (The world size and
/// `total_batch_tokens` may change together as long as the global batch stays the same:
/// [`world_change`]; `rank` is each process's own.)
const FIXED: [&str; 5] = ["preset", "batch_size", "seq_len", "seed", "pack"];

/// Fields a resume neither refuses nor notes: checked by [`world_change`] or per process.
const SPECIAL: [&str; 3] = ["rank", "world_size", "total_batch_tokens"];

/// Tokens per optimizer step over all ranks: `total_batch_tokens`, or with 0 one micro-batch
/// per rank.
fn global_batch(run: &RunConfig) -> usize {
    if run.total_batch_tokens == 0 {
        run.world_size * run.batch_size * run.seq_len
    } else {
        run.total_batch_tokens
    }
}

/// A change of world size or `total_batch_tokens` between the checkpoint's run (`old`) and the
/// resume (`new`): `Ok(None)` when neither changed, `Ok(Some(note))` when the global batch is
/// the same (the data position, in global units, carries over), and the reason otherwise.
fn world_change(old: &RunConfig, new: &RunConfig) -> std::result::Result<Option<String>, String> {
    if old.world_size == new.world_size && old.total_batch_tokens == new.total_batch_tokens {
        return Ok(None);
    }
    let (was, now) = (global_batch(old), global_batch(new));
    let micro = new.batch_size * new.seq_len;
    let per_step = micro * new.world_size.max(1);
    if was != now {
        let fix = if new.world_size > 0 && micro > 0 && was.is_multiple_of(per_step) {
            format!(
                "set total_batch_tokens = {was} (each rank then runs {} micro-batches per step)",
                was / per_step
            )
        } else {
            format!(
                "no total_batch_tokens keeps it at world size {} with batch_size {} and seq_len \
                 {} (it must be a multiple of {per_step}); resume at world size {}, or start a \
                 new run in another --out",
                new.world_size, new.batch_size, new.seq_len, old.world_size
            )
        };
        return Err(format!(
            "it was trained with a global batch of {was} tokens per step (world_size {}, \
             total_batch_tokens {}), and world_size {} with total_batch_tokens {} makes it {now}; \
             the data position only carries over with the same global batch: {fix}",
            old.world_size, old.total_batch_tokens, new.world_size, new.total_batch_tokens
        ));
    }
    if micro == 0 || !now.is_multiple_of(per_step) {
        return Err(format!(
            "its global batch of {now} tokens is not a multiple of world_size {} x batch_size {} \
             x seq_len {} = {per_step}; resume at world size {}, or choose a batch_size that \
             divides it",
            new.world_size, new.batch_size, new.seq_len, old.world_size
        ));
    }
    if old.world_size == new.world_size {
        // total_batch_tokens 0 <-> its explicit value: the same run.
        return Ok(Some(format!(
            "total_batch_tokens {} -> {} (the same global batch)",
            old.total_batch_tokens, new.total_batch_tokens
        )));
    }
    Ok(Some(format!(
        "resuming at world size {} (was {}): the global batch of {now} tokens is unchanged; \
         each rank runs {} micro-batches per step",
        new.world_size,
        old.world_size,
        now / per_step
    )))
}

/// Compares the run config a checkpoint (`ckpt`, after `step` steps) was trained with (`old`)
/// with the one a resume asks for (`new`). Changes of [`FIXED`] fields, a world size or
/// `total_batch_tokens` that changes the global batch ([`world_change`]), or a `max_steps`
/// below `step`, are a [`TrainError::ResumeMismatch`]; the others (schedule, optimizer,
/// cadence, the ZeRO stage, a world size that keeps the global batch) are returned as notes
/// (`field old -> new`, and the world-size sentence).
pub fn resume_changes(
    ckpt: &Path,
    step: usize,
    old: &RunConfig,
    new: &RunConfig,
) -> Result<Vec<String>> {
    let old_fields = fields(old);
    let new_fields = fields(new);
    let (mut refused, mut notes) = (Vec::new(), Vec::new());
    for ((name, was), (_, now)) in old_fields.iter().zip(&new_fields) {
        if was == now || SPECIAL.contains(&name.as_str()) {
            continue;
        }
        let change = format!("{name} {was} -> {now}");
        if FIXED.contains(&name.as_str()) {
            refused.push(change);
        } else {
            notes.push(change);
        }
    }
    let mismatch = |why: String| TrainError::ResumeMismatch {
        ckpt: ckpt.to_path_buf(),
        why,
    };
    if !refused.is_empty() {
        return Err(mismatch(format!(
            "it was trained with other data settings ({}), and its data position only carries \
             over with the same ones; resume with the original values, or start a new run \
             in another --out",
            refused.join(", ")
        )));
    }
    match world_change(old, new) {
        Ok(Some(note)) => notes.insert(0, note),
        Ok(None) => {}
        Err(why) => return Err(mismatch(why)),
    }
    if new.max_steps < step {
        return Err(mismatch(format!(
            "it is at step {step}, past the requested max_steps {}; ask for max_steps {step} \
             or more",
            new.max_steps
        )));
    }
    Ok(notes)
}

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

    #[test]
    fn resume_refuses_data_fields_and_notes_the_rest() {
        let old = RunConfig::default();
        let new = RunConfig {
            batch_size: 4,
            seed: 7,
            ..old.clone()
        };
        let err = resume_changes(Path::new("ck"), 10, &old, &new)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("batch_size 8 -> 4") && err.contains("seed 1337 -> 7"),
            "{err}"
        );
        let new = RunConfig {
            learning_rate: 1e-3,
            ..old.clone()
        };
        let notes = resume_changes(Path::new("ck"), 10, &old, &new).unwrap();
        assert_eq!(notes, vec!["learning_rate 0.003 -> 0.001".to_string()]);
        let short = RunConfig {
            max_steps: 5,
            ..old.clone()
        };
        let err = resume_changes(Path::new("ck"), 10, &old, &short)
            .unwrap_err()
            .to_string();
        assert!(err.contains("past the requested max_steps 5"), "{err}");
    }

    /// A run config at `world` ranks with `tbt` total_batch_tokens (micro-batch 2 x 16 = 32).
    fn at(world: usize, tbt: usize) -> RunConfig {
        RunConfig {
            batch_size: 2,
            seq_len: 16,
            world_size: world,
            total_batch_tokens: tbt,
            ..RunConfig::default()
        }
    }

    fn why(old: &RunConfig, new: &RunConfig) -> String {
        match resume_changes(Path::new("ck"), 4, old, new).unwrap_err() {
            TrainError::ResumeMismatch { why, .. } => why,
            e => panic!("not a mismatch: {e}"),
        }
    }

    #[test]
    fn another_world_size_with_the_same_global_batch_is_a_note() {
        let notes = resume_changes(Path::new("ck"), 4, &at(3, 192), &at(2, 192)).unwrap();
        assert_eq!(
            notes,
            vec![
                "resuming at world size 2 (was 3): the global batch of 192 tokens is unchanged; \
                 each rank runs 3 micro-batches per step"
                    .to_string()
            ]
        );
        let other_rank = RunConfig {
            rank: 2,
            zero: 1,
            ..at(3, 192)
        };
        let notes = resume_changes(Path::new("ck"), 4, &at(3, 192), &other_rank).unwrap();
        assert_eq!(
            notes,
            vec!["zero 0 -> 1".to_string()],
            "rank is never compared"
        );
        // One micro-batch per rank at world size 2 is total_batch_tokens 64 spelled out.
        let notes = resume_changes(Path::new("ck"), 4, &at(2, 0), &at(2, 64)).unwrap();
        assert_eq!(
            notes,
            vec!["total_batch_tokens 0 -> 64 (the same global batch)".to_string()]
        );
        let notes = resume_changes(Path::new("ck"), 4, &at(2, 0), &at(1, 64)).unwrap();
        assert_eq!(
            notes,
            vec![
                "resuming at world size 1 (was 2): the global batch of 64 tokens is unchanged; \
                 each rank runs 2 micro-batches per step"
                    .to_string()
            ]
        );
    }

    #[test]
    fn a_world_size_that_changes_the_global_batch_is_refused() {
        assert_eq!(
            why(&at(3, 0), &at(2, 0)),
            "it was trained with a global batch of 96 tokens per step (world_size 3, \
             total_batch_tokens 0), and world_size 2 with total_batch_tokens 0 makes it 64; the \
             data position only carries over with the same global batch: no total_batch_tokens \
             keeps it at world size 2 with batch_size 2 and seq_len 16 (it must be a multiple of \
             64); resume at world size 3, or start a new run in another --out"
        );
        assert_eq!(
            why(&at(2, 0), &at(1, 0)),
            "it was trained with a global batch of 64 tokens per step (world_size 2, \
             total_batch_tokens 0), and world_size 1 with total_batch_tokens 0 makes it 32; the \
             data position only carries over with the same global batch: set \
             total_batch_tokens = 64 (each rank then runs 2 micro-batches per step)"
        );
        assert_eq!(
            why(&at(2, 192), &at(4, 192)),
            "its global batch of 192 tokens is not a multiple of world_size 4 x batch_size 2 x \
             seq_len 16 = 128; resume at world size 2, or choose a batch_size that divides it"
        );
    }
}
