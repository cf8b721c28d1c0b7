//! The Backend trait: the one contract between model code and hardware.
//!
//! Model, optimizer and stage code call only these ops; a backend owns its buffers and
//! decides their precision (the CPU reference is f32 throughout; CUDA keeps bf16 working
//! copies and fp32 master weights, see DESIGN.md "Precision").
//!
//! Conventions shared by every op:
//! - Tensors are dense, row-major, and described by the shape arguments of the op. `N` is the
//!   number of token positions (`B * T`), `C` the model width, `OC` an output width.
//! - **Forward ops overwrite their outputs. Backward ops accumulate (`+=`) into parameter
//!   gradients** (so accumulation over micro-batches needs no extra adds; the caller zeroes
//!   once per optimizer step) **and overwrite the gradient of their input activation**
//!   (`dinp`, `dqkv`), so no activation-gradient buffer needs zeroing first. The one exception
//!   is `layernorm_backward`, whose `dinp` is the residual stream's gradient: it accumulates,
//!   summing the two branches of every block.
//! - Every op checks its buffer lengths against its shape arguments and returns
//!   [`BackendError::Shape`] instead of reading out of bounds.

pub mod cpu;
pub mod cuda;
pub mod profile; // a Backend wrapper that times every op (`bench --kernels`)
pub mod shapes;
mod types;

pub use types::{check_len, AdamWStep, BackendError, LossGrad, Result, Role, SampleParams};

/// The operations training needs, forward and backward.
pub trait Backend: Send + Sync {
    /// A device buffer of real numbers.
    type Buf: Send;
    /// A device buffer of i32 token ids or targets (a negative target is "ignore").
    type Ids: Send;

    /// Short human-readable name ("cpu", "cuda:0 NVIDIA H100 ...").
    fn name(&self) -> String;

    // ---- timing and memory accounting (benchmarks) ----------------------------------------
    /// Waits until every op issued so far has finished (a no-op where ops run synchronously).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    /// Bytes of device memory in use by this process's device, where the backend can tell.
    fn memory_in_use(&self) -> Option<usize> {
        None
    }
    /// Bytes free for new buffers on this backend's device, where the backend can tell (CPU:
    /// the kernel's `MemAvailable`; CUDA: the driver's free device memory). The memory plan
    /// (`model::memory`) is checked against it before a run allocates.
    fn memory_available(&self) -> Option<u64> {
        None
    }
    /// Bytes per element a buffer of this role takes (4 on the f32 CPU backend).
    fn element_bytes(&self, role: Role) -> usize {
        let _ = role;
        4
    }

    // ---- memory -------------------------------------------------------------------------
    /// A zero-filled buffer of `len` elements.
    fn zeros(&self, len: usize, role: Role) -> Result<Self::Buf>;
    /// A buffer holding a copy of `host`.
    fn upload(&self, host: &[f32], role: Role) -> Result<Self::Buf>;
    /// Overwrites `buf` with `host` (lengths must match).
    fn write(&self, buf: &mut Self::Buf, host: &[f32]) -> Result<()>;
    /// Copies `len` elements starting at `offset` back to the host as f32.
    fn download_range(&self, buf: &Self::Buf, offset: usize, len: usize) -> Result<Vec<f32>>;
    /// Copies the whole buffer back to the host as f32.
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>> {
        self.download_range(buf, 0, self.len(buf))
    }
    /// Number of elements in `buf`.
    fn len(&self, buf: &Self::Buf) -> usize;
    /// Frees the fp32 master copy of parameter buffer `buf`, keeping only what the kernels
    /// read (ZeRO-1: a rank keeps master weights only for the tensors it updates; the others
    /// arrive by broadcast from their owner). Afterwards `adamw` refuses `buf`, `download`
    /// returns its working copy and `write` sets it. A no-op where the parameter is the only
    /// copy (the CPU backend's f32 buffers).
    fn release_master(&self, buf: &mut Self::Buf) -> Result<()> {
        let _ = buf;
        Ok(())
    }
    /// Sets every element to zero.
    fn fill_zero(&self, buf: &mut Self::Buf) -> Result<()>;
    /// Uploads token ids or targets.
    fn upload_ids(&self, host: &[i32]) -> Result<Self::Ids>;
    /// Number of ids in `ids`.
    fn ids_len(&self, ids: &Self::Ids) -> usize;

