//! The [`Backend`] impl of [`CpuBackend`]: each method checks its op's rule
//! (`backend/shapes.rs`), then calls the f32 function of the kernel family file of its name.

use super::{
    adamw, attention, cross_entropy, decode, embedding, encoder, gelu, layernorm, lora, matmul,
    residual, rmsnorm, rope, sample, swiglu, CpuBackend,
};
use crate::backend::{
    check_len, shapes, AdamWStep, Backend, BackendError, LossGrad, Result, Role, SampleParams,
};

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Ids = Vec<i32>;

    fn memory_available(&self) -> Option<u64> {
        super::mem_available()
    }

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
        let pos = pos.map(Vec::as_slice);
        shapes::encoder_forward(out, ids, pos, wte, wpe, b, t, c)?;
        encoder::encoder_forward(out, ids, pos, wte, wpe, b, t, c);
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
        let pos = pos.map(Vec::as_slice);
        shapes::encoder_backward(dwte, dwpe, dout, ids, pos, b, t, c)?;
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
        shapes::layernorm_forward(out, mean, rstd, inp, weight, bias, n, c)?;
        layernorm::layernorm_forward(out, mean, rstd, inp, weight, bias, n, c);
        Ok(())
    }

    fn layernorm_backward(
        &self,
        dinp: &mut Vec<f32>,
        dweight: Option<&mut Vec<f32>>,
        dbias: Option<&mut Vec<f32>>,
        dout: &Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        mean: &Vec<f32>,
        rstd: &Vec<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let (dw, db) = (dweight.as_deref(), dbias.as_deref());
        shapes::layernorm_backward(dinp, dw, db, dout, inp, weight, mean, rstd, n, c)?;
        // A frozen weight (LoRA's base) has no gradient: the sums go to scratch.
        let (mut sw, mut sb) = (Vec::new(), Vec::new());
        let dw = dweight.unwrap_or_else(|| scratch(&mut sw, c));
        let db = dbias.unwrap_or_else(|| scratch(&mut sb, c));
        layernorm::layernorm_backward(dinp, dw, db, dout, inp, weight, mean, rstd, n, c);
        Ok(())
    }

    /// The residual add, then the layernorm of its result (as the trait's default does).
    fn residual_layernorm_forward(
        &self,
        residual: &mut Vec<f32>,
        out: &mut Vec<f32>,
        mean: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        a: &Vec<f32>,
        b: &Vec<f32>,
        weight: &Vec<f32>,
        bias: &Vec<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        shapes::residual_layernorm_forward(residual, out, mean, rstd, a, b, weight, bias, n, c)?;
        residual::residual_forward(residual, a, b, n * c);
        layernorm::layernorm_forward(out, mean, rstd, residual, weight, bias, n, c);
        Ok(())
    }

    fn residual_forward(
        &self,
        out: &mut Vec<f32>,
        a: &Vec<f32>,
        b: &Vec<f32>,
        n: usize,
    ) -> Result<()> {
        shapes::residual_forward(out, a, b, n)?;
        residual::residual_forward(out, a, b, n);
        Ok(())
    }

    fn gelu_forward(&self, out: &mut Vec<f32>, inp: &Vec<f32>, n: usize) -> Result<()> {
        shapes::gelu_forward(out, inp, n)?;
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
        shapes::gelu_backward(dinp, inp, dout, n)?;
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
        shapes::matmul_forward(out, inp, weight, bias, n, c, oc)?;
        matmul::matmul_forward(out, inp, weight, bias.map(|b| b.as_slice()), n, c, oc);
        Ok(())
    }

    fn matmul_backward(
        &self,
        dinp: &mut Vec<f32>,
        dweight: Option<&mut Vec<f32>>,
        dbias: Option<&mut Vec<f32>>,
        dout: &Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let (dw, db) = (dweight.as_deref(), dbias.as_deref());
        shapes::matmul_backward(dinp, dw, db, dout, inp, weight, n, c, oc)?;
        let dweight = dweight.map(|w| w.as_mut_slice());
        let dbias = dbias.map(|b| b.as_mut_slice());
        matmul::matmul_backward(dinp, dweight, dbias, dout, inp, weight, n, c, oc);
        Ok(())
    }

    fn matmul_gelu_backward(
        &self,
        dinp: &mut Vec<f32>,
        dweight: Option<&mut Vec<f32>>,
        dbias: Option<&mut Vec<f32>>,
        dout: &Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        pre: &Vec<f32>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let (dw, db) = (dweight.as_deref(), dbias.as_deref());
        shapes::matmul_gelu_backward(dinp, dw, db, dout, inp, weight, pre, n, c, oc)?;
        let dweight = dweight.map(|w| w.as_mut_slice());
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
        shapes::attention_forward(out, lse, qkv, b, t, c, nh)?;
        let starts = starts.map(Vec::as_slice);
        shapes::attention_starts(op, starts, b, t)?;
        attention::attention_gqa_forward(out, lse, qkv, starts, b, t, c, nh, nh);
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
        shapes::attention_backward(dqkv, dout, qkv, out, lse, b, t, c, nh)?;
        let starts = starts.map(Vec::as_slice);
        shapes::attention_starts(op, starts, b, t)?;
        attention::attention_gqa_backward(dqkv, dout, qkv, out, lse, starts, b, t, c, nh, nh);
        Ok(())
    }

    fn attention_gqa_forward(
        &self,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
        qkv: &Vec<f32>,
        starts: Option<&Vec<i32>>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
        nkv: usize,
    ) -> Result<()> {
        let op = "attention_gqa_forward";
        shapes::attention_gqa_forward(out, lse, qkv, b, t, c, nh, nkv)?;
        let starts = starts.map(Vec::as_slice);
        shapes::attention_starts(op, starts, b, t)?;
        attention::attention_gqa_forward(out, lse, qkv, starts, b, t, c, nh, nkv);
        Ok(())
    }

    fn attention_gqa_backward(
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
        nkv: usize,
    ) -> Result<()> {
        let op = "attention_gqa_backward";
        shapes::attention_gqa_backward(dqkv, dout, qkv, out, lse, b, t, c, nh, nkv)?;
        let starts = starts.map(Vec::as_slice);
        shapes::attention_starts(op, starts, b, t)?;
        let s = starts;
        attention::attention_gqa_backward(dqkv, dout, qkv, out, lse, s, b, t, c, nh, nkv);
        Ok(())
    }

    fn embedding_forward(
        &self,
        out: &mut Vec<f32>,
        ids: &Vec<i32>,
        wte: &Vec<f32>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        shapes::embedding_forward(out, ids, wte, b, t, c)?;
        embedding::embedding_forward(out, ids, wte, b, t, c);
        Ok(())
    }

    fn embedding_backward(
        &self,
        dwte: &mut Vec<f32>,
        dout: &Vec<f32>,
        ids: &Vec<i32>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        shapes::embedding_backward(dwte, dout, ids, b, t, c)?;
        embedding::embedding_backward(dwte, dout, ids, b, t, c);
        Ok(())
    }

    fn add_columns(
        &self,
        y: &mut Vec<f32>,
        x: &Vec<f32>,
        n: usize,
        oc: usize,
        col: usize,
        w: usize,
        alpha: f32,
    ) -> Result<()> {
        shapes::add_columns(y, x, n, oc, col, w, alpha)?;
        lora::add_columns(y, x, n, oc, col, w, alpha);
        Ok(())
    }

    fn copy_columns(
        &self,
        out: &mut Vec<f32>,
        y: &Vec<f32>,
        n: usize,
        oc: usize,
        col: usize,
        w: usize,
        alpha: f32,
    ) -> Result<()> {
        shapes::copy_columns(out, y, n, oc, col, w, alpha)?;
        lora::copy_columns(out, y, n, oc, col, w, alpha);
        Ok(())
    }

    fn dropout_forward(
        &self,
        out: &mut Vec<f32>,
        inp: &Vec<f32>,
        n: usize,
        p: f32,
        seed: u64,
    ) -> Result<()> {
        shapes::dropout("dropout_forward", ["out", "inp"], out, inp, n, p)?;
        lora::dropout_forward(out, inp, n, p, lora::dropout_scale(p), seed);
        Ok(())
    }

    fn dropout_backward(
        &self,
        dinp: &mut Vec<f32>,
        dout: &Vec<f32>,
        n: usize,
        p: f32,
        seed: u64,
    ) -> Result<()> {
        shapes::dropout("dropout_backward", ["dinp", "dout"], dinp, dout, n, p)?;
        lora::dropout_forward(dinp, dout, n, p, lora::dropout_scale(p), seed);
        Ok(())
    }

    fn rmsnorm_forward(
        &self,
        out: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        shapes::rmsnorm_forward(out, rstd, inp, weight, n, c, eps)?;
        rmsnorm::rmsnorm_forward(out, rstd, inp, weight, n, c, eps);
        Ok(())
    }

    fn rmsnorm_backward(
        &self,
        dinp: &mut Vec<f32>,
        dweight: Option<&mut Vec<f32>>,
        dout: &Vec<f32>,
        inp: &Vec<f32>,
        weight: &Vec<f32>,
        rstd: &Vec<f32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        shapes::rmsnorm_backward(dinp, dweight.as_deref(), dout, inp, weight, rstd, n, c)?;
        let mut sw = Vec::new();
        let dw = dweight.unwrap_or_else(|| scratch(&mut sw, c));
        rmsnorm::rmsnorm_backward(dinp, dw, dout, inp, weight, rstd, n, c);
        Ok(())
    }

    /// The residual add and the RMSNorm of its result in one pass per row.
    fn residual_rmsnorm_forward(
        &self,
        residual: &mut Vec<f32>,
        out: &mut Vec<f32>,
        rstd: &mut Vec<f32>,
        a: &Vec<f32>,
        b: &Vec<f32>,
        weight: &Vec<f32>,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        shapes::residual_rmsnorm_forward(residual, out, rstd, a, b, weight, n, c, eps)?;
        rmsnorm::residual_rmsnorm_forward(residual, out, rstd, a, b, weight, n, c, eps);
        Ok(())
    }

    fn rope_forward(
        &self,
        qkv: &mut Vec<f32>,
        inv_freq: &Vec<f32>,
        pos: Option<&Vec<i32>>,
        past: usize,
        b: usize,
        t: usize,
        nh: usize,
        nkv: usize,
        hs: usize,
    ) -> Result<()> {
        let pos = pos.map(Vec::as_slice);
        shapes::rope_forward(qkv, inv_freq, pos, b, t, nh, nkv, hs)?;
        rope::rope_forward(qkv, inv_freq, pos, past, b, t, nh, nkv, hs);
        Ok(())
    }

    fn rope_backward(
        &self,
        dqkv: &mut Vec<f32>,
        inv_freq: &Vec<f32>,
        pos: Option<&Vec<i32>>,
        b: usize,
        t: usize,
        nh: usize,
        nkv: usize,
        hs: usize,
    ) -> Result<()> {
        let pos = pos.map(Vec::as_slice);
        shapes::rope_backward(dqkv, inv_freq, pos, b, t, nh, nkv, hs)?;
        rope::rope_backward(dqkv, inv_freq, pos, b, t, nh, nkv, hs);
        Ok(())
    }

    fn swiglu_forward(
        &self,
        out: &mut Vec<f32>,
        gate_up: &Vec<f32>,
        n: usize,
        i: usize,
    ) -> Result<()> {
        shapes::swiglu_forward(out, gate_up, n, i)?;
        swiglu::swiglu_forward(out, gate_up, n, i);
        Ok(())
    }

    fn swiglu_backward(
        &self,
        dgate_up: &mut Vec<f32>,
        dout: &Vec<f32>,
        gate_up: &Vec<f32>,
        n: usize,
        i: usize,
    ) -> Result<()> {
        shapes::swiglu_backward(dgate_up, dout, gate_up, n, i)?;
        swiglu::swiglu_backward(dgate_up, dout, gate_up, n, i);
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
            LossGrad::PerRow(w) => Some(w),
            _ => None,
        };
        shapes::cross_entropy(losses, logits, targets, weights, n, v, vp)?;
        let dloss = match grad {
            LossGrad::None => None,
            LossGrad::Uniform(s) => Some(s),
            LossGrad::PerRow(_) => Some(1.0),
        };
        let weights = weights.map(Vec::as_slice);
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
        shapes::adamw(param, grad, m, v, hp)?;
        adamw::adamw(param, grad, m, v, hp);
        Ok(())
    }

    fn accumulate(&self, acc: &mut Vec<f32>, x: &Vec<f32>) -> Result<()> {
        if acc.len() != x.len() {
            return Err(BackendError::Shape {
                op: "accumulate",
                what: "x",
                expected: acc.len(),
                found: x.len(),
            });
        }
        for (a, &v) in acc.iter_mut().zip(x) {
            *a += v;
        }
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
        shapes::attention_cached_forward(out, qkv, k_cache, v_cache, b, tn, past, tmax, c, nh)?;
        let (kc, vc) = (k_cache, v_cache);
        decode::attention_gqa_cached_forward(out, qkv, kc, vc, b, tn, past, tmax, c, nh, nh);
        Ok(())
    }

    fn attention_gqa_cached_forward(
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
        nkv: usize,
    ) -> Result<()> {
        let (kc, vc) = (k_cache, v_cache);
        shapes::attention_gqa_cached_forward(out, qkv, kc, vc, b, tn, past, tmax, c, nh, nkv)?;
        decode::attention_gqa_cached_forward(out, qkv, kc, vc, b, tn, past, tmax, c, nh, nkv);
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
        shapes::sample_tokens(logits, n, v, vp, params, uniforms)?;
        Ok(sample::sample_tokens(logits, n, v, vp, params, uniforms))
    }
}

/// A zeroed scratch of `c` elements in `buf`, for a frozen weight's discarded gradient sums
/// (the CPU kernels compute them with the input gradient in one pass).
fn scratch(buf: &mut Vec<f32>, c: usize) -> &mut Vec<f32> {
    buf.resize(c, 0.0);
    buf
}
