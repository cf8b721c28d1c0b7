//! LoRA on the model (config/lora.rs has the settings, params.rs the adapter tensors): the
//! adapters' forward and backward beside each targeted projection, switching them off (the
//! reference model of DPO and RL), and merging them into the base weights.
//!
//! A targeted projection computes `y = x W^T` and then, with adapters on,
//! `y[:, col..col+width] += s * (drop(x) A^T) B^T`; `s = alpha / rank`, `drop` PEFT's dropout
//! on the adapter's input (training passes only). The base weights are frozen.

mod pass;

pub use pass::{slot_seed, LoraActs};
pub(super) use pass::{Adapters, LoraGrads, LoraPass};

use super::{Gpt, Init, ModelError, ParamLayout, Result};
use crate::backend::Backend;
use crate::config::{LoraConfig, ModelConfig};
use crate::rng::Rng;

/// The adapters' switch and dropout seed on a model ([`Gpt`] keeps one).
#[derive(Clone, Copy, Debug)]
pub(super) struct LoraSwitch {
    /// The adapters take part in forward passes (true unless switched off).
    pub on: bool,
    /// The seed of the next training pass's dropout masks.
    pub seed: u64,
    /// Set for the duration of a pass that a backward follows (dropout applies there only).
    pub grad_pass: bool,
}

impl Default for LoraSwitch {
    fn default() -> Self {
        Self {
            on: true,
            seed: 0,
            grad_pass: false,
        }
    }
}

impl<B: Backend> Gpt<B> {
    /// A LoRA model: the base model's tensors `base_values` (in `base_cfg`'s layout, e.g. a
    /// checkpoint's) frozen, and fresh adapters per `lora` (A drawn from `seed`, B zero), so
    /// its output equals the base model's until B moves.
    pub fn with_lora(
        be: &B,
        base_cfg: &ModelConfig,
        mut base_values: Vec<Vec<f32>>,
        lora: LoraConfig,
        seed: u64,
    ) -> Result<Self> {
        if base_cfg.lora.is_some() {
            return Err(ModelError::Invalid(
                "with_lora: the base model already has adapters (merge them first)".into(),
            ));
        }
        let mut cfg = base_cfg.clone();
        cfg.lora = Some(lora);
        cfg.validate()
            .map_err(|e| ModelError::Invalid(e.to_string()))?;
        let layout = ParamLayout::new(&cfg);
        let n_base = layout.num_base_tensors();
        if base_values.len() != n_base {
            return Err(ModelError::Invalid(format!(
                "with_lora: expected {n_base} base tensors, got {}",
                base_values.len()
            )));
        }
        let mut rng = Rng::new(seed);
        for spec in &layout.specs[n_base..] {
            let n = spec.numel();
            base_values.push(match spec.init {
                Init::Uniform(bound) => (0..n)
                    .map(|_| (2.0 * rng.next_f32() - 1.0) * bound)
                    .collect(),
                _ => vec![0.0; n],
            });
        }
        Self::from_values(be, &cfg, base_values)
    }

    /// Switches every adapter off (the model computes the frozen base alone: DPO's and RL's
    /// reference) or back on. A no-op on a model without adapters.
    pub fn set_adapters_enabled(&mut self, on: bool) {
        self.lora_switch.on = on;
    }

    /// Whether the adapters take part in the forward pass (true for a model without any).
    pub fn adapters_enabled(&self) -> bool {
        self.lora_switch.on
    }

    /// Seeds LoRA dropout's mask for the next training pass (the same seed gives the same
    /// mask on every backend, so a resumed run repeats it). Dropout applies only in passes a
    /// backward follows (`forward_backward*`, `sequence_logps_step`, `token_logps_step`);
    /// each uses the seed set last, mixed with the adapter's index ([`slot_seed`]).
    pub fn set_lora_dropout_seed(&mut self, seed: u64) {
        self.lora_switch.seed = seed;
    }

    /// Runs `f` as a pass a backward follows: LoRA dropout applies in its forward. The
    /// gradient entry points (`forward_backward*`, `*_logps_step`) use it themselves; a caller
    /// pairing [`Gpt::reward_forward`] with [`Gpt::reward_backward`] wraps the forward in it.
    pub fn grad_pass<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.lora_switch.grad_pass = true;
        let out = f(self);
        self.lora_switch.grad_pass = false;
        out
    }
}

/// The adapters of a forward pass over `acts` (`None` without adapters or with them off),
/// noting in `acts` whether they ran and with which dropout seed, for the backward.
pub(super) fn forward_pass<'a, B: Backend>(
    cfg: &ModelConfig,
    layout: &'a ParamLayout,
    params: &'a [B::Buf],
    switch: LoraSwitch,
    acts: Option<&'a mut LoraActs<B>>,
) -> Option<LoraPass<'a, B>> {
    let (lora, acts) = (cfg.lora.as_ref()?, acts?);
    acts.active = switch.on;
    let drop = switch.grad_pass && lora.dropout > 0.0;
    acts.dropout_seed = drop.then_some(switch.seed);
    if !switch.on {
        return None;
    }
    let seed = acts.dropout_seed;
    Some(LoraPass {
        ad: Adapters {
            slots: &layout.lora,
            p: params,
            scale: lora.scale(),
            rank: lora.rank,
            rate: lora.dropout,
            seed,
        },
        acts,
    })
}

/// The adapters of the backward of the last forward pass (as that pass ran them).
pub(super) fn backward_pass<'a, B: Backend>(
    cfg: &ModelConfig,
    layout: &'a ParamLayout,
    params: &'a [B::Buf],
    acts: Option<&'a mut LoraActs<B>>,
) -> Option<LoraPass<'a, B>> {
    let (lora, acts) = (cfg.lora.as_ref()?, acts?);
    if !acts.active {
        return None;
    }
    Some(LoraPass {
        ad: Adapters {
            slots: &layout.lora,
            p: params,
            scale: lora.scale(),
            rank: lora.rank,
            rate: lora.dropout,
            seed: acts.dropout_seed,
        },
        acts,
    })
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
