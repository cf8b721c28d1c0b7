//! The f32 CPU reference backend: the specification every other backend is tested against.
//!
//! [`CpuBackend`] implements [`Backend`] with plain `Vec<f32>` buffers. Each trait method checks
//! its buffer lengths and arguments (returning [`BackendError`], never reading out of bounds),
//! then calls the f32 instantiation of a free function from the kernel family file of the same
//! name. Those functions are generic over [`Float`], so the tests run the very same code in
//! f64 for finite-difference gradient checks. Work is split across rayon threads only over
//! independent outputs, and every cross-row sum runs in a fixed order: results are
//! bit-identical whatever the thread count.

pub mod adamw;
pub mod attention;
pub mod cross_entropy;
pub mod decode;
pub mod encoder;
pub mod float;
pub mod gelu;
pub mod layernorm;
pub mod matmul;
pub mod residual;
pub mod sample;

pub use float::Float;

use super::{
    check_len, shapes, AdamWStep, Backend, BackendError, LossGrad, Result, Role, SampleParams,
};

/// The f32 CPU reference backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        Self
    }
}

fn invalid(op: &'static str, msg: String) -> BackendError {
    BackendError::Invalid { op, msg }
}

/// Rows in a `[rows * c]` table whose row count the op does not fix (`wte`, `wpe`).
fn table_rows(op: &'static str, what: &'static str, len: usize, c: usize) -> Result<usize> {
    if c == 0 {
        return Err(invalid(op, "C must be positive".into()));
    }
    check_len(op, what, len - len % c, len)?;
    Ok(len / c)
}

/// Every id must index a row of a `vocab`-row table.
fn check_ids(op: &'static str, ids: &[i32], vocab: usize) -> Result<()> {
    match ids.iter().position(|&id| id < 0 || id as usize >= vocab) {
        None => Ok(()),
        Some(i) => Err(invalid(
            op,
            format!(
                "token id {} at position {i} is outside [0, {vocab})",
                ids[i]
            ),
        )),
    }
}

