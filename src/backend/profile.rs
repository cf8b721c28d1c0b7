//! Per-op profiling: [`Profiled`] wraps any [`Backend`], waits for each op to finish, and adds
//! its wall time, bytes moved and FLOPs to a per-op tally. `topcoat bench --kernels` runs real
//! training steps through it, so every kernel family is timed at the model's own shapes.
//!
//! Bytes are the fewest an op must move through device memory (each input read once, each
//! output written once; read-modify-write counted twice), with the backend's element sizes
//! (bf16 activations on CUDA); FLOPs count only the matrix products (2 per multiply-add;
//! causal attention at half the square). Waiting after every op adds launch gaps the plain
//! step does not have: the tally's total exceeds the unprofiled step time by that much.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use crate::backend::{AdamWStep, Backend, LossGrad, Result, Role, SampleParams};

/// What one op family cost over the profiled steps.
#[derive(Clone, Debug, Default)]
pub struct OpTally {
    pub calls: usize,
    pub seconds: f64,
    pub bytes: f64,
    pub flops: f64,
}

/// A backend that times every op it forwards to `inner`.
pub struct Profiled<'a, B: Backend> {
    inner: &'a B,
    tally: Mutex<BTreeMap<&'static str, OpTally>>,
}

impl<'a, B: Backend> Profiled<'a, B> {
    pub fn new(inner: &'a B) -> Self {
        Self {
            inner,
            tally: Mutex::new(BTreeMap::new()),
        }
    }

    /// The tally so far, by op name.
    pub fn tally(&self) -> BTreeMap<&'static str, OpTally> {
        self.tally.lock().unwrap().clone()
    }

    /// Forgets everything timed so far (e.g. the warm-up steps).
    pub fn reset(&self) {
        self.tally.lock().unwrap().clear();
    }

    /// Runs `op`, waits for the device, and books the time under `name`.
    fn timed<T>(
        &self,
        name: &'static str,
        bytes: f64,
        flops: f64,
        op: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let start = Instant::now();
        let out = op()?;
        self.inner.synchronize()?;
        let seconds = start.elapsed().as_secs_f64();
        let mut tally = self.tally.lock().unwrap();
        let entry = tally.entry(name).or_default();
        entry.calls += 1;
        entry.seconds += seconds;
        entry.bytes += bytes;
        entry.flops += flops;
        Ok(out)
    }

    /// Bytes per activation element and per gradient element.
    fn act(&self) -> f64 {
        self.inner.element_bytes(Role::Activation) as f64
    }
    fn grad(&self) -> f64 {
        self.inner.element_bytes(Role::Grad) as f64
    }
}

