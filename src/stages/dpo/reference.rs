//! The frozen reference's log-probabilities: computed once in a pass over every pair, stored in
//! the run directory as `ref_logps.bin` (docs/FORMATS.md) and reused on `--resume`, so the
//! reference model never shares memory with the policy.
//!
//! File: a 48-byte header (magic, version, `T`, the train and val pair counts, and a fingerprint
//! of the token rows the values were computed on: FNV-1a 64 over `T` and every pair's ids and
//! response masks), then per pair of the train split, in file order, `logp(chosen)` and
//! `logp(rejected)` as f64, then the same for the val split. Pairs that do not fit in `T`
//! tokens are never drawn and hold NaN; so do pairs the run's stream never takes (the pass
//! computes only the pairs the rank's share of the run draws, and its validation pairs: with
//! several ranks, rank 0 writes its own, and the others compute theirs again on a resume). f64 keeps the values bit-identical to the sums the
//! policy computes on the fly, so a policy equal to the reference has a DPO loss of exactly ln 2.

use crate::backend::Backend;
use crate::data::{fill_pair_batch, PairSplit};
use crate::model::Gpt;
use crate::train::{io_err, Result, TrainError};
use std::path::{Path, PathBuf};

pub const REF_MAGIC: i32 = 20241001;
pub const REF_VERSION: i32 = 1;
pub const REF_HEADER: usize = 48;
/// The file's name in the run directory.
pub const REF_FILE: &str = "ref_logps.bin";

/// `[chosen, rejected]` reference log-probabilities of each pair of a split, in file order.
pub type PairLogps = Vec<[f64; 2]>;

/// The reference log-probabilities of both splits and what they were computed on.
#[derive(Clone, Debug, PartialEq)]
pub struct RefLogps {
    pub t: usize,
    pub fingerprint: u64,
    pub train: PairLogps,
    pub val: PairLogps,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(FNV_PRIME);
    }
    h
}

/// FNV-1a 64 over `t` and, split by split, every pair's ids and response masks (with lengths).
pub fn fingerprint(t: usize, splits: &[Option<&PairSplit>]) -> u64 {
    let mut h = fnv(FNV_OFFSET, &(t as u64).to_le_bytes());
    for split in splits {
        let Some(split) = split else {
            h = fnv(h, &u64::MAX.to_le_bytes());
            continue;
        };
        h = fnv(h, &(split.len() as u64).to_le_bytes());
        for i in 0..split.len() {
            for s in [split.chosen(i), split.rejected(i)] {
                h = fnv(h, &(s.ids.len() as u64).to_le_bytes());
                for (&id, &m) in s.ids.iter().zip(s.mask) {
                    h = fnv(h, &id.to_le_bytes());
                    h = fnv(h, &[m as u8]);
                }
            }
        }
    }
    h
}

/// Log-probabilities of both sides of every pair of `split` that fits in `t` tokens (NaN for
/// the others), in batches of `capacity` pairs: the batch shape training uses.
pub fn split_logps<B: Backend>(
    be: &B,
    model: &mut Gpt<B>,
    split: &PairSplit,
    capacity: usize,
    t: usize,
    pad: u32,
) -> Result<PairLogps> {
    let mut out = vec![[f64::NAN; 2]; split.len()];
    let fitting: Vec<usize> = (0..split.len()).filter(|&i| split.fits(i, t)).collect();
    pairs_logps(be, model, split, &fitting, capacity, t, pad, &mut out)?;
    Ok(out)
}

/// Log-probabilities of both sides of `pairs` (each fitting in `t` tokens), in that order in
/// batches of `capacity` pairs, written into `out` (indexed by pair): a rank's share of the
/// reference pass.
#[allow(clippy::too_many_arguments)]
pub fn pairs_logps<B: Backend>(
    be: &B,
    model: &mut Gpt<B>,
    split: &PairSplit,
    pairs: &[usize],
    capacity: usize,
    t: usize,
    pad: u32,
    out: &mut PairLogps,
) -> Result<()> {
    for chunk in pairs.chunks(capacity) {
        let batch = fill_pair_batch(split, chunk, capacity, t, pad);
        let logps = model.sequence_logps(be, &batch.inputs, &batch.targets, 2 * capacity, t)?;
        for (k, &p) in chunk.iter().enumerate() {
            out[p] = [logps[2 * k], logps[2 * k + 1]];
        }
    }
    Ok(())
}

