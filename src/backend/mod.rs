//! The Backend trait: the one contract between model code and hardware.
//!
//! Model, optimizer and stage code call only these ops; a backend owns its buffers and
//! decides their precision (the CPU reference is f32 throughout; CUDA keeps bf16 working
//! copies and fp32 master weights, see DESIGN.md "Precision").
//!
//! Conventions shared by every op:
//! - Tensors are dense, row-major, and described by the shape arguments of the op. `N` is the
//!   number of token positions (`B * T`), `C` the model width, `OC` an output width.
//! - **Forward ops overwrite their outputs. Backward ops accumulate (`+=`) into every gradient
//!   they produce**, both parameter and activation gradients, so gradient accumulation over
//!   micro-batches and residual branches needs no extra adds; the caller zeroes once.
//! - Every op checks its buffer lengths against its shape arguments and returns
//!   [`BackendError::Shape`] instead of reading out of bounds.

pub mod cpu;
pub mod cuda;
pub mod shapes;

use thiserror::Error;

/// Errors raised by backend ops and device set-up.
#[derive(Debug, Error)]
pub enum BackendError {
    #[error("{op}: buffer `{what}` has {found} elements, expected {expected}")]
    Shape {
        op: &'static str,
        what: &'static str,
        expected: usize,
        found: usize,
    },
    #[error("{op}: invalid argument: {msg}")]
    Invalid { op: &'static str, msg: String },
    #[error("device error: {0}")]
    Device(String),
}

pub type Result<T> = std::result::Result<T, BackendError>;

/// What a buffer is for, so a backend can pick its precision and layout.
/// The CPU backend stores every role as f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Trainable weights (CUDA: bf16 working copy plus an fp32 master copy).
    Param,
    /// Gradients of parameters.
    Grad,
    /// Activations and their gradients.
    Activation,
    /// Optimizer moments and other fp32 state.
    State,
}

/// Hyper-parameters of one AdamW update (Loshchilov & Hutter, decoupled weight decay).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Decoupled decay: `param -= lr * weight_decay * param` (0 for biases and norms).
    pub weight_decay: f32,
    /// 1-based step count, for bias correction.
    pub step: u64,
    /// Multiplies the gradient before use (global-norm clipping folds in here).
    pub grad_scale: f32,
}

/// Which gradient [`Backend::cross_entropy`] writes over the logits, as the weights `w_i` of
/// `sum_i w_i * losses[i]`.
pub enum LossGrad<'a, Buf> {
    /// Forward only: the logits are left untouched.
    None,
    /// The same weight for every row (`1 / tokens` gives the mean loss's gradient).
    Uniform(f32),
    /// A weight per row, from a buffer of `N` values (CUDA: an fp32 `Grad` or `State` buffer).
    /// Stages whose objective is not a plain mean of token losses (DPO's per-sequence
    /// coefficients) use this.
    PerRow(&'a Buf),
}

impl<Buf> LossGrad<'_, Buf> {
    /// The uniform scale of an optional gradient: `Some(s)` -> `Uniform(s)`, `None` -> `None`.
    pub fn uniform(scale: Option<f32>) -> Self {
        scale.map_or(Self::None, Self::Uniform)
    }

    pub fn is_none(&self) -> bool {
        matches!(self, Self::None)
    }
}

impl<Buf> Clone for LossGrad<'_, Buf> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<Buf> Copy for LossGrad<'_, Buf> {}

impl<Buf> std::fmt::Debug for LossGrad<'_, Buf> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => write!(f, "None"),
            Self::Uniform(s) => write!(f, "Uniform({s})"),
            Self::PerRow(_) => write!(f, "PerRow(..)"),
        }
    }
}

/// The operations training needs, forward and backward.
pub trait Backend: Send + Sync {
    /// A device buffer of real numbers.
    type Buf: Send;
    /// A device buffer of i32 token ids or targets (a negative target is "ignore").
    type Ids: Send;

    /// Short human-readable name ("cpu", "cuda:0 NVIDIA H100 ...").
    fn name(&self) -> String;

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
    /// Sets every element to zero.
    fn fill_zero(&self, buf: &mut Self::Buf) -> Result<()>;
    /// Uploads token ids or targets.
    fn upload_ids(&self, host: &[i32]) -> Result<Self::Ids>;
    /// Number of ids in `ids`.
    fn ids_len(&self, ids: &Self::Ids) -> usize;

    // ---- encoder: token + position embedding ---------------------------------------------
    /// `out[b,t,:] = wte[ids[b,t],:] + wpe[t,:]`.
    /// Shapes: out `[B*T*C]`, ids `[B*T]`, wte `[V*C]` (any V > max id), wpe `[Tmax*C]`, `T <= Tmax`.
    #[allow(clippy::too_many_arguments)]
    fn encoder_forward(
        &self,
        out: &mut Self::Buf,
        ids: &Self::Ids,
        wte: &Self::Buf,
        wpe: &Self::Buf,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()>;
    /// `dwte[ids[b,t],:] += dout[b,t,:]`, `dwpe[t,:] += dout[b,t,:]`.
    #[allow(clippy::too_many_arguments)]
    fn encoder_backward(
        &self,
        dwte: &mut Self::Buf,
        dwpe: &mut Self::Buf,
        dout: &Self::Buf,
        ids: &Self::Ids,
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
        dweight: &mut Self::Buf,
        dbias: &mut Self::Buf,
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
    /// `dinp += gelu'(inp) * dout`.
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
    /// Accumulates `dinp += dout @ weight`, `dweight += dout^T @ inp`, `dbias += sum_rows(dout)`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward(
        &self,
        dinp: &mut Self::Buf,
        dweight: &mut Self::Buf,
        dbias: Option<&mut Self::Buf>,
        dout: &Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()>;

    // ---- attention ----------------------------------------------------------------------
    /// Causal multi-head self-attention. `qkv [B*T*3C]` holds, per position, `q | k | v`
    /// (each `C` wide; head `h` owns columns `h*hs .. (h+1)*hs`, `hs = C / NH`).
    /// `out [B*T*C]` (heads concatenated) `= softmax(q k^T / sqrt(hs) + causal mask) v`.
    /// Saves `lse [B*NH*T]`, the log-sum-exp of each scaled score row, so backward can
    /// recompute probabilities without storing the `T x T` matrix.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        qkv: &Self::Buf,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()>;
    /// Accumulates `dqkv [B*T*3C]` from `dout [B*T*C]`, given the forward's `qkv`, `out`, `lse`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dqkv: &mut Self::Buf,
        dout: &Self::Buf,
        qkv: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
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
    /// Global L2 norm over all given buffers, `sqrt(sum_i sum_j g_ij^2)`, reduced in f64/fp32.
    fn global_norm(&self, bufs: &[&Self::Buf]) -> Result<f32>;
}

/// Returns an error unless `found == expected`; shared by every backend's shape checks.
pub fn check_len(
    op: &'static str,
    what: &'static str,
    expected: usize,
    found: usize,
) -> Result<()> {
    if expected == found {
        Ok(())
    } else {
        Err(BackendError::Shape {
            op,
            what,
            expected,
            found,
        })
    }
}
