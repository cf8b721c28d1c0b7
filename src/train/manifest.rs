//! A checkpoint's `manifest.json`: the byte size and SHA-256 of every other file in the
//! checkpoint directory (docs/FORMATS.md). It is written last, inside the temporary directory
//! before the rename that publishes the checkpoint, so a checkpoint directory with a manifest
//! is complete; every load checks each file it reads against it. The hashes are plain SHA-256
//! in lowercase hex, so `sha256sum` checks a checkpoint by hand.

use super::checkpoint::CheckpointError;
use super::{io_err, Result, TrainError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;

/// The manifest's file name inside a checkpoint directory.
pub const FILE: &str = "manifest.json";
/// The manifest's `format` field.
pub const FORMAT: &str = "topcoat-checkpoint-manifest";
/// The manifest's `version` field.
pub const VERSION: u32 = 1;

/// One file of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// File name inside the checkpoint directory (no directories).
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256 of the contents, lowercase hex.
    pub sha256: String,
}

/// The parsed `manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// Every file of the checkpoint but the manifest itself, sorted by name.
    pub files: Vec<Entry>,
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Size and SHA-256 of the file at `path`, read in blocks.
fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hex(&hasher.finalize())))
}

impl Manifest {
    /// The manifest of every file in `dir`: `known` gives the entries of files hashed while
    /// they were written; any other file is read and hashed here, so none is left out.
    pub fn of_dir(dir: &Path, known: &[Entry]) -> Result<Self> {
        let mut files = Vec::new();
        for item in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let item = item.map_err(io_err(dir))?;
            let name = item.file_name().to_string_lossy().into_owned();
            if name == FILE {
                continue;
            }
            let path = item.path();
            let kind = item.file_type().map_err(io_err(&path))?;
            // A LoRA checkpoint's PEFT copy of its adapters: a folder for sharing, not read
            // back by topcoat's own loading (docs/FORMATS.md), so not listed.
            if kind.is_dir() && name == super::checkpoint::ADAPTER_DIR {
                continue;
            }
            if !kind.is_file() {
                return Err(TrainError::Checkpoint {
                    path,
                    msg: "not a plain file; a checkpoint holds only files".into(),
                });
            }
            let entry = match known.iter().find(|e| e.name == name) {
                Some(e) => e.clone(),
                None => {
                    let (bytes, sha256) = hash_file(&path).map_err(io_err(&path))?;
                    Entry {
                        name,
                        bytes,
                        sha256,
                    }
                }
            };
            files.push(entry);
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self {
            format: FORMAT.into(),
            version: VERSION,
            files,
        })
    }

    /// The manifest as written to disk.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut text = serde_json::to_vec_pretty(self).expect("a manifest serializes");
        text.push(b'\n');
        text
    }

    /// Parses and checks the `manifest.json` of checkpoint `dir`.
    pub fn parse(dir: &Path, bytes: &[u8]) -> std::result::Result<Self, CheckpointError> {
        let bad = |msg: String| CheckpointError::BadManifest {
            dir: dir.to_path_buf(),
            msg,
        };
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        if m.format != FORMAT {
            return Err(bad(format!(
                "format is {:?}, expected {FORMAT:?}",
                m.format
            )));
        }
        if m.version != VERSION {
            return Err(bad(format!(
                "version is {}, this topcoat reads version {VERSION}",
                m.version
            )));
        }
        for (i, e) in m.files.iter().enumerate() {
            let plain = !e.name.is_empty()
                && e.name != "."
                && e.name != ".."
                && e.name != FILE
                && !e.name.contains(['/', '\\', '\0']);
            if !plain {
                return Err(bad(format!(
                    "file name {:?} is not a plain file name",
                    e.name
                )));
            }
            if m.files[..i].iter().any(|f| f.name == e.name) {
                return Err(bad(format!("{} is listed twice", e.name)));
            }
            let hex_ok = e.sha256.len() == 64
                && e.sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !hex_ok {
                return Err(bad(format!(
                    "sha256 of {} is {:?}, expected 64 lowercase hex digits",
                    e.name, e.sha256
                )));
            }
        }
        Ok(m)
    }

    /// Reads the manifest of checkpoint `dir`; a missing one is [`CheckpointError::NoManifest`].
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CheckpointError::NoManifest {
                    dir: dir.to_path_buf(),
                }
                .into())
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        Ok(Self::parse(dir, &bytes)?)
    }

    /// Checks `bytes`, the contents of file `name` of checkpoint `dir`, against the manifest.
    pub fn verify(
        &self,
        dir: &Path,
        name: &str,
        bytes: &[u8],
    ) -> std::result::Result<(), CheckpointError> {
        let entry = self.files.iter().find(|e| e.name == name).ok_or_else(|| {
            CheckpointError::Unlisted {
                dir: dir.to_path_buf(),
                file: name.into(),
            }
        })?;
        if entry.bytes != bytes.len() as u64 {
            return Err(CheckpointError::WrongSize {
                dir: dir.to_path_buf(),
                file: name.into(),
                expected: entry.bytes,
                found: bytes.len() as u64,
            });
        }
        let found = sha256_hex(bytes);
        if found != entry.sha256 {
            return Err(CheckpointError::Corrupt {
                dir: dir.to_path_buf(),
                file: name.into(),
                expected: entry.sha256.clone(),
                found,
            });
        }
        Ok(())
    }

    /// Reads file `name` of checkpoint `dir` and checks it against the manifest.
    pub fn read_verified(&self, dir: &Path, name: &str) -> Result<Vec<u8>> {
        if !self.files.iter().any(|e| e.name == name) {
            return Err(CheckpointError::Unlisted {
                dir: dir.to_path_buf(),
                file: name.into(),
            }
            .into());
        }
        let path = dir.join(name);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CheckpointError::Missing {
                    dir: dir.to_path_buf(),
                    file: name.into(),
                }
                .into())
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        self.verify(dir, name, &bytes)?;
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_a_known_string() {
        // `printf abc | sha256sum`
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn a_manifest_round_trips_and_names_what_is_wrong() {
        let dir = Path::new("ckpt_000001");
        let m = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            files: vec![Entry {
                name: "a.bin".into(),
                bytes: 3,
                sha256: sha256_hex(b"abc"),
            }],
        };
        assert_eq!(Manifest::parse(dir, &m.to_bytes()).unwrap(), m);
        m.verify(dir, "a.bin", b"abc").unwrap();
        let e = m.verify(dir, "a.bin", b"abd").unwrap_err().to_string();
        assert!(
            e.contains("a.bin is corrupt") && e.contains("SHA-256 mismatch"),
            "{e}"
        );
        let e = m.verify(dir, "a.bin", b"ab").unwrap_err().to_string();
        assert!(e.contains("a.bin") && e.contains("3 bytes"), "{e}");
        let e = m.verify(dir, "b.bin", b"").unwrap_err().to_string();
        assert!(e.contains("b.bin") && e.contains("not listed"), "{e}");

        let mut twice = m.clone();
        twice.files.push(twice.files[0].clone());
        let e = Manifest::parse(dir, &twice.to_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("listed twice"), "{e}");
        let mut escape = m.clone();
        escape.files[0].name = "../model.safetensors".into();
        let e = Manifest::parse(dir, &escape.to_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a plain file name"), "{e}");
        let mut newer = m;
        newer.version = 2;
        let e = Manifest::parse(dir, &newer.to_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("version is 2"), "{e}");
    }
}
