//! The fatbin container nvcc writes (`nvcc --fatbin`): which machine code (SASS, one ELF per
//! `sm_XX`) and which PTX (per `compute_XX`) it holds, and a copy with only its PTX.
//!
//! Layout (little-endian; NVIDIA documents no format, this is what nvcc 13.0 writes and what
//! `tests/kernel_arch.rs` checks against its fatbins): a 16-byte header (`u32` magic
//! `0xBA55ED50`, `u16` version 1, `u16` header size 16, `u64` bytes of entries that follow),
//! then entries back to back, each a header of at least 64 bytes and its payload:
//!
//! | offset | field |
//! | --- | --- |
//! | 0 | `u16` kind: 1 PTX, 2 ELF (SASS) |
//! | 4 | `u32` header size (64, or more with options or extensions after the 64) |
//! | 8 | `u64` payload size (padded to 8) |
//! | 24 | `u16` minor, `u16` major: PTX ISA version (9.0) or ELF code version |
//! | 28 | `u32` arch: 80 for sm_80 or compute_80 |
//! | 40 | `u64` flags: 0x8000 zstd-compressed, 0x2000 the older compression |
//!
//! The driver picks from the whole container (SASS for the device's major version and a minor
//! at most its own, else PTX at most its compute capability, JIT-compiled); [`Fatbin::ptx_only`]
//! drops the SASS so that the driver JITs the PTX even where SASS would fit (what
//! `TOPCOAT_KERNELS=generic` loads).

use thiserror::Error;

/// The first four bytes of a fatbin container.
pub const MAGIC: u32 = 0xBA55_ED50;
const HEADER_BYTES: usize = 16;
const ENTRY_HEADER_MIN: usize = 64;
const KIND_PTX: u16 = 1;
const KIND_ELF: u16 = 2;
const FLAG_COMPRESSED: u64 = 0x8000 | 0x2000;

/// Why bytes are not a fatbin container this parser reads.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum FatbinError {
    #[error("fatbin is empty (a build without nvcc embeds no kernels)")]
    Empty,
    #[error("fatbin is {len} bytes, shorter than its {need}-byte {what} at offset {at}")]
    Truncated {
        what: &'static str,
        at: usize,
        need: usize,
        len: usize,
    },
    #[error("fatbin magic is {found:#010x}, expected {MAGIC:#010x}")]
    Magic { found: u32 },
    #[error("fatbin header: version {version} with a {size}-byte header, expected version 1 and 16 bytes")]
    Header { version: u16, size: u16 },
    #[error("fatbin header says {declared} bytes of entries, the container holds {found}")]
    Size { declared: u64, found: usize },
    #[error("fatbin entry at offset {at}: header size {size}, expected at least 64")]
    EntryHeader { at: usize, size: u32 },
    #[error("fatbin entry at offset {at}: kind {kind}, expected 1 (PTX) or 2 (ELF)")]
    Kind { at: usize, kind: u16 },
    #[error("fatbin entry at offset {at} (sm_{arch}): an uncompressed ELF payload that does not start with \\x7fELF")]
    Elf { at: usize, arch: u32 },
}

/// What an entry holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeKind {
    /// Machine code (a cubin ELF) for one `sm_XX`.
    Sass,
    /// PTX for one `compute_XX`, which the driver JITs for any card at least that new.
    Ptx,
}

/// One entry of a container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    pub kind: CodeKind,
    /// `80` for sm_80 / compute_80.
    pub arch: u32,
    /// `(major, minor)`: the PTX ISA version of a PTX entry (nvcc 13.0 writes 9.0), the ELF
    /// code version of a SASS one.
    pub version: (u16, u16),
    /// Whether the payload is compressed (nvcc compresses PTX by default, not SASS).
    pub compressed: bool,
    /// The whole entry, header and payload, as it sits in the container.
    pub raw: &'a [u8],
    /// The payload (an ELF, PTX text, or either compressed), padding included.
    pub payload: &'a [u8],
}

impl std::fmt::Display for Entry<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            CodeKind::Sass => write!(f, "sm_{} SASS", self.arch),
            CodeKind::Ptx => write!(
                f,
                "compute_{} PTX (ISA {}.{})",
                self.arch, self.version.0, self.version.1
            ),
        }
    }
}

