//! Shared helpers for integration tests: the backend test macro (DESIGN.md convention 4) and
//! random-input and error-norm helpers.
#![allow(dead_code)]

use topcoat::backend::Backend;
use topcoat::rng::Rng;

/// Writes a test body once and runs it on every backend present.
///
/// `backend_tests!(body => name_cpu, name_cuda);` where `body` is a generic
/// `fn body<B: Backend>(be: &B)`, makes `#[test] fn name_cpu` (on the CPU backend) and
/// `#[test] fn name_cuda`, which runs on CUDA device 0 or, when `CudaBackend::new(0)` fails,
/// prints `skipped: no CUDA device (<reason>)` and passes.
#[macro_export]
macro_rules! backend_tests {
    ($body:ident => $cpu:ident, $cuda:ident) => {
        #[test]
        fn $cpu() {
            $body(&topcoat::backend::cpu::CpuBackend::new());
        }

        #[test]
        fn $cuda() {
            match topcoat::backend::cuda::CudaBackend::new(0) {
                Ok(be) => $body(&be),
                Err(e) => println!("skipped: no CUDA device ({e})"),
            }
        }
    };
}

/// `n` values, standard normal times `scale`, rounded to bf16 so every backend sees the same
/// numbers (never zeros: a normal sample is 0 with probability 0).
pub fn randn(rng: &mut Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| bf16_round(rng.normal() * scale)).collect()
}

pub fn bf16_round(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// `||a - b|| / ||b||` in f64 (NaN anywhere makes it NaN, which fails every `<=` check).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    (num / den.max(1e-300)).sqrt()
}

pub fn rel_err_f64(a: &[f64], b: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x - y).powi(2);
        den += y.powi(2);
    }
    (num / den.max(1e-300)).sqrt()
}

/// Asserts `rel_err(got, want) <= tol`, naming the op and buffer.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let err = rel_err(got, want);
    println!("{what}: rel err {err:.2e} (tol {tol:.0e})");
    assert!(err <= tol, "{what}: rel err {err:e} > {tol:e}");
}

/// Downloads a buffer (panics on a device error: tests only).
pub fn down<B: Backend>(be: &B, buf: &B::Buf) -> Vec<f32> {
    be.download(buf).expect("download")
}
/// Where a safetensors file's tensor data starts (after the 8-byte length and the header).
pub fn safetensors_data_start(bytes: &[u8]) -> usize {
    8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize
}

pub mod cli;
pub mod hf_fixtures;
pub mod ranks;
