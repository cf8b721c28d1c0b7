//! Token shards on disk: llm.c's u16 format and topcoat's u32 variant; the atomic writer and the
//! memory-mapped reader.
//!
//! Layout (see docs/FORMATS.md): a 1024-byte header of 256 little-endian `i32` (`[0]` magic,
//! `[1]` version, `[2]` token count, the rest zero), then `count` little-endian tokens of 2 bytes
//! (magic [`MAGIC_U16`], vocabularies up to 65,536) or 4 bytes (magic [`MAGIC_U32`]).

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;

use super::error::{DataError, Result};

/// llm.c's magic for u16 token shards.
pub const MAGIC_U16: i32 = 20240520;
/// topcoat's magic for u32 token shards (vocabularies over 65,536).
pub const MAGIC_U32: i32 = 20240801;
/// The only shard version, for both magics.
pub const VERSION: i32 = 1;
/// Header size in bytes: 256 little-endian `i32`.
pub const HEADER_BYTES: usize = 1024;

/// Bytes per token for a vocabulary of `vocab_size` ids: 2 when every id fits a u16, else 4.
pub fn token_width(vocab_size: usize) -> usize {
    if vocab_size <= 65536 {
        2
    } else {
        4
    }
}

fn header_bytes(magic: i32, count: i32) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[0..4].copy_from_slice(&magic.to_le_bytes());
    h[4..8].copy_from_slice(&VERSION.to_le_bytes());
    h[8..12].copy_from_slice(&count.to_le_bytes());
    h
}

/// `dir/.name.tmp`: a sibling temp name, so the final rename stays on one file system.
pub(crate) fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Streams tokens into a shard. Tokens go to a temp file next to `path`; [`ShardWriter::finish`]
/// writes the header and renames it into place. Dropped without `finish`, the temp file is removed
/// and `path` is untouched.
pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    width: usize,
    vocab_size: usize,
    count: u64,
    buf: Vec<u8>,
}

impl ShardWriter {
    /// Starts a shard for ids `< vocab_size` (u16 tokens when `vocab_size <= 65536`, else u32).
    pub fn create(path: impl AsRef<Path>, vocab_size: usize) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if vocab_size == 0 || vocab_size > u32::MAX as usize {
            return Err(DataError::InvalidArgument(format!(
                "{}: vocab size {vocab_size} is not in 1..=2^32-1",
                path.display()
            )));
        }
        let tmp = temp_sibling(&path);
        let file = File::create(&tmp).map_err(|e| DataError::io(&tmp, "create", e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&[0u8; HEADER_BYTES])
            .map_err(|e| DataError::io(&tmp, "write", e))?;
        Ok(Self {
            path,
            tmp,
            out: Some(out),
            width: token_width(vocab_size),
            vocab_size,
            count: 0,
            buf: Vec::new(),
        })
    }

    /// Tokens written so far.
    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends tokens; an id `>= vocab_size` is an error naming the shard and the offset.
    pub fn write(&mut self, tokens: &[u32]) -> Result<()> {
        if let Some(i) = tokens.iter().position(|&t| t as usize >= self.vocab_size) {
            return Err(DataError::TokenOutOfRange {
                path: self.path.clone(),
                offset: self.count + i as u64,
                id: tokens[i],
                vocab_size: self.vocab_size,
            });
        }
        self.buf.clear();
        if self.width == 2 {
            self.buf
                .extend(tokens.iter().flat_map(|&t| (t as u16).to_le_bytes()));
        } else {
            self.buf
                .extend(tokens.iter().flat_map(|&t| t.to_le_bytes()));
        }
        let out = self.out.as_mut().expect("writer used after finish");
        out.write_all(&self.buf)
            .map_err(|e| DataError::io(&self.tmp, "write", e))?;
        self.count += tokens.len() as u64;
        Ok(())
    }

    /// Writes the header, syncs, and renames the temp file to the final path.
    pub fn finish(mut self) -> Result<PathBuf> {
        let max = i32::MAX as u64;
        if self.count > max {
            return Err(DataError::ShardTooLarge {
                path: self.path.clone(),
                count: self.count,
                max,
            });
        }
        let magic = if self.width == 2 {
            MAGIC_U16
        } else {
            MAGIC_U32
        };
        let out = self.out.take().expect("writer used after finish");
        let tmp = self.tmp.clone();
        let mut file = out
            .into_inner()
            .map_err(|e| DataError::io(&tmp, "write", e.into_error()))?;
        let header = header_bytes(magic, self.count as i32);
        file.seek(SeekFrom::Start(0))
            .and_then(|_| file.write_all(&header))
            .and_then(|_| file.sync_all())
            .map_err(|e| DataError::io(&tmp, "write header", e))?;
        drop(file);
        std::fs::rename(&tmp, &self.path).map_err(|e| DataError::io(&self.path, "rename", e))?;
        Ok(self.path.clone())
    }
}