impl<B: Backend> Backend for Profiled<'_, B> {
    type Buf = B::Buf;
    type Ids = B::Ids;

    fn name(&self) -> String {
        format!("{} (profiled)", self.inner.name())
    }
    fn synchronize(&self) -> Result<()> {
        self.inner.synchronize()
    }
    fn memory_in_use(&self) -> Option<usize> {
        self.inner.memory_in_use()
    }
    fn memory_available(&self) -> Option<u64> {
        self.inner.memory_available()
    }
    fn element_bytes(&self, role: Role) -> usize {
        self.inner.element_bytes(role)
    }

    fn release_master(&self, buf: &mut Self::Buf) -> Result<()> {
        self.inner.release_master(buf)
    }

    fn zeros(&self, len: usize, role: Role) -> Result<Self::Buf> {
        self.inner.zeros(len, role)
    }
    fn upload(&self, host: &[f32], role: Role) -> Result<Self::Buf> {
        self.inner.upload(host, role)
    }
    fn write(&self, buf: &mut Self::Buf, host: &[f32]) -> Result<()> {
        self.inner.write(buf, host)
    }
    fn download_range(&self, buf: &Self::Buf, offset: usize, len: usize) -> Result<Vec<f32>> {
        self.inner.download_range(buf, offset, len)
    }
    fn len(&self, buf: &Self::Buf) -> usize {
        self.inner.len(buf)
    }
    fn fill_zero(&self, buf: &mut Self::Buf) -> Result<()> {
        let bytes = self.inner.len(buf) as f64 * self.grad();
        self.timed("fill_zero", bytes, 0.0, || self.inner.fill_zero(buf))
    }
    fn upload_ids(&self, host: &[i32]) -> Result<Self::Ids> {
        self.inner.upload_ids(host)
    }
    fn ids_len(&self, ids: &Self::Ids) -> usize {
        self.inner.ids_len(ids)
    }

    fn encoder_forward(
        &self,
        out: &mut Self::Buf,
        ids: &Self::Ids,
        pos: Option<&Self::Ids>,
        wte: &Self::Buf,
        wpe: &Self::Buf,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        let bytes = 3.0 * (b * t * c) as f64 * self.act();
        self.timed("encoder_forward", bytes, 0.0, || {
            self.inner.encoder_forward(out, ids, pos, wte, wpe, b, t, c)
        })
    }
    fn encoder_backward(
        &self,
        dwte: &mut Self::Buf,
        dwpe: &mut Self::Buf,
        dout: &Self::Buf,
        ids: &Self::Ids,
        pos: Option<&Self::Ids>,
        b: usize,
        t: usize,
        c: usize,
    ) -> Result<()> {
        // dout read once per table, touched dwte rows and dwpe read and written.
        let n = (b * t * c) as f64;
        let bytes =
            2.0 * n * self.act() + 2.0 * n * self.grad() + 2.0 * (t * c) as f64 * self.grad();
        self.timed("encoder_backward", bytes, 0.0, || {
            self.inner
                .encoder_backward(dwte, dwpe, dout, ids, pos, b, t, c)
        })
    }

    fn layernorm_forward(
        &self,
        out: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        bias: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        let bytes = 2.0 * (n * c) as f64 * self.act();
        self.timed("layernorm_forward", bytes, 0.0, || {
            self.inner
                .layernorm_forward(out, mean, rstd, inp, weight, bias, n, c)
        })
    }
    fn layernorm_backward(
        &self,
        dinp: &mut Self::Buf,
        dweight: &mut Self::Buf,
        dbias: &mut Self::Buf,
        dout: &Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        mean: &Self::Buf,
        rstd: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        // dout and inp read, dinp read and written.
        let bytes = 4.0 * (n * c) as f64 * self.act();
        self.timed("layernorm_backward", bytes, 0.0, || {
            self.inner
                .layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, n, c)
        })
    }
    fn residual_layernorm_forward(
        &self,
        residual: &mut Self::Buf,
        out: &mut Self::Buf,
        mean: &mut Self::Buf,
        rstd: &mut Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        weight: &Self::Buf,
        bias: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<()> {
        // a and b read, residual and out written.
        let bytes = 4.0 * (n * c) as f64 * self.act();
        self.timed("residual_layernorm_forward", bytes, 0.0, || {
            self.inner
                .residual_layernorm_forward(residual, out, mean, rstd, a, b, weight, bias, n, c)
        })
    }

    fn residual_forward(
        &self,
        out: &mut Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        n: usize,
    ) -> Result<()> {
        let bytes = 3.0 * n as f64 * self.act();
        self.timed("residual_forward", bytes, 0.0, || {
            self.inner.residual_forward(out, a, b, n)
        })
    }
    fn gelu_forward(&self, out: &mut Self::Buf, inp: &Self::Buf, n: usize) -> Result<()> {
        let bytes = 2.0 * n as f64 * self.act();
        self.timed("gelu_forward", bytes, 0.0, || {
            self.inner.gelu_forward(out, inp, n)
        })
    }
    fn gelu_backward(
        &self,
        dinp: &mut Self::Buf,
        inp: &Self::Buf,
        dout: &Self::Buf,
        n: usize,
    ) -> Result<()> {
        let bytes = 3.0 * n as f64 * self.act();
        self.timed("gelu_backward", bytes, 0.0, || {
            self.inner.gelu_backward(dinp, inp, dout, n)
        })
    }

    fn matmul_forward(
        &self,
        out: &mut Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        bias: Option<&Self::Buf>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let bytes = (n * c + oc * c + n * oc) as f64 * self.act();
        let flops = 2.0 * (n * c * oc) as f64;
        self.timed("matmul_forward", bytes, flops, || {
            self.inner.matmul_forward(out, inp, weight, bias, n, c, oc)
        })
    }
    fn matmul_backward(
        &self,
        dinp: &mut Self::Buf,
        dweight: &mut Self::Buf,
        dbias: Option<&mut Self::Buf>,
        dout: &Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let bytes =
            (n * oc + 2 * n * c + oc * c) as f64 * self.act() + 2.0 * (oc * c) as f64 * self.grad();
        let flops = 4.0 * (n * c * oc) as f64;
        self.timed("matmul_backward", bytes, flops, || {
            self.inner
                .matmul_backward(dinp, dweight, dbias, dout, inp, weight, n, c, oc)
        })
    }
    fn matmul_gelu_forward(
        &self,
        out: &mut Self::Buf,
        pre: &mut Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        bias: Option<&Self::Buf>,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let bytes = (n * c + oc * c + 2 * n * oc) as f64 * self.act();
        let flops = 2.0 * (n * c * oc) as f64;
        self.timed("matmul_gelu_forward", bytes, flops, || {
            self.inner
                .matmul_gelu_forward(out, pre, inp, weight, bias, n, c, oc)
        })
    }
    fn matmul_gelu_backward(
        &self,
        dinp: &mut Self::Buf,
        dweight: &mut Self::Buf,
        dbias: Option<&mut Self::Buf>,
        dout: &Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        pre: &Self::Buf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let bytes =
            (n * oc + 3 * n * c + oc * c) as f64 * self.act() + 2.0 * (oc * c) as f64 * self.grad();
        let flops = 4.0 * (n * c * oc) as f64;
        self.timed("matmul_gelu_backward", bytes, flops, || {
            self.inner
                .matmul_gelu_backward(dinp, dweight, dbias, dout, inp, weight, pre, n, c, oc)
        })
    }

    fn attention_forward(
        &self,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
        qkv: &Self::Buf,
        starts: Option<&Self::Ids>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        let bytes = 4.0 * (b * t * c) as f64 * self.act();
        self.timed("attention_forward", bytes, attention_flops(b, t, c), || {
            self.inner
                .attention_forward(out, lse, qkv, starts, b, t, c, nh)
        })
    }
    fn attention_backward(
        &self,
        dqkv: &mut Self::Buf,
        dout: &Self::Buf,
        qkv: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        starts: Option<&Self::Ids>,
        b: usize,
        t: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        // dout, out, qkv read; dqkv read and written. Backward does 5 products to forward's 2.
        let bytes = 11.0 * (b * t * c) as f64 * self.act();
        let flops = 2.5 * attention_flops(b, t, c);
        self.timed("attention_backward", bytes, flops, || {
            self.inner
                .attention_backward(dqkv, dout, qkv, out, lse, starts, b, t, c, nh)
        })
    }

    fn cross_entropy(
        &self,
        losses: &mut Self::Buf,
        logits: &mut Self::Buf,
        targets: &Self::Ids,
        n: usize,
        v: usize,
        vp: usize,
        grad: LossGrad<'_, Self::Buf>,
    ) -> Result<()> {
        let passes = if grad.is_none() { 1.0 } else { 2.0 };
        let bytes = passes * (n * vp) as f64 * self.act();
        self.timed("cross_entropy", bytes, 0.0, || {
            self.inner
                .cross_entropy(losses, logits, targets, n, v, vp, grad)
        })
    }

    fn adamw(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        hp: &AdamWStep,
    ) -> Result<()> {
        // Master weights, m, v read and written; the gradient read; the working copy written.
        let n = self.inner.len(param) as f64;
        let bytes = n * (7.0 * self.grad() + self.inner.element_bytes(Role::Param) as f64);
        self.timed("adamw", bytes, 0.0, || {
            self.inner.adamw(param, grad, m, v, hp)
        })
    }
    fn attention_cached_forward(
        &self,
        out: &mut Self::Buf,
        qkv: &Self::Buf,
        k_cache: &mut Self::Buf,
        v_cache: &mut Self::Buf,
        b: usize,
        tn: usize,
        past: usize,
        tmax: usize,
        c: usize,
        nh: usize,
    ) -> Result<()> {
        // New q, k, v read; new k, v written into the caches; the visible cache rows read.
        let bytes = (b * c) as f64 * (6 * tn + 2 * (past + tn)) as f64 * self.act();
        let flops = 4.0 * (b * tn * (past + tn) * c) as f64;
        self.timed("attention_cached_forward", bytes, flops, || {
            self.inner
                .attention_cached_forward(out, qkv, k_cache, v_cache, b, tn, past, tmax, c, nh)
        })
    }
    fn sample_tokens(
        &self,
        logits: &Self::Buf,
        n: usize,
        v: usize,
        vp: usize,
        params: &SampleParams,
        uniforms: &[f32],
    ) -> Result<Vec<u32>> {
        let bytes = (n * vp) as f64 * self.act();
        self.timed("sample_tokens", bytes, 0.0, || {
            self.inner.sample_tokens(logits, n, v, vp, params, uniforms)
        })
    }
    fn global_norm(&self, bufs: &[&Self::Buf]) -> Result<f32> {
        let n: usize = bufs.iter().map(|b| self.inner.len(b)).sum();
        let bytes = n as f64 * self.grad();
        self.timed("global_norm", bytes, 0.0, || self.inner.global_norm(bufs))
    }
}

/// Causal attention forward: `QK^T` and `PV`, each `2 * B * T^2 * C` FLOPs, halved by the mask.
fn attention_flops(b: usize, t: usize, c: usize) -> f64 {
    2.0 * (b * t * t * c) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    #[test]
    fn books_every_call_under_its_op() {
        let cpu = CpuBackend::new();
        let be = Profiled::new(&cpu);
        let x = be.upload(&[1.0, -2.0, 3.0, 0.5], Role::Activation).unwrap();
        let mut y = be.zeros(4, Role::Activation).unwrap();
        be.gelu_forward(&mut y, &x, 4).unwrap();
        be.gelu_forward(&mut y, &x, 4).unwrap();
        be.residual_forward(&mut y, &x, &x, 4).unwrap();
        assert_eq!(be.download(&y).unwrap(), vec![2.0, -4.0, 6.0, 1.0]);
        let tally = be.tally();
        assert_eq!(tally["gelu_forward"].calls, 2);
        assert_eq!(tally["gelu_forward"].bytes, 2.0 * 2.0 * 4.0 * 4.0);
        assert_eq!(tally["residual_forward"].calls, 1);
        assert_eq!(tally.len(), 2);
        be.reset();
        assert!(be.tally().is_empty());
    }
}
