//! Hugging Face `config.json` <-> [`ModelConfig`]: which architecture a directory holds, its
//! shape, and every setting that changes the graph. A setting topcoat does not compute (another
//! activation, a sliding window, a RoPE scaling other than Llama 3's, ...) is refused by name
//! rather than imported into a model that would give other logits.
//!
//! Both spellings transformers has written are read: RoPE as `rope_theta` + `rope_scaling`
//! (4.x) or as one `rope_parameters` object (5.x). The reverse, the exported `config.json`,
//! is export.rs's [`to_json`](super::export::to_json).

use super::{HfError, Result};
use crate::config::{pad_vocab, Family, LlamaShape, ModelConfig, RopeScaling};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// What `import hf` reads, as error messages list it.
pub const SUPPORTED: &[&str] = &[
    "GPT2LMHeadModel (gpt2)",
    "LlamaForCausalLM (llama)",
    "Qwen2ForCausalLM (qwen2)",
    "MistralForCausalLM (mistral)",
];

/// A supported Hugging Face architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Gpt2,
    Llama,
    Qwen2,
    Mistral,
}

impl Arch {
    /// The class name in `"architectures"`.
    pub fn class(self) -> &'static str {
        match self {
            Self::Gpt2 => "GPT2LMHeadModel",
            Self::Llama => "LlamaForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Mistral => "MistralForCausalLM",
        }
    }

    /// `"model_type"`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Gpt2 => "gpt2",
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Mistral => "mistral",
        }
    }

    const ALL: [Arch; 4] = [Self::Gpt2, Self::Llama, Self::Qwen2, Self::Mistral];

    /// The architecture a topcoat model exports as: GPT-2, Qwen2 where q/k/v carry biases,
    /// else Llama (a Mistral without a sliding window is the same graph and the same names).
    pub fn of_config(cfg: &ModelConfig) -> Self {
        match cfg.llama() {
            None => Self::Gpt2,
            Some(s) if s.qkv_bias => Self::Qwen2,
            Some(_) => Self::Llama,
        }
    }
}

/// A Hugging Face model's architecture and its topcoat shape.
#[derive(Clone, Debug, PartialEq)]
pub struct HfModel {
    pub arch: Arch,
    pub cfg: ModelConfig,
}

/// Reads `config.json` at `path`.
pub fn read(path: &Path) -> Result<HfModel> {
    let bytes = std::fs::read(path).map_err(super::io_err(path))?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| HfError::Json {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    parse(path, &value)
}

/// The keys of one config file, with typed getters that name the file and key on error.
struct Keys<'a> {
    path: &'a Path,
    map: &'a Map<String, Value>,
}

impl<'a> Keys<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn bad(&self, key: &str, found: &Value, expected: &str) -> HfError {
        HfError::BadKey {
            path: self.path.to_path_buf(),
            key: key.into(),
            found: found.to_string(),
            expected: expected.into(),
        }
    }

    fn usize_or(&self, key: &'static str, default: Option<usize>) -> Result<usize> {
        match self.get(key) {
            Some(v) => v
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| self.bad(key, v, "a whole number")),
            None => default.ok_or(HfError::MissingKey {
                path: self.path.to_path_buf(),
                key,
                why: "the model's shape needs it",
            }),
        }
    }

    fn usize(&self, key: &'static str) -> Result<usize> {
        self.usize_or(key, None)
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            Some(v) => v.as_f64().ok_or_else(|| self.bad(key, v, "a number")),
            None => Ok(default),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            Some(v) => v.as_bool().ok_or_else(|| self.bad(key, v, "true or false")),
            None => Ok(default),
        }
    }

    fn str_or(&self, key: &str, default: &'a str) -> Result<&'a str> {
        match self.get(key) {
            Some(v) => v.as_str().ok_or_else(|| self.bad(key, v, "a string")),
            None => Ok(default),
        }
    }

    fn unsupported(&self, key: &str, found: impl ToString, why: impl Into<String>) -> HfError {
        HfError::Unsupported {
            path: self.path.to_path_buf(),
            key: key.into(),
            found: found.to_string(),
            why: why.into(),
        }
    }

    /// Refuses `key` unless it is absent or `want`.
    fn require_bool(&self, key: &str, default: bool, want: bool, why: &str) -> Result<()> {
        let v = self.bool_or(key, default)?;
        if v != want {
            return Err(self.unsupported(key, v, why));
        }
        Ok(())
    }
}

