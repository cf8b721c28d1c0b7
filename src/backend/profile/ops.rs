//! The [`Backend`] impl of [`Profiled`]: every op forwarded to the wrapped backend through
//! [`Profiled::timed`], with its napkin math: the fewest bytes it must move and the FLOPs of its
//! matrix products (see the module header of `profile/mod.rs`).

use super::{attention_flops, llama, Profiled};
use crate::backend::{AdamWStep, Backend, LossGrad, Result, Role, SampleParams};

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
    fn peak_memory(&self) -> Option<u64> {
        self.inner.peak_memory()
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
    fn copy_range(
        &self,
        dst: &mut Self::Buf,
        dst_offset: usize,
        src: &Self::Buf,
        src_offset: usize,
        len: usize,
    ) -> Result<()> {
        let bytes = 2.0 * len as f64 * self.act();
        self.timed("copy_range", bytes, 0.0, || {
            self.inner.copy_range(dst, dst_offset, src, src_offset, len)
        })
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
        dweight: Option<&mut Self::Buf>,
        dbias: Option<&mut Self::Buf>,
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
        dweight: Option<&mut Self::Buf>,
        dbias: Option<&mut Self::Buf>,
        dout: &Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        // A frozen weight (no dweight) skips the weight-gradient GEMM: half the FLOPs.
        let (bytes, flops) = matmul_backward_cost(self, dweight.is_some(), 2 * n * c, n, c, oc);
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
        dweight: Option<&mut Self::Buf>,
        dbias: Option<&mut Self::Buf>,
        dout: &Self::Buf,
        inp: &Self::Buf,
        weight: &Self::Buf,
        pre: &Self::Buf,
        n: usize,
        c: usize,
        oc: usize,
    ) -> Result<()> {
        let (bytes, flops) = matmul_backward_cost(self, dweight.is_some(), 3 * n * c, n, c, oc);
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

    // The grouped-query attention and the Llama family's ops, in the `timed!` shorthand.
    llama_ops!();

    // LoRA's column-slice and dropout ops (memory bound, no matrix products).
    timed! {
        /// The slice of y read and written, x read.
        add_columns(y: &mut Self::Buf, x: &Self::Buf, n: usize, oc: usize, col: usize,
            w: usize, alpha: f32)
        |act, _| { let _ = (oc, col, alpha); (3.0 * (n * w) as f64 * act, 0.0) }
    }
    timed! {
        /// The slice of y read, out written.
        copy_columns(out: &mut Self::Buf, y: &Self::Buf, n: usize, oc: usize, col: usize,
            w: usize, alpha: f32)
        |act, _| { let _ = (oc, col, alpha); (2.0 * (n * w) as f64 * act, 0.0) }
    }
    timed! {
        /// inp read, out written (the mask is recomputed, never stored).
        dropout_forward(out: &mut Self::Buf, inp: &Self::Buf, n: usize, p: f32, seed: u64)
        |act, _| { let _ = (p, seed); (2.0 * n as f64 * act, 0.0) }
    }
    timed! {
        /// dout read, dinp written.
        dropout_backward(dinp: &mut Self::Buf, dout: &Self::Buf, n: usize, p: f32, seed: u64)
        |act, _| { let _ = (p, seed); (2.0 * n as f64 * act, 0.0) }
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
    fn accumulate(&self, acc: &mut Self::Buf, x: &Self::Buf) -> Result<()> {
        // Two gradient reads and one write per element.
        let bytes = 3.0 * self.inner.len(acc) as f64 * self.grad();
        self.timed("accumulate", bytes, 0.0, || self.inner.accumulate(acc, x))
    }
    fn global_norm(&self, bufs: &[&Self::Buf]) -> Result<f32> {
        let n: usize = bufs.iter().map(|b| self.inner.len(b)).sum();
        let bytes = n as f64 * self.grad();
        self.timed("global_norm", bytes, 0.0, || self.inner.global_norm(bufs))
    }
}

/// Bytes and FLOPs of a matmul backward that reads `dout` and the weight and moves `nc` input
/// and input-gradient elements: with `dweight`, the weight gradient read and written and
/// twice the forward's FLOPs; without (a frozen weight), the input gradient's GEMM alone,
/// which does not read the input.
fn matmul_backward_cost<B: Backend>(
    p: &Profiled<'_, B>,
    dweight: bool,
    nc: usize,
    n: usize,
    c: usize,
    oc: usize,
) -> (f64, f64) {
    let inp = if dweight { 0 } else { n * c };
    let mut bytes = (n * oc + nc - inp + oc * c) as f64 * p.act();
    let mut flops = 2.0 * (n * c * oc) as f64;
    if dweight {
        bytes += 2.0 * (oc * c) as f64 * p.grad();
        flops *= 2.0;
    }
    (bytes, flops)
}
