//! The host collective: [`Collective`] over the rendezvous [`Star`] of TCP streams, for any
//! backend (buffers travel as f32 through `download` / `write`).
//!
//! Every operation is one round trip through rank 0: each other rank sends a frame (header,
//! then its values), rank 0 reads them in rank order, combines, and answers each rank. Sums
//! are a left fold in rank order, `((x0 + x1) + x2) + ...` (f32 for buffers, f64 for host
//! values), so the result is deterministic and the same bits on every rank. This is the
//! reference engine that specifies the arithmetic in `cargo test`; NCCL is the engine for GPUs.
//!
//! Frame header (little-endian, 32 bytes): op tag (u32), root (u32), sequence number (u64),
//! value count (u64), payload bytes (u64). Rank 0 checks each rank's op, root, sequence and
//! count against its own, so a rank that called another operation is named.
//!
//! Faults: a closed socket is "closed its connection", a read that waits past the timeout is
//! "sent nothing for N s". When rank 0 sees a rank fail, it first sends every other rank an
//! abort frame naming that rank, so every rank's error names the one that failed. After a
//! failure every later call returns the same error.

use super::rendezvous::Star;
use super::{Collective, DistError, RankInfo, Result};
use crate::backend::Backend;
use std::cell::RefCell;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a read waits for a peer when TOPCOAT_COLLECTIVE_TIMEOUT is unset.
pub const DEFAULT_COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(300);

const CLOSED: &str = "closed its connection: it exited or failed; see its own error";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
enum Op {
    AllReduceSum = 1,
    ReduceSum = 2,
    Broadcast = 3,
    AllReduceHost = 4,
    BroadcastBytes = 5,
    Barrier = 6,
    Abort = 99,
}

impl Op {
    fn from_tag(t: u32) -> Option<Op> {
        [
            Op::AllReduceSum,
            Op::ReduceSum,
            Op::Broadcast,
            Op::AllReduceHost,
            Op::BroadcastBytes,
            Op::Barrier,
            Op::Abort,
        ]
        .into_iter()
        .find(|o| *o as u32 == t)
    }

    fn name(self) -> &'static str {
        match self {
            Op::AllReduceSum => "all_reduce_sum",
            Op::ReduceSum => "reduce_sum",
            Op::Broadcast => "broadcast",
            Op::AllReduceHost => "all_reduce_host",
            Op::BroadcastBytes => "broadcast_bytes",
            Op::Barrier => "barrier",
            Op::Abort => "abort",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    op: Op,
    root: usize,
    seq: u64,
    count: u64,
    bytes: u64,
}

impl Header {
    fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&(self.op as u32).to_le_bytes());
        b[4..8].copy_from_slice(&(self.root as u32).to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.count.to_le_bytes());
        b[24..32].copy_from_slice(&self.bytes.to_le_bytes());
        b
    }

    /// "broadcast from rank 2 (12 values)"; the root is named only where it is not rank 0.
    fn describe(&self) -> String {
        let root = match self.op {
            Op::ReduceSum if self.root != 0 => format!(" to rank {}", self.root),
            Op::Broadcast | Op::BroadcastBytes if self.root != 0 => {
                format!(" from rank {}", self.root)
            }
            _ => String::new(),
        };
        let unit = match self.op {
            Op::BroadcastBytes | Op::Barrier => return format!("{}{root}", self.op.name()),
            _ => "values",
        };
        format!("{}{root} ({} {unit})", self.op.name(), self.count)
    }
}

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
    /// call covers; returns what this rank receives (rank 0's combination, or nothing).
    fn exchange(
        &self,
        op: Op,
        root: usize,
        count: usize,
        payload: &[u8],
        combine: &mut dyn FnMut(usize, &[u8]),
        result: &dyn Fn(usize) -> Option<Vec<u8>>,
    ) -> Result<Option<Vec<u8>>> {
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
            self.lead(&mut st, mine, payload, combine, result)
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
        result: &dyn Fn(usize) -> Option<Vec<u8>>,
    ) -> Result<Option<Vec<u8>>> {
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
        for (r, s) in &st.links {
            let data = result(*r).unwrap_or_default();
            let h = Header {
                bytes: data.len() as u64,
                ..mine
            };
            if let Err(msg) = write_frame(s, &h, &data) {
                self.abort(st, *r, &msg, false);
                return Err(DistError::Peer { rank: *r, msg });
            }
        }
        Ok(result(0))
    }

    /// Ranks 1..W: send this rank's frame, read rank 0's answer (or abort).
    fn follow(&self, st: &mut State, mine: Header, payload: &[u8]) -> Result<Option<Vec<u8>>> {
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
        Ok(Some(data))
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
        let mut data = vec![0u8; h.bytes as usize];
        read_until(&mut s, &mut data, None, self.timeout)
            .map_err(|e| (r, describe_io(e, self.timeout)))?;
        Ok((h, data))
    }
}

