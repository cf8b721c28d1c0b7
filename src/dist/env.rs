//! The launcher's environment, used as it is: which rank this process is, how many there are,
//! and where they meet.
//!
//! Read in this order (the first launcher whose rank variable is set wins):
//! - torchrun (and `topcoat launch`, which also sets TOPCOAT_LAUNCHER=topcoat-launch): RANK,
//!   WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
//! - Slurm's srun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID;
//! - Open MPI's mpirun: OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK;
//! - none of them: one process on its own.
//!
//! The master address is the `--master-addr` flag, else MASTER_ADDR; the port MASTER_PORT,
//! else 29500 (torchrun's default). TOPCOAT_RENDEZVOUS_FILE=PATH meets through a shared file
//! instead (no port needed). TOPCOAT_RENDEZVOUS_TIMEOUT and TOPCOAT_COLLECTIVE_TIMEOUT (seconds)
//! state how long a rank waits. [`detect`] is a pure function of a lookup closure, so tests pass
//! a map; [`open_collective`] is what the runtime calls.

use super::host::{HostCollective, DEFAULT_COLLECTIVE_TIMEOUT};
use super::rendezvous::{rendezvous, Meeting, DEFAULT_RENDEZVOUS_TIMEOUT};
use super::{DistError, RankInfo, Result};
use std::path::PathBuf;
use std::time::Duration;

/// torchrun's default MASTER_PORT.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Everything a process needs to join its job.
#[derive(Clone, Debug, PartialEq)]
pub struct DistPlan {
    pub info: RankInfo,
    /// Where the ranks meet; `None` for a process on its own.
    pub meeting: Option<Meeting>,
    /// How long to try to reach the rendezvous (TOPCOAT_RENDEZVOUS_TIMEOUT).
    pub rendezvous_timeout: Duration,
    /// How long a collective read waits for a peer (TOPCOAT_COLLECTIVE_TIMEOUT).
    pub collective_timeout: Duration,
}

/// The variables each launcher sets: its name, then rank, size, local rank.
const LAUNCHERS: [(&str, &str, &str, &str); 3] = [
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("srun", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    (
        "mpirun",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
    ),
];

fn env_err(msg: impl Into<String>) -> DistError {
    DistError::Env(msg.into())
}

/// `name`'s value as a whole number, if set.
fn number(lookup: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<u64>> {
    match lookup(name) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| env_err(format!("{name} is `{v}`: expected an integer"))),
    }
}

/// Seconds from `name`, else `default`.
fn seconds(
    lookup: &dyn Fn(&str) -> Option<String>,
    name: &str,
    default: Duration,
) -> Result<Duration> {
    match lookup(name) {
        None => Ok(default),
        Some(v) => match v.trim().parse::<f64>() {
            Ok(s) if s > 0.0 && s.is_finite() => Ok(Duration::from_secs_f64(s)),
            _ => Err(env_err(format!(
                "{name} is `{v}`: expected a number of seconds above 0"
            ))),
        },
    }
}

/// Reads the launcher's environment through `lookup`; `master_addr` is the `--master-addr`
/// flag's value, which wins over MASTER_ADDR.
pub fn detect(
    lookup: &dyn Fn(&str) -> Option<String>,
    master_addr: Option<&str>,
) -> Result<DistPlan> {
    let rendezvous_timeout = seconds(
        lookup,
        "TOPCOAT_RENDEZVOUS_TIMEOUT",
        DEFAULT_RENDEZVOUS_TIMEOUT,
    )?;
    let collective_timeout = seconds(
        lookup,
        "TOPCOAT_COLLECTIVE_TIMEOUT",
        DEFAULT_COLLECTIVE_TIMEOUT,
    )?;
    let Some(&(name, rank_var, size_var, local_var)) = LAUNCHERS
        .iter()
        .find(|(_, rank, _, _)| lookup(rank).is_some())
    else {
        return Ok(DistPlan {
            info: RankInfo::single(),
            meeting: None,
            rendezvous_timeout,
            collective_timeout,
        });
    };
    let launcher =
        if name == "torchrun" && lookup("TOPCOAT_LAUNCHER").as_deref() == Some("topcoat-launch") {
            "topcoat launch"
        } else {
            name
        };
    let rank = number(lookup, rank_var)?.unwrap_or(0) as usize;
    let world_size = number(lookup, size_var)?.ok_or_else(|| {
        env_err(format!(
            "{rank_var} is set but {size_var} is not: {launcher} sets both"
        ))
    })? as usize;
    if world_size == 0 {
        return Err(env_err(format!("{size_var} is 0: expected at least 1")));
    }
    if rank >= world_size {
        return Err(env_err(format!(
            "{rank_var}={rank} but {size_var}={world_size}: a rank must be below the world size"
        )));
    }
    // A hand-set environment may leave out the local rank: one node, so it is the rank.
    let local_rank = number(lookup, local_var)?.map_or(rank, |v| v as usize);
    let info = RankInfo {
        rank,
        world_size,
        local_rank,
        launcher: launcher.to_string(),
    };
    let meeting = if world_size == 1 {
        None
    } else {
        Some(meeting(
            lookup,
            master_addr,
            launcher,
            size_var,
            world_size,
        )?)
    };
    Ok(DistPlan {
        info,
        meeting,
        rendezvous_timeout,
        collective_timeout,
    })
}