/// Checks the encoder's shapes. `names` are the op's names for (out, wte, wpe) buffers.
#[allow(clippy::too_many_arguments)]
fn check_encoder(
    op: &'static str,
    names: [&'static str; 3],
    out: usize,
    ids: &[i32],
    pos: Option<&[i32]>,
    wte: usize,
    wpe: usize,
    b: usize,
    t: usize,
    c: usize,
) -> Result<()> {
    check_len(op, names[0], b * t * c, out)?;
    check_len(op, "ids", b * t, ids.len())?;
    let vocab = table_rows(op, names[1], wte, c)?;
    let tmax = table_rows(op, names[2], wpe, c)?;
    match pos {
        None if t > tmax => {
            return Err(BackendError::Shape {
                op,
                what: names[2],
                expected: t * c,
                found: wpe,
            })
        }
        None => {}
        Some(pos) => {
            check_len(op, "pos", b * t, pos.len())?;
            check_positions(op, pos, tmax)?;
        }
    }
    check_ids(op, ids, vocab)
}

/// Every explicit position must index a row of the `tmax`-row position table.
fn check_positions(op: &'static str, pos: &[i32], tmax: usize) -> Result<()> {
    match pos.iter().position(|&p| p < 0 || p as usize >= tmax) {
        None => Ok(()),
        Some(i) => Err(invalid(
            op,
            format!(
                "position {} at index {i} is outside [0, {tmax}) (the wpe table's rows)",
                pos[i]
            ),
        )),
    }
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Ids = Vec<i32>;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn zeros(&self, len: usize, _role: Role) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn upload(&self, host: &[f32], _role: Role) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }

    fn write(&self, buf: &mut Vec<f32>, host: &[f32]) -> Result<()> {
        check_len("write", "host", buf.len(), host.len())?;
        buf.copy_from_slice(host);
        Ok(())
    }

    fn download_range(&self, buf: &Vec<f32>, offset: usize, len: usize) -> Result<Vec<f32>> {
        let end = offset.saturating_add(len);
        if end > buf.len() {
            return Err(BackendError::Shape {
                op: "download_range",
                what: "buf",
                expected: end,
                found: buf.len(),
            });
        }
        Ok(buf[offset..end].to_vec())
    }

    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }

    fn fill_zero(&self, buf: &mut Vec<f32>) -> Result<()> {
        buf.fill(0.0);
        Ok(())
    }

    fn upload_ids(&self, host: &[i32]) -> Result<Vec<i32>> {
        Ok(host.to_vec())
    }

    fn ids_len(&self, ids: &Vec<i32>) -> usize {
        ids.len()
    }

    fn encoder_forward(
        &self,
        out: &mut Vec<f32>,
        ids: &Vec<i32>,
        pos: Option<&Vec<i32>>,
        wte: &Vec<f32>,
        wpe: &Vec<f32>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        let names = ["out", "wte", "wpe"];
        check_encoder(
            "encoder_forward",
            names,
            out.len(),
            ids,
            pos.map(Vec::as_slice),
            wte.len(),
            wpe.len(),
            b,
            t,
            c,
        )?;
        encoder::encoder_forward(out, ids, pos.map(Vec::as_slice), wte, wpe, b, t, c);
        Ok(())
    }

    fn encoder_backward(
        &self,
        dwte: &mut Vec<f32>,
        dwpe: &mut Vec<f32>,
        dout: &Vec<f32>,
        ids: &Vec<i32>,
        pos: Option<&Vec<i32>>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        let op = "encoder_backward";
        let names = ["dout", "dwte", "dwpe"];
        let pos = pos.map(Vec::as_slice);
        check_encoder(
            op,
            names,
            dout.len(),
            ids,
            pos,
            dwte.len(),
            dwpe.len(),
            b,
            t,
            c,
        )?;
        encoder::encoder_backward(dwte, dwpe, dout, ids, pos, b, t, c);
        Ok(())
    }

    fn layernorm_forward(
        &self,
        out: &mut Vec<f32>,
        mean: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        bias: &Vec<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        shapes::layernorm_forward(
            out.len(),
            mean.len(),
            rstd.len(),
            inp.len(),
            weight.len(),
            bias.len(),
            n,
            c,
        )?;
        layernorm::layernorm_forward(out, mean, rstd, inp, weight, bias, n, c);
        Ok(())
    }

    fn layernorm_backward(
        &self,
        dinp: &mut Vec<f32>,
        dweight: &mut Vec<f32>,
        dbias: &mut Vec<f32>,
        dout: &Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        mean: &Vec<f32>,
        rstd: &Vec<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        shapes::layernorm_backward(
            dinp.len(),
            dweight.len(),
            dbias.len(),
            dout.len(),
            inp.len(),
            weight.len(),
            mean.len(),
            rstd.len(),
            n,
            c,
        )?;
        layernorm::layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, n, c);
        Ok(())
    }

    fn residual_forward(
        &self,
        out: &mut Vec<f32>,
        a: &Vec<f32>,
        b: &Vec<f32>,
        n: usize,
    ) -> Result<()> {
        let op = "residual_forward";
        check_len(op, "out", n, out.len())?;
        check_len(op, "a", n, a.len())?;
        check_len(op, "b", n, b.len())?;
        residual::residual_forward(out, a, b, n);
        Ok(())
    }

    fn gelu_forward(&self, out: &mut Vec<f32>, inp: &Vec<f32>, n: usize) -> Result<()> {
        check_len("gelu_forward", "out", n, out.len())?;
        check_len("gelu_forward", "inp", n, inp.len())?;
        gelu::gelu_forward(out, inp, n);
        Ok(())
    }

    fn gelu_backward(
        &self,
        dinp: &mut Vec<f32>,
        inp: &Vec<f32>,
        dout: &Vec<f32>,
        n: usize,
    ) -> Result<()> {
        let op = "gelu_backward";
        check_len(op, "dinp", n, dinp.len())?;
        check_len(op, "inp", n, inp.len())?;
        check_len(op, "dout", n, dout.len())?;
        gelu::gelu_backward(dinp, inp, dout, n);
        Ok(())
    }

    fn matmul_forward(
        &self,
        out: &mut Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        bias: Option<&Vec<f32>>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        shapes::matmul_forward(
            out.len(),
            inp.len(),
            weight.len(),
            bias.map(|x| x.len()),
            n,
            c,
            oc,
        )?;
        matmul::matmul_forward(out, inp, weight, bias.map(|b| b.as_slice()), n, c, oc);
        Ok(())
    }

    fn matmul_backward(
        &self,
        dinp: &mut Vec<f32>,
        dweight: &mut Vec<f32>,
        dbias: Option<&mut Vec<f32>>,
        dout: &Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        shapes::matmul_backward(
            dinp.len(),
            dweight.len(),
            dbias.as_ref().map(|x| x.len()),
            dout.len(),
            inp.len(),
            weight.len(),
            n,
            c,
            oc,
        )?;
        let dbias = dbias.map(|b| b.as_mut_slice());
        matmul::matmul_backward(dinp, dweight, dbias, dout, inp, weight, n, c, oc);
        Ok(())
    }

    fn matmul_gelu_backward(
        &self,
        dinp: &mut Vec<f32>,
        dweight: &mut Vec<f32>,
        dbias: Option<&mut Vec<f32>>,
        dout: &Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        pre: &Vec<f32>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        shapes::matmul_gelu_backward(
            dinp.len(),
            dweight.len(),
            dbias.as_ref().map(|x| x.len()),
            dout.len(),
            inp.len(),
            weight.len(),
            pre.len(),
            n,
            c,
            oc,
        )?;
        let dbias = dbias.map(|b| b.as_mut_slice());
        matmul::matmul_backward(dinp, dweight, dbias, dout, inp, weight, n, c, oc);
        gelu::gelu_backward_in_place(dinp, pre, n * c);
        Ok(())
    }

    fn attention_forward(
        &self,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        qkv: &Vec<f32>,
        starts: Option<&Vec<i32>>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        let op = "attention_forward";
        check_heads(op, c, nh)?;
        shapes::attention_forward(out.len(), lse.len(), qkv.len(), b, t, c, nh)?;
        let starts = starts.map(Vec::as_slice);
        shapes::attention_starts(op, starts, b, t)?;
        attention::attention_forward(out, lse, qkv, starts, b, t, c, nh);
        Ok(())
    }

    fn attention_backward(
        &self,
        dqkv: &mut Vec<f32>,
        dout: &Vec<f32>,
        qkv: &Vec<f32>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
        starts: Option<&Vec<i32>>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        let op = "attention_backward";
        check_heads(op, c, nh)?;
        shapes::attention_backward(
            dqkv.len(),
            dout.len(),
            qkv.len(),
            out.len(),
            lse.len(),
            b,
            t,
            c,
            nh,
        )?;
        let starts = starts.map(Vec::as_slice);
        shapes::attention_starts(op, starts, b, t)?;
        attention::attention_backward(dqkv, dout, qkv, out, lse, starts, b, t, c, nh);
        Ok(())
    }

    fn cross_entropy(
        &self,
        losses: &mut Vec<f32>,
        logits: &mut Vec<f32>,
        targets: &Vec<i32>,
        n: usize,
        v: usize,
        vp: usize,
        grad: LossGrad<'_, Vec<f32>>,
    ) -> Result<()> {
        let weights = match grad {
            LossGrad::PerRow(w) => Some(w.as_slice()),
            _ => None,
        };
        shapes::cross_entropy(
            losses.len(),
            logits.len(),
            targets,
            weights.map(<[f32]>::len),
            n,
            v,
            vp,
        )?;
        let dloss = match grad {
            LossGrad::None => None,
            LossGrad::Uniform(s) => Some(s),
            LossGrad::PerRow(_) => Some(1.0),
        };
        cross_entropy::cross_entropy(losses, logits, targets, n, v, vp, dloss, weights);
        Ok(())
    }

    fn adamw(
        &self,
        param: &mut Vec<f32>,
        grad: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        hp: &AdamWStep,
    ) -> Result<()> {
        let op = "adamw";
        check_len(op, "grad", param.len(), grad.len())?;
        check_len(op, "m", param.len(), m.len())?;
        check_len(op, "v", param.len(), v.len())?;
        if hp.step == 0 {
            return Err(invalid(op, "step is 1-based, got 0".into()));
        }
        adamw::adamw(param, grad, m, v, hp);
        Ok(())
    }

    fn global_norm(&self, bufs: &[&Vec<f32>]) -> Result<f32> {
        let slices: Vec<&[f32]> = bufs.iter().map(|b| b.as_slice()).collect();
        Ok(adamw::global_norm(&slices) as f32)
    }

    fn attention_cached_forward(
        &self,
        out: &mut Vec<f32>,
        qkv: &Vec<f32>,
        k_cache: &mut Vec<f32>,
        v_cache: &mut Vec<f32>,
        b: usize,
        tn: usize,
        past: usize,
        tmax: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        shapes::attention_cached_forward(
            out.len(),
            qkv.len(),
            k_cache.len(),
            v_cache.len(),
            b,
            tn,
            past,
            tmax,
            c,
            nh,
        )?;
        decode::attention_cached_forward(out, qkv, k_cache, v_cache, b, tn, past, tmax, c, nh);
        Ok(())
    }

    fn sample_tokens(
        &self,
        logits: &Vec<f32>,
        n: usize,
        v: usize,
        vp: usize,
        params: &SampleParams,
        uniforms: &[f32],
    ) -> Result<Vec<u32>> {
        shapes::sample_tokens(logits.len(), n, v, vp, params, uniforms)?;
        Ok(sample::sample_tokens(logits, n, v, vp, params, uniforms))
    }
}

/// Attention needs `NH > 0` heads that divide `C`.
fn check_heads(op: &'static str, c: usize, nh: usize) -> Result<()> {
    if nh == 0 || c % nh != 0 {
        return Err(invalid(
            op,
            format!("C = {c} is not a multiple of NH = {nh}"),
        ));
    }
    Ok(())
}