/// Parses a `config.json` already read from `path`.
pub fn parse(path: &Path, value: &Value) -> Result<HfModel> {
    let map = value.as_object().ok_or_else(|| HfError::Json {
        path: path.to_path_buf(),
        msg: "not a JSON object".into(),
    })?;
    let k = Keys { path, map };
    let arch = arch_of(&k)?;
    let cfg = match arch {
        Arch::Gpt2 => gpt2(&k)?,
        _ => llama(&k, arch)?,
    };
    cfg.validate().map_err(|e| HfError::Unsupported {
        path: path.to_path_buf(),
        key: "shape".into(),
        found: format!(
            "{} layers, {} heads, width {}",
            cfg.n_layer, cfg.n_head, cfg.n_embd
        ),
        why: e.to_string(),
    })?;
    Ok(HfModel { arch, cfg })
}

/// The architecture named by `model_type`, checked against `architectures`.
fn arch_of(k: &Keys) -> Result<Arch> {
    let unknown = |found: String| HfError::UnknownArchitecture {
        path: k.path.to_path_buf(),
        found,
    };
    let model_type = k.get("model_type").ok_or(HfError::MissingKey {
        path: k.path.to_path_buf(),
        key: "model_type",
        why: "it names the architecture",
    })?;
    let name = model_type
        .as_str()
        .ok_or_else(|| k.bad("model_type", model_type, "a string"))?;
    let arch = Arch::ALL
        .into_iter()
        .find(|a| a.model_type() == name)
        .ok_or_else(|| unknown(format!("model_type \"{name}\"")))?;
    if let Some(list) = k.get("architectures") {
        let classes = list
            .as_array()
            .ok_or_else(|| k.bad("architectures", list, "a list of class names"))?;
        for c in classes {
            if c.as_str() != Some(arch.class()) {
                return Err(unknown(format!("{c} (model_type \"{name}\")")));
            }
        }
    }
    Ok(arch)
}

fn gpt2(k: &Keys) -> Result<ModelConfig> {
    let vocab_size = k.usize("vocab_size")?;
    let n_embd = k.usize("n_embd")?;
    let n_positions = match k.get("n_positions") {
        Some(_) => k.usize("n_positions")?,
        None => k.usize("n_ctx")?,
    };
    if let Some(v) = k.get("n_inner") {
        if v.as_u64() != Some(4 * n_embd as u64) {
            return Err(k.unsupported(
                "n_inner",
                v,
                format!("topcoat's GPT-2 MLP is 4 x n_embd = {} wide", 4 * n_embd),
            ));
        }
    }
    let act = k.str_or("activation_function", "gelu_new")?;
    if !matches!(act, "gelu_new" | "gelu_pytorch_tanh") {
        return Err(k.unsupported(
            "activation_function",
            format!("\"{act}\""),
            "topcoat's GPT-2 computes gelu_new (GELU's tanh approximation)",
        ));
    }
    let eps = k.f64_or("layer_norm_epsilon", 1e-5)?;
    if (eps - crate::backend::cpu::layernorm::EPS).abs() > 1e-12 {
        return Err(k.unsupported("layer_norm_epsilon", eps, "topcoat's LayerNorm uses 1e-5"));
    }
    k.require_bool(
        "tie_word_embeddings",
        true,
        true,
        "topcoat's GPT-2 always ties the output head to the token embedding",
    )?;
    k.require_bool(
        "scale_attn_weights",
        true,
        true,
        "topcoat scales attention scores by 1/sqrt(head size)",
    )?;
    k.require_bool(
        "scale_attn_by_inverse_layer_idx",
        false,
        false,
        "topcoat does not scale attention by the layer index",
    )?;
    k.require_bool(
        "add_cross_attention",
        false,
        false,
        "a causal language model has no cross-attention",
    )?;
    Ok(ModelConfig {
        vocab_size,
        padded_vocab_size: pad_vocab(vocab_size),
        n_layer: k.usize("n_layer")?,
        n_head: k.usize("n_head")?,
        n_embd,
        max_seq_len: n_positions,
        family: Family::Gpt2,
        lora: None,
    })
}

