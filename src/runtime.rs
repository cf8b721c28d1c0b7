//! The runtime: the one place in topcoat that turns `--device` into an opened backend.
//!
//! A command that computes asks for a [`Runtime`] once per process ([`Runtime::open`]); it
//! resolves the device (`auto` looks for a usable CUDA device and falls back to the CPU), opens
//! that backend once (one CUDA context, stream, cuBLASLt workspace and module set for the whole
//! process, the demo's five stages included) and hands it down with [`on_backend!`]. Below this
//! file, code is generic over [`Backend`]; no other module outside `backend/` names
//! `CpuBackend` or `CudaBackend`.
//!
//! The runtime also reads where this process stands in a data-parallel job (the launcher's
//! environment: torchrun, srun, mpirun or `topcoat launch`), opens the CUDA device of the
//! rank's LOCAL_RANK, and opens one [`Collective`] per process: [`Solo`] at world size 1, the
//! loopback-TCP host collective on the CPU, NCCL on CUDA (or, with `--collective host`, host
//! copies: two ranks sharing one GPU). [`on_backend!`] hands the collective down beside the
//! backend.

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::{self, CudaBackend, CudaOptions};
use crate::backend::BackendError;
use crate::dist::env::{detect_from_env, open_collective, DistPlan};
use crate::dist::{Collective, DistError, RankInfo, Solo};
use std::fmt;
use std::rc::Rc;
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

/// What `--collective` asks for: the engine that sums gradients across ranks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CollectiveRequest {
    /// NCCL on CUDA, the host (loopback TCP) collective on the CPU; none at world size 1.
    #[default]
    Auto,
    /// NCCL (CUDA only).
    Nccl,
    /// The host collective: device buffers are copied to the host and summed over TCP (the
    /// CPU backend's engine; on CUDA, for ranks that share one GPU, which NCCL refuses).
    Host,
}

impl FromStr for CollectiveRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "nccl" => Ok(Self::Nccl),
            "host" => Ok(Self::Host),
            other => Err(format!(
                "unknown collective `{other}` (expected auto, nccl or host)"
            )),
        }
    }
}

impl fmt::Display for CollectiveRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Nccl => "nccl",
            Self::Host => "host",
        })
    }
}

/// Why the runtime could not open.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Dist(#[from] DistError),
    #[error("--collective {asked}: {why}")]
    Collective {
        asked: CollectiveRequest,
        why: String,
    },
}

/// Which kind of backend a runtime opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

/// How to open the runtime: the device, and the CUDA backend's kernel choices (`bench`'s A/B
/// switches; the defaults are the fastest measured).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuntimeOptions {
    pub device: DeviceRequest,
    pub cuda: CudaOptions,
    pub collective: CollectiveRequest,
    /// `--master-addr`: where the ranks meet, over MASTER_ADDR (srun sets none).
    pub master_addr: Option<String>,
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
    Cpu(CpuBackend, Rc<dyn Collective<CpuBackend>>),
    Cuda(Box<CudaBackend>, Rc<dyn Collective<CudaBackend>>),
}

/// One process's device and collective: the opened backend, where the process stands in its
/// job, and what was chosen and why.
pub struct Runtime {
    opened: Opened,
    rank: RankInfo,
    description: String,
}

impl Runtime {
    /// Reads the launcher's environment, resolves `opts.device`, opens its backend (CUDA: the
    /// device of the rank's LOCAL_RANK) and the rank's collective.
    ///
    /// `auto` picks CUDA when this build has kernels and a driver finds a device, else the CPU;
    /// [`Runtime::description`] says which and why, the rank and the engine (every command
    /// prints it).
    pub fn open(opts: &RuntimeOptions) -> Result<Self, RuntimeError> {
        let plan = detect_from_env(opts.master_addr.as_deref())?;
        let rank = plan.info.clone();
        let device = match opts.device {
            DeviceRequest::Cpu => None,
            DeviceRequest::Cuda => Some((cuda::probe()?, "")),
            DeviceRequest::Auto => match cuda::probe() {
                Ok(info) => Some((info, " (found by --device auto)")),
                Err(e) => {
                    let why = format!("cpu (f32 reference backend; no CUDA: {e})");
                    return Self::open_cpu(&plan, opts.collective, why);
                }
            },
        };
        let Some((info, why)) = device else {
            return Self::open_cpu(&plan, opts.collective, "cpu (f32 reference backend)".into());
        };
        let ordinal = cuda_ordinal(&rank, info.device_count, opts.collective)?;
        let be = Box::new(CudaBackend::with_options(ordinal, opts.cuda)?);
        let comm: Rc<dyn Collective<CudaBackend>> = match (rank.world_size, opts.collective) {
            (1, CollectiveRequest::Auto | CollectiveRequest::Host) => Rc::new(Solo::new()),
            (_, CollectiveRequest::Host) => host_collective::<CudaBackend>(&plan)?,
            (_, CollectiveRequest::Auto | CollectiveRequest::Nccl) => nccl_collective(&be, &plan)?,
        };
        let device = format!("cuda: {info}, kernels: {}{why}", be.kernel_code());
        let description = describe(&device, &rank, comm.engine());
        Ok(Self {
            opened: Opened::Cuda(be, comm),
            rank,
            description,
        })
    }

