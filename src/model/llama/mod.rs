//! The Llama family (Llama 2/3, Qwen2, Mistral, SmolLM2) on the shared [`super::Gpt`] model
//! type: RMSNorm, rotary position embeddings, grouped-query attention, a SwiGLU MLP, an
//! optional untied head and optional q/k/v biases, written once against `Backend`.
//!
//! One block, for `N = B*T` rows of width `C` (`qkv_width = (NH + 2 NKV) hs`, `I` the MLP
//! width), as Hugging Face's `LlamaDecoderLayer` computes it:
//!
//! ```text
//! ln1  = rmsnorm(x) * w1                     (fused with the previous block's residual add)
//! qkv  = rope(ln1 @ Wqkv^T [+ bqkv])         (queries and keys rotated by position)
//! atty = causal_gqa_attention(qkv)
//! r2   = x + atty @ Wo^T;  ln2 = rmsnorm(r2) * w2
//! out  = r2 + (silu(gate) * up) @ Wdown^T    with gate | up = ln2 @ Wgate_up^T
//! ```
//!
//! forward.rs runs the trunk, backward.rs its gradient, decode.rs the KV-cache step,
//! activations.rs owns the buffers. The embedding, the final norm's output (`lnf`), the head
//! (`ParamLayout::head`), the loss and everything built on the final hidden state (reward
//! heads, log-probabilities) are the family-independent code of the parent module.

mod activations;
mod backward;
mod decode;
mod forward;

pub use activations::LlamaLayerActs;
pub(super) use backward::layer_bucket;