fn llama(k: &Keys, arch: Arch) -> Result<ModelConfig> {
    let vocab_size = k.usize("vocab_size")?;
    let n_embd = k.usize("hidden_size")?;
    let n_head = k.usize("num_attention_heads")?;
    let n_kv_head = k.usize_or("num_key_value_heads", Some(n_head))?;
    let max_seq_len = k.usize("max_position_embeddings")?;
    if let Some(v) = k.get("head_dim") {
        if n_head == 0 || v.as_u64() != Some((n_embd / n_head) as u64) {
            return Err(k.unsupported(
                "head_dim",
                v,
                format!(
                    "topcoat's head size is hidden_size / num_attention_heads = {n_embd} / \
                     {n_head}"
                ),
            ));
        }
    }
    let act = k.str_or("hidden_act", "silu")?;
    if act != "silu" {
        return Err(k.unsupported(
            "hidden_act",
            format!("\"{act}\""),
            "topcoat's SwiGLU MLP computes silu",
        ));
    }
    k.require_bool("mlp_bias", false, false, "topcoat's MLP has no biases")?;
    let qkv_bias = match arch {
        Arch::Qwen2 => true,
        _ => {
            k.require_bool(
                "attention_bias",
                false,
                false,
                "Llama's attention_bias also gives o_proj a bias, which topcoat has not",
            )?;
            false
        }
    };
    sliding_window(k, arch, max_seq_len)?;
    let (rope_theta, rope_scaling) = rope(k)?;
    let shape = LlamaShape {
        n_kv_head,
        intermediate_size: k.usize("intermediate_size")?,
        rope_theta,
        rope_scaling,
        rms_eps: k.f64_or("rms_norm_eps", 1e-6)?,
        tie_embeddings: k.bool_or("tie_word_embeddings", false)?,
        qkv_bias,
    };
    Ok(ModelConfig {
        vocab_size,
        padded_vocab_size: pad_vocab(vocab_size),
        n_layer: k.usize("num_hidden_layers")?,
        n_head,
        n_embd,
        max_seq_len,
        family: Family::Llama(shape),
        lora: None,
    })
}

