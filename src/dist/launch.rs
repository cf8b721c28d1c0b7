//! `topcoat launch`'s process logic: start one child per local rank with torchrun's
//! variables, watch them, and stop the job cleanly when one fails.
//!
//! Each child gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT
//! and TOPCOAT_LAUNCHER=topcoat-launch; its stdout and stderr are the launcher's own. When a
//! child exits non-zero or by a signal, the others get a grace period to exit on their own
//! (they will: their collective names the failed rank), then are killed. SIGINT and SIGTERM
//! sent to the launcher are passed on to every child that is still running.

use std::ffi::OsString;
use std::net::TcpListener;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// How long the other ranks get to exit on their own after one has failed.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);

/// What to start.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    /// Default (one node): 127.0.0.1.
    pub master_addr: Option<String>,
    /// Default (one node): a free port found by the launcher.
    pub master_port: Option<u16>,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub grace: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The flags do not describe a job.
    #[error("{0}")]
    Spec(String),
    #[error("starting rank {rank} ({program}): {source}")]
    Spawn {
        rank: usize,
        program: String,
        source: std::io::Error,
    },
    /// A rank failed; says which first, and how the others ended.
    #[error("{0}")]
    Failed(String),
    /// The launcher was interrupted and passed the signal on.
    #[error("{0}")]
    Interrupted(String),
}

/// The job as started, for the launcher's first line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Started {
    pub ranks: Vec<usize>,
    pub world_size: usize,
    pub master: String,
}

/// The signal received by the launcher (0: none), set by [`on_signal`].
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
}

/// Checks the spec and picks the master address and port.
fn resolve(spec: &LaunchSpec) -> Result<(String, u16), LaunchError> {
    let bad = |m: String| Err(LaunchError::Spec(m));
    if spec.nproc_per_node == 0 {
        return bad("--nproc-per-node must be at least 1".into());
    }
    if spec.nnodes == 0 {
        return bad("--nnodes must be at least 1".into());
    }
    if spec.node_rank >= spec.nnodes {
        return bad(format!(
            "--node-rank {} with --nnodes {}: node ranks run 0..{}",
            spec.node_rank,
            spec.nnodes,
            spec.nnodes - 1
        ));
    }
    if spec.nnodes > 1 && (spec.master_addr.is_none() || spec.master_port.is_none()) {
        return bad(format!(
            "--nnodes {} needs --master-addr and --master-port: every node must name the same rank 0",
            spec.nnodes
        ));
    }
    let addr = spec
        .master_addr
        .clone()
        .unwrap_or_else(|| "127.0.0.1".into());
    let port = match spec.master_port {
        Some(p) => p,
        None => free_port().map_err(|e| LaunchError::Spec(format!("finding a free port: {e}")))?,
    };
    Ok((addr, port))
}

/// A port nothing listens at now (the kernel's pick, released for rank 0 to bind).
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("0.0.0.0:0")?.local_addr()?.port())
}

