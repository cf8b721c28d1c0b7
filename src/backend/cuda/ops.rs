//! The [`Backend`] impl of [`CudaBackend`]: buffer housekeeping (allocation, copies, zeroing
//! in the precision each [`Role`] takes) and every op forwarded to the launcher in the file named
//! after its kernel family.

use super::{
    adamw, attention, check_len, cross_entropy, decode, driver_error, encoder, fill, gelu,
    global_norm, layernorm, matmul, matmul_gelu, residual, sample, to_bf16, AdamWStep,
    BackendError, CudaBackend, CudaBuf, CudaIds, Mem, Result,
};
use crate::backend::{Backend, LossGrad, Role, SampleParams};

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
        let mem = match role {
            Role::Param => Mem::Param {
                work: self.alloc_bf16(len)?,
                master: self.alloc_f32(len)?,
            },
            Role::Activation => Mem::Bf16(self.alloc_bf16(len)?),
            Role::Grad | Role::State | Role::Stat => Mem::F32(self.alloc_f32(len)?),
        };
        Ok(CudaBuf { role, mem })
    }

    fn upload(&self, host: &[f32], role: Role) -> Result<CudaBuf> {
        let mem = match role {
            Role::Param => Mem::Param {
                work: self.htod(&to_bf16(host))?,
                master: self.htod(host)?,
            },
            Role::Activation => Mem::Bf16(self.htod(&to_bf16(host))?),
            Role::Grad | Role::State | Role::Stat => Mem::F32(self.htod(host)?),
        };
        Ok(CudaBuf { role, mem })
    }

    fn write(&self, buf: &mut CudaBuf, host: &[f32]) -> Result<()> {
        check_len("write", "host", buf.len(), host.len())?;
        let copy = |e| driver_error("copying to the device", e);
        match &mut buf.mem {
            Mem::Bf16(x) => self.stream.memcpy_htod(&to_bf16(host), x).map_err(copy),
            Mem::F32(x) => self.stream.memcpy_htod(host, x).map_err(copy),
            Mem::Param { work, master } => {
                self.stream
                    .memcpy_htod(&to_bf16(host), work)
                    .map_err(copy)?;
                self.stream.memcpy_htod(host, master).map_err(copy)
            }
        }
    }

    /// A parameter downloads its fp32 master copy.
    fn download_range(&self, buf: &CudaBuf, offset: usize, len: usize) -> Result<Vec<f32>> {
        let end = offset.saturating_add(len);
        if end > buf.len() {
            return Err(BackendError::Shape {
                op: "download_range",
                what: "buf",
                expected: end,
                found: buf.len(),
            });
        }
        let copy = |e| driver_error("copying from the device", e);
        match &buf.mem {
            Mem::Bf16(x) => {
                let host = self
                    .stream
                    .clone_dtoh(&x.slice(offset..end))
                    .map_err(copy)?;
                Ok(host.into_iter().map(f32::from).collect())
            }
            Mem::F32(x) | Mem::Param { master: x, .. } => {
                self.stream.clone_dtoh(&x.slice(offset..end)).map_err(copy)
            }
        }
    }

    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len()
    }

    /// Drops the fp32 master of a parameter: the buffer keeps its role and its bf16 working
    /// copy (`Mem::Bf16`), which kernels read, `download` widens and `write` rounds into.
    fn release_master(&self, buf: &mut CudaBuf) -> Result<()> {
        if let Mem::Param { work, .. } = &buf.mem {
            let work = work.clone();
            buf.mem = Mem::Bf16(work);
        }
        Ok(())
    }

    fn fill_zero(&self, buf: &mut CudaBuf) -> Result<()> {
        match &mut buf.mem {
            Mem::Bf16(x) => fill::zero(self, x),
            Mem::F32(x) => fill::zero(self, x),
            Mem::Param { work, master } => {
                fill::zero(self, work)?;
                fill::zero(self, master)
            }
        }
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
        dweight: &mut CudaBuf,
        dbias: &mut CudaBuf,
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
        dweight: &mut CudaBuf,
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
        dweight: &mut CudaBuf,
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
        attention::forward(self, out, lse, qkv, starts, b, t, c, nh)
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
        attention::backward(self, dqkv, dout, qkv, out, lse, starts, b, t, c, nh)
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
        decode::attention_cached_forward(self, out, qkv, k_cache, v_cache, b, tn, past, tmax, c, nh)
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
