//! Launchers for `kernels/encoder.cu`: token + position embedding, forward and backward,
//! with implicit (`t`) or explicit (`pos[b,t]`) positions; and the token embedding alone
//! (`embedding_forward/backward`, the Llama family), whose backward is the encoder's dwte walk.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::kernels::encoder::{
    ENCODER_BACKWARD_WPE_F32, ENCODER_BACKWARD_WTE_F32, ENCODER_EMBEDDING_FORWARD_BF16,
    ENCODER_FORWARD_BF16, ENCODER_FORWARD_POS_BF16,
};
use super::{as_i32, grid_stride, CudaBackend, CudaBuf, CudaIds, Result};
use crate::backend::shapes;

/// The 32-bit ints the kernels take.
fn check_i32(op: &'static str, b: usize, t: usize, c: usize) -> Result<()> {
    as_i32(op, "B*T", b * t)?;
    as_i32(op, "C", c)?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    be: &CudaBackend,
    out: &mut CudaBuf,
    ids: &CudaIds,
    pos: Option<&CudaIds>,
    wte: &CudaBuf,
    wpe: &CudaBuf,
    b: usize,
    t: usize,
    c: usize,
) -> Result<()> {
    let op = "encoder_forward";
    let pos_host = pos.map(|p| p.host.as_slice());
    shapes::encoder_forward(out, &ids.host, pos_host, wte, wpe, b, t, c)?;
    check_i32(op, b, t, c)?;
    if b * t == 0 {
        return Ok(());
    }
    let o = out.bf16_mut(op, "out")?;
    let (te, pe) = (wte.bf16(op, "wte")?, wpe.bf16(op, "wpe")?);
    let (n, t_, c_) = ((b * t) as i32, t as i32, c as i32);
    let cfg = grid_stride(b * t * c, 256);
    if let Some(pos) = pos {
        let kernel = ENCODER_FORWARD_POS_BF16;
        // SAFETY: out holds N*C bf16, ids N ints each in [0, V) and pos N ints each in
        // [0, Tmax) (checked on the host copies), wte V*C and wpe Tmax*C bf16; arguments match
        // (bf16*, const int*, const int*, bf16*, bf16*, int, int).
        unsafe { launch!(be, kernel, cfg, o, &ids.dev, &pos.dev, te, pe, &n, &c_) }?;
        return Ok(());
    }
    let kernel = ENCODER_FORWARD_BF16;
    // SAFETY: out holds N*C bf16, ids N ints each in [0, V) (checked on the host copy), wte V*C
    // and wpe at least T*C bf16; arguments match (bf16*, const int*, bf16*, bf16*, int, int, int).
    unsafe { launch!(be, kernel, cfg, o, &ids.dev, te, pe, &n, &t_, &c_) }?;
    Ok(())
}

/// Positions grouped by key (token id, or explicit position), ascending within each group:
/// (order, bucket starts, keys).
fn buckets(ids: &[i32], vocab: usize) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
    let mut count = vec![0usize; vocab];
    for &id in ids {
        count[id as usize] += 1;
    }
    let mut start = vec![0i32];
    let mut tokens = Vec::new();
    let mut offset = vec![0usize; vocab];
    let mut total = 0usize;
    for (tok, &k) in count.iter().enumerate() {
        if k > 0 {
            offset[tok] = total;
            total += k;
            tokens.push(tok as i32);
            start.push(total as i32);
        }
    }
    let mut order = vec![0i32; ids.len()];
    for (pos, &id) in ids.iter().enumerate() {
        order[offset[id as usize]] = pos as i32;
        offset[id as usize] += 1;
    }
    (order, start, tokens)
}

