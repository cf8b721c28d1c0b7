//! The wire format of the host collective: one frame per rank per operation, a 32-byte
//! little-endian header (op tag u32, root u32, sequence number u64, value count u64, payload
//! bytes u64) and the payload; the reads and writes with their timeouts, and the words for
//! each failure.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// The largest frame a rank accepts (64 GiB: 16 G values), so that a corrupt header is an
/// error, not an allocation failure.
pub(super) const MAX_FRAME_BYTES: u64 = 1 << 36;

pub(super) const CLOSED: &str = "closed its connection: it exited or failed; see its own error";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(super) enum Op {
    AllReduceSum = 1,
    ReduceSum = 2,
    Broadcast = 3,
    AllReduceHost = 4,
    BroadcastBytes = 5,
    Barrier = 6,
    Abort = 99,
}

impl Op {
    pub(super) fn from_tag(t: u32) -> Option<Op> {
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

    pub(super) fn name(self) -> &'static str {
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
pub(super) struct Header {
    pub(super) op: Op,
    pub(super) root: usize,
    pub(super) seq: u64,
    pub(super) count: u64,
    pub(super) bytes: u64,
}

impl Header {
    pub(super) fn encode(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&(self.op as u32).to_le_bytes());
        b[4..8].copy_from_slice(&(self.root as u32).to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.count.to_le_bytes());
        b[24..32].copy_from_slice(&self.bytes.to_le_bytes());
        b
    }

    /// "broadcast from rank 2 (12 values)"; the root is named only where it is not rank 0.
    pub(super) fn describe(&self) -> String {
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

/// Reads `buf` fully; each wait is bounded by `timeout`, and by `deadline` when given.
pub(super) fn read_until(
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
pub(super) fn describe_io(e: std::io::Error, waited: Duration) -> String {
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

pub(super) fn write_frame(
    mut s: &TcpStream,
    h: &Header,
    data: &[u8],
) -> std::result::Result<(), String> {
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
pub(super) fn mismatch(mine: &Header, h: &Header) -> Option<String> {
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
pub(super) fn from_bytes<T: bytemuck::Pod>(b: &[u8]) -> Vec<T> {
    let n = b.len() / std::mem::size_of::<T>();
    let mut v = vec![T::zeroed(); n];
    bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(&b[..n * std::mem::size_of::<T>()]);
    v
}
