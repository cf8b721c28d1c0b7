//! Generation with a key/value cache: the forward pass over new tokens only.
//!
//! A [`KvCache`] holds, per layer, the keys and values of every position seen so far for `B`
//! rows (`[B*Tmax*C]` each), all rows at the same length. `Tmax` starts at
//! `min(max_seq_len, 1024)` and doubles (up to `max_seq_len`) when a call needs more, the kept
//! positions copied over: an imported model's context can be 131072 positions, which no
//! sampling of a few hundred tokens should pay for up front. [`Gpt::extend`]
//! runs `Tn` new tokens per row through the network at positions `len .. len+Tn` (explicit
//! positions into the encoder), each block's attention reading the cache through
//! [`Backend::attention_cached_forward`]; only the last new position of each row goes through
//! the final layernorm and the tied head, into [`KvCache::logits`]. A prompt is one call with
//! `Tn` = its length (prefill), each generated token one call with `Tn = 1` (a decode step).
//! The arithmetic per position is that of [`Gpt::forward`], so greedy decoding with the cache
//! picks the same tokens as rerunning the whole context (tests/generate.rs).
//!
//! The Llama family (llama/decode.rs) runs the same steps with its own block: RoPE at
//! positions `len ..`, grouped-query attention over caches of `NKV` heads (`[B*Tmax*NKV*hs]`
//! each), RMSNorm and SwiGLU; the cache, the head and the sampling are shared.
//!
//! [`KvCache::truncate`] rolls the cache back to a shorter prefix (the rows past it are
//! overwritten by the next call), which is how a chat keeps a conversation's common prefix.

use super::lora::{self, LoraActs, LoraPass};
use super::{Gpt, ModelError, Result};
use crate::backend::{Backend, Role, SampleParams};
use crate::config::ModelConfig;

/// Scratch activations of one `extend` call for `N = B*Tn` rows, reused layer after layer.
/// (Llama: `qkv` is `[N*qkv_width]`, `fch` the gate | up projections `[N*2I]`, `fch_gelu`
/// their SwiGLU `[N*I]`, `rstd` fp32 `Stat` and `mean` unused.)
pub(super) struct StepActs<B: Backend> {
    pub(super) tn: usize,
    /// `[N*C]` residual stream entering the block, and after its attention half.
    pub(super) resid: B::Buf,
    pub(super) resid2: B::Buf,
    /// `[N*C]` layernorm output (ln1, then ln2) and its statistics `[N]`.
    pub(super) ln: B::Buf,
    pub(super) mean: B::Buf,
    pub(super) rstd: B::Buf,
    pub(super) qkv: B::Buf,
    pub(super) atty: B::Buf,
    pub(super) proj: B::Buf,
    pub(super) fch: B::Buf,
    pub(super) fch_gelu: B::Buf,
    /// A LoRA model's adapter buffers for `N` rows (no dropout: decoding trains nothing).
    pub(super) lora: Option<LoraActs<B>>,
}

impl<B: Backend> StepActs<B> {
    fn new(be: &B, cfg: &ModelConfig, b: usize, tn: usize) -> Result<Self> {
        let (n, c, mlp) = (b * tn, cfg.n_embd, cfg.mlp_width());
        let z = |len: usize| be.zeros(len, Role::Activation);
        let fch = if cfg.llama().is_some() { 2 * mlp } else { mlp };
        Ok(Self {
            tn,
            resid: z(n * c)?,
            resid2: z(n * c)?,
            ln: z(n * c)?,
            mean: z(n)?,
            rstd: be.zeros(n, stat_role(cfg))?,
            qkv: z(n * cfg.qkv_width())?,
            atty: z(n * c)?,
            proj: z(n * c)?,
            fch: z(n * fch)?,
            fch_gelu: z(n * mlp)?,
            lora: cfg
                .lora
                .is_some()
                .then(|| {
                    let slots = super::ParamLayout::new(cfg).lora;
                    LoraActs::new(be, cfg, &slots, n, false)
                })
                .transpose()?,
        })
    }
}

