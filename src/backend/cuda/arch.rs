//! Which kernel code a device runs: [`choose`] from its compute capability, what the embedded
//! fatbins hold ([`BuildCode`]) and [`KernelVariants`] (`TOPCOAT_KERNELS`).
//!
//! No kernel uses a Hopper-only instruction today (no wgmma, TMA / `cp.async.bulk`, clusters,
//! `setmaxnreg` or fp8): the tensor-core attention is `mma.sync` + `ldmatrix` + `cp.async`, all
//! sm_80. Every family compiles for sm_80 (build.rs checks ptxas compiled every kernel for every
//! arch), so there is one variant of each kernel and no `__CUDA_ARCH__` guard. What differs per
//! card is the code the driver loads: SASS where the fatbin has it for the device's major
//! version (sm_86 SASS also runs on an sm_87 card), else the compute_80 PTX, JIT-compiled by
//! the driver (sm_100, sm_103, sm_110 and newer). A kernel that one day needs Hopper
//! instructions goes under `#if __CUDA_ARCH__ >= 900` with its fallback in the `#else`: the
//! sm_90 SASS is compiled from the compute_90 front end, everything else (the compute_80 PTX
//! included) from compute_80, so [`KernelVariants::Generic`], which loads only that PTX, runs
//! the fallbacks on a Hopper card for the parity tests.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use super::fatbin::{Fatbin, FatbinError};
use super::kernels::Module;
use super::options::ParseOptionError;

/// The oldest card the kernels run on: sm_80 (bf16 `mma.sync`, `ldmatrix`, `cp.async`).
pub const MIN_COMPUTE_CAPABILITY: (i32, i32) = (8, 0);

/// Which code the backend loads (`TOPCOAT_KERNELS`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KernelVariants {
    /// `auto`: what the driver picks from the whole fatbin for this card.
    #[default]
    Auto,
    /// `generic`: only the compute_80 PTX, JIT-compiled on whatever card (on Hopper: the code
    /// an sm_80/86/89/120 card runs, lowered for sm_90, so the parity tests can check it).
    Generic,
}

impl KernelVariants {
    /// Every choice.
    pub const ALL: [Self; 2] = [Self::Auto, Self::Generic];

    /// The spelling `FromStr` accepts.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Generic => "generic",
        }
    }

    /// The value of the `TOPCOAT_KERNELS` variable (unset or empty: `auto`).
    pub fn from_env_value(value: Option<&str>) -> Result<Self, ParseOptionError> {
        match value {
            None | Some("") => Ok(Self::Auto),
            Some(s) => s.parse(),
        }
    }
}

impl fmt::Display for KernelVariants {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KernelVariants {
    type Err = ParseOptionError;

    /// `auto` or `generic`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| ParseOptionError {
                what: "TOPCOAT_KERNELS",
                found: s.to_string(),
                expected: "auto or generic",
            })
    }
}

/// The code a device runs, as the device line and `topcoat info` print it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelCode {
    /// Machine code compiled ahead of time for `sm_XX`.
    Sass { sm: u32 },
    /// PTX for `compute_XX`, JIT-compiled by the driver when the backend opens; `forced` when
    /// [`KernelVariants::Generic`] chose it over SASS that would have run.
    PtxJit { compute: u32, forced: bool },
}

impl fmt::Display for KernelCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Sass { sm } => write!(f, "sm_{sm} SASS"),
            Self::PtxJit {
                compute,
                forced: false,
            } => write!(f, "PTX JIT from compute_{compute}"),
            Self::PtxJit {
                compute,
                forced: true,
            } => write!(
                f,
                "PTX JIT from compute_{compute}, generic variants (TOPCOAT_KERNELS)"
            ),
        }
    }
}

/// What every embedded fatbin holds: the `sm_XX` with SASS and the `compute_XX` with PTX.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct BuildCode {
    pub sass: Vec<u32>,
    pub ptx: Vec<u32>,
}

