//! Reading a Hugging Face directory's weights: `model.safetensors`, or the shards that
//! `model.safetensors.index.json` names, memory-mapped; every tensor F32, BF16 or F16, read
//! as f32. A file shorter than its header says is [`HfError::TruncatedShard`] naming it,
//! found when the directory is opened, before any tensor is read.

use super::{io_err, HfError, Result};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The single-file weights.
pub const SINGLE: &str = "model.safetensors";
/// The index of sharded weights.
pub const INDEX: &str = "model.safetensors.index.json";

/// One safetensors file, mapped.
struct File {
    path: PathBuf,
    map: Mmap,
    /// Where the tensor data starts (after the 8-byte length and the header).
    data_start: usize,
    meta: Metadata,
}

/// Every tensor of a Hugging Face directory, by name.
pub struct HfWeights {
    /// What a missing tensor is reported against: the single file, or the index.
    source: PathBuf,
    files: Vec<File>,
    /// Tensor name -> index into `files`.
    index: BTreeMap<String, usize>,
}

impl HfWeights {
    /// Opens the weights of `dir`: `model.safetensors` or the index's shards.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join(SINGLE);
        let index_path = dir.join(INDEX);
        if single.is_file() {
            return Self::open_single(&single);
        }
        if !index_path.is_file() {
            return Err(HfError::NoWeights {
                dir: dir.to_path_buf(),
            });
        }
        let bytes = std::fs::read(&index_path).map_err(io_err(&index_path))?;
        let json: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| HfError::Json {
                path: index_path.clone(),
                msg: e.to_string(),
            })?;
        let map =
            json.get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or(HfError::MissingKey {
                    path: index_path.clone(),
                    key: "weight_map",
                    why: "it names the shard of every tensor",
                })?;
        let mut shard_names: Vec<&str> = Vec::new();
        let mut wanted: Vec<(&str, &str)> = Vec::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| HfError::BadKey {
                path: index_path.clone(),
                key: format!("weight_map.{tensor}"),
                found: file.to_string(),
                expected: "a file name".into(),
            })?;
            if !shard_names.contains(&file) {
                shard_names.push(file);
            }
            wanted.push((tensor, file));
        }
        shard_names.sort_unstable();
        let files = shard_names
            .iter()
            .map(|f| open_file(&dir.join(f)))
            .collect::<Result<Vec<_>>>()?;
        let mut index = BTreeMap::new();
        for (tensor, file) in wanted {
            let i = shard_names.binary_search(&file).expect("listed above");
            if files[i].meta.info(tensor).is_none() {
                return Err(HfError::MissingTensor {
                    file: files[i].path.clone(),
                    tensor: format!("{tensor} (which {INDEX} places there)"),
                });
            }
            index.insert(tensor.to_string(), i);
        }
        Ok(Self {
            source: index_path,
            files,
            index,
        })
    }

    /// Opens one safetensors file by its path (a PEFT adapter's `adapter_model.safetensors`).
    pub(crate) fn open_single(path: &Path) -> Result<Self> {
        let file = open_file(path)?;
        let index = file.meta.tensors().into_keys().map(|n| (n, 0)).collect();
        Ok(Self {
            source: path.to_path_buf(),
            files: vec![file],
            index,
        })
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The files read (one, or the shards).
    pub fn files(&self) -> Vec<&Path> {
        self.files.iter().map(|f| f.path.as_path()).collect()
    }

    /// Bytes of tensor data in all files.
    pub fn total_bytes(&self) -> u64 {
        self.files
            .iter()
            .map(|f| (f.map.len() - f.data_start) as u64)
            .sum()
    }

    /// The file holding `name`, or the file (or index) that should have held it.
    pub fn file_of(&self, name: &str) -> &Path {
        match self.index.get(name) {
            Some(&i) => &self.files[i].path,
            None => &self.source,
        }
    }

    fn info(&self, name: &str) -> Result<(&File, &TensorInfo)> {
        let missing = || HfError::MissingTensor {
            file: self.source.clone(),
            tensor: name.into(),
        };
        let &i = self.index.get(name).ok_or_else(missing)?;
        let f = &self.files[i];
        Ok((f, f.meta.info(name).ok_or_else(missing)?))
    }

    /// The shape of `name`.
    pub fn shape(&self, name: &str) -> Result<&[usize]> {
        Ok(&self.info(name)?.1.shape)
    }

    /// The element type of `name` as safetensors names it (`BF16`, ...).
    pub fn dtype(&self, name: &str) -> Result<String> {
        Ok(format!("{:?}", self.info(name)?.1.dtype))
    }

    /// Tensor `name` as f32, which must have shape `expected`.
    pub fn read_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        let (f, info) = self.info(name)?;
        if info.shape != expected {
            return Err(HfError::ShapeMismatch {
                file: f.path.clone(),
                tensor: name.into(),
                expected: expected.to_vec(),
                found: info.shape.clone(),
            });
        }
        let (start, end) = info.data_offsets;
        let bytes = &f.map[f.data_start + start..f.data_start + end];
        let n: usize = info.shape.iter().product();
        Ok(match info.dtype {
            Dtype::F32 => convert::<4>(bytes, n, f32::from_le_bytes),
            Dtype::BF16 => convert::<2>(bytes, n, |b| half::bf16::from_le_bytes(b).to_f32()),
            Dtype::F16 => convert::<2>(bytes, n, |b| half::f16::from_le_bytes(b).to_f32()),
            other => {
                return Err(HfError::UnsupportedDtype {
                    file: f.path.clone(),
                    tensor: name.into(),
                    dtype: format!("{other:?}"),
                })
            }
        })
    }
}