    fn open_cpu(
        plan: &DistPlan,
        asked: CollectiveRequest,
        device: String,
    ) -> Result<Self, RuntimeError> {
        let rank = plan.info.clone();
        let comm: Rc<dyn Collective<CpuBackend>> = match (rank.world_size, asked) {
            (_, CollectiveRequest::Nccl) => {
                return Err(RuntimeError::Collective {
                    asked,
                    why: "NCCL sums CUDA buffers, and this rank runs on the CPU (use --device \
                          cuda, or --collective host)"
                        .into(),
                })
            }
            (1, _) => Rc::new(Solo::new()),
            _ => host_collective::<CpuBackend>(plan)?,
        };
        let description = describe(&device, &rank, comm.engine());
        Ok(Self {
            opened: Opened::Cpu(CpuBackend, comm),
            rank,
            description,
        })
    }

    /// The CPU reference backend, one process on its own (tests, the demo's card).
    pub fn cpu() -> Self {
        let rank = RankInfo::single();
        let description = describe("cpu (f32 reference backend)", &rank, "none".into());
        Self {
            opened: Opened::Cpu(CpuBackend, Rc::new(Solo::new())),
            rank,
            description,
        }
    }

    /// Where this process stands in its job (rank 0 of 1 on its own).
    pub fn rank_info(&self) -> &RankInfo {
        &self.rank
    }

    /// What was opened and why, e.g. `cuda: NVIDIA H200 (compute capability 9.0, 140 GiB),
    /// kernels: sm_90 SASS (found by --device auto)`.
    pub fn description(&self) -> &str {
        &self.description
    }

    pub fn kind(&self) -> DeviceKind {
        match self.opened {
            Opened::Cpu(..) => DeviceKind::Cpu,
            Opened::Cuda(..) => DeviceKind::Cuda,
        }
    }

    /// The opened backend, for [`on_backend!`].
    #[doc(hidden)]
    pub fn opened(&self) -> &Opened {
        &self.opened
    }

    /// Runs `work` on rank 0 first (set-up that writes shared files: the embedded corpus, the
    /// run directory), then on the other ranks once rank 0 has succeeded; when rank 0 fails,
    /// every other rank fails too, with rank 0's message, instead of racing it or waiting for
    /// a collective timeout. On its own a process just runs `work`.
    pub fn after_rank_zero<T, E: fmt::Display>(
        &self,
        work: impl FnOnce() -> Result<T, E>,
    ) -> Result<Result<T, E>, DistError> {
        if self.rank.world_size == 1 {
            return Ok(work());
        }
        let share =
            |msg: Vec<u8>| crate::on_backend!(self, _be, comm => comm.broadcast_bytes(msg, 0));
        if self.rank.is_writer() {
            let outcome = work();
            let msg = outcome
                .as_ref()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            share(msg.into_bytes())?;
            return Ok(outcome);
        }
        let msg = share(Vec::new())?;
        if !msg.is_empty() {
            return Err(DistError::Peer {
                rank: 0,
                msg: format!("failed before training: {}", String::from_utf8_lossy(&msg)),
            });
        }
        Ok(work())
    }
}

/// The CUDA device of a rank: its LOCAL_RANK's. With more ranks on a node than visible devices,
/// the host collective shares them round-robin (two ranks on one GPU, for tests); NCCL needs
/// a GPU of its own per rank, so that is refused by name.
fn cuda_ordinal(
    rank: &RankInfo,
    devices: usize,
    asked: CollectiveRequest,
) -> Result<usize, RuntimeError> {
    let local = rank.local_rank;
    if local < devices {
        return Ok(local);
    }
    if asked == CollectiveRequest::Host {
        return Ok(local % devices);
    }
    Err(RuntimeError::Collective {
        asked,
        why: format!(
            "rank {} has LOCAL_RANK {local}, and this node shows {devices} CUDA device(s): NCCL \
             needs one GPU per rank (start at most {devices} ranks per node, check \
             CUDA_VISIBLE_DEVICES, or share the GPUs through host copies with --collective host)",
            rank.rank
        ),
    })
}

