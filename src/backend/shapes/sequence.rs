//! Shape rules of the ops over sequences and the vocabulary: attention, multi-head and with
//! grouped KV heads (training and the KV-cache decode), token sampling and the cross-entropy.

use super::{elementwise, invalid, Len};
use crate::backend::{check_len, BackendError, Result, SampleParams};

/// Attention needs `NH > 0` heads that divide `C`.
pub fn attention_heads(op: &'static str, c: usize, nh: usize) -> Result<()> {
    if nh == 0 || !c.is_multiple_of(nh) {
        return Err(invalid(
            op,
            format!("C = {c} is not a multiple of NH = {nh}"),
        ));
    }
    Ok(())
}

/// Grouped-query attention needs `NH > 0` heads that divide `C` and `NKV > 0` key/value
/// heads that divide `NH`. Returns the width `(NH + 2 NKV) hs` of a `qkv` row.
pub fn attention_gqa_heads(op: &'static str, c: usize, nh: usize, nkv: usize) -> Result<usize> {
    attention_heads(op, c, nh)?;
    if nkv == 0 || !nh.is_multiple_of(nkv) {
        return Err(invalid(
            op,
            format!("NH = {nh} query heads are not a multiple of NKV = {nkv} key/value heads"),
        ));
    }
    Ok((nh + 2 * nkv) * (c / nh))
}

/// Checks for `attention_forward`: heads, then `out [B*T*C]`, `lse [B*NH*T]`, `qkv [B*T*3C]`.
pub fn attention_forward<L: Len + ?Sized>(
    out: &L,
    lse: &L,
    qkv: &L,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) -> Result<()> {
    attention_for("attention_forward", out, lse, qkv, b, t, c, nh, nh)?;
    Ok(())
}

/// Checks for `attention_gqa_forward`: heads ([`attention_gqa_heads`]), then `out [B*T*C]`,
/// `lse [B*NH*T]`, `qkv [B*T*(NH+2*NKV)*hs]`.
#[allow(clippy::too_many_arguments)]
pub fn attention_gqa_forward<L: Len + ?Sized>(
    out: &L,
    lse: &L,
    qkv: &L,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    nkv: usize,
) -> Result<()> {
    attention_for("attention_gqa_forward", out, lse, qkv, b, t, c, nh, nkv)?;
    Ok(())
}

/// Checks for `attention_backward`: those of `attention_forward` on its buffers, then
/// `dqkv [B*T*3C]`, `dout [B*T*C]`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<L: Len + ?Sized>(
    dqkv: &L,
    dout: &L,
    qkv: &L,
    out: &L,
    lse: &L,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) -> Result<()> {
    let op = "attention_backward";
    attention_backward_for(op, dqkv, dout, qkv, out, lse, b, t, c, nh, nh)
}

/// Checks for `attention_gqa_backward`: those of `attention_gqa_forward` on its buffers, then
/// `dqkv [B*T*(NH+2*NKV)*hs]`, `dout [B*T*C]`.
#[allow(clippy::too_many_arguments)]
pub fn attention_gqa_backward<L: Len + ?Sized>(
    dqkv: &L,
    dout: &L,
    qkv: &L,
    out: &L,
    lse: &L,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    nkv: usize,
) -> Result<()> {
    let op = "attention_gqa_backward";
    attention_backward_for(op, dqkv, dout, qkv, out, lse, b, t, c, nh, nkv)
}

/// The attention backward rule under `op`'s name.
#[allow(clippy::too_many_arguments)]
fn attention_backward_for<L: Len + ?Sized>(
    op: &'static str,
    dqkv: &L,
    dout: &L,
    qkv: &L,
    out: &L,
    lse: &L,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    nkv: usize,
) -> Result<()> {
    let w = attention_for(op, out, lse, qkv, b, t, c, nh, nkv)?;
    check_len(op, "dqkv", b * t * w, dqkv.len())?;
    check_len(op, "dout", b * t * c, dout.len())
}

/// The attention forward rule under `op`'s name; returns the `qkv` row width.
#[allow(clippy::too_many_arguments)]
fn attention_for<L: Len + ?Sized>(
    op: &'static str,
    out: &L,
    lse: &L,
    qkv: &L,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
    nkv: usize,
) -> Result<usize> {
    let w = attention_gqa_heads(op, c, nh, nkv)?;
    check_len(op, "out", b * t * c, out.len())?;
    check_len(op, "lse", b * nh * t, lse.len())?;
    check_len(op, "qkv", b * t * w, qkv.len())?;
    Ok(w)
}

/// The optional `starts [B*T]` of attention over packed rows: each row is cut into contiguous
/// examples, and `starts[b*T + i]` is the position where the example holding `i` begins, so
/// `starts[b*T] = 0` and each later entry either repeats the one before or equals its own
/// position `i` (a new example). Anything else is [`BackendError::Invalid`] naming the entry.
pub fn attention_starts(
    op: &'static str,
    starts: Option<&[i32]>,
    b: usize,
    t: usize,
) -> Result<()> {
    let Some(starts) = starts else {
        return Ok(());
    };
    check_len(op, "starts", b * t, starts.len())?;
    for (k, &s) in starts.iter().enumerate() {
        let i = k % t;
        let prev = if i == 0 { 0 } else { starts[k - 1] };
        if s != prev && s as usize != i {
            return Err(BackendError::Invalid {
                op,
                msg: format!(
                    "starts[{k}] = {s} (row {}, position {i}): expected {prev} (same example) \
                     or {i} (a new example)",
                    k / t
                ),
            });
        }
    }
    Ok(())
}

