//! What `prepare sft` (sft.rs) and `prepare prefs` (prefs.rs) share: the check of their options,
//! the seeded train/val split, and the `.idx` sidecar written beside each shard and read back
//! (format in docs/FORMATS.md).
//!
//! Sidecar layout: a 24-byte header of little-endian magic (i32), version (i32), item count
//! (u64) and token count (u64); then the `seqs + 1` sequence offsets (u64, from 0 to the token
//! count); then `fields_per_seq` u64 values per sequence (none for SFT, the response start for
//! pairs); then one mask byte per token. An SFT item is one sequence, a pair two.

use std::io::Write;
use std::path::Path;

use super::error::{DataError, Result};
use super::shard::{temp_sibling, Shard};
use crate::rng::Rng;

/// Bytes before the offsets: magic, version, item count (u64), token count (u64).
pub(crate) const IDX_HEADER: usize = 24;

/// Refuses a `max_len` below 2 (`unit` names what must hold two tokens, e.g. "an example") and
/// a `val_fraction` outside `[0, 1)`.
pub(crate) fn check_options(max_len: usize, val_fraction: f64, unit: &str) -> Result<()> {
    if max_len < 2 {
        return Err(DataError::InvalidArgument(format!(
            "max_len {max_len} is too small: {unit} needs at least 2 tokens"
        )));
    }
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(DataError::InvalidArgument(format!(
            "val_fraction {val_fraction} is not in [0, 1)"
        )));
    }
    Ok(())
}

/// Which of `n` items go to validation: a seeded shuffle picks `round(n * val_fraction)` of them
/// (at least one when the fraction is positive and `n >= 2`, never all).
pub(crate) fn pick_val(n: usize, val_fraction: f64, seed: u64) -> Vec<bool> {
    let mut n_val = (n as f64 * val_fraction).round() as usize;
    if val_fraction > 0.0 && n >= 2 {
        n_val = n_val.max(1);
    }
    n_val = n_val.min(n.saturating_sub(1));
    let mut order: Vec<usize> = (0..n).collect();
    Rng::new(seed).shuffle(&mut order);
    let mut is_val = vec![false; n];
    for &i in &order[..n_val] {
        is_val[i] = true;
    }
    is_val
}

/// Splits `items` into (train, val) per [`pick_val`]; both keep the items' order.
pub(crate) fn split_train_val<T>(items: Vec<T>, val_fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let is_val = pick_val(items.len(), val_fraction, seed);
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (item, v) in items.into_iter().zip(is_val) {
        if v { &mut val } else { &mut train }.push(item);
    }
    (train, val)
}

/// Writes `bytes` to a temp file next to `path`, syncs it and renames it into place.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_sibling(path);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    write().map_err(|e| DataError::io(&tmp, "write", e))?;
    std::fs::rename(&tmp, path).map_err(|e| DataError::io(path, "rename", e))
}

/// What tells one sidecar format from the other.
pub(crate) struct SidecarFormat {
    pub magic: i32,
    pub version: i32,
    /// Sequences per counted item: 1 (an SFT example) or 2 (the sides of a pair).
    pub seqs_per_item: usize,
    /// u64 values per sequence after the offsets.
    pub fields_per_seq: usize,
    /// The fewest items a valid sidecar holds.
    pub min_items: usize,
    /// Names the items in errors ("examples", "pairs").
    pub items: &'static str,
    /// Names a sequence in errors ("example", "sequence").
    pub seq: &'static str,
    /// Said after a wrong magic or version: what the file should have been.
    pub hint: &'static str,
}

/// One sequence to write: its token count, its per-sequence fields and its mask.
pub(crate) struct SidecarSeq<'a> {
    pub len: usize,
    pub fields: &'a [u64],
    pub mask: &'a [bool],
}

