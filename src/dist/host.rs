//! The host collective: [`Collective`] over the rendezvous [`Star`] of TCP streams, for any
//! backend (buffers travel as f32 through `download` / `write`).
//!
//! Every operation is one round trip through rank 0: each other rank sends a frame (header,
//! then its values), rank 0 reads them in rank order, combines, and answers each rank. Sums
//! are a left fold in rank order, `((x0 + x1) + x2) + ...` (f32 for buffers, f64 for host
//! values), so the result is deterministic and the same bits on every rank. This is the
//! reference engine that specifies the arithmetic in `cargo test`; NCCL is the engine for GPUs.
//!
//! Frames (`frame.rs`): a header with the op tag, root, sequence number, value count and
//! payload length. Rank 0 checks each rank's op, root, sequence and count against its own,
//! so a rank that called another operation is named.
//!
//! Faults: a closed socket is "closed its connection", a read that waits past the timeout is
//! "sent nothing for N s". When rank 0 sees a rank fail, it first sends every other rank an
//! abort frame naming that rank, so every rank's error names the one that failed. After a
//! failure every later call returns the same error.

use super::frame::{
    describe_io, from_bytes, mismatch, read_until, write_frame, Header, Op, MAX_FRAME_BYTES,
};
use super::rendezvous::Star;
use super::{Collective, DistError, RankInfo, Result};
use crate::backend::Backend;
use std::cell::RefCell;
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a read waits for a peer when TOPCOAT_COLLECTIVE_TIMEOUT is unset.
pub const DEFAULT_COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(300);

/// The streams and the progress of this rank, behind the collective's lock.
struct State {
    /// Rank 0: `(r, stream)` for r = 1..W; others: `(0, stream)`.
    links: Vec<(usize, TcpStream)>,
    seq: u64,
    /// The first failure, returned again by every later call.
    failed: Option<(usize, String)>,
}

/// The loopback/TCP collective over host copies.
pub struct HostCollective {
    info: RankInfo,
    addr: String,
    timeout: Duration,
    state: Mutex<State>,
}

impl HostCollective {
    /// The collective over the streams of a finished rendezvous; a read waits at most `timeout`.
    pub fn new(star: Star, timeout: Duration) -> Result<Self> {
        for (r, s) in &star.links {
            s.set_nodelay(true)
                .and_then(|()| s.set_write_timeout(Some(timeout)))
                .map_err(|e| DistError::Peer {
                    rank: *r,
                    msg: format!("configuring its connection: {e}"),
                })?;
        }
        Ok(Self {
            info: star.info,
            addr: star.addr,
            timeout,
            state: Mutex::new(State {
                links: star.links,
                seq: 0,
                failed: None,
            }),
        })
    }

    /// The timeout a read waits for, as stated in errors.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// One operation: `payload` is this rank's contribution (bytes), `count` the values its
    /// call covers. On rank 0, `combine` takes each rank's payload in rank order, then
    /// `answer` builds the reply once and it goes to the ranks `receives` names (the others
    /// get an empty reply); rank 0 keeps its own result in the closures' state. Returns what
    /// this rank received (empty on rank 0).
    #[allow(clippy::too_many_arguments)]
    fn exchange(
        &self,
        op: Op,
        root: usize,
        count: usize,
        payload: &[u8],
        combine: &mut dyn FnMut(usize, &[u8]),
        answer: &dyn Fn() -> Vec<u8>,
        receives: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<u8>> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((rank, msg)) = &st.failed {
            return Err(DistError::Peer {
                rank: *rank,
                msg: msg.clone(),
            });
        }
        if root >= self.info.world_size {
            return Err(DistError::Engine {
                rank: self.info.rank,
                msg: format!(
                    "{} names root rank {root}, but the world size is {}",
                    op.name(),
                    self.info.world_size
                ),
            });
        }
        st.seq += 1;
        let mine = Header {
            op,
            root,
            seq: st.seq,
            count: count as u64,
            bytes: payload.len() as u64,
        };
        let out = if self.info.rank == 0 {
            self.lead(&mut st, mine, payload, combine, answer, receives)
        } else {
            self.follow(&mut st, mine, payload)
        };
        if let Err(DistError::Peer { rank, msg }) = &out {
            st.failed = Some((*rank, msg.clone()));
        }
        out
    }