/// A parsed container: its entries in file order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fatbin<'a> {
    pub entries: Vec<Entry<'a>>,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// `Err(Truncated)` unless `bytes` holds `need` bytes from `at`.
fn room(bytes: &[u8], what: &'static str, at: usize, need: usize) -> Result<(), FatbinError> {
    if bytes.len() < at.saturating_add(need) {
        return Err(FatbinError::Truncated {
            what,
            at,
            need,
            len: bytes.len(),
        });
    }
    Ok(())
}

impl<'a> Fatbin<'a> {
    /// Parses one container filling `bytes` exactly (what `nvcc --fatbin` writes).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, FatbinError> {
        if bytes.is_empty() {
            return Err(FatbinError::Empty);
        }
        room(bytes, "header", 0, HEADER_BYTES)?;
        let magic = u32_at(bytes, 0);
        if magic != MAGIC {
            return Err(FatbinError::Magic { found: magic });
        }
        let (version, size) = (u16_at(bytes, 4), u16_at(bytes, 6));
        if version != 1 || size as usize != HEADER_BYTES {
            return Err(FatbinError::Header { version, size });
        }
        let declared = u64_at(bytes, 8);
        let found = bytes.len() - HEADER_BYTES;
        if declared != found as u64 {
            return Err(FatbinError::Size { declared, found });
        }
        let mut entries = Vec::new();
        let mut at = HEADER_BYTES;
        while at < bytes.len() {
            room(bytes, "entry header", at, ENTRY_HEADER_MIN)?;
            let kind = u16_at(bytes, at);
            let header = u32_at(bytes, at + 4);
            if (header as usize) < ENTRY_HEADER_MIN {
                return Err(FatbinError::EntryHeader { at, size: header });
            }
            let payload = u64_at(bytes, at + 8);
            let total = (header as u64).saturating_add(payload);
            let total = usize::try_from(total).unwrap_or(usize::MAX);
            room(bytes, "entry", at, total)?;
            let kind = match kind {
                KIND_PTX => CodeKind::Ptx,
                KIND_ELF => CodeKind::Sass,
                other => return Err(FatbinError::Kind { at, kind: other }),
            };
            let arch = u32_at(bytes, at + 28);
            let compressed = u64_at(bytes, at + 40) & FLAG_COMPRESSED != 0;
            let body = &bytes[at + header as usize..at + total];
            if kind == CodeKind::Sass && !compressed && !body.starts_with(b"\x7fELF") {
                return Err(FatbinError::Elf { at, arch });
            }
            entries.push(Entry {
                kind,
                arch,
                version: (u16_at(bytes, at + 26), u16_at(bytes, at + 24)),
                compressed,
                raw: &bytes[at..at + total],
                payload: body,
            });
            at += total;
        }
        Ok(Self { entries })
    }

    /// The `sm_XX` it holds SASS for, ascending.
    pub fn sass_archs(&self) -> Vec<u32> {
        self.archs(CodeKind::Sass)
    }

    /// The `compute_XX` it holds PTX for, ascending.
    pub fn ptx_archs(&self) -> Vec<u32> {
        self.archs(CodeKind::Ptx)
    }

    fn archs(&self, kind: CodeKind) -> Vec<u32> {
        let mut archs: Vec<u32> = self
            .entries
            .iter()
            .filter(|e| e.kind == kind)
            .map(|e| e.arch)
            .collect();
        archs.sort_unstable();
        archs.dedup();
        archs
    }

    /// A container with only the PTX entries, copied unchanged (a driver given it JIT-compiles
    /// the PTX whatever SASS the original held); `None` when there is no PTX.
    pub fn ptx_only(&self) -> Option<Vec<u8>> {
        let ptx: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| e.kind == CodeKind::Ptx)
            .collect();
        if ptx.is_empty() {
            return None;
        }
        let body: usize = ptx.iter().map(|e| e.raw.len()).sum();
        let mut out = Vec::with_capacity(HEADER_BYTES + body);
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&1u16.to_le_bytes());
        out.extend_from_slice(&(HEADER_BYTES as u16).to_le_bytes());
        out.extend_from_slice(&(body as u64).to_le_bytes());
        for e in ptx {
            out.extend_from_slice(e.raw);
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A container of `entries` = (kind, arch, flags, payload), laid out as nvcc does.
    fn container(entries: &[(u16, u32, u64, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for &(kind, arch, flags, payload) in entries {
            let padded = payload.len().div_ceil(8) * 8;
            let mut h = vec![0u8; 64];
            h[0..2].copy_from_slice(&kind.to_le_bytes());
            h[2..4].copy_from_slice(&0x0101u16.to_le_bytes());
            h[4..8].copy_from_slice(&64u32.to_le_bytes());
            h[8..16].copy_from_slice(&(padded as u64).to_le_bytes());
            h[24..26].copy_from_slice(&0u16.to_le_bytes());
            h[26..28].copy_from_slice(&9u16.to_le_bytes());
            h[28..32].copy_from_slice(&arch.to_le_bytes());
            h[40..48].copy_from_slice(&flags.to_le_bytes());
            body.extend_from_slice(&h);
            body.extend_from_slice(payload);
            body.resize(body.len() + padded - payload.len(), 0);
        }
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&1u16.to_le_bytes());
        out.extend_from_slice(&16u16.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn parses_kinds_archs_and_filters_ptx() {
        let elf = b"\x7fELF and some code";
        let ptx = b"\n.version 9.0\n.target sm_80\n";
        let bytes = container(&[(2, 86, 0x11, elf), (1, 80, 0x11, ptx), (2, 80, 0x11, elf)]);
        let fb = Fatbin::parse(&bytes).unwrap();
        assert_eq!(fb.sass_archs(), vec![80, 86]);
        assert_eq!(fb.ptx_archs(), vec![80]);
        assert_eq!(fb.entries[1].to_string(), "compute_80 PTX (ISA 9.0)");
        assert_eq!(fb.entries[0].to_string(), "sm_86 SASS");
        let only = fb.ptx_only().unwrap();
        assert_eq!(only, container(&[(1, 80, 0x11, ptx)]));
        let again = Fatbin::parse(&only).unwrap();
        assert_eq!(again.sass_archs(), Vec::<u32>::new());
        assert_eq!(again.ptx_archs(), vec![80]);
        let sass_only = container(&[(2, 90, 0x11, elf)]);
        assert_eq!(Fatbin::parse(&sass_only).unwrap().ptx_only(), None);
    }

    #[test]
    fn named_errors() {
        let good = container(&[(2, 80, 0x11, b"\x7fELF....")]);
        assert_eq!(Fatbin::parse(&[]), Err(FatbinError::Empty));
        let mut bad = good.clone();
        bad[0] = 0;
        assert_eq!(
            Fatbin::parse(&bad),
            Err(FatbinError::Magic { found: 0xBA55_ED00 })
        );
        assert_eq!(
            Fatbin::parse(&good[..good.len() - 8]).unwrap_err(),
            FatbinError::Size {
                declared: (good.len() - 16) as u64,
                found: good.len() - 24
            }
        );
        let mut kind = good.clone();
        kind[16] = 7;
        assert_eq!(
            Fatbin::parse(&kind),
            Err(FatbinError::Kind { at: 16, kind: 7 })
        );
        let not_elf = container(&[(2, 89, 0x11, b"garbage!")]);
        assert_eq!(
            Fatbin::parse(&not_elf),
            Err(FatbinError::Elf { at: 16, arch: 89 })
        );
        // Compressed SASS is not an ELF until inflated: accepted as it is.
        let zstd = container(&[(2, 89, 0x8011, b"(\xb5/\xfd...")]);
        assert!(Fatbin::parse(&zstd).unwrap().entries[0].compressed);
        // A payload size running past the end.
        let mut long = good.clone();
        long[24..32].copy_from_slice(&1000u64.to_le_bytes());
        assert_eq!(
            Fatbin::parse(&long),
            Err(FatbinError::Truncated {
                what: "entry",
                at: 16,
                need: 1064,
                len: good.len()
            })
        );
        assert_eq!(
            FatbinError::Magic { found: 7 }.to_string(),
            "fatbin magic is 0x00000007, expected 0xba55ed50"
        );
    }
}
