//! `topcoat launch`: the children see torchrun's variables; one failing child stops the job
//! within the grace period, naming the rank; a signal to the launcher reaches the children.

mod common;
use common::cli::{fails, ok, s};

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `topcoat launch ARGS -- sh -c SCRIPT DIR`, which must fail; its output and how long it took.
fn launch_fails(args: &[&str], script: &str, dir: &Path) -> (String, Duration) {
    let t = Instant::now();
    let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    all.extend(["--".into(), "sh".into(), "-c".into(), script.into(), s(dir)]);
    let out = fails(&all);
    (out, t.elapsed())
}

fn alive(pid: &str) -> bool {
    Path::new(&format!("/proc/{}", pid.trim())).exists()
}

#[test]
fn three_children_see_torchruns_variables() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"echo "$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT $TOPCOAT_LAUNCHER" > "$0/env.$RANK"; echo "hello from rank $RANK""#;
    let out = ok(&[
        "launch",
        "--nproc-per-node",
        "3",
        "--",
        "sh",
        "-c",
        script,
        &s(dir.path()),
    ]);
    let port: Vec<String> = (0..3)
        .map(|r| {
            let line = std::fs::read_to_string(dir.path().join(format!("env.{r}"))).unwrap();
            let f: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(f.len(), 7, "{line}");
            assert_eq!(
                [f[0], f[1], f[2], f[3], f[4], f[6]],
                [
                    &r.to_string() as &str,
                    "3",
                    &r.to_string(),
                    "3",
                    "127.0.0.1",
                    "topcoat-launch"
                ]
            );
            assert!(f[5].parse::<u16>().unwrap() > 0, "{line}");
            f[5].to_string()
        })
        .collect();
    assert!(
        port.iter().all(|p| *p == port[0]),
        "one master port: {port:?}"
    );
    // The children's output passes through.
    for r in 0..3 {
        assert!(out.contains(&format!("hello from rank {r}")), "{out}");
    }
    assert!(
        out.contains(&format!(
            "launch: ranks 0..2 of 3 started, rendezvous at 127.0.0.1:{}",
            port[0]
        )),
        "{out}"
    );
}

#[test]
fn a_failing_child_is_named_and_a_sleeping_one_killed_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"echo $$ > "$0/pid.$RANK"; if [ "$RANK" = 1 ]; then sleep 0.3; exit 3; fi; exec sleep 30"#;
    let (out, took) = launch_fails(
        &["launch", "--nproc-per-node", "3", "--grace", "1"],
        script,
        dir.path(),
    );
    assert!(took < Duration::from_secs(6), "{took:?}");
    let pid1 = std::fs::read_to_string(dir.path().join("pid.1")).unwrap();
    let killed = "killed by the launcher after the 1 s grace period";
    assert!(
        out.contains(&format!(
            "error: rank 1 (pid {}) exited with status 3; ranks 0, 2 stopped (rank 0: {killed}; rank 2: {killed})",
            pid1.trim()
        )),
        "{out}"
    );
    for r in [0, 2] {
        let pid = std::fs::read_to_string(dir.path().join(format!("pid.{r}"))).unwrap();
        assert!(!alive(&pid), "rank {r} (pid {pid}) still runs");
    }
}

#[test]
fn ranks_that_stop_on_their_own_are_reported_as_they_ended() {
    let dir = tempfile::tempdir().unwrap();
    let script =
        r#"echo $$ > "$0/pid.$RANK"; if [ "$RANK" = 2 ]; then kill -9 $$; fi; sleep 1; exit 1"#;
    let (out, took) = launch_fails(
        &["launch", "--nproc-per-node", "3", "--grace", "20"],
        script,
        dir.path(),
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    let pid2 = std::fs::read_to_string(dir.path().join("pid.2")).unwrap();
    assert!(
        out.contains(&format!(
            "rank 2 (pid {}) was killed by signal 9 (SIGKILL); ranks 0, 1 stopped (rank 0: exited with status 1; rank 1: exited with status 1)",
            pid2.trim()
        )),
        "{out}"
    );
}

#[test]
fn a_topcoat_command_runs_this_executable() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing-here");
    let out = fails(&[
        "launch",
        "--nproc-per-node",
        "2",
        "--grace",
        "5",
        "--",
        "info",
        &s(&missing),
    ]);
    // Both children are `topcoat info`, failing with its own words; the launcher names a rank.
    assert_eq!(
        out.matches("does not exist: `topcoat info` takes").count(),
        2,
        "{out}"
    );
    assert!(
        out.contains("error: rank ") && out.contains("exited with status 1"),
        "{out}"
    );
}

#[test]
fn bad_launch_flags_are_named() {
    let out = fails(&["launch", "--nproc-per-node", "0", "--", "true"]);
    assert!(
        out.contains("error: --nproc-per-node must be at least 1"),
        "{out}"
    );
    let out = fails(&[
        "launch",
        "--nproc-per-node",
        "2",
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--",
        "true",
    ]);
    assert!(
        out.contains("--nnodes 2 needs --master-addr and --master-port"),
        "{out}"
    );
    let out = fails(&["launch", "--nproc-per-node", "2", "--", "/no/such/program"]);
    assert!(out.contains("starting rank 0 (/no/such/program)"), "{out}");
}

