//! [`NcclCollective`]: the data-parallel [`Collective`] of CUDA ranks, one GPU each, over NCCL
//! (cudarc's `nccl` feature, dlopened at run time; [`super::nccl_lib`] checks it loads first).
//!
//! Streams: device operations run on a second stream of the backend's context, the
//! communication stream. Each one records an event on the compute stream and makes the
//! communication stream wait on it (the buffers are final), launches the bucket's NCCL calls in
//! one `group()` and returns at once, so the backward pass keeps running while the bucket is
//! summed. [`Collective::wait`] makes the compute stream wait on an event recorded on the
//! communication stream; the host never blocks there.
//!
//! Buffers: gradients (`Grad`) and the other fp32 roles are summed in fp32. A `Param` buffer is
//! broadcast as its bf16 working copy, the rounding of the owner's master (upload and AdamW
//! write both): under ZeRO-1 the receiving ranks released their masters of the tensors they do
//! not own (`Backend::release_master`), so the bf16 copy is all they hold.
//!
//! Host operations (the step's losses, run settings, barriers) either go to the host collective
//! handed to [`NcclCollective::with_host`] (its TCP timeouts then name a dead rank), or, with
//! [`NcclCollective::new`], through small device buffers on the communication stream:
//! `all_reduce_host` all-gathers every rank's values and sums them on the host in rank order,
//! so it returns the same bits as the host collective.
//!
//! Determinism: NCCL's ring all-reduce is deterministic run to run at a fixed world size,
//! algorithm and protocol; pin them with NCCL_ALGO=Ring and NCCL_PROTO=Simple when comparing
//! runs bit for bit (docs/DISTRIBUTED.md "## NCCL").

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, CudaStream, CudaViewMut};
use cudarc::nccl::result::{get_nccl_version, NcclError};
use cudarc::nccl::safe::{Comm, Group, Id, ReduceOp};
use half::bf16;

use super::buffer::Mem;
use super::nccl_lib::check_nccl_loadable;
use super::{CudaBackend, CudaBuf};
use crate::dist::{Collective, DistError, RankInfo, Result};

/// Bytes of an NCCL unique id.
pub const NCCL_ID_BYTES: usize = 128;

/// Exchanges bytes from a root rank to every rank: `(bytes, root) -> root's bytes` (the host
/// collective's `broadcast_bytes`, over the rendezvous).
pub type ExchangeBytes<'a> = dyn FnMut(Vec<u8>, usize) -> Result<Vec<u8>> + 'a;

/// The NCCL collective of one CUDA rank.
pub struct NcclCollective {
    info: RankInfo,
    /// Comm before stream: NCCL's communicator is aborted before its stream goes.
    comm: Comm,
    comm_stream: Arc<CudaStream>,
    compute: Arc<CudaStream>,
    version: String,
    host: Option<Box<dyn Collective<CudaBackend>>>,
}

impl NcclCollective {
    /// Joins the NCCL communicator of `info.world_size` ranks: rank 0 makes the unique id, every
    /// rank receives it through `exchange(bytes, 0)`. Host operations run through NCCL.
    pub fn new(be: &CudaBackend, info: RankInfo, exchange: &mut ExchangeBytes<'_>) -> Result<Self> {
        Self::open(be, info, exchange)
    }

    /// As [`new`](Self::new), the id exchanged through `host.broadcast_bytes`, and the host
    /// operations (`all_reduce_host`, `broadcast_bytes`, `barrier`) delegated to `host`.
    pub fn with_host(
        be: &CudaBackend,
        info: RankInfo,
        host: Box<dyn Collective<CudaBackend>>,
    ) -> Result<Self> {
        let mut exchange = |b: Vec<u8>, root: usize| host.broadcast_bytes(b, root);
        let mut me = Self::open(be, info, &mut exchange)?;
        me.host = Some(host);
        Ok(me)
    }

