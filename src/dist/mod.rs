//! Data parallelism: where a process stands in a job ([`RankInfo`]) and the [`Collective`]
//! that sums gradients across the ranks.
//!
//! The runtime opens one collective per process from the launcher's environment (torchrun,
//! srun, mpirun or `topcoat launch`) and hands it down beside the backend; the step loop
//! (`train/`) is generic over both. Two engines implement the trait:
//! - NCCL, for CUDA ranks (one GPU each): the engine of every GPU run;
//! - a loopback-TCP host collective, for the CPU backend (and for two ranks sharing one GPU
//!   through host copies). It reduces in a fixed order (rank 0, 1, 2, ...), so its sums are
//!   deterministic; it exists to specify and test the distributed path in `cargo test`.
//!
//! [`Solo`] is the collective of a single process: every operation is the identity.
//!
//! Semantics every engine keeps:
//! - A device operation (`all_reduce_sum`, `reduce_sum`, `broadcast`) may return before it has
//!   finished (NCCL runs it on a communication stream, so it overlaps the backward pass that
//!   is still running); [`Collective::wait`] makes later work on the backend see its result.
//! - Sums are `f32` and every rank ends with the same bits.
//! - Every rank calls the same operations in the same order with the same lengths.
//! - A failure names the rank that failed or went silent (and the address, for the
//!   rendezvous), and no operation blocks longer than the engine's stated timeout.

pub mod env;
mod frame;
pub mod host;
pub mod launch;
pub mod rendezvous;

pub use env::{detect, detect_from_env, open_collective, DistPlan};
pub use host::HostCollective;
pub use rendezvous::{rendezvous, Meeting, Star};

use crate::backend::Backend;
use thiserror::Error;

/// Errors of the distributed layer: each names the rank (and address or file) it is about.
#[derive(Debug, Error)]
pub enum DistError {
    /// The launcher's environment is incomplete or contradictory.
    #[error("launcher environment: {0}")]
    Env(String),
    /// The rendezvous (exchange of addresses or the NCCL id) failed.
    #[error("rendezvous at {addr}: {msg}")]
    Rendezvous { addr: String, msg: String },
    /// A peer rank failed, exited or went silent.
    #[error("rank {rank}: {msg}")]
    Peer { rank: usize, msg: String },
    /// The engine itself (NCCL, the device) failed on this rank.
    #[error("rank {rank}: {msg}")]
    Engine { rank: usize, msg: String },
    #[error(transparent)]
    Backend(#[from] crate::backend::BackendError),
}

pub type Result<T> = std::result::Result<T, DistError>;

/// Where this process stands in a data-parallel job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankInfo {
    /// Global rank, `0..world_size`; rank 0 writes metrics, checkpoints and the console.
    pub rank: usize,
    pub world_size: usize,
    /// Rank within its node: the CUDA device this rank uses.
    pub local_rank: usize,
    /// Which launcher set the environment ("torchrun", "srun", "mpirun", "topcoat launch"), or
    /// "single process".
    pub launcher: String,
}

impl RankInfo {
    /// A process on its own.
    pub fn single() -> Self {
        Self {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            launcher: "single process".into(),
        }
    }

    /// Whether this rank writes files and prints progress (rank 0).
    pub fn is_writer(&self) -> bool {
        self.rank == 0
    }
}

/// The operations data parallelism needs, over the buffers of backend `B`.
pub trait Collective<B: Backend> {
    /// This process's place in the job.
    fn info(&self) -> &RankInfo;

    fn rank(&self) -> usize {
        self.info().rank
    }

    fn world_size(&self) -> usize {
        self.info().world_size
    }

    /// What carries the traffic, for the device line ("nccl 2.x", "tcp (host copies)", "none").
    fn engine(&self) -> String;

    /// Starts summing each of `bufs` over all ranks, in place (every rank gets the sum).
    fn all_reduce_sum(&self, be: &B, bufs: &mut [&mut B::Buf]) -> Result<()>;

    /// Starts summing each of `bufs` into rank `root`'s buffers (the others' are left as they
    /// were or clobbered: only `root`'s are defined afterwards).
    fn reduce_sum(&self, be: &B, bufs: &mut [&mut B::Buf], root: usize) -> Result<()>;

    /// Starts copying each of `bufs` from rank `root` to every other rank.
    fn broadcast(&self, be: &B, bufs: &mut [&mut B::Buf], root: usize) -> Result<()>;

    /// Waits until every operation started has finished and the backend's later work sees
    /// its results.
    fn wait(&self, be: &B) -> Result<()>;

    /// Sums host values over all ranks, in rank order (0, 1, 2, ...): the step's loss, token
    /// counts, validation sums and metrics. Every rank gets the same bits.
    fn all_reduce_host(&self, values: &mut [f64]) -> Result<()>;

    /// Rank `root`'s bytes, on every rank (run settings, the data position, a decision).
    fn broadcast_bytes(&self, bytes: Vec<u8>, root: usize) -> Result<Vec<u8>>;

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()> {
        self.all_reduce_host(&mut []).map(|_| ())
    }
}

/// The collective of a process on its own: every operation is the identity.
pub struct Solo {
    info: RankInfo,
}

impl Solo {
    pub fn new() -> Self {
        Self {
            info: RankInfo::single(),
        }
    }
}

impl Default for Solo {
    fn default() -> Self {
        Self::new()
    }
}

impl<B: Backend> Collective<B> for Solo {
    fn info(&self) -> &RankInfo {
        &self.info
    }

    fn engine(&self) -> String {
        "none (one process)".into()
    }

    fn all_reduce_sum(&self, _be: &B, _bufs: &mut [&mut B::Buf]) -> Result<()> {
        Ok(())
    }

    fn reduce_sum(&self, _be: &B, _bufs: &mut [&mut B::Buf], _root: usize) -> Result<()> {
        Ok(())
    }

    fn broadcast(&self, _be: &B, _bufs: &mut [&mut B::Buf], _root: usize) -> Result<()> {
        Ok(())
    }

    fn wait(&self, _be: &B) -> Result<()> {
        Ok(())
    }

    fn all_reduce_host(&self, _values: &mut [f64]) -> Result<()> {
        Ok(())
    }

    fn broadcast_bytes(&self, bytes: Vec<u8>, _root: usize) -> Result<Vec<u8>> {
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    #[test]
    fn solo_is_the_identity() {
        let be = CpuBackend;
        let solo = Solo::new();
        let c: &dyn Collective<CpuBackend> = &solo;
        let mut buf = be
            .upload(&[1.0, -2.5, 3.25], crate::backend::Role::Grad)
            .unwrap();
        c.all_reduce_sum(&be, &mut [&mut buf]).unwrap();
        c.wait(&be).unwrap();
        assert_eq!(be.download(&buf).unwrap(), vec![1.0, -2.5, 3.25]);
        let mut host = [0.5, 7.0];
        c.all_reduce_host(&mut host).unwrap();
        assert_eq!(host, [0.5, 7.0]);
        assert_eq!(c.broadcast_bytes(b"run".to_vec(), 0).unwrap(), b"run");
        assert_eq!((c.rank(), c.world_size()), (0, 1));
        assert!(c.info().is_writer());
    }
}
