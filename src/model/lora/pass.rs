//! The adapters' arithmetic inside one pass: after a targeted projection `y = x W^T` (+ bias),
//! for each adapter on it, `xd = drop(x)`, `u = xd A^T` (kept per adapter for the backward),
//! `t = u B^T`, `y[:, col..col+width] += s t`; and the backward of that, run right after the
//! base projection's own backward has written `dx`.
//!
//! Buffers (`N` rows of the pass, `r` the rank; [`LoraActs`] with the activations,
//! [`LoraGrads`] with the gradient scratch):
//! - per adapter `u [N*r]` (Activation role), kept from the forward for the backward;
//! - one scratch `[N*width]` per distinct adapter output width (`t` in the forward, `dt` in
//!   the backward) and, with dropout, one `[N*in]` per distinct input width (`xd`, recomputed
//!   from the seed in the backward instead of stored);
//! - backward only: `du [N*r]`, one `[N*in]` per distinct input width (`dxl`); and for GPT-2
//!   with a `down` adapter `GradScratch::dgelu [N*4C]` (the adapter's input gradient must join
//!   the base's before the GELU's backward, which `matmul_gelu_backward` would fuse away).

use super::super::LoraSlot;
use crate::backend::cpu::lora::splitmix64;
use crate::backend::{Backend, Result, Role};
use crate::config::ModelConfig;

/// Buffers found by their length (a handful per model: one per distinct width).
pub struct Pool<B: Backend>(Vec<B::Buf>);

impl<B: Backend> Pool<B> {
    /// One zeroed buffer per distinct length of `lens`.
    fn new(be: &B, lens: impl IntoIterator<Item = usize>) -> Result<Self> {
        let mut lens: Vec<usize> = lens.into_iter().collect();
        lens.sort_unstable();
        lens.dedup();
        Ok(Self(
            lens.into_iter()
                .map(|n| be.zeros(n, Role::Activation))
                .collect::<Result<_>>()?,
        ))
    }

    /// The buffer of `len` elements (allocated by `new`).
    fn get(&mut self, be: &B, len: usize) -> &mut B::Buf {
        self.0
            .iter_mut()
            .find(|b| be.len(b) == len)
            .expect("a LoRA scratch buffer of every width the adapters use")
    }

    /// Elements held.
    fn elements(&self, be: &B) -> usize {
        self.0.iter().map(|b| be.len(b)).sum()
    }
}

/// What the adapters keep from a forward pass of `N` rows.
pub struct LoraActs<B: Backend> {
    /// Per adapter (in `ParamLayout::lora` order), `u = drop(x) A^T` `[N*r]`.
    pub u: Vec<B::Buf>,
    /// `t` / `dt` `[N*width]` and, with dropout, `xd` `[N*in]`, by length.
    scratch: Pool<B>,
    /// Whether the adapters took part in the last forward pass, and the dropout seed it used
    /// (`None`: no dropout), for its backward.
    pub active: bool,
    pub dropout_seed: Option<u64>,
}

impl<B: Backend> LoraActs<B> {
    /// The buffers for `n` rows of a model of `cfg` (which has adapters), with room for
    /// dropout's `xd` when `dropout` (training passes; a decode step never drops).
    pub fn new(
        be: &B,
        cfg: &ModelConfig,
        slots: &[LoraSlot],
        n: usize,
        dropout: bool,
    ) -> Result<Self> {
        let r = cfg.lora.as_ref().map_or(0, |l| l.rank);
        let widths = slots.iter().map(|s| n * s.width);
        let ins = slots.iter().filter(|_| dropout).map(|s| n * s.in_dim);
        Ok(Self {
            u: slots
                .iter()
                .map(|_| be.zeros(n * r, Role::Activation))
                .collect::<Result<_>>()?,
            scratch: Pool::new(be, widths.chain(ins))?,
            active: false,
            dropout_seed: None,
        })
    }

    /// Elements of its buffers (all of the Activation role).
    pub fn activation_elements(&self, be: &B) -> usize {
        self.u.iter().map(|b| be.len(b)).sum::<usize>() + self.scratch.elements(be)
    }
}

/// The backward pass's own scratch for the adapters.
pub struct LoraGrads<B: Backend> {
    /// `[N*r]`.
    du: B::Buf,
    /// `dxl [N*in]` by length.
    dx: Pool<B>,
}

impl<B: Backend> LoraGrads<B> {
    pub fn new(be: &B, cfg: &ModelConfig, slots: &[LoraSlot], n: usize) -> Result<Self> {
        let r = cfg.lora.as_ref().map_or(0, |l| l.rank);
        Ok(Self {
            du: be.zeros(n * r, Role::Activation)?,
            dx: Pool::new(be, slots.iter().map(|s| n * s.in_dim))?,
        })
    }

    /// Elements of its buffers (all of the Activation role).
    pub fn elements(&self, be: &B) -> usize {
        be.len(&self.du) + self.dx.elements(be)
    }
}