    fn open(be: &CudaBackend, info: RankInfo, exchange: &mut ExchangeBytes<'_>) -> Result<Self> {
        let rank = info.rank;
        let engine = |msg: String| DistError::Engine { rank, msg };
        if info.rank >= info.world_size {
            return Err(engine(format!(
                "rank {} is outside world size {}",
                info.rank, info.world_size
            )));
        }
        // cudarc panics on its first NCCL call when the library does not load: look first.
        check_nccl_loadable().map_err(|e| engine(e.0))?;
        let caught = |what: &str| engine(format!("{what}: NCCL panicked (see the message above)"));
        let mine = if rank == 0 {
            let id = catch_unwind(Id::new)
                .map_err(|_| caught("ncclGetUniqueId"))?
                .map_err(|e| engine(nccl_msg("ncclGetUniqueId", &e)))?;
            id_to_bytes(&id)
        } else {
            Vec::new()
        };
        let bytes = exchange(mine, 0)?;
        let id = Id::uninit(id_from_bytes(rank, &bytes)?);
        let comm_stream = be
            .ctx
            .new_stream()
            .map_err(|e| engine(format!("creating the communication stream: {:?}", e.0)))?;
        let (stream, world) = (comm_stream.clone(), info.world_size);
        let comm = catch_unwind(AssertUnwindSafe(|| {
            Comm::from_rank(stream, rank, world, id)
        }))
        .map_err(|_| caught("ncclCommInitRank"))?
        .map_err(|e| {
            engine(nccl_msg(
                &format!(
                    "ncclCommInitRank (rank {rank} of {world}, device {})",
                    be.ordinal
                ),
                &e,
            ))
        })?;
        let version = match get_nccl_version() {
            Ok(v) => format_version(v),
            Err(_) => "2.x".into(),
        };
        Ok(Self {
            info,
            comm,
            comm_stream,
            compute: be.stream.clone(),
            version,
            host: None,
        })
    }

    fn engine_err(&self, msg: String) -> DistError {
        DistError::Engine {
            rank: self.info.rank,
            msg,
        }
    }

    /// The communication stream waits for everything issued so far on `from`.
    fn order(&self, from: &CudaStream, to: &CudaStream, what: &str) -> Result<()> {
        let ev = from
            .record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(|e| self.engine_err(format!("{what}: recording an event: {:?}", e.0)))?;
        to.wait(&ev)
            .map_err(|e| self.engine_err(format!("{what}: waiting on an event: {:?}", e.0)))
    }

    /// Runs `ops` between ncclGroupStart and ncclGroupEnd on the communication stream, after the
    /// compute stream's work so far. cudarc's group panics on a failed start or end: caught.
    fn grouped<'v>(
        &'v self,
        what: &str,
        ops: impl FnOnce(&mut Group<'v>) -> std::result::Result<(), NcclError>,
    ) -> Result<()> {
        self.order(&self.compute, &self.comm_stream, what)?;
        let run = catch_unwind(AssertUnwindSafe(|| {
            let mut group = self.comm.group();
            ops(&mut group)
            // the group ends (ncclGroupEnd, the launch) when it drops here
        }));
        match run {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(self.engine_err(nccl_msg(what, &e))),
            Err(_) => Err(self.engine_err(format!(
                "{what}: ncclGroupStart/ncclGroupEnd failed (NCCL panicked, see above)"
            ))),
        }
    }

