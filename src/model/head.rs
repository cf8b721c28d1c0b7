//! The classifier and cross-entropy of the LM head, run in chunks of rows so that the logits
//! of a large vocabulary never materialise whole (Liger-Kernel's fused linear cross-entropy is
//! the idea): per chunk, the head matmul, the loss with its gradient in place, and that chunk's
//! share of the head's backward.

/// Logit elements one chunk may hold (`rows * VP`): 64 Mi (128 MiB in bf16).
pub const LOGIT_CHUNK_ELEMENTS: usize = 1 << 26;

/// Rows per chunk for `n` positions over a padded vocabulary `vp`: all `n` where they fit in
/// [`LOGIT_CHUNK_ELEMENTS`], else as many as fit (at least one).
pub fn logit_chunk_rows(n: usize, vp: usize) -> usize {
    (LOGIT_CHUNK_ELEMENTS / vp.max(1)).clamp(1, n.max(1))
}
