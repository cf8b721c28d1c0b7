//! The timed forwarding of the grouped-query attention ops and the Llama family's embedding,
//! RMSNorm, RoPE and SwiGLU, written in a shorthand so the one `impl Backend for Profiled`
//! stays readable: `timed!` turns each entry (an op's name, its arguments, and its napkin math
//! as `|act, grad| (bytes, flops)` over the argument names and the backend's bytes per
//! activation and gradient element) into the trait method that books the op under its name.
//! Bytes are the fewest the op must move, FLOPs those of matrix products, as in `mod.rs`.

/// One timed op returning `Result<()>`: forwards to the wrapped backend through
/// [`super::Profiled::timed`] with the entry's bytes and FLOPs.
macro_rules! timed {
    ($(#[$doc:meta])* $name:ident($($arg:ident: $ty:ty),* $(,)?)
        |$act:pat_param, $grad:pat_param| $cost:expr) => {
        $(#[$doc])*
        fn $name(&self, $($arg: $ty),*) -> Result<()> {
            let ($act, $grad) = (self.act(), self.grad());
            let (bytes, flops): (f64, f64) = $cost;
            self.timed(stringify!($name), bytes, flops, || self.inner.$name($($arg),*))
        }
    };
}

/// The width of a grouped-query `qkv` row, `(NH + 2 NKV) hs` (no heads: the op's rule refuses).
pub(super) fn gqa_width(c: usize, nh: usize, nkv: usize) -> usize {
    c + 2 * nkv * (c / nh.max(1))
}

/// The methods themselves, expanded inside `impl Backend for Profiled` (ops.rs).
macro_rules! llama_ops {
    () => {
        timed! {
            /// qkv read ((NH+2*NKV)*hs per position), out written; FLOPs as multi-head attention.
            attention_gqa_forward(out: &mut Self::Buf, lse: &mut Self::Buf, qkv: &Self::Buf,
                starts: Option<&Self::Ids>, b: usize, t: usize, c: usize, nh: usize, nkv: usize)
            |act, _| {
                let w = llama::gqa_width(c, nh, nkv);
                ((b * t * (w + c)) as f64 * act, attention_flops(b, t, c))
            }
        }
        timed! {
            /// attention_backward's 11 C per position with the qkv width W: dout, out (C each)
            /// and qkv (W) read, dqkv (W) read and written; 5 products to the forward's 2.
            attention_gqa_backward(dqkv: &mut Self::Buf, dout: &Self::Buf, qkv: &Self::Buf,
                out: &Self::Buf, lse: &Self::Buf, starts: Option<&Self::Ids>, b: usize, t: usize,
                c: usize, nh: usize, nkv: usize)
            |act, _| {
                let w = llama::gqa_width(c, nh, nkv);
                ((b * t * (2 * c + 3 * w)) as f64 * act, 2.5 * attention_flops(b, t, c))
            }
        }
        timed! {
            /// attention_cached_forward's traffic with cache rows NKV*hs wide: the new qkv rows
            /// read, their key and value heads written to the caches, out written, the visible
            /// cache rows read.
            attention_gqa_cached_forward(out: &mut Self::Buf, qkv: &Self::Buf,
                k_cache: &mut Self::Buf, v_cache: &mut Self::Buf, b: usize, tn: usize,
                past: usize, tmax: usize, c: usize, nh: usize, nkv: usize)
            |act, _| {
                let ckv = nkv * (c / nh.max(1));
                let per_new = llama::gqa_width(c, nh, nkv) + 2 * ckv + c;
                let bytes = (b * (tn * per_new + 2 * (past + tn) * ckv)) as f64 * act;
                (bytes, 4.0 * (b * tn * (past + tn) * c) as f64)
            }
        }
        timed! {
            /// One wte row read and one out row written per position.
            embedding_forward(out: &mut Self::Buf, ids: &Self::Ids, wte: &Self::Buf, b: usize,
                t: usize, c: usize)
            |act, _| (2.0 * (b * t * c) as f64 * act, 0.0)
        }
        timed! {
            /// dout read; at most one dwte row read and written per position.
            embedding_backward(dwte: &mut Self::Buf, dout: &Self::Buf, ids: &Self::Ids,
                b: usize, t: usize, c: usize)
            |act, grad| ((b * t * c) as f64 * (act + 2.0 * grad), 0.0)
        }
        timed! {
            /// inp read, out written (rstd: N floats).
            rmsnorm_forward(out: &mut Self::Buf, rstd: &mut Self::Buf, inp: &Self::Buf,
                weight: &Self::Buf, n: usize, c: usize, eps: f32)
            |act, _| (2.0 * (n * c) as f64 * act, 0.0)
        }
        timed! {
            /// dout and inp read, dinp read and written.
            rmsnorm_backward(dinp: &mut Self::Buf, dweight: Option<&mut Self::Buf>, dout: &Self::Buf,
                inp: &Self::Buf, weight: &Self::Buf, rstd: &Self::Buf, n: usize, c: usize)
            |act, _| (4.0 * (n * c) as f64 * act, 0.0)
        }
        timed! {
            /// a and b read, residual and out written.
            residual_rmsnorm_forward(residual: &mut Self::Buf, out: &mut Self::Buf,
                rstd: &mut Self::Buf, a: &Self::Buf, b: &Self::Buf, weight: &Self::Buf,
                n: usize, c: usize, eps: f32)
            |act, _| (4.0 * (n * c) as f64 * act, 0.0)
        }
        timed! {
            /// The query and key heads read and written in place.
            rope_forward(qkv: &mut Self::Buf, inv_freq: &Self::Buf, pos: Option<&Self::Ids>,
                past: usize, b: usize, t: usize, nh: usize, nkv: usize, hs: usize)
            |act, _| (2.0 * (b * t * (nh + nkv) * hs) as f64 * act, 0.0)
        }
        timed! {
            /// As the forward, over dqkv.
            rope_backward(dqkv: &mut Self::Buf, inv_freq: &Self::Buf, pos: Option<&Self::Ids>,
                b: usize, t: usize, nh: usize, nkv: usize, hs: usize)
            |act, _| (2.0 * (b * t * (nh + nkv) * hs) as f64 * act, 0.0)
        }
        timed! {
            /// gate and up read, out written.
            swiglu_forward(out: &mut Self::Buf, gate_up: &Self::Buf, n: usize, i: usize)
            |act, _| (3.0 * (n * i) as f64 * act, 0.0)
        }
        timed! {
            /// gate, up and dout read, dgate and dup written.
            swiglu_backward(dgate_up: &mut Self::Buf, dout: &Self::Buf, gate_up: &Self::Buf,
                n: usize, i: usize)
            |act, _| (5.0 * (n * i) as f64 * act, 0.0)
        }
    };
}