/// Checks for `attention_cached_forward`: heads divide `C`, `past + Tn <= Tmax`, and lengths
/// `out [B*Tn*C]`, `qkv [B*Tn*3C]`, `k_cache`, `v_cache` `[B*Tmax*C]`.
#[allow(clippy::too_many_arguments)]
pub fn attention_cached_forward<L: Len + ?Sized>(
    out: &L,
    qkv: &L,
    k_cache: &L,
    v_cache: &L,
    b: usize,
    tn: usize,
    past: usize,
    tmax: usize,
    c: usize,
    nh: usize,
) -> Result<()> {
    let op = "attention_cached_forward";
    let caches = [k_cache, v_cache];
    cached_for(op, out, qkv, caches, b, tn, past, tmax, c, nh, nh)
}

/// Checks for `attention_gqa_cached_forward`: heads ([`attention_gqa_heads`]),
/// `past + Tn <= Tmax`, and lengths `out [B*Tn*C]`, `qkv [B*Tn*(NH+2*NKV)*hs]`, `k_cache`,
/// `v_cache` `[B*Tmax*NKV*hs]`.
#[allow(clippy::too_many_arguments)]
pub fn attention_gqa_cached_forward<L: Len + ?Sized>(
    out: &L,
    qkv: &L,
    k_cache: &L,
    v_cache: &L,
    b: usize,
    tn: usize,
    past: usize,
    tmax: usize,
    c: usize,
    nh: usize,
    nkv: usize,
) -> Result<()> {
    let op = "attention_gqa_cached_forward";
    let caches = [k_cache, v_cache];
    cached_for(op, out, qkv, caches, b, tn, past, tmax, c, nh, nkv)
}

/// The cached attention rule under `op`'s name.
#[allow(clippy::too_many_arguments)]
fn cached_for<L: Len + ?Sized>(
    op: &'static str,
    out: &L,
    qkv: &L,
    [k_cache, v_cache]: [&L; 2],
    b: usize,
    tn: usize,
    past: usize,
    tmax: usize,
    c: usize,
    nh: usize,
    nkv: usize,
) -> Result<()> {
    let w = attention_gqa_heads(op, c, nh, nkv)?;
    if past + tn > tmax {
        return Err(BackendError::Invalid {
            op,
            msg: format!("past {past} + Tn {tn} new positions exceed the cache's Tmax {tmax}"),
        });
    }
    check_len(op, "out", b * tn * c, out.len())?;
    check_len(op, "qkv", b * tn * w, qkv.len())?;
    let caches = [("k_cache", k_cache), ("v_cache", v_cache)];
    elementwise(op, &caches, b * tmax * nkv * (c / nh))
}

/// A logits row holds `VP` columns of which the first `V` are real: `0 < V <= VP`.
fn padded_vocab(op: &'static str, v: usize, vp: usize) -> Result<()> {
    if v == 0 || v > vp {
        let msg = format!("need 0 < V <= VP, got V = {v}, VP = {vp}");
        return Err(invalid(op, msg));
    }
    Ok(())
}

/// Checks for `sample_tokens`: the parameters' ranges, `0 < V <= VP`, `logits [N*VP]`, and one
/// uniform in `[0, 1)` per row.
pub fn sample_tokens<L: Len + ?Sized>(
    logits: &L,
    n: usize,
    v: usize,
    vp: usize,
    params: &SampleParams,
    uniforms: &[f32],
) -> Result<()> {
    let op = "sample_tokens";
    params.check(op)?;
    padded_vocab(op, v, vp)?;
    check_len(op, "logits", n * vp, logits.len())?;
    check_len(op, "uniforms", n, uniforms.len())?;
    if let Some(i) = uniforms.iter().position(|u| !(0.0..1.0).contains(u)) {
        return Err(BackendError::Invalid {
            op,
            msg: format!("uniforms[{i}] = {} is outside [0, 1)", uniforms[i]),
        });
    }
    Ok(())
}

/// Checks for `cross_entropy`: `0 < V <= VP`, `losses [N]`, `logits [N*VP]`, `targets [N]`
/// each below `V` (negative: masked), and per-row weights `[N]` when given.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy<L: Len + ?Sized>(
    losses: &L,
    logits: &L,
    targets: &[i32],
    weights: Option<&L>,
    n: usize,
    v: usize,
    vp: usize,
) -> Result<()> {
    let op = "cross_entropy";
    padded_vocab(op, v, vp)?;
    check_len(op, "losses", n, losses.len())?;
    check_len(op, "logits", n * vp, logits.len())?;
    check_len(op, "targets", n, targets.len())?;
    weights.map_or(Ok(()), |w| check_len(op, "weights", n, w.len()))?;
    match targets.iter().position(|&x| x >= 0 && x as usize >= v) {
        None => Ok(()),
        Some(i) => Err(BackendError::Invalid {
            op,
            msg: format!("target {} at row {i} is not below V = {v}", targets[i]),
        }),
    }
}