/// Reads `buf` fully; each wait is bounded by `timeout`, and by `deadline` when given.
fn read_until(
    s: &mut &TcpStream,
    buf: &mut [u8],
    deadline: Option<Instant>,
    timeout: Duration,
) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let wait = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => timeout,
        };
        if wait.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        s.set_read_timeout(Some(wait))?;
        match s.read(&mut buf[done..]) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// An I/O failure on a peer's stream, in words; `waited` is the stated wait.
fn describe_io(e: std::io::Error, waited: Duration) -> String {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => format!(
            "sent nothing for {} s (TOPCOAT_COLLECTIVE_TIMEOUT sets the wait)",
            waited.as_secs_f64()
        ),
        ErrorKind::UnexpectedEof
        | ErrorKind::ConnectionReset
        | ErrorKind::ConnectionAborted
        | ErrorKind::BrokenPipe => CLOSED.to_string(),
        _ => format!("connection failed: {e}"),
    }
}

fn write_frame(mut s: &TcpStream, h: &Header, data: &[u8]) -> std::result::Result<(), String> {
    // One write for small frames (header and values together); large payloads go straight
    // from the caller's buffer after the header.
    let res = if data.len() <= 64 * 1024 {
        let mut frame = Vec::with_capacity(32 + data.len());
        frame.extend_from_slice(&h.encode());
        frame.extend_from_slice(data);
        s.write_all(&frame)
    } else {
        s.write_all(&h.encode()).and_then(|()| s.write_all(data))
    };
    res.map_err(|e| match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => {
            "read nothing of what was sent to it (its receive buffer stayed full)".to_string()
        }
        _ => CLOSED.to_string(),
    })
}

/// Why rank `r`'s frame `h` does not belong to rank 0's call `mine`, if it does not.
fn mismatch(mine: &Header, h: &Header) -> Option<String> {
    let same_call = h.op == mine.op
        && h.root == mine.root
        && (h.count == mine.count || mine.op == Op::BroadcastBytes);
    if !same_call {
        return Some(format!(
            "called {} where rank 0 called {}",
            h.describe(),
            mine.describe()
        ));
    }
    if h.seq != mine.seq {
        return Some(format!(
            "is at collective call {} where rank 0 is at call {} (both {})",
            h.seq,
            mine.seq,
            mine.describe()
        ));
    }
    None
}

/// Values from the bytes of a frame (a trailing partial value is dropped; the header's count
/// check has already caught a length mismatch).
fn from_bytes<T: bytemuck::Pod>(b: &[u8]) -> Vec<T> {
    let n = b.len() / std::mem::size_of::<T>();
    let mut v = vec![T::zeroed(); n];
    bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(&b[..n * std::mem::size_of::<T>()]);
    v
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
            let x: Vec<T> = from_bytes(b);
            let mut acc = acc.borrow_mut();
            if r == 0 {
                *acc = x;
            } else {
                for (a, v) in acc.iter_mut().zip(x) {
                    *a += v;
                }
            }
        };
        // Called by rank 0 once every rank's values are in.
        let result =
            |r: usize| (all || r == root).then(|| bytemuck::cast_slice(&acc.borrow()).to_vec());
        let got = self
            .exchange(
                op,
                root,
                values.len(),
                bytemuck::cast_slice(values),
                &mut combine,
                &result,
            )?
            .unwrap_or_default();
        Ok(from_bytes(&got))
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
            if r == root {
                *held.borrow_mut() = b.to_vec();
            }
        };
        let result = |r: usize| (r != root).then(|| held.borrow().clone());
        let got = self
            .exchange(op, root, count, &payload, &mut combine, &result)?
            .unwrap_or_default();
        Ok(if self.info.rank == root { payload } else { got })
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
        self.exchange(Op::Barrier, 0, 0, &[], &mut |_, _| {}, &|_| None)
            .map(|_| ())
    }
}

#[cfg(test)]
#[path = "host_tests.rs"]
mod tests;