/// `n` little-endian values of `W` bytes each, converted by `f`, in parallel.
fn convert<const W: usize>(bytes: &[u8], n: usize, f: impl Fn([u8; W]) -> f32 + Sync) -> Vec<f32> {
    debug_assert_eq!(bytes.len(), n * W);
    let mut out = vec![0f32; n];
    out.par_chunks_mut(1 << 16)
        .zip(bytes.par_chunks(W << 16))
        .for_each(|(o, b)| {
            for (x, c) in o.iter_mut().zip(b.chunks_exact(W)) {
                *x = f(c.try_into().expect("chunks of W"));
            }
        });
    out
}

/// Maps one safetensors file and checks its length against its header.
fn open_file(path: &Path) -> Result<File> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    // SAFETY: the file is only read; a model directory is not written while it is imported
    // (as for token shards, a concurrent writer is outside what topcoat guards against).
    let map = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
    let len = map.len() as u64;
    let truncated = |expected: u64| HfError::TruncatedShard {
        file: path.to_path_buf(),
        expected,
        found: len,
    };
    if len < 8 {
        return Err(truncated(8));
    }
    let n = u64::from_le_bytes(map[..8].try_into().expect("8 bytes"));
    if n > len - 8 {
        return Err(truncated(n.saturating_add(8)));
    }
    // The end of the data is the largest end offset the header states.
    let header: serde_json::Value =
        serde_json::from_slice(&map[8..8 + n as usize]).map_err(|e| HfError::BadSafetensors {
            file: path.to_path_buf(),
            msg: format!("header is not JSON: {e}"),
        })?;
    let data_end = header
        .as_object()
        .into_iter()
        .flat_map(|m| m.values())
        .filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    if 8 + n + data_end > len {
        return Err(truncated(8 + n + data_end));
    }
    let (n, meta) = SafeTensors::read_metadata(&map).map_err(|e| HfError::BadSafetensors {
        file: path.to_path_buf(),
        msg: format!("{e:?}"),
    })?;
    Ok(File {
        path: path.to_path_buf(),
        map,
        data_start: 8 + n,
        meta,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    /// F32, BF16 and F16 tensors of the same values read back as those values (each exactly
    /// representable in the narrow types); a file cut short is named as truncated.
    #[test]
    fn reads_every_dtype_and_names_a_truncated_file() {
        let dir = tempfile::tempdir().unwrap();
        let vals = [1.5f32, -0.25, 3.0, 0.0078125, -96.0, 2.0];
        let f32b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bf: Vec<u8> = vals
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        let hf: Vec<u8> = vals
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let views = vec![
            ("a", TensorView::new(Dtype::F32, vec![2, 3], &f32b).unwrap()),
            ("b", TensorView::new(Dtype::BF16, vec![3, 2], &bf).unwrap()),
            ("c", TensorView::new(Dtype::F16, vec![6], &hf).unwrap()),
        ];
        let bytes = safetensors::serialize(views, &None).unwrap();
        std::fs::write(dir.path().join(SINGLE), &bytes).unwrap();
        let w = HfWeights::open(dir.path()).unwrap();
        assert_eq!(w.names().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(w.read_f32("a", &[2, 3]).unwrap(), vals);
        assert_eq!(w.read_f32("b", &[3, 2]).unwrap(), vals);
        assert_eq!(w.read_f32("c", &[6]).unwrap(), vals);
        let e = w.read_f32("a", &[3, 2]).unwrap_err().to_string();
        assert!(
            e.contains("tensor a has shape [2, 3], expected [3, 2]"),
            "{e}"
        );
        std::fs::write(dir.path().join(SINGLE), &bytes[..bytes.len() - 5]).unwrap();
        let e = HfWeights::open(dir.path()).err().unwrap().to_string();
        let want = format!(
            "model.safetensors: truncated safetensors file: its header says {} bytes, the file \
             has {}",
            bytes.len(),
            bytes.len() - 5
        );
        assert!(e.contains(&want), "{e}");
    }
}