impl BuildCode {
    /// What all of `modules` hold (the archs every fatbin has; they are built alike).
    pub fn of(modules: &[Module]) -> Result<Self, ArchError> {
        let mut code: Option<BuildCode> = None;
        for m in modules {
            let fb = Fatbin::parse(m.fatbin).map_err(|source| ArchError::Fatbin {
                family: m.family,
                source,
            })?;
            let (sass, ptx) = (fb.sass_archs(), fb.ptx_archs());
            code = Some(match code {
                None => BuildCode { sass, ptx },
                Some(c) => BuildCode {
                    sass: c.sass.into_iter().filter(|a| sass.contains(a)).collect(),
                    ptx: c.ptx.into_iter().filter(|a| ptx.contains(a)).collect(),
                },
            });
        }
        Ok(code.unwrap_or_default())
    }
}

impl fmt::Display for BuildCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |prefix: &str, archs: &[u32]| -> String {
            if archs.is_empty() {
                return "none".into();
            }
            let names: Vec<String> = archs.iter().map(|a| format!("{prefix}_{a}")).collect();
            names.join(", ")
        };
        write!(
            f,
            "SASS for {}; PTX for {}",
            list("sm", &self.sass),
            list("compute", &self.ptx)
        )
    }
}

/// Why a device cannot run this build's kernels.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ArchError {
    #[error(
        "{name} has compute capability {}.{}: topcoat's CUDA kernels need 8.0 (sm_80, A100) or \
         newer (bf16 tensor cores, cp.async); use --device cpu",
        .cc.0, .cc.1
    )]
    TooOld { name: String, cc: (i32, i32) },
    #[error(
        "{name} (compute capability {}.{}){}: this build holds {code}, none of which runs on it \
         (PTX comes only from nvcc 13.0; see docs/BUILD.md)",
        .cc.0, .cc.1, generic_suffix(.generic)
    )]
    NoCode {
        name: String,
        cc: (i32, i32),
        code: BuildCode,
        generic: bool,
    },
    #[error("kernels/{family}.cu: the embedded fatbin: {source}")]
    Fatbin {
        family: &'static str,
        source: FatbinError,
    },
}

/// How [`ArchError::NoCode`] mentions `TOPCOAT_KERNELS=generic`.
fn generic_suffix(generic: &bool) -> &'static str {
    if *generic {
        " with TOPCOAT_KERNELS=generic"
    } else {
        ""
    }
}

