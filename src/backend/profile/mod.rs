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

use crate::backend::{Backend, Result, Role};

#[macro_use]
mod llama; // `llama_ops!`: the grouped-query attention and Llama-family ops' timed forwarding
mod ops; // the Backend impl: every op timed, with its bytes and FLOPs

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

/// Causal attention forward: `QK^T` and `PV`, each `2 * B * T^2 * C` FLOPs, halved by the mask
/// (grouped KV heads do not change it: every query head still takes both products).
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

    /// The shorthand-forwarded ops (llama.rs) reach the inner backend with their arguments in
    /// order and book their napkin math under their own names.
    #[test]
    fn books_the_llama_family_ops() {
        let cpu = CpuBackend::new();
        let be = Profiled::new(&cpu);
        // SwiGLU over one row of I = 2: out = silu(gate) * up.
        let gate_up = be.upload(&[1.0, -2.0, 3.0, 0.5], Role::Activation).unwrap();
        let mut out = be.zeros(2, Role::Activation).unwrap();
        be.swiglu_forward(&mut out, &gate_up, 1, 2).unwrap();
        let silu = |x: f32| x / (1.0 + (-x).exp());
        let got = be.download(&out).unwrap();
        assert!((got[0] - silu(1.0) * 3.0).abs() < 1e-6, "{got:?}");
        assert!((got[1] - silu(-2.0) * 0.5).abs() < 1e-6, "{got:?}");
        // GQA forward, T = 1 (the output is the value head): NH = 2, NKV = 1, hs = 2.
        let qkv = [0.3, -0.1, 0.7, 0.2, 0.5, 0.9, 1.5, -2.5];
        let qkv = be.upload(&qkv, Role::Activation).unwrap();
        let (mut o, mut lse) = (
            be.zeros(4, Role::Activation).unwrap(),
            be.zeros(2, Role::Stat).unwrap(),
        );
        be.attention_gqa_forward(&mut o, &mut lse, &qkv, None, 1, 1, 4, 2, 1)
            .unwrap();
        assert_eq!(be.download(&o).unwrap(), vec![1.5, -2.5, 1.5, -2.5]);
        let tally = be.tally();
        assert_eq!(tally["swiglu_forward"].bytes, 3.0 * 2.0 * 4.0);
        // qkv (8) read and out (4) written; 2 B T^2 C FLOPs.
        assert_eq!(tally["attention_gqa_forward"].bytes, 12.0 * 4.0);
        assert_eq!(tally["attention_gqa_forward"].flops, 8.0);
        assert_eq!(tally.len(), 2);
    }
}
