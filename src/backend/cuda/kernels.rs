//! Every embedded kernel by name: build.rs reads `kernels/<family>.cu` for its
//! `extern "C" __global__` functions and writes, per family, a module of typed constants, so a
//! launcher names its kernel (`kernels::layernorm::LAYERNORM_FORWARD_BF16`) and never an index.
//!
//! Each family module holds one [`Kernel`] per function (the name in capitals), `KERNELS` (all
//! of them, in source order) and `MODULE` (the [`Module`]: family, fatbin, kernels); [`MODULES`]
//! lists every family, and [`SASS_ARCHS`], [`PTX_ARCHS`] and [`NVCC_VERSION`] say what build.rs
//! asked nvcc for. A build without nvcc has the same names, empty fatbins and empty lists.

/// One kernel function: the family (`kernels/<module>.cu`) it is compiled in and its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Kernel {
    pub module: &'static str,
    pub name: &'static str,
}

impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// One kernel family: `kernels/<family>.cu` compiled into a fatbin (SASS for sm_80, sm_86,
/// sm_89, sm_90 and sm_120, plus compute_80 PTX), empty in a build without nvcc, and the kernels
/// it holds.
#[derive(Clone, Copy, Debug)]
pub struct Module {
    pub family: &'static str,
    pub fatbin: &'static [u8],
    pub kernels: &'static [Kernel],
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_belongs_to_its_module() {
        assert!(!MODULES.is_empty());
        for m in MODULES {
            assert!(!m.kernels.is_empty(), "kernels/{}.cu: no kernels", m.family);
            for k in m.kernels {
                assert_eq!(k.module, m.family, "{}", k.name);
            }
        }
        assert_eq!(
            layernorm::LAYERNORM_FORWARD_BF16.name,
            "layernorm_forward_bf16"
        );
        assert_eq!(
            attention_mma::ATTENTION_FORWARD_MMA64_BF16.module,
            "attention_mma"
        );
    }
}