    /// Rank 0: read every rank's frame in rank order, then answer each one.
    fn lead(
        &self,
        st: &mut State,
        mine: Header,
        payload: &[u8],
        combine: &mut dyn FnMut(usize, &[u8]),
        answer: &dyn Fn() -> Vec<u8>,
        receives: &dyn Fn(usize) -> bool,
    ) -> Result<Vec<u8>> {
        combine(0, payload);
        // One deadline for the whole gather: a silent rank is named after `timeout`, before
        // the other ranks (which wait longer) give up on rank 0.
        let deadline = Instant::now() + self.timeout;
        let mut failure = None;
        for (r, s) in &st.links {
            match self.read_frame(*r, s, Some(deadline), self.timeout) {
                Ok((h, data)) => {
                    if let Some(msg) = mismatch(&mine, &h) {
                        // A rank that called the wrong operation is alive: it hears it too.
                        failure = Some((*r, msg, true));
                        break;
                    }
                    combine(*r, &data);
                }
                Err((rank, msg)) => {
                    failure = Some((rank, msg, false));
                    break;
                }
            }
        }
        if let Some((rank, msg, tell_it)) = failure {
            self.abort(st, rank, &msg, tell_it);
            return Err(DistError::Peer { rank, msg });
        }
        let reply = if st.links.iter().any(|(r, _)| receives(*r)) {
            answer()
        } else {
            Vec::new()
        };
        for (r, s) in &st.links {
            let data: &[u8] = if receives(*r) { &reply } else { &[] };
            let h = Header {
                bytes: data.len() as u64,
                ..mine
            };
            if let Err(msg) = write_frame(s, &h, data) {
                self.abort(st, *r, &msg, false);
                return Err(DistError::Peer { rank: *r, msg });
            }
        }
        Ok(Vec::new())
    }

    /// Ranks 1..W: send this rank's frame, read rank 0's answer (or abort).
    fn follow(&self, st: &mut State, mine: Header, payload: &[u8]) -> Result<Vec<u8>> {
        let (_, s) = &st.links[0];
        write_frame(s, &mine, payload).map_err(|msg| DistError::Peer { rank: 0, msg })?;
        // Rank 0 may first wait up to the timeout for another rank; wait longer, so that
        // rank 0's verdict naming that rank arrives before this rank blames rank 0.
        let patience = self.timeout + self.timeout / 2 + Duration::from_millis(500);
        let (h, data) = self
            .read_frame(0, s, Some(Instant::now() + patience), patience)
            .map_err(|(rank, msg)| DistError::Peer { rank, msg })?;
        if h.op == Op::Abort {
            return Err(DistError::Peer {
                rank: h.root,
                msg: String::from_utf8_lossy(&data).into_owned(),
            });
        }
        if h.op != mine.op || h.seq != mine.seq {
            return Err(DistError::Peer {
                rank: 0,
                msg: format!(
                    "answered {} (call {}) where rank {} called {} (call {})",
                    h.describe(),
                    h.seq,
                    self.info.rank,
                    mine.describe(),
                    mine.seq
                ),
            });
        }
        Ok(data)
    }

    /// Tells every other rank (and `failed` itself when `tell_failed`) which rank failed and
    /// how; best effort, as they may be gone too.
    fn abort(&self, st: &State, failed: usize, msg: &str, tell_failed: bool) {
        let h = Header {
            op: Op::Abort,
            root: failed,
            seq: st.seq,
            count: 0,
            bytes: msg.len() as u64,
        };
        for (r, s) in &st.links {
            if *r != failed || tell_failed {
                let _ = write_frame(s, &h, msg.as_bytes());
            }
        }
    }

    /// One frame from rank `r`; errors are `(rank to blame, message)`.
    fn read_frame(
        &self,
        r: usize,
        mut s: &TcpStream,
        deadline: Option<Instant>,
        stated: Duration,
    ) -> std::result::Result<(Header, Vec<u8>), (usize, String)> {
        let mut head = [0u8; 32];
        read_until(&mut s, &mut head, deadline, self.timeout)
            .map_err(|e| (r, describe_io(e, stated)))?;
        let tag = u32::from_le_bytes(head[0..4].try_into().unwrap());
        let op = Op::from_tag(tag).ok_or((r, format!("sent an unknown operation tag {tag}")))?;
        let h = Header {
            op,
            root: u32::from_le_bytes(head[4..8].try_into().unwrap()) as usize,
            seq: u64::from_le_bytes(head[8..16].try_into().unwrap()),
            count: u64::from_le_bytes(head[16..24].try_into().unwrap()),
            bytes: u64::from_le_bytes(head[24..32].try_into().unwrap()),
        };
        if h.bytes > MAX_FRAME_BYTES {
            return Err((
                r,
                format!(
                    "sent a frame of {} bytes for {}: more than any model's gradients (is it a topcoat rank of this job?)",
                    h.bytes,
                    h.describe()
                ),
            ));
        }
        let mut data = vec![0u8; h.bytes as usize];
        read_until(&mut s, &mut data, None, self.timeout)
            .map_err(|e| (r, describe_io(e, self.timeout)))?;
        Ok((h, data))
    }
}

impl HostCollective {
    fn download_all<B: Backend>(be: &B, bufs: &[&mut B::Buf]) -> Result<Vec<f32>> {
        let mut all = Vec::new();
        for b in bufs {
            all.extend(be.download(b)?);
        }
        Ok(all)
    }

    fn write_all<B: Backend>(be: &B, bufs: &mut [&mut B::Buf], values: &[f32]) -> Result<()> {
        let mut at = 0;
        for b in bufs.iter_mut() {
            let n = be.len(b);
            be.write(b, &values[at..at + n])?;
            at += n;
        }
        Ok(())
    }

