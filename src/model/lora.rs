//! LoRA on the model (config/lora.rs has the settings, params.rs the adapter tensors): the
//! adapters' forward and backward beside each targeted projection, switching them off (the
//! reference model of DPO and RL), and merging them into the base weights.
//!
//! A targeted projection computes `y = x W^T` and then, with adapters on,
//! `y[:, col..col+width] += s * (drop(x) A^T) B^T`; `s = alpha / rank`, `drop` PEFT's dropout
//! on the adapter's input (training passes only). The base weights are frozen.

use super::{Gpt, ModelError, ParamLayout, Result};
use crate::backend::Backend;
use crate::config::{LoraConfig, ModelConfig};

impl<B: Backend> Gpt<B> {
    /// A LoRA model: the base model's tensors `base_values` (in `base_cfg`'s layout, e.g. a
    /// checkpoint's) frozen, and fresh adapters per `lora` (A drawn from `seed`, B zero), so
    /// its output equals the base model's until B moves.
    pub fn with_lora(
        be: &B,
        base_cfg: &ModelConfig,
        base_values: Vec<Vec<f32>>,
        lora: LoraConfig,
        seed: u64,
    ) -> Result<Self> {
        let _ = (be, base_cfg, base_values, lora, seed);
        Err(ModelError::Invalid("LoRA: not implemented yet".into()))
    }

    /// Switches every adapter off (the model computes the frozen base alone: DPO's and RL's
    /// reference) or back on. A no-op on a model without adapters.
    pub fn set_adapters_enabled(&mut self, on: bool) {
        let _ = on;
    }

    /// Whether the adapters take part in the forward pass (true for a model without any).
    pub fn adapters_enabled(&self) -> bool {
        true
    }

    /// Seeds LoRA dropout's mask for the next training pass (the same seed gives the same
    /// mask on every backend, so a resumed run repeats it).
    pub fn set_lora_dropout_seed(&mut self, seed: u64) {
        let _ = seed;
    }
}

/// The base model's config and tensors with every adapter of `values` (a LoRA model's tensors
/// in `cfg`'s layout) merged in: `W[col + i, :] += s * (B A)[i, :]`, computed in f64 and rounded
/// once. A model without adapters comes back unchanged.
pub fn merged(cfg: &ModelConfig, mut values: Vec<Vec<f32>>) -> (ModelConfig, Vec<Vec<f32>>) {
    let Some(lora) = &cfg.lora else {
        return (cfg.clone(), values);
    };
    let layout = ParamLayout::new(cfg);
    let (scale, r) = (lora.scale() as f64, lora.rank);
    for slot in &layout.lora {
        let (a, b) = (&values[slot.a], &values[slot.b]);
        let mut delta = vec![0f32; slot.width * slot.in_dim];
        for (i, row) in delta.chunks_mut(slot.in_dim).enumerate() {
            for (j, d) in row.iter_mut().enumerate() {
                let dot: f64 = (0..r)
                    .map(|k| b[i * r + k] as f64 * a[k * slot.in_dim + j] as f64)
                    .sum();
                *d = (scale * dot) as f32;
            }
        }
        let w = &mut values[slot.base];
        let start = slot.col * slot.in_dim;
        for (wv, d) in w[start..start + delta.len()].iter_mut().zip(&delta) {
            *wv += d;
        }
    }
    values.truncate(layout.num_base_tensors());
    let mut base = cfg.clone();
    base.lora = None;
    (base, values)
}