/// The host (loopback TCP) collective of `plan`'s job: meets the other ranks first.
fn host_collective<B: crate::backend::Backend + 'static>(
    plan: &DistPlan,
) -> Result<Rc<dyn Collective<B>>, RuntimeError> {
    Ok(Rc::new(open_collective(plan)?))
}

/// NCCL over `be`'s device for `plan`'s job: the unique id travels through the host
/// collective, which also carries the host operations (losses, decisions).
fn nccl_collective(
    be: &CudaBackend,
    plan: &DistPlan,
) -> Result<Rc<dyn Collective<CudaBackend>>, RuntimeError> {
    let host: Box<dyn Collective<CudaBackend>> = Box::new(open_collective(plan)?);
    Ok(Rc::new(cuda::NcclCollective::with_host(
        be,
        plan.info.clone(),
        host,
    )?))
}

/// The device line: the device, then the rank and the engine when there are several ranks.
fn describe(device: &str, rank: &RankInfo, engine: String) -> String {
    if rank.world_size == 1 {
        return device.to_string();
    }
    format!(
        "{device}; rank {} of {} (local {}, {}), collective: {engine}",
        rank.rank, rank.world_size, rank.local_rank, rank.launcher
    )
}

/// Runs `$body` with `$be` bound to the runtime's backend (`&impl Backend`): the one match over
/// the backends, written once. `on_backend!(rt, be => sample_on(be, &job))`; with
/// `on_backend!(rt, be, comm => train_on(be, comm, &job))`, `comm` is the rank's collective
/// (`&Rc<dyn Collective<B>>`, which derefs to `&dyn Collective<B>`).
#[macro_export]
macro_rules! on_backend {
    ($rt:expr, $be:ident => $body:expr) => {
        match $rt.opened() {
            $crate::runtime::Opened::Cpu($be, _) => $body,
            $crate::runtime::Opened::Cuda(cuda, _) => {
                let $be: &$crate::backend::cuda::CudaBackend = cuda;
                $body
            }
        }
    };
    ($rt:expr, $be:ident, $comm:ident => $body:expr) => {
        match $rt.opened() {
            $crate::runtime::Opened::Cpu($be, $comm) => $body,
            $crate::runtime::Opened::Cuda(cuda, $comm) => {
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
    fn collective_names_parse_and_nccl_on_the_cpu_is_refused() {
        for (name, want) in [
            ("auto", CollectiveRequest::Auto),
            ("nccl", CollectiveRequest::Nccl),
            ("host", CollectiveRequest::Host),
        ] {
            let got: CollectiveRequest = name.parse().unwrap();
            assert_eq!((got, got.to_string().as_str()), (want, name));
        }
        let e = "mpi".parse::<CollectiveRequest>().unwrap_err();
        assert!(
            e.contains("`mpi`") && e.contains("auto, nccl or host"),
            "{e}"
        );
        let opts = RuntimeOptions {
            collective: CollectiveRequest::Nccl,
            ..RuntimeOptions::cpu()
        };
        let e = Runtime::open(&opts)
            .err()
            .expect("nccl on the cpu")
            .to_string();
        assert!(e.contains("--collective nccl") && e.contains("CPU"), "{e}");
    }

    #[test]
    fn ranks_share_gpus_only_through_host_copies() {
        let rank = |r: usize| RankInfo {
            rank: r,
            world_size: 4,
            local_rank: r,
            launcher: "torchrun".into(),
        };
        for asked in [
            CollectiveRequest::Auto,
            CollectiveRequest::Nccl,
            CollectiveRequest::Host,
        ] {
            assert_eq!(cuda_ordinal(&rank(3), 8, asked).unwrap(), 3, "its own GPU");
        }
        assert_eq!(
            cuda_ordinal(&rank(3), 2, CollectiveRequest::Host).unwrap(),
            1
        );
        let e = cuda_ordinal(&rank(3), 2, CollectiveRequest::Auto)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rank 3 has LOCAL_RANK 3, and this node shows 2 CUDA device(s)")
                && e.contains("--collective host"),
            "{e}"
        );
    }

    #[test]
    fn a_single_process_gets_the_solo_collective() {
        let rt = Runtime::open(&RuntimeOptions::cpu()).unwrap();
        assert_eq!(rt.rank_info(), &RankInfo::single());
        let (rank, world, engine) = crate::on_backend!(rt, be, comm => { let _ = be; (comm.rank(), comm.world_size(), comm.engine()) });
        assert_eq!((rank, world), (0, 1));
        assert!(engine.starts_with("none"), "{engine}");
    }
}