impl Drop for ShardWriter {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `tokens` as one shard at `path` (u16 when `vocab_size <= 65536`, else u32), atomically.
pub fn write_shard(path: impl AsRef<Path>, tokens: &[u32], vocab_size: usize) -> Result<PathBuf> {
    let mut w = ShardWriter::create(path, vocab_size)?;
    w.write(tokens)?;
    w.finish()
}

/// A memory-mapped shard whose header and size have been checked.
pub struct Shard {
    path: PathBuf,
    map: Mmap,
    len: usize,
    width: usize,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("width", &self.width)
            .finish()
    }
}

impl Shard {
    /// Maps `path` and checks magic, version, and that the size is header + count * width.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        // Checked before opening: a directory would fail later as "mmap: No such device", and
        // opening a FIFO would block.
        let meta = std::fs::metadata(&path).map_err(|e| DataError::io(&path, "open", e))?;
        if !meta.is_file() {
            return Err(DataError::NotAFile {
                path,
                expected: "a token shard file",
            });
        }
        let file = File::open(&path).map_err(|e| DataError::io(&path, "open", e))?;
        let size = file
            .metadata()
            .map_err(|e| DataError::io(&path, "stat", e))?
            .len();
        if size < HEADER_BYTES as u64 {
            return Err(DataError::ShardTooShort { path, len: size });
        }
        // SAFETY: the file is opened read-only; topcoat never writes a shard in place (writers
        // rename a finished temp file over it), so the mapped bytes do not change under us.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| DataError::io(&path, "mmap", e))?;
        let word = |i: usize| i32::from_le_bytes(map[4 * i..4 * i + 4].try_into().unwrap());
        let (magic, version, count) = (word(0), word(1), word(2));
        let width = match magic {
            MAGIC_U16 => 2,
            MAGIC_U32 => 4,
            found => {
                return Err(DataError::BadMagic {
                    path,
                    found,
                    expected_u16: MAGIC_U16,
                    expected_u32: MAGIC_U32,
                })
            }
        };
        if version != VERSION {
            return Err(DataError::BadVersion {
                path,
                magic,
                found: version,
                expected: VERSION,
            });
        }
        if count < 0 {
            return Err(DataError::NegativeCount { path, count });
        }
        let expected = HEADER_BYTES as u64 + count as u64 * width as u64;
        if size != expected {
            return Err(DataError::ShardSize {
                path,
                which: if size < expected { "shorter" } else { "longer" },
                count: count as u64,
                width,
                expected,
                found: size,
            });
        }
        Ok(Self {
            path,
            map,
            len: count as usize,
            width,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes per token: 2 (u16 shard) or 4 (u32 shard).
    pub fn width(&self) -> usize {
        self.width
    }

    fn data(&self) -> &[u8] {
        &self.map[HEADER_BYTES..]
    }

    /// Token `i`; panics when `i >= len()`.
    pub fn get(&self, i: usize) -> u32 {
        assert!(
            i < self.len,
            "token {i} out of range for {} tokens",
            self.len
        );
        let d = &self.data()[i * self.width..(i + 1) * self.width];
        if self.width == 2 {
            u16::from_le_bytes([d[0], d[1]]) as u32
        } else {
            u32::from_le_bytes([d[0], d[1], d[2], d[3]])
        }
    }

    /// Copies tokens `start..start + out.len()` into `out`; panics when the range is out of bounds.
    pub fn copy_range(&self, start: usize, out: &mut [i32]) {
        let end = start + out.len();
        assert!(
            end <= self.len,
            "range {start}..{end} out of {} tokens",
            self.len
        );
        let bytes = &self.data()[start * self.width..end * self.width];
        if self.width == 2 {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = u16::from_le_bytes([c[0], c[1]]) as i32;
            }
        } else {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i32;
            }
        }
    }

    /// All tokens as u32 (for tests and tools; training reads windows with `copy_range`).
    pub fn to_vec(&self) -> Vec<u32> {
        (0..self.len).map(|i| self.get(i)).collect()
    }

    /// Scans every token (in parallel chunks) and reports the first id `>= vocab_size` with its
    /// offset.
    pub fn validate_vocab(&self, vocab_size: usize) -> Result<()> {
        const CHUNK: usize = 1 << 20;
        let width = self.width;
        let bad = self
            .data()
            .par_chunks(CHUNK * width)
            .enumerate()
            .find_map_first(|(ci, bytes)| {
                let hit = if width == 2 {
                    bytes
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
                        .enumerate()
                        .find(|&(_, t)| t as usize >= vocab_size)
                } else {
                    bytes
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .enumerate()
                        .find(|&(_, t)| t as usize >= vocab_size)
                };
                hit.map(|(i, t)| ((ci * CHUNK + i) as u64, t))
            });
        match bad {
            None => Ok(()),
            Some((offset, id)) => Err(DataError::TokenOutOfRange {
                path: self.path.clone(),
                offset,
                id,
                vocab_size,
            }),
        }
    }
}