/// Writes the sidecar of `items` items made of `seqs` (layout in the module header).
pub(crate) fn write_sidecar(
    path: &Path,
    fmt: &SidecarFormat,
    items: usize,
    seqs: &[SidecarSeq],
) -> Result<()> {
    let tokens: usize = seqs.iter().map(|s| s.len).sum();
    let mut bytes =
        Vec::with_capacity(IDX_HEADER + 8 * (1 + fmt.fields_per_seq) * seqs.len() + 8 + tokens);
    bytes.extend(fmt.magic.to_le_bytes());
    bytes.extend(fmt.version.to_le_bytes());
    bytes.extend((items as u64).to_le_bytes());
    bytes.extend((tokens as u64).to_le_bytes());
    let mut off = 0u64;
    bytes.extend(off.to_le_bytes());
    for s in seqs {
        off += s.len as u64;
        bytes.extend(off.to_le_bytes());
    }
    for s in seqs {
        bytes.extend(s.fields.iter().flat_map(|f| f.to_le_bytes()));
    }
    for s in seqs {
        bytes.extend(s.mask.iter().map(|&m| m as u8));
    }
    write_atomic(path, &bytes)
}

/// A prepared split read back: its tokens and what its sidecar says about them.
pub(crate) struct Sidecar {
    pub tokens: Vec<u32>,
    /// Sequence `s` is `tokens[offsets[s]..offsets[s + 1]]`.
    pub offsets: Vec<usize>,
    /// `fields_per_seq` values per sequence, sequence after sequence.
    pub fields: Vec<usize>,
    /// Per token.
    pub mask: Vec<bool>,
}

/// Reads `{dir}/{name}.bin` and `{dir}/{name}.idx`, checking that they agree, that the sidecar
/// is of format `fmt`, and that every id is below `vocab_size`.
pub(crate) fn read_sidecar(
    dir: &Path,
    name: &str,
    vocab_size: usize,
    fmt: &SidecarFormat,
) -> Result<Sidecar> {
    let shard = Shard::open(dir.join(format!("{name}.bin")))?;
    shard.validate_vocab(vocab_size)?;
    let path = dir.join(format!("{name}.idx"));
    let bytes = std::fs::read(&path).map_err(|e| DataError::io(&path, "read", e))?;
    let bad = |msg: String| DataError::Sidecar {
        path: path.clone(),
        msg,
    };
    if bytes.len() < IDX_HEADER {
        return Err(bad(format!(
            "{} bytes, shorter than the {IDX_HEADER}-byte header",
            bytes.len()
        )));
    }
    let i32_at = |o: usize| i32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
    if i32_at(0) != fmt.magic || i32_at(4) != fmt.version {
        return Err(bad(format!(
            "magic {} version {}, expected magic {} version {}{}",
            i32_at(0),
            i32_at(4),
            fmt.magic,
            fmt.version,
            fmt.hint
        )));
    }
    let (n, len) = (u64_at(8), u64_at(16));
    if len != shard.len() as u64 {
        return Err(bad(format!(
            "counts {len} tokens but its shard holds {}",
            shard.len()
        )));
    }
    // Sizes from the file are checked in u128 (no product of two u64 overflows it), so a huge
    // count is a size error, never a wrapped size or a huge allocation.
    let seqs = fmt.seqs_per_item as u128 * n as u128;
    let fields_at = IDX_HEADER as u128 + 8 * (seqs + 1);
    let mask_at = fields_at + 8 * fmt.fields_per_seq as u128 * seqs;
    let want = mask_at + len as u128;
    if bytes.len() as u128 != want {
        return Err(bad(format!(
            "{} bytes, expected {want} for {n} {} and {len} tokens",
            bytes.len(),
            fmt.items
        )));
    }
    // The file's size bounds every count from here on, so they fit usize.
    let (n, len, seqs) = (n as usize, len as usize, seqs as usize);
    let (fields_at, mask_at) = (fields_at as usize, mask_at as usize);
    if n < fmt.min_items {
        return Err(bad(format!(
            "{n} {}, expected at least {}",
            fmt.items, fmt.min_items
        )));
    }
    let offsets: Vec<usize> = (0..=seqs)
        .map(|i| u64_at(IDX_HEADER + 8 * i) as usize)
        .collect();
    if offsets[0] != 0 || offsets[seqs] != len || offsets.windows(2).any(|w| w[0] >= w[1]) {
        return Err(bad(format!(
            "{} offsets are not increasing from 0 to the token count",
            fmt.seq
        )));
    }
    let fields = (0..fmt.fields_per_seq * seqs)
        .map(|i| u64_at(fields_at + 8 * i) as usize)
        .collect();
    let mask = bytes[mask_at..].iter().map(|&b| b != 0).collect();
    Ok(Sidecar {
        tokens: shard.to_vec(),
        offsets,
        fields,
        mask,
    })
}
