//! The TCP rendezvous: how the ranks of a job find each other and agree on its size.
//!
//! torchrun's convention: rank 0 listens at MASTER_ADDR:MASTER_PORT and every other rank
//! connects to it (retrying until the stated timeout, since the ranks start in any order) and
//! says its rank and world size. Rank 0 checks that every rank 1..W connected exactly once and
//! that all agree on the world size, then answers each one "go" (or the error, so that every
//! rank fails with the same words). The result is a [`Star`] of TCP streams: rank 0 holds one
//! per other rank, every other rank one to rank 0. The host collective runs over it; the NCCL
//! engine uses it to hand out its unique id.
//!
//! For clusters without a known master port, [`Meeting::File`]: rank 0 listens on a free port
//! and writes `host:port` to a shared file (a temporary name renamed into place, so a reader
//! never sees half an address); the others poll the file. Rank 0 deletes it once everyone has
//! connected, so a later job never reads a stale address.

use super::{DistError, RankInfo, Result};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long a rank tries to reach the rendezvous when TOPCOAT_RENDEZVOUS_TIMEOUT is unset.
pub const DEFAULT_RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(120);

/// The first bytes of every handshake: a stray connection (a port scanner, another program)
/// is told apart from a rank.
const HELLO: &[u8; 8] = b"TOPCOAT1";

/// Where the ranks meet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Meeting {
    /// Rank 0 listens at `addr` (`host:port`, MASTER_ADDR:MASTER_PORT).
    Tcp { addr: String },
    /// Rank 0 listens on a free port of `host` and writes `host:port` to `path`.
    File { path: PathBuf, host: String },
}

impl Meeting {
    /// The address or file, for messages.
    pub fn describe(&self) -> String {
        match self {
            Meeting::Tcp { addr } => addr.clone(),
            Meeting::File { path, .. } => format!("the address in {}", path.display()),
        }
    }
}

/// The connections of one rank after the rendezvous.
#[derive(Debug)]
pub struct Star {
    pub info: RankInfo,
    /// The address rank 0 listened at (for messages).
    pub addr: String,
    /// Rank 0: `(r, stream)` for r = 1..W in rank order; any other rank: `(0, stream)`.
    pub links: Vec<(usize, TcpStream)>,
}

/// Meets the other ranks of `info`'s job at `meeting`, trying for at most `timeout`.
pub fn rendezvous(info: &RankInfo, meeting: &Meeting, timeout: Duration) -> Result<Star> {
    let deadline = Instant::now() + timeout;
    if info.world_size <= 1 {
        return Ok(Star {
            info: info.clone(),
            addr: meeting.describe(),
            links: Vec::new(),
        });
    }
    if info.rank == 0 {
        let (listener, addr) = listen(meeting)?;
        let links = gather(info, &listener, &addr, timeout, deadline)?;
        if let Meeting::File { path, .. } = meeting {
            // Everyone has connected: nobody reads the file again.
            let _ = std::fs::remove_file(path);
        }
        Ok(Star {
            info: info.clone(),
            addr,
            links,
        })
    } else {
        let (stream, addr) = join(info, meeting, timeout, deadline)?;
        Ok(Star {
            info: info.clone(),
            addr,
            links: vec![(0, stream)],
        })
    }
}

fn rdv_err(addr: &str, msg: impl Into<String>) -> DistError {
    DistError::Rendezvous {
        addr: addr.to_string(),
        msg: msg.into(),
    }
}

