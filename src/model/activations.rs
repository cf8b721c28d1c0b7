//! Activation buffers of one forward pass, kept for the backward pass, and the gradient
//! scratch buffers the backward pass reuses layer after layer.
//!
//! Activation recompute (llm.c's levels) drops buffers from every layer for one shared
//! buffer: level 1 keeps no GELU output per layer (the backward recomputes it from the stored
//! pre-activation `fch`), level 2 also keeps no layernorm output `ln1`/`ln2` per layer (the
//! backward recomputes it from the stored residual stream; the saved mean/rstd are rewritten
//! with the same values).
//!
//! A Llama-family model keeps its blocks' buffers in [`Activations::llama`]
//! (`super::llama::LlamaLayerActs`) and leaves `layers` empty; the buffers around the blocks
//! (embedding, final norm, logits, losses) are shared by both families. Its recompute levels
//! are the same with SwiGLU for GELU and RMSNorm for layernorm ([`Shared::swiglu`]).

use super::head::{logit_chunk_rows, HeadState};
use super::llama::LlamaLayerActs;
use super::lora::{LoraActs, LoraGrads};
use super::ParamLayout;
use crate::backend::{Backend, Result, Role};
use crate::config::ModelConfig;

/// What one transformer block saves during the forward pass (shapes for `N = B*T` rows).
pub struct LayerActs<B: Backend> {
    /// `[N*C]` layernorm 1 output (`None` at recompute 2: [`Shared::ln`]) and its saved
    /// statistics `[N]`.
    pub ln1: Option<B::Buf>,
    pub ln1_mean: B::Buf,
    pub ln1_rstd: B::Buf,
    /// `[N*3C]` query, key and value.
    pub qkv: B::Buf,
    /// `[N*C]` attention output (heads concatenated) and `[B*NH*T]` row log-sum-exps.
    pub atty: B::Buf,
    pub lse: B::Buf,
    /// `[N*C]` attention projection output.
    pub attproj: B::Buf,
    /// `[N*C]` residual stream after attention.
    pub residual2: B::Buf,
    /// `None` at recompute 2 (the shared buffer holds it while it is needed).
    pub ln2: Option<B::Buf>,
    pub ln2_mean: B::Buf,
    pub ln2_rstd: B::Buf,
    /// `[N*4C]` MLP hidden pre-activation and its GELU (`None` at recompute 1 and 2:
    /// [`Shared::gelu`]).
    pub fch: B::Buf,
    pub fch_gelu: Option<B::Buf>,
    /// `[N*C]` MLP output and the residual stream after the block.
    pub fcproj: B::Buf,
    pub residual3: B::Buf,
}

/// The buffers recompute shares between layers: the forward writes a layer's GELU output
/// (or layernorm output) there, the next layer overwrites it, and the backward recomputes
/// each layer's into it just before use.
pub struct Shared<B: Backend> {
    /// `[N*4C]` at recompute >= 1.
    pub gelu: Option<B::Buf>,
    /// `[N*C]` at recompute 2.
    pub ln: Option<B::Buf>,
    /// Llama family: `[N*I]` SwiGLU output at recompute >= 1 (`gelu` is then `None`).
    pub swiglu: Option<B::Buf>,
}

/// The layer's own buffer when it keeps one, else the shared one.
pub fn pick<'a, B: Backend>(
    own: &'a mut Option<B::Buf>,
    shared: &'a mut Option<B::Buf>,
) -> &'a mut B::Buf {
    own.as_mut()
        .or(shared.as_mut())
        .expect("a recomputed buffer has a shared one")
}

/// [`pick`] for reading.
pub fn pick_ref<'a, B: Backend>(own: &'a Option<B::Buf>, shared: &'a Option<B::Buf>) -> &'a B::Buf {
    own.as_ref()
        .or(shared.as_ref())
        .expect("a recomputed buffer has a shared one")
}