    /// Sums `values` over the ranks as a left fold in rank order, `((x0 + x1) + x2) + ...`;
    /// every rank (`all`) or `root` alone receives the sum, the others an empty vector.
    fn fold_sum<T>(&self, op: Op, root: usize, values: &[T], all: bool) -> Result<Vec<T>>
    where
        T: bytemuck::Pod + std::ops::AddAssign,
    {
        let acc = RefCell::new(Vec::<T>::new());
        let mut combine = |r: usize, b: &[u8]| {
            let mut acc = acc.borrow_mut();
            // A received buffer is in practice aligned for T; copy only where it is not.
            let x: std::borrow::Cow<[T]> = match bytemuck::try_cast_slice(b) {
                Ok(x) => x.into(),
                Err(_) => from_bytes(b).into(),
            };
            if r == 0 {
                *acc = x.into_owned();
            } else {
                for (a, v) in acc.iter_mut().zip(x.iter()) {
                    *a += *v;
                }
            }
        };
        let answer = || bytemuck::cast_slice(&acc.borrow()).to_vec();
        let receives = |r: usize| all || r == root;
        let got = self.exchange(
            op,
            root,
            values.len(),
            bytemuck::cast_slice(values),
            &mut combine,
            &answer,
            &receives,
        )?;
        Ok(match self.info.rank {
            0 if receives(0) => acc.into_inner(),
            _ => from_bytes(&got),
        })
    }

    /// Rank `root`'s `payload` on every rank, relayed through rank 0.
    fn broadcast_raw(
        &self,
        op: Op,
        root: usize,
        count: usize,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>> {
        let held = RefCell::new(Vec::<u8>::new());
        let mut combine = |r: usize, b: &[u8]| {
            if r == root && r != 0 {
                *held.borrow_mut() = b.to_vec();
            }
        };
        // Rank 0 relays its own payload without copying it into `held`.
        let answer = || {
            if root == 0 {
                payload.clone()
            } else {
                held.borrow().clone()
            }
        };
        let got = self.exchange(op, root, count, &payload, &mut combine, &answer, &|r| {
            r != root
        })?;
        Ok(match self.info.rank {
            r if r == root => payload,
            0 => held.into_inner(),
            _ => got,
        })
    }
}

impl<B: Backend> Collective<B> for HostCollective {
    fn info(&self) -> &RankInfo {
        &self.info
    }

    fn engine(&self) -> String {
        format!("tcp (host copies) via {}", self.addr)
    }

    fn all_reduce_sum(&self, be: &B, bufs: &mut [&mut B::Buf]) -> Result<()> {
        if self.info.world_size <= 1 {
            return Ok(());
        }
        let values = Self::download_all(be, bufs)?;
        let sum = self.fold_sum(Op::AllReduceSum, 0, &values, true)?;
        Self::write_all(be, bufs, &sum)
    }

    fn reduce_sum(&self, be: &B, bufs: &mut [&mut B::Buf], root: usize) -> Result<()> {
        if self.info.world_size <= 1 {
            return Ok(());
        }
        let values = Self::download_all(be, bufs)?;
        let sum = self.fold_sum(Op::ReduceSum, root, &values, false)?;
        if self.info.rank == root {
            Self::write_all(be, bufs, &sum)?;
        }
        Ok(())
    }

    fn broadcast(&self, be: &B, bufs: &mut [&mut B::Buf], root: usize) -> Result<()> {
        if self.info.world_size <= 1 {
            return Ok(());
        }
        let count: usize = bufs.iter().map(|b| be.len(b)).sum();
        let mine = if self.info.rank == root {
            Self::download_all(be, bufs)?
        } else {
            Vec::new()
        };
        let got = self.broadcast_raw(
            Op::Broadcast,
            root,
            count,
            bytemuck::cast_slice(&mine).to_vec(),
        )?;
        if self.info.rank != root {
            Self::write_all(be, bufs, &from_bytes::<f32>(&got))?;
        }
        Ok(())
    }

    fn wait(&self, _be: &B) -> Result<()> {
        // Every operation has finished when it returns.
        Ok(())
    }

    fn all_reduce_host(&self, values: &mut [f64]) -> Result<()> {
        if self.info.world_size <= 1 {
            return Ok(());
        }
        let sum = self.fold_sum(Op::AllReduceHost, 0, values, true)?;
        values.copy_from_slice(&sum);
        Ok(())
    }

    fn broadcast_bytes(&self, bytes: Vec<u8>, root: usize) -> Result<Vec<u8>> {
        if self.info.world_size <= 1 {
            return Ok(bytes);
        }
        let mine = if self.info.rank == root {
            bytes
        } else {
            Vec::new()
        };
        self.broadcast_raw(Op::BroadcastBytes, root, 0, mine)
    }

    fn barrier(&self) -> Result<()> {
        if self.info.world_size <= 1 {
            return Ok(());
        }
        self.exchange(Op::Barrier, 0, 0, &[], &mut |_, _| {}, &Vec::new, &|_| {
            false
        })
        .map(|_| ())
    }
}

#[cfg(test)]
#[path = "host_tests.rs"]
mod tests;
