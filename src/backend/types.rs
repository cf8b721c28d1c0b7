//! The value types of the Backend contract: its error, the role that picks a buffer's
//! precision, the parameters of the optimizer, sampling and loss-gradient ops, and
//! [`check_len`], which builds the shape error every op's rule returns.

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
    /// The card cannot run this build's kernels (too old, or no code for it).
    #[error("device error: {0}")]
    Arch(#[from] super::cuda::ArchError),
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
    /// Small per-row statistics saved by a forward for its backward where bf16 would spoil
    /// them (attention's log-sum-exp): fp32 on every backend.
    Stat,
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

/// How [`Backend::sample_tokens`](super::Backend::sample_tokens) picks a token from a row of
/// logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleParams {
    /// Divides the logits before the softmax; 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 keeps all; 1 is greedy).
    pub top_k: usize,
    /// Then keep the fewest most likely tokens whose probability sums to at least `top_p`
    /// (nucleus sampling, Holtzman et al. 2019); 1 keeps all. In `(0, 1]`.
    pub top_p: f32,
}

impl SampleParams {
    /// Greedy decoding: always the most likely token.
    pub const GREEDY: SampleParams = SampleParams {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
    };

    /// Checks the ranges: temperature finite and `>= 0`, `0 < top_p <= 1`.
    pub fn check(&self, op: &'static str) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(BackendError::Invalid {
                op,
                msg: format!("temperature {} must be finite and >= 0", self.temperature),
            });
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(BackendError::Invalid {
                op,
                msg: format!("top_p {} must be in (0, 1]", self.top_p),
            });
        }
        Ok(())
    }

    /// True when the rule reduces to the argmax (no random number is used).
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }
}

/// Which gradient [`Backend::cross_entropy`](super::Backend::cross_entropy) writes over the
/// logits, as the weights `w_i` of `sum_i w_i * losses[i]`.
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