/// Runs `encoder_backward_wte_f32` on `table` (`rows * C` fp32): `table[keys[i],:] +=
/// dout[i,:]`, one block per distinct key walking its positions in increasing order.
#[allow(clippy::too_many_arguments)]
fn scatter_rows(
    be: &CudaBackend,
    op: &'static str,
    what: &'static str,
    table: &mut CudaBuf,
    dout: &CudaBuf,
    keys: &[i32],
    rows: usize,
    c: usize,
) -> Result<()> {
    let dy = dout.bf16(op, "dout")?;
    let (order, start, tokens) = buckets(keys, rows);
    let (order, start_d, tokens_d) = (be.htod(&order)?, be.htod(&start)?, be.htod(&tokens)?);
    let c_ = c as i32;
    let dst = table.f32_mut(op, what)?;
    let kernel = ENCODER_BACKWARD_WTE_F32;
    let cfg = LaunchConfig {
        grid_dim: (tokens.len() as u32, 1, 1),
        block_dim: (row_threads(c), 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: one block per bucket; bucket k's positions order[start[k]..start[k+1]] index
    // rows of dout (N*C bf16) and its key a row of the table (rows*C fp32), all built on the
    // host from checked ids or positions; arguments match (float*, bf16*, int*, int*, int*, int).
    unsafe { launch!(be, kernel, cfg, dst, dy, &order, &start_d, &tokens_d, &c_) }?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    be: &CudaBackend,
    dwte: &mut CudaBuf,
    dwpe: &mut CudaBuf,
    dout: &CudaBuf,
    ids: &CudaIds,
    pos: Option<&CudaIds>,
    b: usize,
    t: usize,
    c: usize,
) -> Result<()> {
    let op = "encoder_backward";
    let pos_host = pos.map(|p| p.host.as_slice());
    let (vocab, tmax) = shapes::encoder_backward(dwte, dwpe, dout, &ids.host, pos_host, b, t, c)?;
    check_i32(op, b, t, c)?;
    if b * t == 0 {
        return Ok(());
    }
    scatter_rows(be, op, "dwte", dwte, dout, &ids.host, vocab, c)?;
    if let Some(pos) = pos {
        return scatter_rows(be, op, "dwpe", dwpe, dout, &pos.host, tmax, c);
    }
    let dy = dout.bf16(op, "dout")?;
    let dpe = dwpe.f32_mut(op, "dwpe")?;
    let (b_, t_, c_) = (b as i32, t as i32, c as i32);
    let kernel = ENCODER_BACKWARD_WPE_F32;
    // SAFETY: dwpe holds at least T*C floats and dout B*T*C bf16 (checked); the kernel covers
    // the first T*C elements of dwpe; arguments match (float*, bf16*, int, int, int).
    unsafe { launch!(be, kernel, grid_stride(t * c, 256), dpe, dy, &b_, &t_, &c_) }?;
    Ok(())
}

/// Threads per block of the row kernels: C rounded up to a warp, at most 256.
fn row_threads(c: usize) -> u32 {
    c.next_multiple_of(32).min(256) as u32
}

/// `out[b,t,:] = wte[ids[b,t],:]`: one block per position.
#[allow(clippy::too_many_arguments)]
pub(super) fn embedding_forward(
    be: &CudaBackend,
    out: &mut CudaBuf,
    ids: &CudaIds,
    wte: &CudaBuf,
    b: usize,
    t: usize,
    c: usize,
) -> Result<()> {
    let op = "embedding_forward";
    shapes::embedding_forward(out, &ids.host, wte, b, t, c)?;
    check_i32(op, b, t, c)?;
    if b * t == 0 {
        return Ok(());
    }
    let o = out.bf16_mut(op, "out")?;
    let te = wte.bf16(op, "wte")?;
    let c_ = c as i32;
    let cfg = LaunchConfig {
        grid_dim: ((b * t) as u32, 1, 1),
        block_dim: (row_threads(c), 1, 1),
        shared_mem_bytes: 0,
    };
    let kernel = ENCODER_EMBEDDING_FORWARD_BF16;
    // SAFETY: one block per position p < B*T; out holds B*T*C bf16, ids B*T ints each in
    // [0, V) (checked on the host copy), wte V*C bf16; arguments match (bf16*, const int*,
    // const bf16*, int).
    unsafe { launch!(be, kernel, cfg, o, &ids.dev, te, &c_) }?;
    Ok(())
}

/// `dwte[ids[b,t],:] += dout[b,t,:]`: the encoder's per-token bucket walk (positions in order).
pub(super) fn embedding_backward(
    be: &CudaBackend,
    dwte: &mut CudaBuf,
    dout: &CudaBuf,
    ids: &CudaIds,
    b: usize,
    t: usize,
    c: usize,
) -> Result<()> {
    let op = "embedding_backward";
    let vocab = shapes::embedding_backward(dwte, dout, &ids.host, b, t, c)?;
    check_i32(op, b, t, c)?;
    if b * t == 0 {
        return Ok(());
    }
    scatter_rows(be, op, "dwte", dwte, dout, &ids.host, vocab, c)
}