    /// The fp32 views of `bufs`, or an error naming the role that is not fp32.
    fn f32_views<'a>(
        &self,
        op: &str,
        bufs: &'a mut [&mut CudaBuf],
    ) -> Result<Vec<CudaViewMut<'a, f32>>> {
        bufs.iter_mut()
            .enumerate()
            .map(|(i, b)| {
                let role = b.role;
                match &mut b.mem {
                    Mem::F32(x) => Ok(x.as_view_mut()),
                    _ => Err(self.engine_err(format!(
                        "{op}: buffer {i} is a {role:?} buffer; only fp32 (Grad, State, Stat) \
                         buffers are summed"
                    ))),
                }
            })
            .collect()
    }

    fn root(&self, op: &str, root: usize) -> Result<i32> {
        if root >= self.info.world_size {
            return Err(self.engine_err(format!(
                "{op}: root {root} is outside world size {}",
                self.info.world_size
            )));
        }
        Ok(root as i32)
    }

    /// Host values through the device: every rank's values all-gathered, summed in rank order.
    fn all_reduce_host_nccl(&self, values: &mut [f64]) -> Result<()> {
        let what = "all_reduce_host";
        let n = values.len().max(1); // an empty call is a barrier: still one value each
        let mut mine = values.to_vec();
        mine.resize(n, 0.0);
        let dev_err =
            |e: cudarc::driver::DriverError| self.engine_err(format!("{what}: {:?}", e.0));
        let send = self.comm_stream.clone_htod(&mine).map_err(dev_err)?;
        let mut recv: CudaSlice<f64> = self
            .comm_stream
            .alloc_zeros(n * self.info.world_size)
            .map_err(dev_err)?;
        let (s, r) = (send.as_view(), recv.as_view_mut());
        self.grouped(what, |g| g.all_gather(s, r).map(|_| ()))?;
        let gathered = self.comm_stream.clone_dtoh(&recv).map_err(dev_err)?;
        let sums = sum_in_rank_order(&gathered, self.info.world_size, n);
        values.copy_from_slice(&sums[..values.len()]);
        Ok(())
    }

    /// Bytes through the device: the length, then the bytes, broadcast from `root`.
    fn broadcast_bytes_nccl(&self, bytes: Vec<u8>, root: usize) -> Result<Vec<u8>> {
        let what = "broadcast_bytes";
        let r = self.root(what, root)?;
        let dev_err =
            |e: cudarc::driver::DriverError| self.engine_err(format!("{what}: {:?}", e.0));
        let mut len = self
            .comm_stream
            .clone_htod(&[bytes.len() as u64])
            .map_err(dev_err)?;
        let lv = len.as_view_mut();
        self.grouped(what, |g| g.broadcast_in_place(lv, r).map(|_| ()))?;
        let n = self.comm_stream.clone_dtoh(&len).map_err(dev_err)?[0] as usize;
        let mut host = bytes;
        host.resize(n, 0);
        let mut buf = self.comm_stream.clone_htod(&host).map_err(dev_err)?;
        let bv = buf.as_view_mut();
        self.grouped(what, |g| g.broadcast_in_place(bv, r).map(|_| ()))?;
        self.comm_stream.clone_dtoh(&buf).map_err(dev_err)
    }
}

impl Collective<CudaBackend> for NcclCollective {
    fn info(&self) -> &RankInfo {
        &self.info
    }

    fn engine(&self) -> String {
        format!("nccl {}", self.version)
    }

    fn all_reduce_sum(&self, _be: &CudaBackend, bufs: &mut [&mut CudaBuf]) -> Result<()> {
        let views = self.f32_views("all_reduce_sum", bufs)?;
        self.grouped("all_reduce_sum", |g| {
            for v in views {
                g.all_reduce_in_place(v, &ReduceOp::Sum)?;
            }
            Ok(())
        })
    }

    fn reduce_sum(&self, _be: &CudaBackend, bufs: &mut [&mut CudaBuf], root: usize) -> Result<()> {
        let r = self.root("reduce_sum", root)?;
        let views = self.f32_views("reduce_sum", bufs)?;
        self.grouped("reduce_sum", |g| {
            for v in views {
                g.reduce_in_place(v, &ReduceOp::Sum, r)?;
            }
            Ok(())
        })
    }

    fn broadcast(&self, _be: &CudaBackend, bufs: &mut [&mut CudaBuf], root: usize) -> Result<()> {
        let r = self.root("broadcast", root)?;
        let mut f32s: Vec<CudaViewMut<'_, f32>> = Vec::new();
        let mut bf16s: Vec<CudaViewMut<'_, bf16>> = Vec::new();
        let me = self.info.rank;
        for (i, b) in bufs.iter_mut().enumerate() {
            match &mut b.mem {
                Mem::F32(x) => f32s.push(x.as_view_mut()),
                Mem::Bf16(x) => bf16s.push(x.as_view_mut()),
                // A parameter goes as its bf16 working copy (the rounding of the owner's master):
                // under ZeRO-1 the receivers hold no master (`release_master`), so every rank
                // makes the same bf16 call. A receiver that kept its master would be left with a
                // stale one, so that is refused rather than silently diverging.
                Mem::Param { work, .. } if me == root => bf16s.push(work.as_view_mut()),
                Mem::Param { .. } => {
                    return Err(DistError::Engine {
                        rank: me,
                        msg: format!(
                            "broadcast: buffer {i} is a parameter that keeps its fp32 master; \
                             only a parameter whose master was released (ZeRO-1, another rank \
                             owns it) receives a broadcast"
                        ),
                    })
                }
            }
        }
        self.grouped("broadcast", |g| {
            for v in f32s {
                g.broadcast_in_place(v, r)?;
            }
            for v in bf16s {
                g.broadcast_in_place(v, r)?;
            }
            Ok(())
        })
    }