/// Starts the children, watches them, and returns once all have ended: `Ok` when every rank
/// exited with status 0. `started` is told the job once it is running.
pub fn launch(spec: &LaunchSpec, started: &mut dyn FnMut(&Started)) -> Result<(), LaunchError> {
    let (addr, port) = resolve(spec)?;
    let world_size = spec.nnodes * spec.nproc_per_node;
    let first = spec.node_rank * spec.nproc_per_node;
    let ranks: Vec<usize> = (first..first + spec.nproc_per_node).collect();
    // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
    let old: Vec<(libc::c_int, libc::sighandler_t)> = [libc::SIGINT, libc::SIGTERM]
        .into_iter()
        .map(|s| unsafe {
            (
                s,
                libc::signal(
                    s,
                    on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
                ),
            )
        })
        .collect();
    SIGNAL.store(0, Ordering::SeqCst);
    let mut children: Vec<Child> = Vec::new();
    let mut result = Ok(());
    for (local, &rank) in ranks.iter().enumerate() {
        let spawned = Command::new(&spec.program)
            .args(&spec.args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world_size.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", spec.nproc_per_node.to_string())
            .env("MASTER_ADDR", &addr)
            .env("MASTER_PORT", port.to_string())
            .env("TOPCOAT_LAUNCHER", "topcoat-launch")
            .spawn();
        match spawned {
            Ok(c) => children.push(c),
            Err(source) => {
                result = Err(LaunchError::Spawn {
                    rank,
                    program: spec.program.display().to_string(),
                    source,
                });
                break;
            }
        }
    }
    if result.is_ok() {
        started(&Started {
            ranks: ranks.clone(),
            world_size,
            master: format!("{addr}:{port}"),
        });
        result = watch(&mut children, &ranks, spec.grace);
    } else {
        // Those already started must not outlive a launcher that could not start them all.
        for c in &mut children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
    for (s, h) in old {
        // SAFETY: restores the handlers this function replaced.
        unsafe { libc::signal(s, h) };
    }
    result
}

/// How a child ended.
#[derive(Clone, Debug)]
enum End {
    Exited(ExitStatus),
    /// Killed by the launcher after the grace period.
    Killed,
}

fn watch(children: &mut [Child], ranks: &[usize], grace: Duration) -> Result<(), LaunchError> {
    let mut ends: Vec<Option<End>> = vec![None; children.len()];
    let mut first_failure: Option<usize> = None;
    let mut forwarded: Option<i32> = None;
    let mut deadline: Option<Instant> = None;
    while ends.iter().any(Option::is_none) {
        let sig = SIGNAL.swap(0, Ordering::SeqCst);
        if sig != 0 {
            for (c, e) in children.iter().zip(&ends) {
                if e.is_none() {
                    // SAFETY: kill(2) on our own child's pid, which has not been reaped.
                    unsafe { libc::kill(c.id() as libc::pid_t, sig) };
                }
            }
            forwarded.get_or_insert(sig);
            deadline.get_or_insert(Instant::now() + grace);
        }
        let mut failed_now = Vec::new();
        for (i, c) in children.iter_mut().enumerate() {
            if ends[i].is_some() {
                continue;
            }
            if let Ok(Some(status)) = c.try_wait() {
                if !status.success() {
                    failed_now.push((i, status));
                }
                ends[i] = Some(End::Exited(status));
            }
        }
        if let (None, None, Some(i)) = (first_failure, forwarded, likely_cause(&failed_now)) {
            first_failure = Some(i);
            deadline.get_or_insert(Instant::now() + grace);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            for (c, e) in children.iter_mut().zip(ends.iter_mut()) {
                if e.is_none() {
                    let _ = c.kill();
                    let _ = c.wait();
                    *e = Some(End::Killed);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let ends: Vec<End> = ends.into_iter().map(Option::unwrap).collect();
    let how = |i: usize| match &ends[i] {
        End::Exited(s) => describe(s),
        End::Killed => format!(
            "killed by the launcher after the {} s grace period",
            grace.as_secs_f64()
        ),
    };
    let others = |skip: Option<usize>| -> (String, String) {
        let idx: Vec<usize> = (0..ends.len()).filter(|&i| Some(i) != skip).collect();
        let names = idx
            .iter()
            .map(|&i| ranks[i].to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let detail = idx
            .iter()
            .map(|&i| format!("rank {}: {}", ranks[i], how(i)))
            .collect::<Vec<_>>()
            .join("; ");
        (names, detail)
    };
    if let Some(sig) = forwarded {
        let (names, detail) = others(None);
        return Err(LaunchError::Interrupted(format!(
            "interrupted by {}: passed on to ranks {names} ({detail})",
            signal_name(sig)
        )));
    }
    if let Some(i) = first_failure {
        let (names, detail) = others(Some(i));
        let rest = if names.is_empty() {
            String::new()
        } else {
            let plural = if names.contains(',') { "ranks" } else { "rank" };
            format!("; {plural} {names} stopped ({detail})")
        };
        return Err(LaunchError::Failed(format!(
            "rank {} (pid {}) {}{rest}",
            ranks[i],
            children[i].id(),
            how(i)
        )));
    }
    Ok(())
}

/// Of the ranks seen failing in one poll, the one to name first: a rank killed by a signal is
/// more likely the cause than one that exited with an error (the others exit on learning of
/// its death); else the lowest.
fn likely_cause(failed: &[(usize, ExitStatus)]) -> Option<usize> {
    failed
        .iter()
        .min_by_key(|(i, st)| (st.signal().is_none(), *i))
        .map(|(i, _)| *i)
}

/// "exited with status 3", "was killed by signal 9 (SIGKILL)".
fn describe(s: &ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(sig)) => format!("was killed by signal {sig} ({})", signal_name(sig)),
        _ => format!("ended with {s}"),
    }
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGQUIT => "SIGQUIT".into(),
        libc::SIGILL => "SIGILL".into(),
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGBUS => "SIGBUS".into(),
        libc::SIGFPE => "SIGFPE".into(),
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGPIPE => "SIGPIPE".into(),
        libc::SIGTERM => "SIGTERM".into(),
        n => format!("signal {n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(nproc: usize) -> LaunchSpec {
        LaunchSpec {
            nproc_per_node: nproc,
            nnodes: 1,
            node_rank: 0,
            master_addr: None,
            master_port: None,
            program: "sh".into(),
            args: vec![],
            grace: Duration::from_secs(1),
        }
    }

    #[test]
    fn the_spec_is_checked() {
        let e = |s: LaunchSpec| resolve(&s).unwrap_err().to_string();
        assert_eq!(e(spec(0)), "--nproc-per-node must be at least 1");
        let mut s = spec(2);
        s.nnodes = 2;
        s.node_rank = 2;
        assert_eq!(
            e(s.clone()),
            "--node-rank 2 with --nnodes 2: node ranks run 0..1"
        );
        s.node_rank = 1;
        assert!(e(s.clone()).starts_with("--nnodes 2 needs --master-addr and --master-port"));
        s.master_addr = Some("head".into());
        s.master_port = Some(4000);
        assert_eq!(resolve(&s).unwrap(), ("head".to_string(), 4000));
        let (addr, port) = resolve(&spec(2)).unwrap();
        assert_eq!(addr, "127.0.0.1");
        assert!(port > 0);
    }

    #[test]
    fn a_signal_death_is_described() {
        assert_eq!(
            describe(&ExitStatus::from_raw(9)),
            "was killed by signal 9 (SIGKILL)"
        );
        assert_eq!(
            describe(&ExitStatus::from_raw(3 << 8)),
            "exited with status 3"
        );
    }

    #[test]
    fn a_signal_death_is_named_before_the_exits_it_caused() {
        let exit1 = ExitStatus::from_raw(1 << 8);
        let killed = ExitStatus::from_raw(9);
        assert_eq!(
            likely_cause(&[(0, exit1), (2, killed), (1, exit1)]),
            Some(2)
        );
        assert_eq!(likely_cause(&[(1, exit1), (0, exit1)]), Some(0));
        assert_eq!(likely_cause(&[]), None);
    }
}