/// All activations for one `(B, T)` shape.
pub struct Activations<B: Backend> {
    pub b: usize,
    pub t: usize,
    /// The recompute level they were allocated for (0, 1 or 2).
    pub recompute: u8,
    pub shared: Shared<B>,
    /// `[N*C]` token + position embedding (the residual stream entering block 0).
    pub encoded: B::Buf,
    /// GPT-2 blocks (empty for the Llama family).
    pub layers: Vec<LayerActs<B>>,
    /// Llama-family blocks (empty for GPT-2).
    pub llama: Vec<LlamaLayerActs<B>>,
    /// `[N*C]` final norm output (GPT-2's ln_f, Llama's RMSNorm) and its statistics `[N]`
    /// (Llama: `lnf_rstd` alone, fp32 `Stat`; `lnf_mean` unused).
    pub lnf: B::Buf,
    pub lnf_mean: B::Buf,
    pub lnf_rstd: B::Buf,
    /// `[rows*VP]` logits of one chunk of rows (all `N` after [`super::Gpt::forward`]; see
    /// head.rs); after a pass with a gradient, overwritten by their gradient.
    pub logits: B::Buf,
    /// What `logits` holds, and the staging buffers of a chunked head.
    pub head: HeadState<B>,
    /// `[N]` per-position loss (0 where the target is masked); fp32 on every backend (`State`),
    /// since stages sum it (sequence log-probabilities) and bf16 would round each term.
    pub losses: B::Buf,
    /// A LoRA model's adapter activations (model/lora/pass.rs): per adapter `u [N*r]`, plus
    /// one scratch `[N*width]` per distinct adapter output width and, with dropout, one
    /// `[N*in]` per distinct input width. `None` without adapters.
    pub lora: Option<LoraActs<B>>,
}

/// The adapter activations of a `n`-row pass of `cfg` (`None` without adapters).
pub(super) fn lora_acts<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    n: usize,
) -> Result<Option<LoraActs<B>>> {
    let Some(lora) = &cfg.lora else {
        return Ok(None);
    };
    let slots = ParamLayout::new(cfg).lora;
    LoraActs::new(be, cfg, &slots, n, lora.dropout > 0.0).map(Some)
}

/// Gradient scratch for the backward pass (one set, reused by every block).
pub struct GradScratch<B: Backend> {
    /// `[N*C]` gradient flowing along the residual stream.
    pub dresidual: B::Buf,
    pub dln: B::Buf,
    pub datty: B::Buf,
    /// `[N*qkv_width]` (GPT-2: `[N*3C]`).
    pub dqkv: B::Buf,
    /// `[N*4C]` gradient on the GELU's input (`matmul_gelu_backward` goes straight there
    /// from the fc_proj output gradient); Llama: `[N*2I]` on the SwiGLU's input `gate_up`.
    pub dfch: B::Buf,
    /// Llama: `[N*I]` gradient on the SwiGLU output (`None` for GPT-2).
    pub dswiglu: Option<B::Buf>,
    /// A LoRA model's adapter gradient scratch: `du [N*r]`, one `[N*in]` per distinct adapter
    /// input width, and GPT-2 with a `down` adapter `[N*4C]` (model/lora/pass.rs).
    pub lora: Option<LoraGrads<B>>,
    /// GPT-2 with a LoRA `down` adapter: `[N*4C]`, the gradient on the GELU's output (the
    /// adapter's input gradient joins the base's before the GELU's backward).
    pub dgelu: Option<B::Buf>,
}

impl<B: Backend> Activations<B> {
    /// The buffers of a `(b, t)` pass at `recompute` level 0, 1 or 2.
    pub fn new(be: &B, cfg: &ModelConfig, b: usize, t: usize, recompute: u8) -> Result<Self> {
        if cfg.llama().is_some() {
            return Self::new_llama(be, cfg, b, t, recompute);
        }
        let (n, c) = (b * t, cfg.n_embd);
        let z = |len: usize| be.zeros(len, Role::Activation);
        // A buffer each layer keeps unless recompute is at least `level`.
        let kept = |level: u8, len: usize| -> Result<Option<B::Buf>> {
            (recompute < level).then(|| z(len)).transpose()
        };
        let shared = Shared {
            gelu: (recompute >= 1).then(|| z(n * 4 * c)).transpose()?,
            ln: (recompute >= 2).then(|| z(n * c)).transpose()?,
            swiglu: None,
        };
        let rows = logit_chunk_rows(n, cfg.padded_vocab_size);
        let (logits, head) = HeadState::alloc(be, cfg, n, rows)?;
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for _ in 0..cfg.n_layer {
            layers.push(LayerActs {
                ln1: kept(2, n * c)?,
                ln1_mean: z(n)?,
                ln1_rstd: z(n)?,
                qkv: z(n * 3 * c)?,
                atty: z(n * c)?,
                lse: be.zeros(b * cfg.n_head * t, Role::Stat)?,
                attproj: z(n * c)?,
                residual2: z(n * c)?,
                ln2: kept(2, n * c)?,
                ln2_mean: z(n)?,
                ln2_rstd: z(n)?,
                fch: z(n * 4 * c)?,
                fch_gelu: kept(1, n * 4 * c)?,
                fcproj: z(n * c)?,
                residual3: z(n * c)?,
            });
        }
        Ok(Self {
            b,
            t,
            recompute,
            shared,
            encoded: z(n * c)?,
            layers,
            llama: Vec::new(),
            lnf: z(n * c)?,
            lnf_mean: z(n)?,
            lnf_rstd: z(n)?,
            logits,
            head,
            losses: be.zeros(n, Role::State)?,
            lora: lora_acts(be, cfg, n)?,
        })
    }
}