/// The role of a norm's saved statistics: GPT-2's layernorm keeps them as activations, the
/// Llama family's RMSNorm its `rstd` in fp32 (`Stat`).
fn stat_role(cfg: &ModelConfig) -> Role {
    if cfg.llama().is_some() {
        Role::Stat
    } else {
        Role::Activation
    }
}

/// `[B*C]` each row's last new position: its residual, its final norm and statistics `[B]`.
pub(super) struct LastPosition<B: Backend> {
    pub(super) resid: B::Buf,
    pub(super) lnf: B::Buf,
    pub(super) mean: B::Buf,
    pub(super) rstd: B::Buf,
}

/// The shape of one `extend` call: `b` rows of `tn` new tokens after `past` cached ones.
#[derive(Clone, Copy)]
pub(super) struct StepShape {
    pub(super) b: usize,
    pub(super) tn: usize,
    pub(super) past: usize,
    /// Positions per row the cache holds (its row stride).
    pub(super) tmax: usize,
}

impl StepShape {
    /// Positions run (`N = B*Tn`).
    pub(super) fn n(self) -> usize {
        self.b * self.tn
    }
}

impl<B: Backend> Gpt<B> {
    /// The adapters of a decode step over `acts` (as the model's switch says; never dropout).
    pub(super) fn step_adapters<'a>(
        &'a self,
        acts: Option<&'a mut LoraActs<B>>,
    ) -> Option<LoraPass<'a, B>> {
        let mut switch = self.lora_switch;
        switch.grad_pass = false;
        lora::forward_pass(&self.cfg, &self.layout, &self.params, switch, acts)
    }
}

/// Positions per row a new cache holds before it first grows (or `max_seq_len`, if less).
const INITIAL_POSITIONS: usize = 1024;

/// Keys and values of every position seen so far, for `B` rows, plus the logits of the last.
pub struct KvCache<B: Backend> {
    cfg: ModelConfig,
    b: usize,
    len: usize,
    /// Positions per row allocated (`Tmax`, at most `max_seq_len`).
    rows: usize,
    /// Per layer, `[B*Tmax*NKV*hs]` (GPT-2: `[B*Tmax*C]`).
    k: Vec<B::Buf>,
    v: Vec<B::Buf>,
    step: Option<StepActs<B>>,
    last: LastPosition<B>,
    /// `[B*VP]` logits of each row's last position.
    logits: B::Buf,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `b` rows of a model of shape `cfg`.
    pub fn new(be: &B, cfg: &ModelConfig, b: usize) -> Result<Self> {
        if b == 0 {
            return Err(ModelError::Invalid("a KV cache needs B >= 1 rows".into()));
        }
        let (c, tmax) = (cfg.n_embd, cfg.max_seq_len.min(INITIAL_POSITIONS));
        let kv = cfg.n_kv_head() * cfg.head_size();
        let z = |len: usize| be.zeros(len, Role::Activation);
        let mut k = Vec::with_capacity(cfg.n_layer);
        let mut v = Vec::with_capacity(cfg.n_layer);
        for _ in 0..cfg.n_layer {
            k.push(z(b * tmax * kv)?);
            v.push(z(b * tmax * kv)?);
        }
        Ok(Self {
            cfg: cfg.clone(),
            b,
            len: 0,
            rows: tmax,
            k,
            v,
            step: None,
            last: LastPosition {
                resid: z(b * c)?,
                lnf: z(b * c)?,
                mean: z(b)?,
                rstd: be.zeros(b, stat_role(cfg))?,
            },
            logits: z(b * cfg.padded_vocab_size)?,
        })
    }

    /// Rows.
    pub fn batch(&self) -> usize {
        self.b
    }

    /// Positions held per row.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Most positions per row (the model's `max_seq_len`).
    pub fn capacity(&self) -> usize {
        self.cfg.max_seq_len
    }