/// Refuses a sliding attention window that a sequence of the model's length could reach.
fn sliding_window(k: &Keys, arch: Arch, max_seq_len: usize) -> Result<()> {
    let why = "topcoat attends to the whole causal context (no sliding window)";
    match arch {
        Arch::Qwen2 => {
            if k.bool_or("use_sliding_window", false)? {
                return Err(k.unsupported("use_sliding_window", true, why));
            }
            if let Some(v) = k.get("layer_types") {
                let all_full = v
                    .as_array()
                    .is_some_and(|a| a.iter().all(|t| t == "full_attention"));
                if !all_full {
                    return Err(k.unsupported("layer_types", v, why));
                }
            }
        }
        Arch::Mistral => {
            if let Some(v) = k.get("sliding_window") {
                let w = v
                    .as_u64()
                    .ok_or_else(|| k.bad("sliding_window", v, "a whole number or null"))?;
                if (w as usize) < max_seq_len {
                    return Err(k.unsupported(
                        "sliding_window",
                        w,
                        format!(
                            "{why}; a window at least max_position_embeddings \
                             ({max_seq_len}) would be the same graph"
                        ),
                    ));
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// RoPE's base and scaling, from `rope_parameters` (5.x) or `rope_theta` + `rope_scaling`.
fn rope(k: &Keys) -> Result<(f64, Option<RopeScaling>)> {
    let (key, params) = match k.get("rope_parameters") {
        Some(p) => ("rope_parameters", Some(p)),
        None => ("rope_scaling", k.get("rope_scaling")),
    };
    let mut theta = k.f64_or("rope_theta", 10_000.0)?;
    let Some(params) = params else {
        return Ok((theta, None));
    };
    let map = params
        .as_object()
        .ok_or_else(|| k.bad(key, params, "an object"))?;
    let sub = Keys { path: k.path, map };
    if key == "rope_parameters" {
        theta = sub.f64_or("rope_theta", theta)?;
    }
    let rope_type = match sub.get("rope_type").or_else(|| sub.get("type")) {
        Some(v) => v
            .as_str()
            .ok_or_else(|| k.bad(key, params, "a rope_type string"))?,
        None => "default",
    };
    match rope_type {
        "default" => Ok((theta, None)),
        "llama3" => {
            let num = |name: &'static str| -> Result<f64> {
                sub.get(name)
                    .and_then(Value::as_f64)
                    .ok_or_else(|| HfError::MissingKey {
                        path: k.path.to_path_buf(),
                        key: name,
                        why: "Llama 3 RoPE scaling needs it",
                    })
            };
            Ok((
                theta,
                Some(RopeScaling {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position_embeddings: num("original_max_position_embeddings")?
                        as usize,
                }),
            ))
        }
        other => Err(k.unsupported(
            &format!("{key}.rope_type"),
            format!("\"{other}\""),
            "topcoat computes RoPE without scaling (\"default\") or with Llama 3's (\"llama3\")",
        )),
    }
}

/// `config.json` in `dir`.
pub fn path_in(dir: &Path) -> PathBuf {
    dir.join("config.json")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hf::export::{to_json, SpecialIds};
    use crate::hf::HfDtype;
    use serde_json::json;

    fn llama_json() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100,
            "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 48, "max_position_embeddings": 64,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": false, "head_dim": 8,
            "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}
        })
    }

    /// Both RoPE spellings give the same shape, and an export parses back to it.
    #[test]
    fn llama_config_round_trips_in_both_rope_spellings() {
        let p = Path::new("config.json");
        let a = parse(p, &llama_json()).unwrap();
        let s = a.cfg.llama().unwrap();
        assert_eq!((s.n_kv_head, s.intermediate_size), (2, 48));
        assert_eq!(s.rope_theta, 500000.0);
        assert_eq!(s.rope_scaling.as_ref().unwrap().factor, 8.0);
        let mut legacy = llama_json();
        let m = legacy.as_object_mut().unwrap();
        let mut rp = m.remove("rope_parameters").unwrap();
        m.insert("rope_theta".into(), rp["rope_theta"].take());
        m.insert("rope_scaling".into(), rp);
        assert_eq!(parse(p, &legacy).unwrap(), a);
        let back = to_json(a.arch, &a.cfg, HfDtype::F32, &SpecialIds::default());
        assert_eq!(parse(p, &back).unwrap(), a);
    }

    /// Each refused setting names its key.
    #[test]
    fn unsupported_settings_name_their_key() {
        let p = Path::new("config.json");
        let cases: [(&str, Value, &str); 5] = [
            (
                "model_type",
                json!("bert"),
                "unsupported architecture model_type \"bert\"",
            ),
            ("head_dim", json!(16), "\"head_dim\" = 16"),
            ("hidden_act", json!("gelu"), "\"hidden_act\" = \"gelu\""),
            (
                "rope_parameters",
                json!({"rope_type": "yarn", "rope_theta": 1e4}),
                "\"rope_parameters.rope_type\" = \"yarn\"",
            ),
            ("attention_bias", json!(true), "\"attention_bias\" = true"),
        ];
        for (key, value, want) in cases {
            let mut j = llama_json();
            j[key] = value;
            let e = parse(p, &j).unwrap_err().to_string();
            assert!(e.contains(want), "{key}: {e}");
        }
    }
}