impl<B: Backend> Activations<B> {
    /// Elements of every `Activation`-role buffer (the shared ones, the logits and a chunked
    /// head's staging included; the fp32 `lse` statistics and `losses` are not activations of
    /// that role).
    pub fn activation_elements(&self, be: &B) -> usize {
        let len = |x: &Option<B::Buf>| x.as_ref().map_or(0, |x| be.len(x));
        let mut n = len(&self.shared.gelu) + len(&self.shared.ln) + len(&self.shared.swiglu);
        n += self.head.activation_elements(be);
        n += self.lora.as_ref().map_or(0, |l| l.activation_elements(be));
        n += self
            .llama
            .iter()
            .map(|l| l.activation_elements(be))
            .sum::<usize>();
        n += [
            &self.encoded,
            &self.lnf,
            &self.lnf_mean,
            &self.lnf_rstd,
            &self.logits,
        ]
        .iter()
        .map(|x| be.len(x))
        .sum::<usize>();
        if !self.llama.is_empty() {
            n -= be.len(&self.lnf_rstd); // fp32 `Stat` for the Llama family
        }
        for l in &self.layers {
            n += len(&l.ln1) + len(&l.ln2) + len(&l.fch_gelu);
            n += [
                &l.ln1_mean,
                &l.ln1_rstd,
                &l.qkv,
                &l.atty,
                &l.attproj,
                &l.residual2,
                &l.ln2_mean,
                &l.ln2_rstd,
                &l.fch,
                &l.fcproj,
                &l.residual3,
            ]
            .iter()
            .map(|x| be.len(x))
            .sum::<usize>();
        }
        n
    }
}

impl<B: Backend> GradScratch<B> {
    /// Elements of every buffer (all of the `Activation` role).
    pub fn elements(&self, be: &B) -> usize {
        let len = |x: &Option<B::Buf>| x.as_ref().map_or(0, |x| be.len(x));
        [
            &self.dresidual,
            &self.dln,
            &self.datty,
            &self.dqkv,
            &self.dfch,
        ]
        .iter()
        .map(|x| be.len(x))
        .sum::<usize>()
            + len(&self.dswiglu)
            + len(&self.dgelu)
            + self.lora.as_ref().map_or(0, |l| l.elements(be))
    }

    pub fn new(be: &B, cfg: &ModelConfig, n: usize) -> Result<Self> {
        let c = cfg.n_embd;
        let z = |len: usize| be.zeros(len, Role::Activation);
        let llama = cfg.llama().is_some();
        let mlp = cfg.mlp_width();
        Ok(Self {
            dresidual: z(n * c)?,
            dln: z(n * c)?,
            datty: z(n * c)?,
            dqkv: z(n * cfg.qkv_width())?,
            dfch: z(n * if llama { 2 * mlp } else { mlp })?,
            dswiglu: llama.then(|| z(n * mlp)).transpose()?,
            lora: cfg
                .lora
                .is_some()
                .then(|| LoraGrads::new(be, cfg, &ParamLayout::new(cfg).lora, n))
                .transpose()?,
            dgelu: (!llama
                && cfg
                    .lora
                    .as_ref()
                    .is_some_and(|l| l.targets.contains(&crate::config::LoraTarget::Down)))
            .then(|| z(n * mlp))
            .transpose()?,
        })
    }
}