    /// Makes room for `need` positions per row (at most `max_seq_len`, checked by the caller):
    /// doubles `Tmax` (or more, to `need`), copying each row's kept positions through the host
    /// (lossless on every backend: a stored value read as f32 and written back is unchanged).
    fn reserve(&mut self, be: &B, need: usize) -> Result<()> {
        if need <= self.rows {
            return Ok(());
        }
        let new = need.max(2 * self.rows).min(self.cfg.max_seq_len);
        let kv = self.cfg.n_kv_head() * self.cfg.head_size();
        let keep = self.len * kv;
        // Every new buffer first, so that a failure leaves the cache as it was.
        let mut grown = Vec::with_capacity(2 * self.k.len());
        for buf in self.k.iter().chain(&self.v) {
            let mut host = vec![0f32; self.b * new * kv];
            for r in 0..self.b {
                let row = be.download_range(buf, r * self.rows * kv, keep)?;
                host[r * new * kv..][..keep].copy_from_slice(&row);
            }
            grown.push(be.upload(&host, Role::Activation)?);
        }
        self.v = grown.split_off(self.k.len());
        self.k = grown;
        self.rows = new;
        Ok(())
    }

    /// Keeps the first `len` positions (no-op if it holds fewer). The logits are stale until
    /// the next [`Gpt::extend`].
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The logits `[B*VP]` of each row's last position (valid after an `extend`).
    pub fn logits(&self) -> &B::Buf {
        &self.logits
    }

    /// Row `row`'s logits over the real vocabulary.
    pub fn logits_row(&self, be: &B, row: usize) -> Result<Vec<f32>> {
        if row >= self.b {
            return Err(ModelError::Invalid(format!(
                "row {row} of a {}-row cache",
                self.b
            )));
        }
        let vp = self.cfg.padded_vocab_size;
        Ok(be.download_range(&self.logits, row * vp, self.cfg.vocab_size)?)
    }

    /// One token per row from the current logits, drawn on the device.
    pub fn sample(&self, be: &B, params: &SampleParams, uniforms: &[f32]) -> Result<Vec<u32>> {
        if self.len == 0 {
            return Err(ModelError::Invalid(
                "sampling from an empty KV cache".into(),
            ));
        }
        let (v, vp) = (self.cfg.vocab_size, self.cfg.padded_vocab_size);
        Ok(be.sample_tokens(&self.logits, self.b, v, vp, params, uniforms)?)
    }
}

impl<B: Backend> Gpt<B> {
    /// Runs `tn` new tokens per row (`ids [B*Tn]`, row-major) at positions `len .. len+Tn` of
    /// `cache`, appending their keys and values; afterwards [`KvCache::logits`] holds the
    /// logits of each row's last new token. Errors (leaving the cache as it was) if the ids are
    /// outside the vocabulary or `len + Tn` exceeds `max_seq_len`.
    pub fn extend(&self, be: &B, cache: &mut KvCache<B>, ids: &[i32], tn: usize) -> Result<()> {
        self.check_extend(cache, ids, tn)?;
        cache.reserve(be, cache.len + tn)?;
        let shape = StepShape {
            b: cache.b,
            tn,
            past: cache.len,
            tmax: cache.rows,
        };
        if !matches!(&cache.step, Some(s) if s.tn == tn) {
            cache.step = None;
            cache.step = Some(StepActs::new(be, &self.cfg, shape.b, tn)?);
        }
        let s = cache.step.as_mut().expect("allocated above");
        if self.cfg.llama().is_some() {
            let (k, v, last) = (&mut cache.k, &mut cache.v, &mut cache.last);
            self.llama_extend(be, s, k, v, last, ids, shape)?;
        } else {
            self.embed_new(be, s, ids, shape)?;
            for l in 0..self.layout.layers.len() {
                self.block_step(be, s, &mut cache.k[l], &mut cache.v[l], l, shape)?;
                self.close_block(be, s, &mut cache.last, l, shape)?;
            }
        }
        self.head_step(be, s, &mut cache.last, &mut cache.logits, shape)?;
        cache.len = shape.past + tn;
        Ok(())
    }

