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
pub mod embedding;
pub mod encoder;
pub mod float;
pub mod gelu;
pub mod layernorm;
pub mod lora;
pub mod matmul;
mod ops;
pub mod residual;
pub mod rmsnorm;
pub mod rope;
pub mod sample;
pub mod swiglu;

pub use float::Float;

/// The f32 CPU reference backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        Self
    }
}

/// The kernel's estimate of memory available to a new allocation without swapping
/// (`MemAvailable` in `/proc/meminfo`); `None` where that file is unreadable (not Linux).
fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

/// `MemAvailable:   123456 kB` in bytes.
fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut words = line.split_whitespace().skip(1);
    let kib: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => kib.checked_mul(1024),
        _ => None,
    }
}

#[cfg(test)]
mod mem_tests {
    #[test]
    fn mem_available_is_read_in_bytes() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n";
        assert_eq!(super::parse_mem_available(text), Some(2048 * 1024));
        assert_eq!(super::parse_mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(super::parse_mem_available("MemAvailable: x kB\n"), None);
    }
}
