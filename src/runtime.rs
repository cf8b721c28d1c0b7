//! The runtime: the one place in topcoat that turns `--device` into an opened backend.
//!
//! A command that computes asks for a [`Runtime`] once per process ([`Runtime::open`]); it
//! resolves the device (`auto` looks for a usable CUDA device and falls back to the CPU), opens
//! that backend once (one CUDA context, stream, cuBLASLt workspace and module set for the whole
//! process, the demo's five stages included) and hands it down with [`on_backend!`]. Below this
//! file, code is generic over [`Backend`]; no other module outside `backend/` names
//! `CpuBackend` or `CudaBackend`.
//!
//! Training runs on one rank: [`Runtime::check_world_size`] refuses a run config that asks for
//! more (each rank would read its own slice and nothing would sum the gradients).

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{self, CudaBackend, CudaOptions};
use crate::backend::BackendError;
use std::fmt;
use std::str::FromStr;

/// What `--device` asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceRequest {
    /// A CUDA device when this build has kernels and a driver finds one, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl FromStr for DeviceRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            other => Err(format!(
                "unknown device `{other}` (expected auto, cpu or cuda)"
            )),
        }
    }
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
        })
    }
}

/// Which kind of backend a runtime opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

/// How to open the runtime: the device, and the CUDA backend's kernel choices (`bench`'s A/B
/// switches; the defaults are the fastest measured).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuntimeOptions {
    pub device: DeviceRequest,
    pub cuda: CudaOptions,
}

impl RuntimeOptions {
    /// The CPU reference backend (tests, and the demo's reproducible card).
    pub fn cpu() -> Self {
        Self {
            device: DeviceRequest::Cpu,
            ..Self::default()
        }
    }
}

/// The opened backend. Public only so that [`on_backend!`] can match on it; use the macro.
#[doc(hidden)]
pub enum Opened {
    Cpu(CpuBackend),
    Cuda(Box<CudaBackend>),
}

/// One process's device: the opened backend and what was chosen and why.
pub struct Runtime {
    opened: Opened,
    description: String,
}

/// The CUDA device a process uses. One GPU per process; a launcher with several ranks will
/// pick the rank's local device here.
const CUDA_ORDINAL: usize = 0;

impl Runtime {
    /// Resolves `opts.device` and opens its backend.
    ///
    /// `auto` picks CUDA when this build has kernels and a driver finds a device, else the CPU;
    /// [`Runtime::description`] says which and why (every command prints it).
    pub fn open(opts: &RuntimeOptions) -> Result<Self, BackendError> {
        let cuda_backend = |info: cuda::DeviceInfo, why: &str| -> Result<Self, BackendError> {
            Ok(Self {
                opened: Opened::Cuda(Box::new(CudaBackend::with_options(
                    CUDA_ORDINAL,
                    opts.cuda,
                )?)),
                description: format!("cuda: {info}{why}"),
            })
        };
        match opts.device {
            DeviceRequest::Cpu => Ok(Self::cpu_with("cpu (f32 reference backend)")),
            DeviceRequest::Cuda => cuda_backend(cuda::probe()?, ""),
            DeviceRequest::Auto => match cuda::probe() {
                Ok(info) => cuda_backend(info, " (found by --device auto)"),
                Err(e) => Ok(Self::cpu_with(&format!(
                    "cpu (f32 reference backend; no CUDA: {e})"
                ))),
            },
        }
    }

    /// The CPU reference backend.
    pub fn cpu() -> Self {
        Self::cpu_with("cpu (f32 reference backend)")
    }

    fn cpu_with(description: &str) -> Self {
        Self {
            opened: Opened::Cpu(CpuBackend),
            description: description.into(),
        }
    }

    /// What was opened and why, e.g. `cuda: NVIDIA H200 (sm_90, 140 GiB) (found by --device auto)`.
    pub fn description(&self) -> &str {
        &self.description
    }

    pub fn kind(&self) -> DeviceKind {
        match self.opened {
            Opened::Cpu(_) => DeviceKind::Cpu,
            Opened::Cuda(_) => DeviceKind::Cuda,
        }
    }

    /// The opened backend, for [`on_backend!`].
    #[doc(hidden)]
    pub fn opened(&self) -> &Opened {
        &self.opened
    }

    /// Refuses a run config with `world_size != 1` (or a rank outside it): topcoat trains on
    /// one rank until data parallelism exists.
    pub fn check_world_size(world_size: usize, rank: usize) -> Result<(), String> {
        if world_size != 1 || rank != 0 {
            return Err(format!(
                "world_size = {world_size}, rank = {rank}: topcoat trains on one process and one \
                 device; data-parallel training is not built yet, and N processes would train N \
                 unrelated models (set world_size = 1 and rank = 0)"
            ));
        }
        Ok(())
    }
}

/// Runs `$body` with `$be` bound to the runtime's backend (`&impl Backend`): the one match over
/// the backends, written once. `on_backend!(rt, be => sample_on(be, &job))`.
#[macro_export]
macro_rules! on_backend {
    ($rt:expr, $be:ident => $body:expr) => {
        match $rt.opened() {
            $crate::runtime::Opened::Cpu($be) => $body,
            $crate::runtime::Opened::Cuda(cuda) => {
                let $be: &$crate::backend::cuda::CudaBackend = cuda;
                $body
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse_and_an_unknown_one_is_named() {
        for (name, want) in [
            ("auto", DeviceRequest::Auto),
            ("cpu", DeviceRequest::Cpu),
            ("cuda", DeviceRequest::Cuda),
        ] {
            let got: DeviceRequest = name.parse().unwrap();
            assert_eq!(got, want);
            assert_eq!(got.to_string(), name);
        }
        let e = "gpu".parse::<DeviceRequest>().unwrap_err();
        assert!(
            e.contains("`gpu`") && e.contains("auto, cpu or cuda"),
            "{e}"
        );
    }

    #[test]
    fn cpu_opens_the_reference_backend_and_says_so() {
        let rt = Runtime::open(&RuntimeOptions::cpu()).unwrap();
        assert_eq!(rt.kind(), DeviceKind::Cpu);
        assert!(rt.description().starts_with("cpu"), "{}", rt.description());
        let name = crate::on_backend!(rt, be => crate::backend::Backend::name(be));
        assert!(name.to_lowercase().contains("cpu"), "{name}");
    }

    #[test]
    fn auto_falls_back_to_the_cpu_with_the_reason_when_cuda_is_unusable() {
        let rt = Runtime::open(&RuntimeOptions::default()).unwrap();
        if rt.kind() == DeviceKind::Cpu {
            assert!(rt.description().contains("no CUDA"), "{}", rt.description());
        } else {
            assert!(rt.description().contains("found by --device auto"));
        }
    }

    #[test]
    fn only_one_rank_is_accepted() {
        assert!(Runtime::check_world_size(1, 0).is_ok());
        let e = Runtime::check_world_size(4, 2).unwrap_err();
        assert!(
            e.contains("world_size = 4") && e.contains("rank = 2"),
            "{e}"
        );
        assert!(Runtime::check_world_size(1, 1).is_err());
    }
}