/// Rank 0's listening socket, and the address the others use.
fn listen(meeting: &Meeting) -> Result<(TcpListener, String)> {
    match meeting {
        Meeting::Tcp { addr } => {
            let l = TcpListener::bind(bind_addr(addr)?).map_err(|e| {
                rdv_err(
                    addr,
                    format!("rank 0 cannot listen there: {e} (is another job's rank 0 using this port? choose another MASTER_PORT)"),
                )
            })?;
            Ok((l, addr.clone()))
        }
        Meeting::File { path, host } => {
            let l = TcpListener::bind((bind_host(host), 0))
                .map_err(|e| rdv_err(host, format!("rank 0 cannot listen on a free port: {e}")))?;
            let port = l
                .local_addr()
                .map_err(|e| rdv_err(host, e.to_string()))?
                .port();
            let addr = format!("{host}:{port}");
            let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
            std::fs::write(&tmp, format!("{addr}\n"))
                .and_then(|()| std::fs::rename(&tmp, path))
                .map_err(|e| {
                    rdv_err(
                        &addr,
                        format!(
                            "rank 0 cannot write its address to the rendezvous file {}: {e}",
                            path.display()
                        ),
                    )
                })?;
            Ok((l, addr))
        }
    }
}

/// What rank 0 binds for `host:port`: the port on every interface when the host is a name
/// (rank 0 may be reached by another name than its own), the address itself when loopback.
fn bind_addr(addr: &str) -> Result<SocketAddr> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| rdv_err(addr, "expected host:port"))?;
    let port: u16 = port.parse().map_err(|_| {
        rdv_err(
            addr,
            format!("port `{port}` is not a number from 0 to 65535"),
        )
    })?;
    let ip = bind_host(host)
        .parse()
        .map_err(|e| rdv_err(addr, format!("{e}")))?;
    Ok(SocketAddr::new(ip, port))
}

fn bind_host(host: &str) -> &'static str {
    match host {
        "127.0.0.1" | "localhost" => "127.0.0.1",
        _ => "0.0.0.0",
    }
}

