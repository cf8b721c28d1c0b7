//! Hugging Face tensor names and shapes <-> topcoat's [`ParamLayout`].
//!
//! GPT-2: topcoat's names are the Hugging Face names without the `transformer.` prefix, and
//! the four Conv1D weights (`c_attn`, `attn.c_proj`, `c_fc`, `mlp.c_proj`) are stored
//! `[in, out]` there and `[out, in]` here, so they are transposed. Llama family: the names are
//! the same but for the two fused tensors, `self_attn.qkv_proj` (q_proj, k_proj, v_proj rows
//! stacked, weights and Qwen2's biases alike) and `mlp.gate_up_proj` (gate_proj over up_proj).
//! Both: the token embedding (and an untied head) has `vocab_size` rows there and
//! `padded_vocab_size` here, the padding rows zero.

use super::Arch;
use crate::config::ModelConfig;
use crate::model::ParamLayout;

/// One Hugging Face tensor: its name and its shape there.
#[derive(Clone, Debug, PartialEq)]
pub struct Part {
    pub name: String,
    pub shape: Vec<usize>,
}

impl Part {
    /// Rows and row width in topcoat's orientation.
    fn rows_cols(&self, transpose: bool) -> (usize, usize) {
        let n: usize = self.shape.iter().product();
        let rows = if transpose {
            self.shape[1]
        } else {
            self.shape[0]
        };
        (rows, n / rows.max(1))
    }
}

/// How topcoat tensor `spec` (an index into the layout) is made of Hugging Face tensors: the
/// parts' rows stacked, each transposed first where `transpose` (GPT-2's Conv1D), then zero
/// rows up to the topcoat shape (the vocabulary padding).
#[derive(Clone, Debug, PartialEq)]
pub struct Mapping {
    pub spec: usize,
    pub parts: Vec<Part>,
    pub transpose: bool,
}

/// Buffers some transformers versions save beside the weights and that topcoat recomputes:
/// GPT-2's causal mask (`attn.bias`, `attn.masked_bias`) and RoPE's `inv_freq`.
pub fn is_buffer(name: &str) -> bool {
    name.ends_with(".attn.bias")
        || name.ends_with(".attn.masked_bias")
        || name.ends_with("rotary_emb.inv_freq")
}

/// GPT-2's Conv1D weights, stored `[in, out]`.
fn is_conv1d(name: &str) -> bool {
    [
        ".attn.c_attn.weight",
        ".attn.c_proj.weight",
        ".mlp.c_fc.weight",
        ".mlp.c_proj.weight",
    ]
    .iter()
    .any(|s| name.ends_with(s))
}

/// The Hugging Face tensors of every topcoat tensor of `cfg` exported as (or imported from)
/// `arch`, whose embedding has `vocab_rows` rows there. `prefix` goes before every GPT-2 name
/// (`transformer.`, or nothing in the oldest GPT-2 files).
pub fn mappings(cfg: &ModelConfig, vocab_rows: usize, prefix: &str) -> Vec<Mapping> {
    let layout = ParamLayout::new(cfg);
    let hs = cfg.head_size();
    let (q_rows, kv_rows) = (cfg.n_head * hs, cfg.n_kv_head() * hs);
    let c = cfg.n_embd;
    let is_gpt2 = Arch::of_config(cfg) == Arch::Gpt2;
    layout
        .specs
        .iter()
        .enumerate()
        .map(|(i, spec)| {
            let mut shape = spec.shape.clone();
            if i == layout.wte || Some(i) == layout.lm_head {
                shape[0] = vocab_rows;
            }
            let single = |name: String, shape: Vec<usize>| vec![Part { name, shape }];
            let (parts, transpose) = if is_gpt2 {
                let transpose = is_conv1d(&spec.name);
                if transpose {
                    shape.reverse();
                }
                (single(format!("{prefix}{}", spec.name), shape), transpose)
            } else if let Some(stem) = spec.name.strip_suffix("qkv_proj.weight") {
                let p = |w: &str, rows| Part {
                    name: format!("{stem}{w}_proj.weight"),
                    shape: vec![rows, c],
                };
                (
                    vec![p("q", q_rows), p("k", kv_rows), p("v", kv_rows)],
                    false,
                )
            } else if let Some(stem) = spec.name.strip_suffix("qkv_proj.bias") {
                let p = |w: &str, rows| Part {
                    name: format!("{stem}{w}_proj.bias"),
                    shape: vec![rows],
                };
                (
                    vec![p("q", q_rows), p("k", kv_rows), p("v", kv_rows)],
                    false,
                )
            } else if let Some(stem) = spec.name.strip_suffix("gate_up_proj.weight") {
                let rows = shape[0] / 2;
                let p = |w: &str| Part {
                    name: format!("{stem}{w}_proj.weight"),
                    shape: vec![rows, c],
                };
                (vec![p("gate"), p("up")], false)
            } else {
                (single(spec.name.clone(), shape), false)
            };
            Mapping {
                spec: i,
                parts,
                transpose,
            }
        })
        .collect()
}