/// Where a job of several ranks meets.
fn meeting(
    lookup: &dyn Fn(&str) -> Option<String>,
    flag: Option<&str>,
    launcher: &str,
    size_var: &str,
    world_size: usize,
) -> Result<Meeting> {
    let host = flag
        .map(str::to_string)
        .or_else(|| lookup("MASTER_ADDR"))
        .filter(|h| !h.trim().is_empty());
    if let Some(path) = lookup("TOPCOAT_RENDEZVOUS_FILE").filter(|p| !p.is_empty()) {
        return Ok(Meeting::File {
            path: PathBuf::from(path),
            host: host.unwrap_or_else(hostname),
        });
    }
    let host = host.ok_or_else(|| {
        env_err(format!(
            "{launcher} set {size_var}={world_size} but no master address: set MASTER_ADDR or pass --master-addr (or TOPCOAT_RENDEZVOUS_FILE=PATH on a shared file system)"
        ))
    })?;
    let port = match number(lookup, "MASTER_PORT")? {
        None => DEFAULT_MASTER_PORT,
        Some(p) if (1..=65535).contains(&p) => p as u16,
        Some(p) => {
            return Err(env_err(format!(
                "MASTER_PORT is {p}: expected a port from 1 to 65535"
            )))
        }
    };
    // An IPv6 literal needs brackets before the port.
    let addr = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok(Meeting::Tcp { addr })
}

/// This machine's name, for the shared-file rendezvous when no master address is given.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(name) if rc == 0 && !name.is_empty() => name.to_string(),
        _ => "127.0.0.1".to_string(),
    }
}

/// [`detect`] over this process's environment.
pub fn detect_from_env(master_addr: Option<&str>) -> Result<DistPlan> {
    detect(&|name| std::env::var(name).ok(), master_addr)
}

