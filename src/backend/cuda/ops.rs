//! The [`Backend`] impl of [`CudaBackend`]: buffer housekeeping (allocation, copies, zeroing
//! in the precision each [`Role`] takes, in `buffer.rs`) and every op forwarded to the launcher
//! in the file named after its kernel family. Multi-head attention (training and cached) runs
//! the grouped-query kernels with NKV = NH: one kernel path serves both families.

use super::{
    accumulate, adamw, attention, cross_entropy, decode, driver_error, encoder, gelu, global_norm,
    layernorm, lora, matmul, matmul_gelu, residual, rmsnorm, rope, sample, swiglu, AdamWStep,
    CudaBackend, CudaBuf, CudaIds, Result,
};
use crate::backend::{shapes, Backend, LossGrad, Role, SampleParams};

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Ids = CudaIds;

    fn name(&self) -> String {
        let label = self.options.label();
        format!("cuda:{} {}{label}", self.ordinal, self.info)
    }

    fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_error("synchronizing the stream", e))
    }

    /// Device-wide: total minus free memory (this process's buffers, cuBLASLt's workspace
    /// and the context itself), the figure `nvidia-smi` shows for the process.
    fn memory_in_use(&self) -> Option<usize> {
        self.ctx
            .mem_get_info()
            .ok()
            .map(|(free, total)| total - free)
    }

    fn memory_available(&self) -> Option<u64> {
        self.ctx.mem_get_info().ok().map(|(free, _)| free as u64)
    }

    fn element_bytes(&self, role: Role) -> usize {
        match role {
            Role::Param | Role::Activation => 2,
            Role::Grad | Role::State | Role::Stat => 4,
        }
    }

    fn zeros(&self, len: usize, role: Role) -> Result<CudaBuf> {
        self.zeros_buf(len, role)
    }

    fn upload(&self, host: &[f32], role: Role) -> Result<CudaBuf> {
        self.upload_buf(host, role)
    }

    fn write(&self, buf: &mut CudaBuf, host: &[f32]) -> Result<()> {
        self.write_buf(buf, host)
    }

    /// A parameter downloads its fp32 master copy.
    fn download_range(&self, buf: &CudaBuf, offset: usize, len: usize) -> Result<Vec<f32>> {
        self.download_buf(buf, offset, len)
    }

    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len()
    }

    /// Drops the fp32 master of a parameter (see `buffer.rs`).
    fn release_master(&self, buf: &mut CudaBuf) -> Result<()> {
        buf.release_master();
        Ok(())
    }

    fn fill_zero(&self, buf: &mut CudaBuf) -> Result<()> {
        self.fill_zero_buf(buf)
    }

    fn upload_ids(&self, host: &[i32]) -> Result<CudaIds> {
        Ok(CudaIds {
            dev: self.htod(host)?,
            host: host.to_vec(),
        })
    }

    fn ids_len(&self, ids: &CudaIds) -> usize {
        ids.host.len()
    }

    fn encoder_forward(
        &self,
        out: &mut CudaBuf,
        ids: &CudaIds,
        pos: Option<&CudaIds>,
        wte: &CudaBuf,
        wpe: &CudaBuf,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        encoder::forward(self, out, ids, pos, wte, wpe, b, t, c)
    }

    fn encoder_backward(
        &self,
        dwte: &mut CudaBuf,
        dwpe: &mut CudaBuf,
        dout: &CudaBuf,
        ids: &CudaIds,
        pos: Option<&CudaIds>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        encoder::backward(self, dwte, dwpe, dout, ids, pos, b, t, c)
    }

    fn layernorm_forward(
        &self,
        out: &mut CudaBuf,
        mean: &mut CudaBuf,
        rstd: &mut CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        bias: &CudaBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        layernorm::forward(self, out, mean, rstd, inp, weight, bias, n, c)
    }

    fn layernorm_backward(
        &self,
        dinp: &mut CudaBuf,
        dweight: Option<&mut CudaBuf>,
        dbias: Option<&mut CudaBuf>,
        dout: &CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        mean: &CudaBuf,
        rstd: &CudaBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        layernorm::backward(
            self, dinp, dweight, dbias, dout, inp, weight, mean, rstd, n, c,
        )
    }

    fn residual_layernorm_forward(
        &self,
        residual: &mut CudaBuf,
        out: &mut CudaBuf,
        mean: &mut CudaBuf,
        rstd: &mut CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        weight: &CudaBuf,
        bias: &CudaBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        layernorm::residual_layernorm_forward(
            self, residual, out, mean, rstd, a, b, weight, bias, n, c,
        )
    }

    fn residual_forward(
        &self,
        out: &mut CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        n: usize,
    ) -> Result<()> {
        residual::forward(self, out, a, b, n)
    }

    fn add_columns(
        &self,
        y: &mut CudaBuf,
        x: &CudaBuf,
        n: usize,
        oc: usize,
        col: usize,
        w: usize,
        alpha: f32,
    ) -> Result<()> {
        lora::add_columns(self, y, x, n, oc, col, w, alpha)
    }

    fn copy_columns(
        &self,
        out: &mut CudaBuf,
        y: &CudaBuf,
        n: usize,
        oc: usize,
        col: usize,
        w: usize,
        alpha: f32,
    ) -> Result<()> {
        lora::copy_columns(self, out, y, n, oc, col, w, alpha)
    }

    fn dropout_forward(
        &self,
        out: &mut CudaBuf,
        inp: &CudaBuf,
        n: usize,
        p: f32,
        seed: u64,
    ) -> Result<()> {
        let names = ["out", "inp"];
        lora::dropout(self, "dropout_forward", names, out, inp, n, p, seed)
    }

    fn dropout_backward(
        &self,
        dinp: &mut CudaBuf,
        dout: &CudaBuf,
        n: usize,
        p: f32,
        seed: u64,
    ) -> Result<()> {
        let names = ["dinp", "dout"];
        lora::dropout(self, "dropout_backward", names, dinp, dout, n, p, seed)
    }

    fn gelu_forward(&self, out: &mut CudaBuf, inp: &CudaBuf, n: usize) -> Result<()> {
        gelu::forward(self, out, inp, n)
    }

    fn gelu_backward(
        &self,
        dinp: &mut CudaBuf,
        inp: &CudaBuf,
        dout: &CudaBuf,
        n: usize,
    ) -> Result<()> {
        gelu::backward(self, dinp, inp, dout, n)
    }

    fn matmul_forward(
        &self,
        out: &mut CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        bias: Option<&CudaBuf>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        matmul::forward(self, out, inp, weight, bias, n, c, oc)
    }

    fn matmul_backward(
        &self,
        dinp: &mut CudaBuf,
        dweight: Option<&mut CudaBuf>,
        dbias: Option<&mut CudaBuf>,
        dout: &CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        matmul::backward(self, dinp, dweight, dbias, dout, inp, weight, n, c, oc)
    }

    fn matmul_gelu_forward(
        &self,
        out: &mut CudaBuf,
        pre: &mut CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        bias: Option<&CudaBuf>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        matmul_gelu::forward(self, out, pre, inp, weight, bias, n, c, oc)
    }

    fn matmul_gelu_backward(
        &self,
        dinp: &mut CudaBuf,
        dweight: Option<&mut CudaBuf>,
        dbias: Option<&mut CudaBuf>,
        dout: &CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        pre: &CudaBuf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        matmul_gelu::backward(self, dinp, dweight, dbias, dout, inp, weight, pre, n, c, oc)
    }

    fn attention_forward(
        &self,
        out: &mut CudaBuf,
        lse: &mut CudaBuf,
        qkv: &CudaBuf,
        starts: Option<&CudaIds>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        shapes::attention_forward(out, lse, qkv, b, t, c, nh)?;
        let op = "attention_forward";
        attention::forward(self, op, out, lse, qkv, starts, b, t, c, nh, nh)
    }

    fn attention_backward(
        &self,
        dqkv: &mut CudaBuf,
        dout: &CudaBuf,
        qkv: &CudaBuf,
        out: &CudaBuf,
        lse: &CudaBuf,
        starts: Option<&CudaIds>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        shapes::attention_backward(dqkv, dout, qkv, out, lse, b, t, c, nh)?;
        let op = "attention_backward";
        attention::backward(self, op, dqkv, dout, qkv, out, lse, starts, b, t, c, nh, nh)
    }

    fn attention_gqa_forward(
        &self,
        out: &mut CudaBuf,
        lse: &mut CudaBuf,
        qkv: &CudaBuf,
        starts: Option<&CudaIds>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
        nkv: usize,
    ) -> Result<()> {
        let op = "attention_gqa_forward";
        attention::forward(self, op, out, lse, qkv, starts, b, t, c, nh, nkv)
    }

    fn attention_gqa_backward(
        &self,
        dqkv: &mut CudaBuf,
        dout: &CudaBuf,
        qkv: &CudaBuf,
        out: &CudaBuf,
        lse: &CudaBuf,
        starts: Option<&CudaIds>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
        nkv: usize,
    ) -> Result<()> {
        let op = "attention_gqa_backward";
        attention::backward(
            self, op, dqkv, dout, qkv, out, lse, starts, b, t, c, nh, nkv,
        )
    }

    fn embedding_forward(
        &self,
        out: &mut CudaBuf,
        ids: &CudaIds,
        wte: &CudaBuf,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        encoder::embedding_forward(self, out, ids, wte, b, t, c)
    }

    fn embedding_backward(
        &self,
        dwte: &mut CudaBuf,
        dout: &CudaBuf,
        ids: &CudaIds,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        encoder::embedding_backward(self, dwte, dout, ids, b, t, c)
    }

    fn rmsnorm_forward(
        &self,
        out: &mut CudaBuf,
        rstd: &mut CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        rmsnorm::forward(self, out, rstd, inp, weight, n, c, eps)
    }

    fn rmsnorm_backward(
        &self,
        dinp: &mut CudaBuf,
        dweight: Option<&mut CudaBuf>,
        dout: &CudaBuf,
        inp: &CudaBuf,
        weight: &CudaBuf,
        rstd: &CudaBuf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        rmsnorm::backward(self, dinp, dweight, dout, inp, weight, rstd, n, c)
    }

    fn residual_rmsnorm_forward(
        &self,
        residual: &mut CudaBuf,
        out: &mut CudaBuf,
        rstd: &mut CudaBuf,
        a: &CudaBuf,
        b: &CudaBuf,
        weight: &CudaBuf,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        rmsnorm::residual_rmsnorm_forward(self, residual, out, rstd, a, b, weight, n, c, eps)
    }

    fn rope_forward(
        &self,
        qkv: &mut CudaBuf,
        inv_freq: &CudaBuf,
        pos: Option<&CudaIds>,
        past: usize,
        b: usize,
        t: usize,
        nh: usize,
        nkv: usize,
        hs: usize,
    ) -> Result<()> {
        rope::forward(self, qkv, inv_freq, pos, past, b, t, nh, nkv, hs)
    }

    fn rope_backward(
        &self,
        dqkv: &mut CudaBuf,
        inv_freq: &CudaBuf,
        pos: Option<&CudaIds>,
        b: usize,
        t: usize,
        nh: usize,
        nkv: usize,
        hs: usize,
    ) -> Result<()> {
        rope::backward(self, dqkv, inv_freq, pos, b, t, nh, nkv, hs)
    }

    fn swiglu_forward(
        &self,
        out: &mut CudaBuf,
        gate_up: &CudaBuf,
        n: usize,
        i: usize,
    ) -> Result<()> {
        swiglu::forward(self, out, gate_up, n, i)
    }

    fn swiglu_backward(
        &self,
        dgate_up: &mut CudaBuf,
        dout: &CudaBuf,
        gate_up: &CudaBuf,
        n: usize,
        i: usize,
    ) -> Result<()> {
        swiglu::backward(self, dgate_up, dout, gate_up, n, i)
    }

    fn cross_entropy(
        &self,
        losses: &mut CudaBuf,
        logits: &mut CudaBuf,
        targets: &CudaIds,
        n: usize,
        v: usize,
        vp: usize,
        grad: LossGrad<'_, CudaBuf>,
    ) -> Result<()> {
        cross_entropy::forward(self, losses, logits, targets, n, v, vp, grad)
    }

    fn adamw(
        &self,
        param: &mut CudaBuf,
        grad: &CudaBuf,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
        hp: &AdamWStep,
    ) -> Result<()> {
        adamw::update(self, param, grad, m, v, hp)
    }

    fn accumulate(&self, acc: &mut CudaBuf, x: &CudaBuf) -> Result<()> {
        accumulate::accumulate(self, acc, x)
    }

    fn global_norm(&self, bufs: &[&CudaBuf]) -> Result<f32> {
        global_norm::global_norm(self, bufs)
    }

    fn attention_cached_forward(
        &self,
        out: &mut CudaBuf,
        qkv: &CudaBuf,
        k_cache: &mut CudaBuf,
        v_cache: &mut CudaBuf,
        b: usize,
        tn: usize,
        past: usize,
        tmax: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        shapes::attention_cached_forward(out, qkv, k_cache, v_cache, b, tn, past, tmax, c, nh)?;
        let op = "attention_cached_forward";
        let (kc, vc) = (k_cache, v_cache);
        decode::attention_cached_forward(self, op, out, qkv, kc, vc, b, tn, past, tmax, c, nh, nh)
    }

    fn attention_gqa_cached_forward(
        &self,
        out: &mut CudaBuf,
        qkv: &CudaBuf,
        k_cache: &mut CudaBuf,
        v_cache: &mut CudaBuf,
        b: usize,
        tn: usize,
        past: usize,
        tmax: usize,
        c: usize,
        nh: usize,
        nkv: usize,
    ) -> Result<()> {
        let op = "attention_gqa_cached_forward";
        let (kc, vc) = (k_cache, v_cache);
        decode::attention_cached_forward(self, op, out, qkv, kc, vc, b, tn, past, tmax, c, nh, nkv)
    }

    fn sample_tokens(
        &self,
        logits: &CudaBuf,
        n: usize,
        v: usize,
        vp: usize,
        params: &SampleParams,
        uniforms: &[f32],
    ) -> Result<Vec<u32>> {
        sample::sample_tokens(self, logits, n, v, vp, params, uniforms)
    }
}