    fn wait(&self, _be: &CudaBackend) -> Result<()> {
        self.order(&self.comm_stream, &self.compute, "wait")
    }

    fn all_reduce_host(&self, values: &mut [f64]) -> Result<()> {
        match &self.host {
            Some(h) => h.all_reduce_host(values),
            None => self.all_reduce_host_nccl(values),
        }
    }

    fn broadcast_bytes(&self, bytes: Vec<u8>, root: usize) -> Result<Vec<u8>> {
        match &self.host {
            Some(h) => h.broadcast_bytes(bytes, root),
            None => self.broadcast_bytes_nccl(bytes, root),
        }
    }

    fn barrier(&self) -> Result<()> {
        match &self.host {
            Some(h) => h.barrier(),
            None => self.all_reduce_host_nccl(&mut []),
        }
    }
}

/// The id's 128 bytes, as sent to the other ranks.
pub fn id_to_bytes(id: &Id) -> Vec<u8> {
    id.internal().iter().map(|&c| c as u8).collect()
}

/// The id received from rank 0: exactly [`NCCL_ID_BYTES`] bytes, or an error naming this rank.
pub fn id_from_bytes(rank: usize, bytes: &[u8]) -> Result<[std::ffi::c_char; NCCL_ID_BYTES]> {
    if bytes.len() != NCCL_ID_BYTES {
        return Err(DistError::Peer {
            rank: 0,
            msg: format!(
                "rank {rank} received an NCCL unique id of {} bytes from rank 0, expected \
                 {NCCL_ID_BYTES} (is every rank running the same topcoat?)",
                bytes.len()
            ),
        });
    }
    let mut id = [0 as std::ffi::c_char; NCCL_ID_BYTES];
    for (d, &b) in id.iter_mut().zip(bytes) {
        *d = b as std::ffi::c_char;
    }
    Ok(id)
}

/// `gathered` holds `world` rows of `n` values (rank 0's first); the column sums, added in rank
/// order (0, 1, 2, ...) as the host collective does, so both engines give the same bits.
pub fn sum_in_rank_order(gathered: &[f64], world: usize, n: usize) -> Vec<f64> {
    assert_eq!(gathered.len(), world * n, "gathered rows");
    let mut sums = gathered[..n].to_vec();
    for row in gathered.chunks_exact(n).skip(1) {
        for (s, v) in sums.iter_mut().zip(row) {
            *s += v;
        }
    }
    sums
}

/// NCCL's version code (e.g. 22703) as "2.27.3".
pub fn format_version(code: i32) -> String {
    let (major, rest) = (code / 10000, code % 10000);
    format!("{major}.{}.{}", rest / 100, rest % 100)
}

/// "OP failed: ncclXxx (NCCL result N)": cudarc's NcclError has no Display of its own.
fn nccl_msg(op: &str, e: &NcclError) -> String {
    format!("{op} failed: {:?} (NCCL result {})", e.0, e.0 as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn id_bytes_round_trip_and_wrong_length_names_the_rank() {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let bytes = random_bytes(NCCL_ID_BYTES, seed);
        let id = Id::uninit(id_from_bytes(3, &bytes).unwrap());
        assert_eq!(id_to_bytes(&id), bytes);
        let err = id_from_bytes(3, &bytes[..100]).unwrap_err().to_string();
        assert_eq!(
            err,
            "rank 0: rank 3 received an NCCL unique id of 100 bytes from rank 0, expected 128 \
             (is every rank running the same topcoat?)"
        );
        assert!(id_from_bytes(1, &[]).is_err());
    }

    #[test]
    fn host_sums_run_in_rank_order() {
        // Three ranks, two values each; the first column's sum depends on the order.
        let gathered = [1.0, 0.5, 1e16, 0.25, -1e16, 2.0];
        let sums = sum_in_rank_order(&gathered, 3, 2);
        assert_eq!(sums, vec![0.0, 2.75]); // (1 + 1e16) - 1e16 rounds the 1 away
        let other_order: f64 = 1.0 + (1e16 + -1e16);
        assert_eq!(other_order, 1.0); // so the order is part of the result, and it is fixed
        assert_eq!(sum_in_rank_order(&[4.5, -2.0], 1, 2), vec![4.5, -2.0]);
    }

    #[test]
    fn version_codes_read_as_dotted() {
        assert_eq!(format_version(22703), "2.27.3");
        assert_eq!(format_version(23000), "2.30.0");
    }
}
