//! CPU reference backend: every backward against central finite differences in f64, forward
//! sanity against naive computations, AdamW and global norm against hand computations,
//! accumulate (parameter gradients, the residual stream) and overwrite (other activation
//! gradients) semantics, thread-count determinism, and shape errors.
//!
//! The kernel families are generic over the float type: finite differences run the f64
//! instantiation; the f32 `CpuBackend` is then checked against the same f64 references.
//! This file holds the shared shapes, tolerances and f64 helpers; each module one group of ops.

use topcoat::backend::cpu::CpuBackend;
use topcoat::backend::cpu::{adamw, attention, cross_entropy, encoder, gelu, layernorm, matmul};
use topcoat::backend::{AdamWStep, Backend, BackendError, LossGrad};
use topcoat::rng::Rng;

/// f64 analytic gradient vs f64 central differences: `||a - fd|| / ||fd||`.
const FD_TOL: f64 = 1e-7;
/// Step of the central differences.
const FD_H: f64 = 1e-5;
/// f32 backend vs f64 reference, relative error.
const F32_TOL: f64 = 1e-5;
/// f64 accumulate check: `backward(prefilled) - prefilled` vs `backward(zeros)`.
const ACC_TOL: f64 = 1e-12;

// Small odd shapes.
const B: usize = 2;
const T: usize = 5;
const TMAX: usize = 7;
const C: usize = 12;
const NH: usize = 3;
const OC: usize = 7;
const V: usize = 11;
const VP: usize = 16;
const N: usize = B * T;

/// Random normal values that are exactly representable in f32, so f32 and f64 see one input.
fn randn(len: usize, rng: &mut Rng) -> Vec<f64> {
    (0..len).map(|_| rng.normal() as f64).collect()
}

fn to32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

fn to64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn norm(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum::<f64>().sqrt()
}

/// `||a - b|| / ||b||`.
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let diff: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    norm(&diff) / norm(b).max(1e-300)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Central differences of the scalar `loss` with respect to every element of `x`.
fn fd_grad(x: &[f64], loss: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            xp[i] = x[i] + FD_H;
            let up = loss(&xp);
            xp[i] = x[i] - FD_H;
            let down = loss(&xp);
            xp[i] = x[i];
            (up - down) / (2.0 * FD_H)
        })
        .collect()
}

fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    let e = rel_err(got, want);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
    assert!(
        norm(want) > 0.0,
        "{what}: reference gradient is zero, test is vacuous"
    );
}

/// `prefill + fresh` vs the result of accumulating onto `prefill`.
fn assert_accumulates(what: &str, prefill: &[f64], fresh: &[f64], accumulated: &[f64]) {
    let expect: Vec<f64> = prefill.iter().zip(fresh).map(|(p, g)| p + g).collect();
    let e = rel_err(accumulated, &expect);
    assert!(
        e <= ACC_TOL,
        "{what}: does not accumulate (rel err {e:.3e})"
    );
}

/// An activation gradient computed into a buffer pre-filled with random values must equal the
/// one computed into zeros (the op overwrites it).
fn assert_overwrites(what: &str, fresh: &[f64], from_prefilled: &[f64]) {
    let e = rel_err(from_prefilled, fresh);
    assert!(e <= ACC_TOL, "{what}: does not overwrite (rel err {e:.3e})");
}

fn random_ids(len: usize, below: usize, rng: &mut Rng) -> Vec<i32> {
    (0..len).map(|_| rng.below(below as u64) as i32).collect()
}

fn assert_shape_err(r: Result<(), BackendError>, want_what: &str) {
    match r {
        Err(BackendError::Shape { what, .. }) if what == want_what => {}
        other => panic!("expected a Shape error on `{want_what}`, got {other:?}"),
    }
}

mod attention_grads;
mod contract;
mod encoder_norm_mlp;
mod gqa_attention;
mod llama_ops;
mod lora_ops;
mod loss_and_optimizer;