#[test]
fn sigterm_to_the_launcher_reaches_every_child() {
    let dir = tempfile::tempdir().unwrap();
    let script =
        r#"echo $$ > "$0/pid.$RANK.tmp"; mv "$0/pid.$RANK.tmp" "$0/pid.$RANK"; exec sleep 30"#;
    let launcher = Command::new(env!("CARGO_BIN_EXE_topcoat"))
        .args([
            "launch",
            "--nproc-per-node",
            "2",
            "--grace",
            "5",
            "--",
            "sh",
            "-c",
            script,
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !(0..2).all(|r| dir.path().join(format!("pid.{r}")).exists()) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the children did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on the launcher we started.
    unsafe { libc::kill(launcher.id() as libc::pid_t, libc::SIGTERM) };
    let out = launcher.wait_with_output().unwrap();
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("interrupted by SIGTERM: passed on to ranks 0, 1 (rank 0: was killed by signal 15 (SIGTERM); rank 1: was killed by signal 15 (SIGTERM))"),
        "{err}"
    );
}

/// Rank `r`'s values for seed `seed`: magnitudes far apart, so the order of a sum shows in its bits.
fn values(seed: u64, r: usize) -> Vec<f32> {
    let mut rng = topcoat::rng::Rng::new(seed.wrapping_add(r as u64 * 7919));
    (0..64)
        .map(|_| rng.normal() * 10f32.powi(rng.below(9) as i32 - 2))
        .collect()
}

/// A rank of a job started by the tests below (this test binary, run by `topcoat launch`):
/// joins through the launcher's environment, sums its values, writes the bits or the error.
#[test]
#[ignore = "a child process of the launch tests"]
fn child_rank() {
    use topcoat::backend::{cpu::CpuBackend, Backend, Role};
    use topcoat::dist::Collective;
    let Ok(dir) = std::env::var("TOPCOAT_TEST_DIR") else {
        return;
    };
    let dir = Path::new(&dir);
    let seed: u64 = std::env::var("TOPCOAT_TEST_SEED").unwrap().parse().unwrap();
    let plan = topcoat::dist::detect_from_env(None).unwrap();
    let r = plan.info.rank;
    let c = topcoat::dist::open_collective(&plan).unwrap();
    if std::env::var("TOPCOAT_TEST_DIE").ok() == Some(r.to_string()) {
        std::process::exit(7);
    }
    let be = CpuBackend::new();
    let mut b = be.upload(&values(seed, r), Role::Grad).unwrap();
    match Collective::<CpuBackend>::all_reduce_sum(&c, &be, &mut [&mut b]) {
        Ok(()) => {
            let bits: Vec<String> = b.iter().map(|x| x.to_bits().to_string()).collect();
            std::fs::write(dir.join(format!("sum.{r}")), bits.join(" ")).unwrap();
        }
        Err(e) => {
            std::fs::write(dir.join(format!("err.{r}")), e.to_string()).unwrap();
            // Long enough for the launcher to see the failed rank's exit first.
            std::thread::sleep(Duration::from_millis(500));
            std::process::exit(1);
        }
    }
}

/// `topcoat launch -- THIS_TEST_BINARY child_rank` with `env`.
fn launch_children(dir: &Path, seed: u64, env: &[(&str, &str)]) -> std::process::Output {
    let me = std::env::current_exe().unwrap();
    Command::new(env!("CARGO_BIN_EXE_topcoat"))
        .args(["launch", "--nproc-per-node", "3", "--grace", "5", "--"])
        .arg(me)
        .args(["--exact", "child_rank", "--ignored", "--test-threads", "1"])
        .env("TOPCOAT_TEST_DIR", dir)
        .env("TOPCOAT_TEST_SEED", seed.to_string())
        .env("TOPCOAT_RENDEZVOUS_TIMEOUT", "20")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[test]
fn three_launched_processes_sum_in_rank_order_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let s = seed();
    let out = launch_children(dir.path(), s, &[]);
    assert!(
        out.status.success(),
        "seed {s}: {}",
        common::cli::text(&out)
    );
    let x: Vec<Vec<f32>> = (0..3).map(|r| values(s, r)).collect();
    let fold: Vec<String> = (0..64)
        .map(|i| ((x[0][i] + x[1][i]) + x[2][i]).to_bits().to_string())
        .collect();
    let other: Vec<String> = (0..64)
        .map(|i| ((x[2][i] + x[1][i]) + x[0][i]).to_bits().to_string())
        .collect();
    assert_ne!(
        fold, other,
        "seed {s}: the values must tell the orders apart"
    );
    for r in 0..3 {
        let got = std::fs::read_to_string(dir.path().join(format!("sum.{r}"))).unwrap();
        assert_eq!(got, fold.join(" "), "rank {r}, seed {s}");
    }
}

#[test]
fn a_launched_rank_that_exits_is_named_by_every_other_rank_and_the_launcher() {
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let out = launch_children(dir.path(), seed(), &[("TOPCOAT_TEST_DIE", "1")]);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(!out.status.success());
    for r in [0, 2] {
        let e = std::fs::read_to_string(dir.path().join(format!("err.{r}"))).unwrap();
        assert_eq!(
            e, "rank 1: closed its connection: it exited or failed; see its own error",
            "rank {r}"
        );
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("exited with status 7; ranks 0, 2 stopped (rank 0: exited with status 1; rank 2: exited with status 1)")
            && err.contains("error: rank 1 (pid "),
        "{err}"
    );
}
