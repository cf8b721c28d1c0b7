//! Buffer-length checks for the ops whose shapes every backend checks the same way; each
//! backend calls these before launching, so the rules live in one place.

use super::{check_len, BackendError, Result, SampleParams};

/// Lengths for `layernorm_forward`: `out`, `inp` `[N*C]`; `mean`, `rstd` `[N]`; `weight`, `bias` `[C]`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    out: usize,
    mean: usize,
    rstd: usize,
    inp: usize,
    weight: usize,
    bias: usize,
    n: usize,
    c: usize,
) -> Result<()> {
    let op = "layernorm_forward";
    check_len(op, "out", n * c, out)?;
    check_len(op, "mean", n, mean)?;
    check_len(op, "rstd", n, rstd)?;
    check_len(op, "inp", n * c, inp)?;
    check_len(op, "weight", c, weight)?;
    check_len(op, "bias", c, bias)
}

/// Lengths for `layernorm_backward`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dinp: usize,
    dweight: usize,
    dbias: usize,
    dout: usize,
    inp: usize,
    weight: usize,
    mean: usize,
    rstd: usize,
    n: usize,
    c: usize,
) -> Result<()> {
    let op = "layernorm_backward";
    check_len(op, "dinp", n * c, dinp)?;
    check_len(op, "dweight", c, dweight)?;
    check_len(op, "dbias", c, dbias)?;
    check_len(op, "dout", n * c, dout)?;
    check_len(op, "inp", n * c, inp)?;
    check_len(op, "weight", c, weight)?;
    check_len(op, "mean", n, mean)?;
    check_len(op, "rstd", n, rstd)
}

/// Lengths for `matmul_forward`: `out [N*OC]`, `inp [N*C]`, `weight [OC*C]`, `bias [OC]`.
pub fn matmul_forward(
    out: usize,
    inp: usize,
    weight: usize,
    bias: Option<usize>,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    let op = "matmul_forward";
    check_len(op, "out", n * oc, out)?;
    check_len(op, "inp", n * c, inp)?;
    check_len(op, "weight", oc * c, weight)?;
    bias.map_or(Ok(()), |len| check_len(op, "bias", oc, len))
}

/// Lengths for `matmul_backward`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward(
    dinp: usize,
    dweight: usize,
    dbias: Option<usize>,
    dout: usize,
    inp: usize,
    weight: usize,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    let op = "matmul_backward";
    matmul_backward_for(op, dinp, dweight, dbias, dout, inp, weight, n, c, oc)
}

/// Lengths for `matmul_gelu_backward`: those of `matmul_backward` plus `pre [N*C]`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_gelu_backward(
    dinp: usize,
    dweight: usize,
    dbias: Option<usize>,
    dout: usize,
    inp: usize,
    weight: usize,
    pre: usize,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    let op = "matmul_gelu_backward";
    matmul_backward_for(op, dinp, dweight, dbias, dout, inp, weight, n, c, oc)?;
    check_len(op, "pre", n * c, pre)
}

#[allow(clippy::too_many_arguments)]
fn matmul_backward_for(
    op: &'static str,
    dinp: usize,
    dweight: usize,
    dbias: Option<usize>,
    dout: usize,
    inp: usize,
    weight: usize,
    n: usize,
    c: usize,
    oc: usize,
) -> Result<()> {
    check_len(op, "dinp", n * c, dinp)?;
    check_len(op, "dweight", oc * c, dweight)?;
    dbias.map_or(Ok(()), |len| check_len(op, "dbias", oc, len))?;
    check_len(op, "dout", n * oc, dout)?;
    check_len(op, "inp", n * c, inp)?;
    check_len(op, "weight", oc * c, weight)
}

/// Lengths for `attention_forward`: `out [B*T*C]`, `lse [B*NH*T]`, `qkv [B*T*3C]`.
pub fn attention_forward(
    out: usize,
    lse: usize,
    qkv: usize,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) -> Result<()> {
    let op = "attention_forward";
    check_len(op, "out", b * t * c, out)?;
    check_len(op, "lse", b * nh * t, lse)?;
    check_len(op, "qkv", b * t * 3 * c, qkv)
}

/// Lengths for `attention_backward`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dqkv: usize,
    dout: usize,
    qkv: usize,
    out: usize,
    lse: usize,
    b: usize,
    t: usize,
    c: usize,
    nh: usize,
) -> Result<()> {
    let op = "attention_backward";
    check_len(op, "dqkv", b * t * 3 * c, dqkv)?;
    check_len(op, "dout", b * t * c, dout)?;
    check_len(op, "qkv", b * t * 3 * c, qkv)?;
    check_len(op, "out", b * t * c, out)?;
    check_len(op, "lse", b * nh * t, lse)
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
pub fn attention_cached_forward(
    out: usize,
    qkv: usize,
    k_cache: usize,
    v_cache: usize,
    b: usize,
    tn: usize,
    past: usize,
    tmax: usize,
    c: usize,
    nh: usize,
) -> Result<()> {
    let op = "attention_cached_forward";
    if nh == 0 || c % nh != 0 {
        return Err(BackendError::Invalid {
            op,
            msg: format!("C = {c} is not a multiple of NH = {nh}"),
        });
    }
    if past + tn > tmax {
        return Err(BackendError::Invalid {
            op,
            msg: format!("past {past} + Tn {tn} new positions exceed the cache's Tmax {tmax}"),
        });
    }
    check_len(op, "out", b * tn * c, out)?;
    check_len(op, "qkv", b * tn * 3 * c, qkv)?;
    check_len(op, "k_cache", b * tmax * c, k_cache)?;
    check_len(op, "v_cache", b * tmax * c, v_cache)
}

/// Checks for `sample_tokens`: the parameters' ranges, `0 < V <= VP`, `logits [N*VP]`, and one
/// uniform in `[0, 1)` per row.
pub fn sample_tokens(
    logits: usize,
    n: usize,
    v: usize,
    vp: usize,
    params: &SampleParams,
    uniforms: &[f32],
) -> Result<()> {
    let op = "sample_tokens";
    params.check(op)?;
    if v == 0 || v > vp {
        return Err(BackendError::Invalid {
            op,
            msg: format!("need 0 < V <= VP, got V = {v}, VP = {vp}"),
        });
    }
    check_len(op, "logits", n * vp, logits)?;
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
pub fn cross_entropy(
    losses: usize,
    logits: usize,
    targets: &[i32],
    weights: Option<usize>,
    n: usize,
    v: usize,
    vp: usize,
) -> Result<()> {
    let op = "cross_entropy";
    if v == 0 || v > vp {
        return Err(BackendError::Invalid {
            op,
            msg: format!("need 0 < V <= VP, got V = {v}, VP = {vp}"),
        });
    }
    check_len(op, "losses", n, losses)?;
    check_len(op, "logits", n * vp, logits)?;
    check_len(op, "targets", n, targets.len())?;
    weights.map_or(Ok(()), |len| check_len(op, "weights", n, len))?;
    match targets.iter().position(|&x| x >= 0 && x as usize >= v) {
        None => Ok(()),
        Some(i) => Err(BackendError::Invalid {
            op,
            msg: format!("target {} at row {i} is not below V = {v}", targets[i]),
        }),
    }
}
