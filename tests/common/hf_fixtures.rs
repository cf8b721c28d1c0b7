//! The Hugging Face fixtures (tests/fixtures/hf, written by scripts/make_hf_fixtures.py): their
//! folders and the reference outputs the reference libraries wrote beside them.

use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

/// `reference.safetensors` of a fixture: the i64 and f64 tensors by name.
pub struct Reference {
    pub ids: Vec<i32>,
    pub logits: Vec<f64>,
    pub loss: f64,
    pub prompt: Vec<i32>,
    pub greedy: Vec<u32>,
}

pub fn reference(dir: &Path) -> Reference {
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let i64s = |n: &str| -> Vec<i64> {
        let t = st.tensor(n).unwrap();
        assert_eq!(t.dtype(), Dtype::I64, "{n}");
        t.data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let f64s = |n: &str| -> Vec<f64> {
        let t = st.tensor(n).unwrap();
        assert_eq!(t.dtype(), Dtype::F64, "{n}");
        t.data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    Reference {
        ids: i64s("input_ids").into_iter().map(|x| x as i32).collect(),
        logits: f64s("logits"),
        loss: f64s("loss")[0],
        prompt: i64s("prompt_ids").into_iter().map(|x| x as i32).collect(),
        greedy: i64s("greedy").into_iter().map(|x| x as u32).collect(),
    }
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}