    /// Refuses an `extend` the cache cannot take (see [`Gpt::extend`]).
    fn check_extend(&self, cache: &KvCache<B>, ids: &[i32], tn: usize) -> Result<()> {
        if cache.cfg != self.cfg {
            return Err(ModelError::Invalid(
                "the KV cache was made for a model of another shape".into(),
            ));
        }
        let (past, tmax) = (cache.len, self.cfg.max_seq_len);
        if tn == 0 {
            return Err(ModelError::Invalid("extend with no new tokens".into()));
        }
        if past + tn > tmax {
            return Err(ModelError::Invalid(format!(
                "{past} cached + {tn} new positions exceed the model's max_seq_len {tmax}"
            )));
        }
        self.check_ids("ids", ids, cache.b, tn, false)
    }

    /// Token plus position embeddings of the new tokens (explicit positions `past ..`), then
    /// the first block's ln_1.
    fn embed_new(&self, be: &B, s: &mut StepActs<B>, ids: &[i32], sh: StepShape) -> Result<()> {
        let (lay, p, c) = (&self.layout, &self.params, self.cfg.n_embd);
        let gids = be.upload_ids(ids)?;
        let pos: Vec<i32> = (0..sh.b)
            .flat_map(|_| (sh.past..sh.past + sh.tn).map(|x| x as i32))
            .collect();
        let gpos = be.upload_ids(&pos)?;
        be.encoder_forward(
            &mut s.resid,
            &gids,
            Some(&gpos),
            &p[lay.wte],
            &p[lay.wpe.expect("GPT-2 has position embeddings")],
            sh.b,
            sh.tn,
            c,
        )?;
        let l0 = &lay.layers[0];
        be.layernorm_forward(
            &mut s.ln,
            &mut s.mean,
            &mut s.rstd,
            &s.resid,
            &p[l0.ln1_w],
            &p[l0.ln1_b],
            sh.n(),
            c,
        )?;
        Ok(())
    }

    /// Block `l` on the new positions up to its last residual add: attention over the cache
    /// (appending the new keys and values to `k`, `v`), ln_2, and the MLP into `s.proj`.
    fn block_step(
        &self,
        be: &B,
        s: &mut StepActs<B>,
        k: &mut B::Buf,
        v: &mut B::Buf,
        l: usize,
        sh: StepShape,
    ) -> Result<()> {
        let (p, w) = (&self.params, &self.layout.layers[l]);
        let (n, c, nh) = (sh.n(), self.cfg.n_embd, self.cfg.n_head);
        let mut lora = self.step_adapters(s.lora.as_mut());
        be.matmul_forward(
            &mut s.qkv,
            &s.ln,
            &p[w.qkv_w],
            Some(&p[w.qkv_b]),
            n,
            c,
            3 * c,
        )?;
        LoraPass::forward(&mut lora, be, l, w.qkv_w, &s.ln, &mut s.qkv, n)?;
        be.attention_cached_forward(
            &mut s.atty,
            &s.qkv,
            k,
            v,
            sh.b,
            sh.tn,
            sh.past,
            sh.tmax,
            c,
            nh,
        )?;
        be.matmul_forward(
            &mut s.proj,
            &s.atty,
            &p[w.attn_proj_w],
            Some(&p[w.attn_proj_b]),
            n,
            c,
            c,
        )?;
        LoraPass::forward(&mut lora, be, l, w.attn_proj_w, &s.atty, &mut s.proj, n)?;
        be.residual_layernorm_forward(
            &mut s.resid2,
            &mut s.ln,
            &mut s.mean,
            &mut s.rstd,
            &s.resid,
            &s.proj,
            &p[w.ln2_w],
            &p[w.ln2_b],
            n,
            c,
        )?;
        let (fc_w, fc_b) = (&p[w.fc_w], Some(&p[w.fc_b]));
        if LoraPass::has(&lora, l, w.fc_w) {
            // The adapter adds before the GELU, as in the training forward.
            be.matmul_forward(&mut s.fch, &s.ln, fc_w, fc_b, n, c, 4 * c)?;
            LoraPass::forward(&mut lora, be, l, w.fc_w, &s.ln, &mut s.fch, n)?;
            be.gelu_forward(&mut s.fch_gelu, &s.fch, n * 4 * c)?;
        } else {
            be.matmul_gelu_forward(&mut s.fch_gelu, &mut s.fch, &s.ln, fc_w, fc_b, n, c, 4 * c)?;
        }
        be.matmul_forward(
            &mut s.proj,
            &s.fch_gelu,
            &p[w.fc_proj_w],
            Some(&p[w.fc_proj_b]),
            n,
            4 * c,
            c,
        )?;
        LoraPass::forward(&mut lora, be, l, w.fc_proj_w, &s.fch_gelu, &mut s.proj, n)?;
        Ok(())
    }