/// Rank 0: accepts ranks 1..W, checks what each says, answers all.
fn gather(
    info: &RankInfo,
    listener: &TcpListener,
    addr: &str,
    timeout: Duration,
    deadline: Instant,
) -> Result<Vec<(usize, TcpStream)>> {
    let w = info.world_size;
    let mut slots: Vec<Option<(TcpStream, SocketAddr)>> = (0..w).map(|_| None).collect();
    // A process whose hello was refused: it hears why, with the others.
    let mut refused: Option<TcpStream> = None;
    listener
        .set_nonblocking(true)
        .map_err(|e| rdv_err(addr, e.to_string()))?;
    let result = (|| {
        while slots[1..].iter().any(Option::is_none) {
            let (mut s, peer) = match listener.accept() {
                Ok(c) => c,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing: Vec<String> = (1..w)
                            .filter(|&r| slots[r].is_none())
                            .map(|r| r.to_string())
                            .collect();
                        return Err(rdv_err(
                            addr,
                            format!(
                                "rank 0 waited {} s for ranks {} of {w} to connect; did they start, with MASTER_ADDR/MASTER_PORT pointing here?",
                                timeout.as_secs_f64(),
                                missing.join(", ")
                            ),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(e) => return Err(rdv_err(addr, format!("rank 0 accepting: {e}"))),
            };
            // A connection that is not a rank (or says nothing in time) is dropped, not fatal.
            let Ok((rank, size)) = read_hello(&mut s) else {
                continue;
            };
            if size != w || rank == 0 || rank >= w || slots[rank].is_some() {
                refused = s.try_clone().ok();
            }
            if size != w {
                return Err(rdv_err(
                    addr,
                    format!("rank {rank} says world size {size}, rank 0 has {w}"),
                ));
            }
            if rank == 0 || rank >= w {
                return Err(rdv_err(
                    addr,
                    format!("a process at {peer} says it is rank {rank} of {size}; rank 0 is this process and ranks run 1..{}", w - 1),
                ));
            }
            if let Some((_, first)) = &slots[rank] {
                return Err(rdv_err(
                    addr,
                    format!("duplicate rank {rank}: processes at {first} and {peer} both say they are rank {rank}"),
                ));
            }
            slots[rank] = Some((s, peer));
        }
        Ok(())
    })();
    let links: Vec<(usize, TcpStream)> = slots
        .into_iter()
        .enumerate()
        .filter_map(|(r, s)| s.map(|(s, _)| (r, s)))
        .collect();
    // Every connected rank hears the outcome, so all fail with the same words.
    let verdict = match &result {
        Ok(()) => String::new(),
        Err(e) => e.to_string(),
    };
    for s in links.iter().map(|(_, s)| s).chain(refused.as_ref()) {
        let mut msg = (verdict.len() as u32).to_le_bytes().to_vec();
        msg.extend_from_slice(verdict.as_bytes());
        let _ = (&*s).write_all(&msg);
    }
    result?;
    for (_, s) in &links {
        s.set_read_timeout(None)
            .and_then(|()| s.set_nodelay(true))
            .map_err(|e| rdv_err(addr, e.to_string()))?;
    }
    Ok(links)
}

/// Reads a rank's hello: magic, rank, world size.
fn read_hello(s: &mut TcpStream) -> std::io::Result<(usize, usize)> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut b = [0u8; 16];
    s.read_exact(&mut b)?;
    if &b[..8] != HELLO {
        return Err(ErrorKind::InvalidData.into());
    }
    let rank = u32::from_le_bytes(b[8..12].try_into().unwrap()) as usize;
    let size = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
    Ok((rank, size))
}

/// Ranks 1..W: connect to rank 0 (retrying until the deadline), say who we are, hear the verdict.
fn join(
    info: &RankInfo,
    meeting: &Meeting,
    timeout: Duration,
    deadline: Instant,
) -> Result<(TcpStream, String)> {
    let mut last = String::from("nothing tried");
    loop {
        let addr = match meeting {
            Meeting::Tcp { addr } => Some(addr.clone()),
            Meeting::File { path, .. } => match std::fs::read_to_string(path) {
                Ok(text) if !text.trim().is_empty() => Some(text.trim().to_string()),
                Ok(_) => None,
                Err(e) => {
                    last = format!("{}: {e}", path.display());
                    None
                }
            },
        };
        if let Some(addr) = addr {
            match connect_once(&addr, deadline) {
                Ok(s) => return handshake(info, s, &addr, timeout),
                Err(e) => last = e,
            }
        }
        if Instant::now() >= deadline {
            return Err(rdv_err(
                &meeting.describe(),
                format!(
                    "rank {} could not reach rank 0 within {} s (last error: {last}); is rank 0 running, and do MASTER_ADDR/MASTER_PORT name it? (TOPCOAT_RENDEZVOUS_TIMEOUT sets the wait)",
                    info.rank,
                    timeout.as_secs_f64()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn connect_once(addr: &str, deadline: Instant) -> std::result::Result<TcpStream, String> {
    let targets: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("resolving {addr}: {e}"))?
        .collect();
    let mut last = format!("{addr} resolves to no address");
    for t in targets {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(10), Duration::from_secs(2));
        match TcpStream::connect_timeout(&t, left) {
            Ok(s) => return Ok(s),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

fn handshake(
    info: &RankInfo,
    mut s: TcpStream,
    addr: &str,
    timeout: Duration,
) -> Result<(TcpStream, String)> {
    let io = |e: std::io::Error| rdv_err(addr, format!("rank {}: {e}", info.rank));
    s.set_nodelay(true).map_err(io)?;
    let mut hello = HELLO.to_vec();
    hello.extend_from_slice(&(info.rank as u32).to_le_bytes());
    hello.extend_from_slice(&(info.world_size as u32).to_le_bytes());
    s.write_all(&hello).map_err(io)?;
    // Rank 0 answers once every rank has connected: wait as long as the rendezvous may take.
    s.set_read_timeout(Some(timeout.max(Duration::from_millis(10))))
        .map_err(io)?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).map_err(|e| {
        rdv_err(
            addr,
            format!(
                "rank {} connected but rank 0 did not confirm the job within {} s: {e}",
                info.rank,
                timeout.as_secs_f64()
            ),
        )
    })?;
    let mut verdict = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut verdict).map_err(io)?;
    if !verdict.is_empty() {
        // Rank 0's own error text already names the address.
        return Err(DistError::Peer {
            rank: 0,
            msg: format!(
                "refused the rendezvous: {}",
                String::from_utf8_lossy(&verdict)
            ),
        });
    }
    s.set_read_timeout(None).map_err(io)?;
    Ok((s, addr.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(rank: usize, world_size: usize) -> RankInfo {
        RankInfo {
            rank,
            world_size,
            local_rank: rank,
            launcher: "test".into(),
        }
    }

    /// A port nobody listens at (bound, then released).
    pub(crate) fn free_addr() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("127.0.0.1:{}", l.local_addr().unwrap().port())
    }

    fn meet_all(sizes: &[usize], meeting: &Meeting, timeout: Duration) -> Vec<Result<Star>> {
        let handles: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(r, &w)| {
                let m = meeting.clone();
                std::thread::spawn(move || rendezvous(&info(r, w), &m, timeout))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn three_ranks_meet_over_tcp_and_over_a_file() {
        let tcp = Meeting::Tcp { addr: free_addr() };
        let dir = tempfile::tempdir().unwrap();
        let file = Meeting::File {
            path: dir.path().join("rdv"),
            host: "127.0.0.1".into(),
        };
        for m in [tcp, file] {
            let stars: Vec<Star> = meet_all(&[3, 3, 3], &m, Duration::from_secs(5))
                .into_iter()
                .map(|s| s.unwrap())
                .collect();
            let ranks: Vec<usize> = stars[0].links.iter().map(|(r, _)| *r).collect();
            assert_eq!(ranks, vec![1, 2]);
            assert_eq!(stars[1].links.len(), 1);
            assert_eq!(stars[2].links[0].0, 0);
            if let Meeting::File { path, .. } = &m {
                assert!(!path.exists(), "rank 0 removes the file once all have met");
            }
        }
    }

    #[test]
    fn a_world_size_disagreement_is_named_on_every_rank() {
        let m = Meeting::Tcp { addr: free_addr() };
        // Rank 1 may arrive after rank 0 has given up: it then fails by its own timeout.
        let res = meet_all(&[3, 3, 4], &m, Duration::from_millis(1500));
        let e0 = res[0].as_ref().unwrap_err().to_string();
        // Rank 2 may be the one that disagrees before or after rank 1 connects.
        assert!(
            e0.contains("rank 2 says world size 4, rank 0 has 3"),
            "{e0}"
        );
        assert!(e0.contains(&m.describe()), "{e0}");
        let e2 = res[2].as_ref().unwrap_err().to_string();
        assert!(
            e2.contains("rank 2 says world size 4, rank 0 has 3"),
            "{e2}"
        );
    }

    #[test]
    fn a_duplicate_rank_is_named() {
        let addr = free_addr();
        let m = Meeting::Tcp { addr: addr.clone() };
        let root = {
            let m = m.clone();
            std::thread::spawn(move || rendezvous(&info(0, 3), &m, Duration::from_secs(5)))
        };
        let a = {
            let m = m.clone();
            std::thread::spawn(move || rendezvous(&info(1, 3), &m, Duration::from_secs(5)))
        };
        let b = rendezvous(&info(1, 3), &m, Duration::from_secs(5));
        let e = root.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("duplicate rank 1"), "{e}");
        assert!(e.contains(&addr), "{e}");
        let other = a.join().unwrap();
        assert!(other.is_err() && b.is_err());
    }

    #[test]
    fn nobody_listening_fails_in_time_naming_the_address() {
        let addr = free_addr();
        let t = Instant::now();
        let e = rendezvous(
            &info(1, 2),
            &Meeting::Tcp { addr: addr.clone() },
            Duration::from_millis(400),
        )
        .unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        assert!(matches!(e, DistError::Rendezvous { .. }));
        let e = e.to_string();
        assert!(
            e.contains(&addr) && e.contains("rank 1 could not reach rank 0 within 0.4 s"),
            "{e}"
        );
    }

    #[test]
    fn rank_zero_alone_times_out_naming_the_missing_ranks() {
        let addr = free_addr();
        let e = rendezvous(
            &info(0, 3),
            &Meeting::Tcp { addr: addr.clone() },
            Duration::from_millis(300),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&addr) && e.contains("for ranks 1, 2 of 3"),
            "{e}"
        );
    }
}