/// The newest SASS in `code` that a card of compute capability `cc` runs (same major version,
/// minor at most the card's), else the newest PTX at most `cc` (JIT), for the device `name`.
/// A card older than [`MIN_COMPUTE_CAPABILITY`] is [`ArchError::TooOld`]; with
/// [`KernelVariants::Generic`] only PTX is considered.
pub fn choose(
    name: &str,
    cc: (i32, i32),
    code: &BuildCode,
    variants: KernelVariants,
) -> Result<KernelCode, ArchError> {
    if cc < MIN_COMPUTE_CAPABILITY {
        return Err(ArchError::TooOld {
            name: name.into(),
            cc,
        });
    }
    let (major, minor) = (cc.0 as u32, cc.1 as u32);
    let generic = variants == KernelVariants::Generic;
    let sass = code
        .sass
        .iter()
        .copied()
        .filter(|&a| a / 10 == major && a % 10 <= minor)
        .max();
    let ptx = code
        .ptx
        .iter()
        .copied()
        .filter(|&a| (a / 10, a % 10) <= (major, minor))
        .max();
    match (sass, ptx) {
        (Some(sm), _) if !generic => Ok(KernelCode::Sass { sm }),
        (_, Some(compute)) => Ok(KernelCode::PtxJit {
            compute,
            forced: generic && sass.is_some(),
        }),
        _ => Err(ArchError::NoCode {
            name: name.into(),
            cc,
            code: code.clone(),
            generic,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build() -> BuildCode {
        BuildCode {
            sass: vec![80, 86, 89, 90, 120],
            ptx: vec![80],
        }
    }

    fn pick(cc: (i32, i32), v: KernelVariants) -> String {
        choose("card", cc, &build(), v).unwrap().to_string()
    }

    #[test]
    fn sass_by_major_and_minor_else_ptx() {
        let auto = KernelVariants::Auto;
        assert_eq!(pick((8, 0), auto), "sm_80 SASS");
        assert_eq!(pick((8, 6), auto), "sm_86 SASS");
        // Orin (8.7) runs the sm_86 SASS; the L40S (8.9) its own.
        assert_eq!(pick((8, 7), auto), "sm_86 SASS");
        assert_eq!(pick((8, 9), auto), "sm_89 SASS");
        assert_eq!(pick((9, 0), auto), "sm_90 SASS");
        // Blackwell datacenter and Thor: no SASS of their major version, so the PTX.
        assert_eq!(pick((10, 0), auto), "PTX JIT from compute_80");
        assert_eq!(pick((11, 0), auto), "PTX JIT from compute_80");
        assert_eq!(pick((12, 0), auto), "sm_120 SASS");
        assert_eq!(pick((12, 1), auto), "sm_120 SASS");
    }

    #[test]
    fn generic_forces_the_ptx() {
        let g = KernelVariants::Generic;
        assert_eq!(
            pick((9, 0), g),
            "PTX JIT from compute_80, generic variants (TOPCOAT_KERNELS)"
        );
        assert_eq!(
            choose("H100", (9, 0), &build(), g),
            Ok(KernelCode::PtxJit {
                compute: 80,
                forced: true
            })
        );
        // Where only PTX fits anyway, generic changes nothing.
        assert_eq!(
            choose("B200", (10, 0), &build(), g),
            Ok(KernelCode::PtxJit {
                compute: 80,
                forced: false
            })
        );
    }

    #[test]
    fn too_old_and_no_code_are_named() {
        let err = choose("Tesla T4", (7, 5), &build(), KernelVariants::Auto).unwrap_err();
        assert_eq!(
            err,
            ArchError::TooOld {
                name: "Tesla T4".into(),
                cc: (7, 5)
            }
        );
        assert!(err
            .to_string()
            .starts_with("Tesla T4 has compute capability 7.5: topcoat's CUDA kernels need 8.0"));
        // A build without PTX (nvcc other than 13.0) on a card it has no SASS for.
        let sass_only = BuildCode {
            sass: vec![80, 90],
            ptx: vec![],
        };
        let err = choose("B200", (10, 0), &sass_only, KernelVariants::Auto).unwrap_err();
        assert_eq!(
            err.to_string(),
            "B200 (compute capability 10.0): this build holds SASS for sm_80, sm_90; PTX for \
             none, none of which runs on it (PTX comes only from nvcc 13.0; see docs/BUILD.md)"
        );
        let err = choose("H100", (9, 0), &sass_only, KernelVariants::Generic).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("H100 (compute capability 9.0) with TOPCOAT_KERNELS=generic:"),
            "{err}"
        );
    }

    #[test]
    fn env_value_parses() {
        assert_eq!(
            KernelVariants::from_env_value(None),
            Ok(KernelVariants::Auto)
        );
        assert_eq!(
            KernelVariants::from_env_value(Some("")),
            Ok(KernelVariants::Auto)
        );
        assert_eq!(
            KernelVariants::from_env_value(Some("generic")),
            Ok(KernelVariants::Generic)
        );
        for v in KernelVariants::ALL {
            assert_eq!(v.to_string().parse(), Ok(v));
        }
        assert_eq!(
            KernelVariants::from_env_value(Some("hopper"))
                .unwrap_err()
                .to_string(),
            "unknown TOPCOAT_KERNELS `hopper`: expected auto or generic"
        );
    }

    #[test]
    fn build_code_of_the_embedded_modules() {
        let code = BuildCode::of(super::super::kernels::MODULES);
        if !super::super::BUILT_WITH_NVCC {
            println!("skipped: built without nvcc");
            assert!(matches!(
                code,
                Err(ArchError::Fatbin {
                    source: FatbinError::Empty,
                    ..
                })
            ));
            return;
        }
        let code = code.unwrap();
        assert_eq!(code.sass, super::super::kernels::SASS_ARCHS);
        assert_eq!(code.ptx, super::super::kernels::PTX_ARCHS);
    }
}