    /// Block `l`'s last residual add. As in `forward`, it is fused with the layernorm that
    /// follows it: the next block's ln_1, or ln_f when every position goes to the head (Tn = 1).
    fn close_block(
        &self,
        be: &B,
        s: &mut StepActs<B>,
        last: &mut LastPosition<B>,
        l: usize,
        sh: StepShape,
    ) -> Result<()> {
        let (lay, p) = (&self.layout, &self.params);
        let (n, c) = (sh.n(), self.cfg.n_embd);
        if let Some(nw) = lay.layers.get(l + 1) {
            be.residual_layernorm_forward(
                &mut s.resid,
                &mut s.ln,
                &mut s.mean,
                &mut s.rstd,
                &s.resid2,
                &s.proj,
                &p[nw.ln1_w],
                &p[nw.ln1_b],
                n,
                c,
            )?;
        } else if sh.tn == 1 {
            be.residual_layernorm_forward(
                &mut s.resid,
                &mut last.lnf,
                &mut last.mean,
                &mut last.rstd,
                &s.resid2,
                &s.proj,
                &p[lay.lnf_w],
                &p[lay.lnf_b.expect("GPT-2 layernorms have biases")],
                n,
                c,
            )?;
        } else {
            be.residual_forward(&mut s.resid, &s.resid2, &s.proj, n * c)?;
        }
        Ok(())
    }

    /// The head on each row's last new position. With Tn > 1 only those B rows go on: copy
    /// them out (B*C numbers through the host, once per prompt), then the final norm.
    fn head_step(
        &self,
        be: &B,
        s: &StepActs<B>,
        last: &mut LastPosition<B>,
        logits: &mut B::Buf,
        sh: StepShape,
    ) -> Result<()> {
        let (lay, p) = (&self.layout, &self.params);
        let (b, tn, c) = (sh.b, sh.tn, self.cfg.n_embd);
        if tn > 1 {
            let mut rows = Vec::with_capacity(b * c);
            for bb in 0..b {
                rows.extend(be.download_range(&s.resid, (bb * tn + tn - 1) * c, c)?);
            }
            be.write(&mut last.resid, &rows)?;
            if let Some(shape) = self.cfg.llama() {
                let (lnf, rstd, eps) = (&mut last.lnf, &mut last.rstd, shape.rms_eps as f32);
                be.rmsnorm_forward(lnf, rstd, &last.resid, &p[lay.lnf_w], b, c, eps)?;
            } else {
                be.layernorm_forward(
                    &mut last.lnf,
                    &mut last.mean,
                    &mut last.rstd,
                    &last.resid,
                    &p[lay.lnf_w],
                    &p[lay.lnf_b.expect("GPT-2 layernorms have biases")],
                    b,
                    c,
                )?;
            }
        }
        let vp = self.cfg.padded_vocab_size;
        be.matmul_forward(logits, &last.lnf, &p[lay.head()], None, b, c, vp)?;
        Ok(())
    }
}