/// The adapters as one pass sees them: the model's slots and tensors, the scale, and the
/// dropout of this pass (`None`: none).
pub struct Adapters<'a, B: Backend> {
    pub slots: &'a [LoraSlot],
    pub p: &'a [B::Buf],
    pub scale: f32,
    pub rank: usize,
    pub rate: f32,
    pub seed: Option<u64>,
}

/// The seed of adapter `k`'s dropout mask in a pass seeded `seed`: each adapter (a layer and
/// target) draws its own mask.
pub fn slot_seed(seed: u64, k: usize) -> u64 {
    splitmix64(seed ^ splitmix64(0x4C6F_5241_0000_0000 ^ k as u64))
}

/// The adapters of one pass and the buffers they work in; `None` where the model has no
/// adapters or they are switched off, so each call site is one line.
pub struct LoraPass<'a, B: Backend> {
    pub ad: Adapters<'a, B>,
    pub acts: &'a mut LoraActs<B>,
}

impl<'a, B: Backend> LoraPass<'a, B> {
    /// Whether projection `base` of `layer` carries an adapter.
    pub fn has(pass: &Option<Self>, layer: usize, base: usize) -> bool {
        pass.as_ref().is_some_and(|p| {
            p.ad.slots
                .iter()
                .any(|s| s.layer == layer && s.base == base)
        })
    }

    /// Adds every adapter on projection `base` of `layer` into its output `y [N*out]`, given
    /// the projection's input `x [N*in]`. A no-op without adapters.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        pass: &mut Option<Self>,
        be: &B,
        layer: usize,
        base: usize,
        x: &B::Buf,
        y: &mut B::Buf,
        n: usize,
    ) -> Result<()> {
        let Some(LoraPass { ad, acts }) = pass.as_mut() else {
            return Ok(());
        };
        let LoraActs { u, scratch, .. } = &mut **acts;
        for (k, s) in ad.slots.iter().enumerate() {
            if s.layer != layer || s.base != base {
                continue;
            }
            let (r, inp) = (ad.rank, s.in_dim);
            match ad.seed {
                Some(seed) => {
                    let xd = scratch.get(be, n * inp);
                    be.dropout_forward(xd, x, n * inp, ad.rate, slot_seed(seed, k))?;
                    be.matmul_forward(&mut u[k], xd, &ad.p[s.a], None, n, inp, r)?;
                }
                None => be.matmul_forward(&mut u[k], x, &ad.p[s.a], None, n, inp, r)?,
            }
            let t = scratch.get(be, n * s.width);
            be.matmul_forward(t, &u[k], &ad.p[s.b], None, n, r, s.width)?;
            be.add_columns(y, t, n, s.out_dim, s.col, s.width, ad.scale)?;
        }
        Ok(())
    }

    /// The adapters' backward on projection `base` of `layer`, after the base projection's
    /// backward wrote `dx [N*in]` from `dy [N*out]`: accumulates `dA`, `dB` into `g` and adds
    /// each adapter's input gradient into `dx`. `x` is the input the forward saw.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        pass: &mut Option<Self>,
        be: &B,
        gs: Option<&mut LoraGrads<B>>,
        g: &mut [Option<B::Buf>],
        layer: usize,
        base: usize,
        x: &B::Buf,
        dy: &B::Buf,
        dx: &mut B::Buf,
        n: usize,
    ) -> Result<()> {
        let (Some(LoraPass { ad, acts }), Some(gs)) = (pass.as_mut(), gs) else {
            return Ok(());
        };
        let LoraActs { u, scratch, .. } = &mut **acts;
        for (k, s) in ad.slots.iter().enumerate() {
            if s.layer != layer || s.base != base {
                continue;
            }
            let (r, inp) = (ad.rank, s.in_dim);
            // dt = s * dy[:, col..col+width]; du = dt B; dB += dt^T u.
            let dt = scratch.get(be, n * s.width);
            be.copy_columns(dt, dy, n, s.out_dim, s.col, s.width, ad.scale)?;
            let db = g[s.b].as_mut();
            be.matmul_backward(&mut gs.du, db, None, dt, &u[k], &ad.p[s.b], n, r, s.width)?;
            // dxl = du A; dA += du^T drop(x).
            let dxl = gs.dx.get(be, n * inp);
            let da = g[s.a].as_mut();
            match ad.seed {
                Some(seed) => {
                    let seed = slot_seed(seed, k);
                    let xd = scratch.get(be, n * inp);
                    be.dropout_forward(xd, x, n * inp, ad.rate, seed)?;
                    be.matmul_backward(dxl, da, None, &gs.du, xd, &ad.p[s.a], n, inp, r)?;
                    let xd = scratch.get(be, n * inp);
                    be.dropout_backward(xd, dxl, n * inp, ad.rate, seed)?;
                    be.add_columns(dx, xd, n, inp, 0, inp, 1.0)?;
                }
                None => {
                    be.matmul_backward(dxl, da, None, &gs.du, x, &ad.p[s.a], n, inp, r)?;
                    be.add_columns(dx, dxl, n, inp, 0, inp, 1.0)?;
                }
            }
        }
        Ok(())
    }
}