    // ---- encoder: token + position embedding ---------------------------------------------
    /// `out[b,t,:] = wte[ids[b,t],:] + wpe[p,:]`, where `p = t` when `pos` is `None` and
    /// `p = pos[b,t]` otherwise (explicit positions, e.g. restarting at each example packed
    /// into a row). Shapes: out `[B*T*C]`, ids `[B*T]`, pos `[B*T]`, wte `[V*C]` (any V > max
    /// id), wpe `[Tmax*C]`; `T <= Tmax` without `pos`, every `pos` in `[0, Tmax)` with it
    /// (an [`BackendError::Invalid`] otherwise).
    #[allow(clippy::too_many_arguments)]
    fn encoder_forward(
        &self,
        out: &mut Self::Buf,
        ids: &Self::Ids,
        pos: Option<&Self::Ids>,
        wte: &Self::Buf,
        wpe: &Self::Buf,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()>;
    /// `dwte[ids[b,t],:] += dout[b,t,:]`, `dwpe[p,:] += dout[b,t,:]` (`p` as in the forward).
    #[allow(clippy::too_many_arguments)]
    fn encoder_backward(
        &self,
        dwte: &mut Self::Buf,
        dwpe: &mut Self::Buf,
        dout: &Self::Buf,
        ids: &Self::Ids,
        pos: Option<&Self::Ids>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()>;

    // ---- layernorm ----------------------------------------------------------------------
    /// Per row of `inp` `[N*C]`: `out = (x - mean) * rstd * weight + bias`, with
    /// `rstd = 1/sqrt(var + 1e-5)` (biased variance). Saves `mean` and `rstd` `[N]` for backward.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        out: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        bias: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<()>;
    /// Accumulates `dinp [N*C]`, `dweight [C]`, `dbias [C]` from `dout [N*C]`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        dinp: &mut Self::Buf,
        dweight: Option<&mut Self::Buf>,
        dbias: Option<&mut Self::Buf>,
        dout: &Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<()>;
    /// Residual add fused with the layernorm that follows it:
    /// `residual = a + b`, then `out = layernorm(residual)`. Shapes as in `layernorm_forward`.
    #[allow(clippy::too_many_arguments)]
    fn residual_layernorm_forward(
        &self,
        residual: &mut Self::Buf,
        out: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        weight: &Self::Buf,
        bias: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        self.residual_forward(residual, a, b, n * c)?;
        self.layernorm_forward(out, mean, rstd, residual, weight, bias, n, c)
    }

    // ---- elementwise --------------------------------------------------------------------
    /// `out = a + b` over `n` elements.
    fn residual_forward(
        &self,
        out: &mut Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        n: usize,
    ) -> Result<()>;
    /// GELU, tanh approximation: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, `n` elements.
    fn gelu_forward(&self, out: &mut Self::Buf, inp: &Self::Buf, n: usize) -> Result<()>;
    /// `dinp = gelu'(inp) * dout` (overwrites).
    fn gelu_backward(
        &self,
        dinp: &mut Self::Buf,
        inp: &Self::Buf,
        dout: &Self::Buf,
        n: usize,
    ) -> Result<()>;

    // ---- matmul -------------------------------------------------------------------------
    /// `out [N*OC] = inp [N*C] @ weight^T + bias`, with `weight [OC*C]` (PyTorch `nn.Linear`
    /// layout) and an optional `bias [OC]`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_forward(
        &self,
        out: &mut Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        bias: Option<&Self::Buf>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()>;
    /// `dinp = dout @ weight` (overwrites); accumulates `dweight += dout^T @ inp`,
    /// `dbias += sum_rows(dout)`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward(
        &self,
        dinp: &mut Self::Buf,
        dweight: Option<&mut Self::Buf>,
        dbias: Option<&mut Self::Buf>,
        dout: &Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()>;

    /// The MLP's first matmul with its GELU: `pre [N*OC] = inp @ weight^T + bias`, then
    /// `out [N*OC] = gelu(pre)`; both are kept (`pre` for the backward). A backend may fuse the
    /// two (CUDA: a cuBLASLt GELU epilogue); the default runs them one after the other.
    #[allow(clippy::too_many_arguments)]
    fn matmul_gelu_forward(
        &self,
        out: &mut Self::Buf,
        pre: &mut Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        bias: Option<&Self::Buf>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let [o, p, i, w] = [&*out, &*pre, inp, weight].map(|x| shapes::Of(self, x));
        let bs = bias.map(|x| shapes::Of(self, x));
        shapes::matmul_gelu_forward(&o, &p, &i, &w, bs.as_ref(), n, c, oc)?;
        self.matmul_forward(pre, inp, weight, bias, n, c, oc)?;
        self.gelu_forward(out, pre, n * oc)
    }
    /// `matmul_backward` of a matmul whose input was `gelu(pre)`, carried on through the GELU:
    /// `dinp [N*C] = gelu'(pre) * (dout @ weight)` (overwrites; `pre [N*C]`), accumulating
    /// `dweight += dout^T @ inp` and `dbias += sum_rows(dout)` as `matmul_backward` does.
    #[allow(clippy::too_many_arguments)]
    fn matmul_gelu_backward(
        &self,
        dinp: &mut Self::Buf,
        dweight: Option<&mut Self::Buf>,
        dbias: Option<&mut Self::Buf>,
        dout: &Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        pre: &Self::Buf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()>;

    // ---- attention ----------------------------------------------------------------------
    /// Causal multi-head self-attention. `qkv [B*T*3C]` holds, per position, `q | k | v`
    /// (each `C` wide; head `h` owns columns `h*hs .. (h+1)*hs`, `hs = C / NH`).
    /// `out [B*T*C]` (heads concatenated) `= softmax(q k^T / sqrt(hs) + mask) v`, where query
    /// `i` of row `b` attends keys `j` with `s <= j <= i`: `s = 0` (plain causal) when `starts`
    /// is `None`, else `s = starts[b*T + i]`, the position within the row where the example
    /// holding position `i` begins (examples packed into one row do not see each other).
    /// Examples are contiguous: `starts[b*T] = 0` and each later entry repeats the previous one
    /// or equals its own position (a new example); see [`shapes::attention_starts`]
    /// ([`BackendError::Invalid`] otherwise). Saves `lse [B*NH*T]`, the log-sum-exp of each scaled score row, so
    /// backward can recompute probabilities without storing the `T x T` matrix.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        qkv: &Self::Buf,
        starts: Option<&Self::Ids>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()>;
    /// Writes `dqkv [B*T*3C]` (overwrites) from `dout [B*T*C]`, given the forward's `qkv`,
    /// `out`, `lse` and the same `starts`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dqkv: &mut Self::Buf,
        dout: &Self::Buf,
        qkv: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        starts: Option<&Self::Ids>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()>;

    /// [`Backend::attention_forward`] with grouped-query attention: `qkv [B*T*(NH+2*NKV)*hs]`
    /// holds, per position, `NH` query heads, then `NKV` key heads, then `NKV` value heads
    /// (`hs = C / NH`), and query head `h` reads key/value head `h / (NH / NKV)`. `NKV` divides
    /// `NH`; `NKV = NH` is plain multi-head attention (the `qkv [B*T*3C]` layout), `NKV = 1`
    /// multi-query. `out [B*T*C]` and `lse [B*NH*T]` as in `attention_forward`.
    #[allow(clippy::too_many_arguments)]
    fn attention_gqa_forward(
        &self,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        qkv: &Self::Buf,
        starts: Option<&Self::Ids>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
        nkv: usize,
    ) -> Result<()>;
    /// The backward of [`Backend::attention_gqa_forward`]: writes `dqkv [B*T*(NH+2*NKV)*hs]`
    /// (overwrites); a key/value head's gradient sums over the query heads of its group.
    #[allow(clippy::too_many_arguments)]
    fn attention_gqa_backward(
        &self,
        dqkv: &mut Self::Buf,
        dout: &Self::Buf,
        qkv: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        starts: Option<&Self::Ids>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
        nkv: usize,
    ) -> Result<()>;

    // ---- Llama family: token embedding, RMSNorm, rotary embedding, SwiGLU --------------------
    /// `out[b,t,:] = wte[ids[b,t],:]`: the token embedding alone (the Llama family has no
    /// position embedding). Shapes: out `[B*T*C]`, ids `[B*T]`, wte `[V*C]` (any V > max id).
    #[allow(clippy::too_many_arguments)]
    fn embedding_forward(
        &self,
        out: &mut Self::Buf,
        ids: &Self::Ids,
        wte: &Self::Buf,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()>;
    /// `dwte[ids[b,t],:] += dout[b,t,:]`, rows summed in position order.
    #[allow(clippy::too_many_arguments)]
    fn embedding_backward(
        &self,
        dwte: &mut Self::Buf,
        dout: &Self::Buf,
        ids: &Self::Ids,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()>;
    /// Per row of `inp [N*C]`: `out = x * rstd * weight` with `rstd = 1/sqrt(mean(x^2) + eps)`
    /// (Zhang & Sennrich 2019; Hugging Face's `LlamaRMSNorm`); saves `rstd [N]` (fp32 `Stat`).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_forward(
        &self,
        out: &mut Self::Buf,
        rstd: &mut Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()>;
    /// **Accumulates** `dinp [N*C]` (the residual stream's gradient, as `layernorm_backward`)
    /// and `dweight [C]` from `dout [N*C]`, given the forward's `inp` and `rstd`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dinp: &mut Self::Buf,
        dweight: Option<&mut Self::Buf>,
        dout: &Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        rstd: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<()>;
    /// Residual add fused with the RMSNorm that follows it: `residual = a + b`, then
    /// `out = rmsnorm(residual)`. Shapes as in `rmsnorm_forward`.
    #[allow(clippy::too_many_arguments)]
    fn residual_rmsnorm_forward(
        &self,
        residual: &mut Self::Buf,
        out: &mut Self::Buf,
        rstd: &mut Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        weight: &Self::Buf,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        self.residual_forward(residual, a, b, n * c)?;
        self.rmsnorm_forward(out, rstd, residual, weight, n, c, eps)
    }
    /// Rotary position embedding (Su et al. 2021), in place on the `NH` query and `NKV` key
    /// heads of `qkv [B*T*(NH+2*NKV)*hs]` (layout of `attention_gqa_forward`; value heads are
    /// untouched). Hugging Face's rotate-half pairing: for `i < hs/2`, with
    /// `a = p * inv_freq[i]` computed in f32 (`inv_freq [hs/2]`, an fp32 `State` buffer),
    /// `x'[i] = x[i] cos a - x[i+hs/2] sin a` and `x'[i+hs/2] = x[i+hs/2] cos a + x[i] sin a`.
    /// The position `p` of `(b, t)` is `pos[b*T+t]` when given (packed rows), else `past + t`
    /// (generation appends after `past` cached positions).
    #[allow(clippy::too_many_arguments)]
    fn rope_forward(
        &self,
        qkv: &mut Self::Buf,
        inv_freq: &Self::Buf,
        pos: Option<&Self::Ids>,
        past: usize,
        b: usize,
        t: usize,
        nh: usize,
        nkv: usize,
        hs: usize,
    ) -> Result<()>;
    /// The backward of `rope_forward` (with `past = 0`): rotates the query and key gradients
    /// of `dqkv` in place by the opposite angles (the transpose); value gradients untouched.
    #[allow(clippy::too_many_arguments)]
    fn rope_backward(
        &self,
        dqkv: &mut Self::Buf,
        inv_freq: &Self::Buf,
        pos: Option<&Self::Ids>,
        b: usize,
        t: usize,
        nh: usize,
        nkv: usize,
        hs: usize,
    ) -> Result<()>;
    /// SwiGLU (Shazeer 2020): `out [N*I] = silu(gate) * up`, where each row of
    /// `gate_up [N*2I]` holds `gate` (first `I` columns) then `up`; `silu(x) = x / (1 + e^-x)`.
    fn swiglu_forward(
        &self,
        out: &mut Self::Buf,
        gate_up: &Self::Buf,
        n: usize,
        i: usize,
    ) -> Result<()>;
    /// Writes `dgate_up [N*2I]` (overwrites) from `dout [N*I]` and the forward's `gate_up`.
    fn swiglu_backward(
        &self,
        dgate_up: &mut Self::Buf,
        dout: &Self::Buf,
        gate_up: &Self::Buf,
        n: usize,
        i: usize,
    ) -> Result<()>;

    // ---- LoRA: adapter outputs into column slices, seeded dropout ---------------------------
    /// `y[:, col..col+W] += alpha * x` for `y [N*OC]`, `x [N*W]` (`col + W <= OC`): an
    /// adapter's output added into its slice of a (possibly fused) projection's output, or an
    /// input gradient added into another (`col = 0`, `W = OC`, `alpha = 1`).
    #[allow(clippy::too_many_arguments)]
    fn add_columns(
        &self,
        y: &mut Self::Buf,
        x: &Self::Buf,
        n: usize,
        oc: usize,
        col: usize,
        w: usize,
        alpha: f32,
    ) -> Result<()>;
    /// `out [N*W] = alpha * y[:, col..col+W]` (overwrites): an adapter's slice of an output
    /// gradient, scaled.
    #[allow(clippy::too_many_arguments)]
    fn copy_columns(
        &self,
        out: &mut Self::Buf,
        y: &Self::Buf,
        n: usize,
        oc: usize,
        col: usize,
        w: usize,
        alpha: f32,
    ) -> Result<()>;
    /// Dropout over `n` elements (overwrites `out`): element `i` is kept, times `1/(1-p)`, iff
    /// the counter-based hash of `(seed, i)` is at least `p` (the rule is spelt out in
    /// `cpu/lora.rs`), so every backend draws the same mask bit for bit and the backward
    /// recomputes it from the seed instead of storing it. `p` in `[0, 1)`.
    fn dropout_forward(
        &self,
        out: &mut Self::Buf,
        inp: &Self::Buf,
        n: usize,
        p: f32,
        seed: u64,
    ) -> Result<()>;
    /// The backward of [`Backend::dropout_forward`] with the same `p` and `seed`:
    /// `dinp = mask * dout / (1 - p)` (overwrites).
    fn dropout_backward(
        &self,
        dinp: &mut Self::Buf,
        dout: &Self::Buf,
        n: usize,
        p: f32,
        seed: u64,
    ) -> Result<()>;

    // ---- fused softmax + cross-entropy ------------------------------------------------------
    /// For each of `N` rows of `logits [N*VP]` (only the first `V` columns are real; the padded
    /// tail is ignored): `losses[i] = logsumexp(logits[i,:V]) - logits[i, targets[i]]`, or 0 where
    /// `targets[i] < 0` (masked). Unless `grad` is [`LossGrad::None`], the logits buffer is
    /// overwritten in place by the gradient `w_i * (softmax - onehot)` of `sum_i w_i losses[i]`
    /// (0 in padded columns and masked rows), which saves a second `N x VP` buffer; `w_i` is one
    /// scale for every row ([`LossGrad::Uniform`]) or row `i` of a weights buffer `[N]`
    /// ([`LossGrad::PerRow`]). Targets must be `< V`. `losses` may be an fp32 buffer (CUDA:
    /// `Role::State`) where the per-row losses are summed afterwards and bf16 would round them.
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy(
        &self,
        losses: &mut Self::Buf,
        logits: &mut Self::Buf,
        targets: &Self::Ids,
        n: usize,
        v: usize,
        vp: usize,
        grad: LossGrad<'_, Self::Buf>,
    ) -> Result<()>;

    // ---- optimizer ------------------------------------------------------------------------
    /// One AdamW update of `param` given `grad` (times `hp.grad_scale`) and moments `m`, `v`.
    fn adamw(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        hp: &AdamWStep,
    ) -> Result<()>;
    /// `acc[i] += x[i]` over two f32 gradient buffers of the same length: gradient
    /// accumulation adds each micro-batch's gradient, computed from zero, in micro-batch order
    /// (the same sums, in the same order, as the ranks' all-reduce).
    fn accumulate(&self, acc: &mut Self::Buf, x: &Self::Buf) -> Result<()>;
    /// Global L2 norm over all given buffers, `sqrt(sum_i sum_j g_ij^2)`, reduced in f64/fp32.
    fn global_norm(&self, bufs: &[&Self::Buf]) -> Result<f32>;

    // ---- generation: cached attention and sampling -------------------------------------------
    /// Causal attention of `Tn` new positions over a key/value cache, for generation.
    /// `qkv [B*Tn*3C]` holds the new positions `past .. past+Tn` (layout as in
    /// `attention_forward`); `k_cache`, `v_cache` `[B*Tmax*C]` hold the keys and values of
    /// positions `0 .. past` of each row. The op first writes the new keys and values into rows
    /// `past .. past+Tn` of the caches, then sets `out [B*Tn*C]` so that new position `i`
    /// attends to cache rows `0 ..= past+i`. With `past = 0` and `Tn = T` this equals
    /// `attention_forward`'s `out`; a decode step is `Tn = 1`. Needs `past + Tn <= Tmax`.
    #[allow(clippy::too_many_arguments)]
    fn attention_cached_forward(
        &self,
        out: &mut Self::Buf,
        qkv: &Self::Buf,
        k_cache: &mut Self::Buf,
        v_cache: &mut Self::Buf,
        b: usize,
        tn: usize,
        past: usize,
        tmax: usize,
        c: usize,
        nh: usize,
    ) -> Result<()>;
    /// [`Backend::attention_cached_forward`] with grouped KV heads: `qkv [B*Tn*(NH+2*NKV)*hs]`
    /// (layout of `attention_gqa_forward`), caches `[B*Tmax*NKV*hs]`.
    #[allow(clippy::too_many_arguments)]
    fn attention_gqa_cached_forward(
        &self,
        out: &mut Self::Buf,
        qkv: &Self::Buf,
        k_cache: &mut Self::Buf,
        v_cache: &mut Self::Buf,
        b: usize,
        tn: usize,
        past: usize,
        tmax: usize,
        c: usize,
        nh: usize,
        nkv: usize,
    ) -> Result<()>;
    /// Draws one token from each of `N` rows of `logits [N*VP]` (first `V` columns real) per
    /// [`SampleParams`], using `uniforms[i]` in `[0, 1)` as row `i`'s random number, so that
    /// backends given the same logits and uniforms draw the same tokens. The rule is spelt out
    /// in `cpu/sample.rs`, the specification.
    #[allow(clippy::too_many_arguments)]
    fn sample_tokens(
        &self,
        logits: &Self::Buf,
        n: usize,
        v: usize,
        vp: usize,
        params: &SampleParams,
        uniforms: &[f32],
    ) -> Result<Vec<u32>>;
}