/// Meets the other ranks and opens the host collective over the connections (for one rank,
/// a collective whose every operation is the identity).
pub fn open_collective(plan: &DistPlan) -> Result<HostCollective> {
    let star = match &plan.meeting {
        Some(m) => rendezvous(&plan.info, m, plan.rendezvous_timeout)?,
        None if plan.info.world_size == 1 => super::rendezvous::Star {
            info: plan.info.clone(),
            addr: "nowhere (one process)".into(),
            links: Vec::new(),
        },
        None => {
            return Err(env_err(format!(
                "rank {} of {} has no rendezvous address",
                plan.info.rank, plan.info.world_size
            )))
        }
    };
    HostCollective::new(star, plan.collective_timeout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn plan(vars: &[(&str, &str)], flag: Option<&str>) -> Result<DistPlan> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        detect(&move |k| map.get(k).cloned(), flag)
    }

    fn err(vars: &[(&str, &str)], flag: Option<&str>) -> String {
        plan(vars, flag).unwrap_err().to_string()
    }

    #[test]
    fn no_launcher_is_a_single_process() {
        let p = plan(&[("PATH", "/bin")], None).unwrap();
        assert_eq!(p.info, RankInfo::single());
        assert_eq!(p.meeting, None);
        assert_eq!(p.rendezvous_timeout, Duration::from_secs(120));
        assert_eq!(p.collective_timeout, Duration::from_secs(300));
    }

    #[test]
    fn torchrun_and_topcoat_launch() {
        let vars = [
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node7"),
            ("MASTER_PORT", "1234"),
            ("TOPCOAT_RENDEZVOUS_TIMEOUT", "2.5"),
            ("TOPCOAT_COLLECTIVE_TIMEOUT", "9"),
        ];
        let p = plan(&vars, None).unwrap();
        assert_eq!(
            (p.info.rank, p.info.world_size, p.info.local_rank),
            (5, 8, 1)
        );
        assert_eq!(p.info.launcher, "torchrun");
        assert_eq!(
            p.meeting,
            Some(Meeting::Tcp {
                addr: "node7:1234".into()
            })
        );
        assert_eq!(p.rendezvous_timeout, Duration::from_millis(2500));
        assert_eq!(p.collective_timeout, Duration::from_secs(9));
        let mut launched = vars.to_vec();
        launched.push(("TOPCOAT_LAUNCHER", "topcoat-launch"));
        assert_eq!(
            plan(&launched, None).unwrap().info.launcher,
            "topcoat launch"
        );
        // The flag wins over MASTER_ADDR.
        assert_eq!(
            plan(&vars, Some("10.0.0.1")).unwrap().meeting,
            Some(Meeting::Tcp {
                addr: "10.0.0.1:1234".into()
            })
        );
    }

    #[test]
    fn srun_and_mpirun_take_the_master_from_the_flag_or_the_environment() {
        let p = plan(
            &[
                ("SLURM_PROCID", "3"),
                ("SLURM_NTASKS", "4"),
                ("SLURM_LOCALID", "3"),
            ],
            Some("head"),
        )
        .unwrap();
        assert_eq!(
            (
                p.info.rank,
                p.info.world_size,
                p.info.local_rank,
                p.info.launcher.as_str()
            ),
            (3, 4, 3, "srun")
        );
        assert_eq!(
            p.meeting,
            Some(Meeting::Tcp {
                addr: "head:29500".into()
            })
        );
        let p = plan(
            &[
                ("OMPI_COMM_WORLD_RANK", "0"),
                ("OMPI_COMM_WORLD_SIZE", "2"),
                ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
                ("MASTER_ADDR", "fe80::1"),
            ],
            None,
        )
        .unwrap();
        assert_eq!(p.info.launcher, "mpirun");
        assert_eq!(
            p.meeting,
            Some(Meeting::Tcp {
                addr: "[fe80::1]:29500".into()
            })
        );
        let p = plan(
            &[
                ("SLURM_PROCID", "1"),
                ("SLURM_NTASKS", "2"),
                ("TOPCOAT_RENDEZVOUS_FILE", "/shared/rdv"),
                ("MASTER_ADDR", "head"),
            ],
            None,
        )
        .unwrap();
        assert_eq!(
            p.meeting,
            Some(Meeting::File {
                path: "/shared/rdv".into(),
                host: "head".into()
            })
        );
    }

    #[test]
    fn a_bad_environment_is_named() {
        assert_eq!(
            err(&[("RANK", "x"), ("WORLD_SIZE", "2")], None),
            "launcher environment: RANK is `x`: expected an integer"
        );
        assert_eq!(
            err(&[("RANK", "1")], None),
            "launcher environment: RANK is set but WORLD_SIZE is not: torchrun sets both"
        );
        assert_eq!(
            err(&[("OMPI_COMM_WORLD_RANK", "4"), ("OMPI_COMM_WORLD_SIZE", "4")], None),
            "launcher environment: OMPI_COMM_WORLD_RANK=4 but OMPI_COMM_WORLD_SIZE=4: a rank must be below the world size"
        );
        assert!(err(
            &[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4")],
            None
        )
        .starts_with("launcher environment: srun set SLURM_NTASKS=4 but no master address: set MASTER_ADDR or pass --master-addr"));
        assert_eq!(
            err(
                &[
                    ("RANK", "0"),
                    ("WORLD_SIZE", "2"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "70000")
                ],
                None
            ),
            "launcher environment: MASTER_PORT is 70000: expected a port from 1 to 65535"
        );
        assert_eq!(
            err(&[("TOPCOAT_COLLECTIVE_TIMEOUT", "soon")], None),
            "launcher environment: TOPCOAT_COLLECTIVE_TIMEOUT is `soon`: expected a number of seconds above 0"
        );
    }

    #[test]
    fn open_collective_joins_ranks_from_their_environments() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
            .to_string();
        let hs: Vec<_> = (0..2)
            .map(|r| {
                let port = port.clone();
                std::thread::spawn(move || {
                    let rank = r.to_string();
                    let p = plan(
                        &[
                            ("RANK", &rank),
                            ("WORLD_SIZE", "2"),
                            ("MASTER_ADDR", "127.0.0.1"),
                            ("MASTER_PORT", &port),
                        ],
                        None,
                    )
                    .unwrap();
                    let c = open_collective(&p).unwrap();
                    let mut v = [r as f64 + 0.5];
                    super::super::Collective::<crate::backend::cpu::CpuBackend>::all_reduce_host(
                        &c, &mut v,
                    )
                    .unwrap();
                    v[0]
                })
            })
            .collect();
        for h in hs {
            assert_eq!(h.join().unwrap(), 2.0);
        }
    }
}