fn bad(path: &Path, msg: String) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        msg,
    }
}

impl RefLogps {
    pub fn path(run_dir: &Path) -> PathBuf {
        run_dir.join(REF_FILE)
    }

    /// Writes `dir/ref_logps.bin` atomically (a temporary name, then a rename).
    pub fn save(&self, run_dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(run_dir).map_err(io_err(run_dir))?;
        let path = Self::path(run_dir);
        let mut bytes = Vec::with_capacity(REF_HEADER + 16 * (self.train.len() + self.val.len()));
        bytes.extend_from_slice(&REF_MAGIC.to_le_bytes());
        bytes.extend_from_slice(&REF_VERSION.to_le_bytes());
        for x in [
            self.t as u64,
            self.train.len() as u64,
            self.val.len() as u64,
            self.fingerprint,
            0,
        ] {
            bytes.extend_from_slice(&x.to_le_bytes());
        }
        for pair in self.train.iter().chain(&self.val) {
            for x in pair {
                bytes.extend_from_slice(&x.to_le_bytes());
            }
        }
        let tmp = run_dir.join(format!(".{REF_FILE}.tmp"));
        std::fs::write(&tmp, &bytes).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        Ok(path)
    }

    /// Reads `dir/ref_logps.bin`, checking the magic, version and size; `Ok(None)` when absent.
    pub fn load(run_dir: &Path) -> Result<Option<Self>> {
        let path = Self::path(run_dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        if bytes.len() < REF_HEADER {
            return Err(bad(
                &path,
                format!(
                    "{} bytes, shorter than the {REF_HEADER}-byte header",
                    bytes.len()
                ),
            ));
        }
        let i32_at = |o: usize| i32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
        if i32_at(0) != REF_MAGIC || i32_at(4) != REF_VERSION {
            return Err(bad(
                &path,
                format!(
                    "magic {} version {}, expected magic {REF_MAGIC} version {REF_VERSION} \
                     (DPO reference log-probabilities)",
                    i32_at(0),
                    i32_at(4)
                ),
            ));
        }
        let (t, n_train, n_val) = (u64_at(8), u64_at(16), u64_at(24));
        let want = (n_train as u128 + n_val as u128) * 16 + REF_HEADER as u128;
        if bytes.len() as u128 != want {
            return Err(bad(
                &path,
                format!(
                    "{} bytes for {n_train} train and {n_val} val pairs, expected {want}",
                    bytes.len()
                ),
            ));
        }
        let f64_at = |o: usize| f64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
        let pairs = |first: usize, n: usize| -> PairLogps {
            (0..n)
                .map(|i| {
                    let o = REF_HEADER + 16 * (first + i);
                    [f64_at(o), f64_at(o + 8)]
                })
                .collect()
        };
        Ok(Some(Self {
            t: t as usize,
            fingerprint: u64_at(32),
            train: pairs(0, n_train as usize),
            val: pairs(n_train as usize, n_val as usize),
        }))
    }

    /// Why these values cannot serve a run over `train`/`val` at `t`, or `None` when they can.
    pub fn mismatch(
        &self,
        t: usize,
        fingerprint: u64,
        n_train: usize,
        n_val: usize,
    ) -> Option<String> {
        if self.t != t {
            return Some(format!("computed at T = {}, the run uses T = {t}", self.t));
        }
        if (self.train.len(), self.val.len()) != (n_train, n_val) {
            return Some(format!(
                "holds {} train and {} val pairs, the data has {n_train} and {n_val}",
                self.train.len(),
                self.val.len()
            ));
        }
        if self.fingerprint != fingerprint {
            return Some("computed on different pair tokens (the data was re-prepared)".into());
        }
        None
    }
}