/// `src`, a row-major `[rows, cols]` matrix, as `[cols, rows]`.
fn transpose(src: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; src.len()];
    for r in 0..rows {
        for (cc, &v) in src[r * cols..(r + 1) * cols].iter().enumerate() {
            out[cc * rows + r] = v;
        }
    }
    out
}

/// The topcoat tensor of `numel` values built from the values of `m`'s parts (in order).
pub fn assemble(m: &Mapping, parts: Vec<Vec<f32>>, numel: usize) -> Vec<f32> {
    if parts.len() == 1 && !m.transpose && parts[0].len() == numel {
        return parts.into_iter().next().expect("one part");
    }
    let mut out = Vec::with_capacity(numel);
    for (part, v) in m.parts.iter().zip(parts) {
        if m.transpose {
            // Stored [in, out]: the topcoat rows are its columns.
            out.extend(transpose(&v, part.shape[0], part.shape[1]));
        } else {
            out.extend(v);
        }
    }
    debug_assert!(out.len() <= numel);
    out.resize(numel, 0.0);
    out
}

/// The Hugging Face tensors of `m` cut from topcoat tensor `values` (the inverse of
/// [`assemble`]: padding rows dropped, fused tensors split, Conv1D weights transposed back).
pub fn split(m: &Mapping, values: &[f32]) -> Vec<Vec<f32>> {
    let mut at = 0;
    m.parts
        .iter()
        .map(|part| {
            let (rows, cols) = part.rows_cols(m.transpose);
            let v = &values[at..at + rows * cols];
            at += rows * cols;
            if m.transpose {
                transpose(v, rows, cols)
            } else {
                v.to_vec()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Family, LlamaShape};

    /// Every topcoat tensor of a Qwen2-like and of a GPT-2 config splits into its Hugging Face
    /// parts and assembles back to itself; the fused names and the transposed shapes are
    /// Hugging Face's.
    #[test]
    fn split_then_assemble_is_the_identity() {
        let mut qwen = ModelConfig::preset("llama-tiny", 100).unwrap();
        qwen.family = Family::Llama(LlamaShape {
            qkv_bias: true,
            ..LlamaShape::new(2, 48)
        });
        let gpt2 = ModelConfig::preset("tiny", 100).unwrap();
        for (cfg, prefix) in [(qwen, ""), (gpt2, "transformer.")] {
            let layout = ParamLayout::new(&cfg);
            let maps = mappings(&cfg, cfg.vocab_size, prefix);
            let mut rng = crate::rng::Rng::new(7);
            for m in &maps {
                let spec = &layout.specs[m.spec];
                let mut v: Vec<f32> = (0..spec.numel()).map(|_| rng.normal()).collect();
                if m.spec == layout.wte || Some(m.spec) == layout.lm_head {
                    v[cfg.vocab_size * cfg.n_embd..].fill(0.0);
                }
                let parts = split(m, &v);
                for (p, pv) in m.parts.iter().zip(&parts) {
                    assert_eq!(p.shape.iter().product::<usize>(), pv.len(), "{}", p.name);
                }
                assert_eq!(assemble(m, parts, spec.numel()), v, "{}", spec.name);
            }
            let names: Vec<&str> = maps
                .iter()
                .flat_map(|m| m.parts.iter().map(|p| p.name.as_str()))
                .collect();
            if prefix.is_empty() {
                assert!(names.contains(&"model.layers.1.self_attn.k_proj.bias"));
                assert!(names.contains(&"model.layers.3.mlp.up_proj.weight"));
            } else {
                let fc = maps
                    .iter()
                    .flat_map(|m| &m.parts)
                    .find(|p| p.name == "transformer.h.0.mlp.c_fc.weight")
                    .unwrap();
                assert_eq!(fc.shape, vec![cfg.n_embd, 4 * cfg.n_embd]);
            }
        }
    }
}
