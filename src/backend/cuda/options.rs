//! [`CudaOptions`]: the A/B switches of the CUDA backend, chosen by the caller when it opens
//! the backend (`CudaBackend::with_options`); the library reads no environment variable.
//! Benchmarks and parity tests run each alternative; users never need to.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

pub use super::arch::KernelVariants;

/// Which attention kernels run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AttentionKernels {
    /// `mma`: the tensor-core kernels (`kernels/attention_mma.cu`) where the head size allows
    /// (32 or 64, C a multiple of 8), the CUDA-core ones elsewhere.
    #[default]
    Mma,
    /// `cuda-cores`: the CUDA-core kernels (`kernels/attention.cu`) everywhere.
    CudaCores,
}

impl AttentionKernels {
    /// Every choice.
    pub const ALL: [Self; 2] = [Self::Mma, Self::CudaCores];

    /// The spelling `FromStr` accepts.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mma => "mma",
            Self::CudaCores => "cuda-cores",
        }
    }
}

impl fmt::Display for AttentionKernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A spelling `FromStr` does not accept, with the ones it does.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[error("unknown {what} `{found}`: expected {expected}")]
pub struct ParseOptionError {
    pub what: &'static str,
    pub found: String,
    pub expected: &'static str,
}

impl FromStr for AttentionKernels {
    type Err = ParseOptionError;

    /// `mma` or `cuda-cores`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| ParseOptionError {
                what: "attention kernels",
                found: s.to_string(),
                expected: "mma or cuda-cores",
            })
    }
}

/// How [`CudaBackend`](super::CudaBackend) runs; `Default` is what users get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaOptions {
    /// Which attention kernels run (default: the tensor-core ones).
    pub attention: AttentionKernels,
    /// cuBLASLt's GELU epilogues in `matmul_gelu_forward` / `_backward` (default on); off takes
    /// the unfused path (matmul, then the kernels of `kernels/gelu.cu`), which computes the
    /// same thing.
    pub gelu_epilogue: bool,
    /// Which code loads (default: what the driver picks for the card; `generic` forces the
    /// compute_80 PTX, see `arch.rs`). The CLI and the parity tests read `TOPCOAT_KERNELS`.
    pub kernels: KernelVariants,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            attention: AttentionKernels::Mma,
            gelu_epilogue: true,
            kernels: KernelVariants::Auto,
        }
    }
}

impl CudaOptions {
    /// How `Backend::name` mentions the non-default choices ("" for the defaults); the
    /// kernel code (`kernels`) is named there on its own.
    pub(super) fn label(&self) -> String {
        let mut label = String::new();
        if self.attention != AttentionKernels::Mma {
            label += &format!(", attention {}", self.attention);
        }
        if !self.gelu_epilogue {
            label += ", GELU epilogue off";
        }
        label
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_kernels_parse_and_print() {
        assert_eq!("mma".parse(), Ok(AttentionKernels::Mma));
        assert_eq!("cuda-cores".parse(), Ok(AttentionKernels::CudaCores));
        for k in AttentionKernels::ALL {
            assert_eq!(k.to_string().parse(), Ok(k));
        }
        let err = "mma-sync".parse::<AttentionKernels>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown attention kernels `mma-sync`: expected mma or cuda-cores"
        );
    }

    #[test]
    fn defaults_and_label() {
        let d = CudaOptions::default();
        assert_eq!(d.attention, AttentionKernels::Mma);
        assert!(d.gelu_epilogue);
        assert_eq!(d.kernels, KernelVariants::Auto);
        assert_eq!(d.label(), "");
        let ab = CudaOptions {
            attention: AttentionKernels::CudaCores,
            gelu_epilogue: false,
            kernels: KernelVariants::Generic,
        };
        assert_eq!(ab.label(), ", attention cuda-cores, GELU epilogue off");
    }
}
