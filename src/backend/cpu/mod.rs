//! The f32 CPU reference backend: the specification every other backend is tested against.
//!
//! [`CpuBackend`] implements [`Backend`] (in `ops.rs`) with plain `Vec<f32>` buffers. Each trait
//! method checks
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
mod ops;
pub mod residual;
pub mod sample;

pub use float::Float;

/// The f32 CPU reference backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        Self
    }
}
