//! The model of either family: parameter layout, activations, and forward/backward written
//! once against `Backend`.
//!
//! GPT-2: learned positions, pre-LN blocks, a GELU (tanh) MLP, tied input/output embeddings.
//! The Llama family (llama/): RMSNorm, RoPE, grouped-query attention, a SwiGLU MLP, a tied or
//! untied head. Both have a vocabulary padded to a multiple of 64 whose padded logits never
//! take part in the loss, and optionally a reward head (reward.rs) on the final hidden state
//! (hidden.rs).

pub mod activations;
mod backward;
pub mod decode;
pub mod fit;
pub mod forward;
pub mod head;
mod hidden;
mod llama;
mod logprobs;
pub mod lora;
pub mod memory;
pub mod packing;
pub mod params;
pub mod reward;

pub use activations::{Activations, GradScratch};
pub use decode::KvCache;
pub use fit::{advise, Advice, BatchFlag, FitQuery};
pub use memory::{MemoryPlan, OutOfMemory, PlanOptions};
pub use packing::Packing;
pub use params::{Init, LayerIdx, LlamaLayerIdx, LoraSlot, ParamLayout, ParamSpec};
pub use reward::{RewardHead, RewardModel, RewardPass};

use crate::backend::{Backend, BackendError, Role};
use crate::config::ModelConfig;
use crate::rng::Rng;
use packing::PackedIds;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    OutOfMemory(#[from] Box<OutOfMemory>),
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// A model of either family (`cfg.family`: GPT-2 or Llama) living on backend `B`: parameters,
/// their gradients, and activation buffers sized for the last batch shape seen.
pub struct Gpt<B: Backend> {
    pub cfg: ModelConfig,
    pub layout: ParamLayout,
    pub params: Vec<B::Buf>,
    /// Per tensor, its gradient; `None` for a frozen tensor (`ParamSpec::trainable` false: a
    /// LoRA model's base), which has no gradient, master copy or optimizer moments.
    pub grads: Vec<Option<B::Buf>>,
    acts: Option<Activations<B>>,
    scratch: Option<GradScratch<B>>,
    /// The packing of the last forward pass, on the device (`None`: one sequence per row).
    packing: Option<PackedIds<B>>,
    /// Activation recompute level (0, 1 or 2; see [`Gpt::set_recompute`]).
    recompute: u8,
    /// Told by the backward pass each time a bucket of parameter gradients is final.
    grad_hook: Option<Box<dyn GradHook<B>>>,
    /// Llama family: the RoPE inverse frequencies `[hs/2]` (fp32 `State`), uploaded once.
    rope: Option<B::Buf>,
    /// Rows per chunk of the LM head forced by [`Gpt::set_logit_chunk_rows`] (head.rs).
    logit_chunk: Option<usize>,
    /// LoRA: the adapters' switch and dropout seed (unused without adapters).
    lora_switch: lora::LoraSwitch,
}

/// What the backward pass tells as it goes: data parallelism starts summing a bucket of
/// gradients across ranks while the rest of the backward pass still runs.
pub trait GradHook<B: Backend> {
    /// The gradients `grads[i]` for every `i` in `bucket` are final for this backward pass:
    /// each layer's, last to first, then the rest (embeddings, final layernorm, any head),
    /// whose tied `wte` gradient is final only at the very end.
    /// Buckets hold trained tensors only (every `grads[i]` of a bucket is `Some`).
    fn ready(&mut self, be: &B, grads: &mut [Option<B::Buf>], bucket: &[usize]) -> Result<()>;
}

impl<B: Backend> Gpt<B> {
    /// A model with its family's initialisation (GPT-2's, or normal(0.02) matrices for the
    /// Llama family) drawn from `seed`.
    pub fn init(be: &B, cfg: &ModelConfig, seed: u64) -> Result<Self> {
        let layout = ParamLayout::new(cfg);
        let values = layout.init_values(cfg, &mut Rng::new(seed));
        Self::from_values(be, cfg, values)
    }

    /// A model from host values, one `Vec` per tensor in [`ParamLayout`] order.
    pub fn from_values(be: &B, cfg: &ModelConfig, values: Vec<Vec<f32>>) -> Result<Self> {
        cfg.validate()
            .map_err(|e| ModelError::Invalid(e.to_string()))?;
        let layout = ParamLayout::new(cfg);
        if values.len() != layout.specs.len() {
            return Err(ModelError::Invalid(format!(
                "expected {} parameter tensors, got {}",
                layout.specs.len(),
                values.len()
            )));
        }
        let mut params = Vec::with_capacity(values.len());
        let mut grads = Vec::with_capacity(values.len());
        for (spec, v) in layout.specs.iter().zip(&values) {
            if v.len() != spec.numel() {
                return Err(ModelError::Invalid(format!(
                    "parameter {} has {} values, expected {} for shape {:?}",
                    spec.name,
                    v.len(),
                    spec.numel(),
                    spec.shape
                )));
            }
            let mut p = be.upload(v, Role::Param)?;
            if spec.trainable {
                grads.push(Some(be.zeros(v.len(), Role::Grad)?));
            } else {
                // Frozen: the working copy alone (bf16 on CUDA), no gradient.
                be.release_master(&mut p)?;
                grads.push(None);
            }
            params.push(p);
        }
        let rope = cfg
            .llama()
            .map(|s| be.upload(&s.rope_inv_freq(cfg.head_size()), Role::State))
            .transpose()?;
        Ok(Self {
            cfg: cfg.clone(),
            layout,
            params,
            grads,
            acts: None,
            scratch: None,
            packing: None,
            grad_hook: None,
            recompute: 0,
            rope,
            logit_chunk: None,
            lora_switch: lora::LoraSwitch::default(),
        })
    }

    /// Activation recompute, llm.c's levels: 0 keeps every activation for the backward pass,
    /// 1 keeps no GELU output (recomputed from the kept pre-activation), 2 also no layernorm
    /// output (recomputed from the kept residual stream). The Llama family's are the same with
    /// SwiGLU (from the kept gate/up projections) and RMSNorm. Gradients are the same bit for bit;
    /// the activation memory is [`MemoryPlan`]'s. Takes effect at the next forward pass.
    pub fn set_recompute(&mut self, level: u8) -> Result<()> {
        if level > 2 {
            return Err(ModelError::Invalid(format!(
                "recompute level {level}: must be 0, 1 or 2"
            )));
        }
        if level != self.recompute {
            self.recompute = level;
            self.acts = None;
        }
        Ok(())
    }

    /// The activation recompute level ([`Gpt::set_recompute`]).
    pub fn recompute(&self) -> u8 {
        self.recompute
    }

    /// Elements allocated for activations of the last forward pass (the `Activation` role
    /// buffers of [`Activations`], the logits included; `None` before any pass).
    pub fn activation_elements(&self, be: &B) -> Option<usize> {
        self.acts.as_ref().map(|a| a.activation_elements(be))
    }

    /// Elements of the backward pass's scratch (`GradScratch`, LoRA's included; all of the
    /// `Activation` role), `None` before any pass with a gradient.
    pub fn scratch_elements(&self, be: &B) -> Option<usize> {
        self.scratch.as_ref().map(|s| s.elements(be))
    }

    /// Drops every gradient and fp32 master copy: a model held for forward passes only (RL's
    /// reference and reward model) keeps one working copy of its weights, as the memory plan
    /// counts it. A later backward pass finds no gradient to write into and is refused.
    pub fn freeze(&mut self, be: &B) -> Result<()> {
        for (p, g) in self.params.iter_mut().zip(&mut self.grads) {
            be.release_master(p)?;
            *g = None;
        }
        Ok(())
    }

    /// Downloads every parameter tensor, in layout order.
    pub fn param_values(&self, be: &B) -> Result<Vec<Vec<f32>>> {
        download_all(be, &self.params)
    }

    /// Downloads every gradient tensor, in layout order (an empty `Vec` for a frozen tensor).
    pub fn grad_values(&self, be: &B) -> Result<Vec<Vec<f32>>> {
        self.grads
            .iter()
            .map(|g| g.as_ref().map_or(Ok(Vec::new()), |g| be.download(g)))
            .collect::<std::result::Result<_, _>>()
            .map_err(Into::into)
    }

    /// Sets (or, with `None`, clears) the hook the backward pass tells when a bucket of
    /// gradients is final; returns the previous one.
    pub fn set_grad_hook(
        &mut self,
        hook: Option<Box<dyn GradHook<B>>>,
    ) -> Option<Box<dyn GradHook<B>>> {
        std::mem::replace(&mut self.grad_hook, hook)
    }

    pub fn zero_grad(&mut self, be: &B) -> Result<()> {
        for g in self.grads.iter_mut().flatten() {
            be.fill_zero(g)?;
        }
        Ok(())
    }

    /// Global L2 norm of all gradients (the trained tensors').
    pub fn grad_norm(&self, be: &B) -> Result<f32> {
        let refs: Vec<&B::Buf> = self.grads.iter().flatten().collect();
        Ok(be.global_norm(&refs)?)
    }

    /// Makes sure activation buffers match `(b, t)`, reallocating only on a change of shape.
    fn ensure_acts(&mut self, be: &B, b: usize, t: usize) -> Result<()> {
        if b == 0 || t == 0 {
            return Err(ModelError::Invalid(format!("empty batch: B={b}, T={t}")));
        }
        if t > self.cfg.max_seq_len {
            return Err(ModelError::Invalid(format!(
                "sequence length {t} exceeds the model's max_seq_len {}",
                self.cfg.max_seq_len
            )));
        }
        let level = self.recompute;
        if !matches!(&self.acts, Some(a) if a.b == b && a.t == t && a.recompute == level) {
            self.acts = None; // free the old set first: both may not fit at once
            self.scratch = None;
            // The weights already live on the device: the new set must fit what is left.
            let opts = PlanOptions {
                recompute: level,
                logit_rows: self.logit_chunk,
                ..PlanOptions::default()
            };
            MemoryPlan::training_with(&self.cfg, b, t, opts, |r| be.element_bytes(r))
                .activations_only()
                .check(&be.name(), be.memory_available())?;
            self.acts = Some(Activations::new(be, &self.cfg, b, t, level)?);
        }
        // A new forward pass: whatever the logits buffer holds is stale.
        self.acts.as_mut().expect("allocated above").head.fresh = false;
        Ok(())
    }

    fn check_ids(
        &self,
        what: &str,
        ids: &[i32],
        b: usize,
        t: usize,
        allow_masked: bool,
    ) -> Result<()> {
        if ids.len() != b * t {
            return Err(ModelError::Invalid(format!(
                "{what}: {} ids for B*T = {}",
                ids.len(),
                b * t
            )));
        }
        let v = self.cfg.vocab_size as i32;
        if let Some((i, &id)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id >= v || (id < 0 && !(allow_masked && id == -1)))
        {
            return Err(ModelError::Invalid(format!(
                "{what}[{i}] = {id} is outside the vocabulary [0, {v}){}",
                if allow_masked {
                    " (or -1 for a masked target)"
                } else {
                    ""
                }
            )));
        }
        Ok(())
    }

    /// Per-position losses of the last forward with targets (`[B*T]`, 0 where masked).
    pub fn position_losses(&self, be: &B) -> Result<Vec<f32>> {
        let acts = self
            .acts
            .as_ref()
            .ok_or_else(|| ModelError::Invalid("no forward pass yet".into()))?;
        Ok(be.download(&acts.losses)?)
    }
}

/// Every buffer of `bufs` on the host, in order.
fn download_all<B: Backend>(be: &B, bufs: &[B::Buf]) -> Result<Vec<Vec<f32>>> {
    Ok(bufs
        .iter()
        .map(|b| be.download(b))
        .collect::<std::result::Result<_, _>>()?)
}
