//! `launch` as a library call: the command line after `--` into a [`LaunchSpec`] (a topcoat
//! command runs this same executable), then [`crate::dist::launch::launch`].

use crate::dist::launch::{self, LaunchError, LaunchSpec, Started};
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

/// What `topcoat launch` was asked to run.
pub struct LaunchJob {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: Option<String>,
    pub master_port: Option<u16>,
    /// Seconds; see [`launch::DEFAULT_GRACE`].
    pub grace: f64,
    pub command: Vec<OsString>,
    /// `--threads` given before `launch`: passed on to a topcoat command.
    pub threads: Option<usize>,
}

/// The program and arguments each rank runs: `topcoat_commands` are the names that make the
/// command a topcoat subcommand, run by this same executable.
pub fn resolve_command(
    command: &[OsString],
    topcoat_commands: &[String],
    threads: Option<usize>,
) -> Result<(PathBuf, Vec<OsString>), LaunchError> {
    let Some(first) = command.first() else {
        return Err(LaunchError::Spec(
            "no command after `--`: give a topcoat command (`pretrain ...`) or a program".into(),
        ));
    };
    if topcoat_commands.iter().any(|c| first.to_str() == Some(c)) {
        let exe = std::env::current_exe()
            .map_err(|e| LaunchError::Spec(format!("finding this executable: {e}")))?;
        let mut args: Vec<OsString> = match threads {
            Some(n) => vec!["--threads".into(), n.to_string().into()],
            None => Vec::new(),
        };
        args.extend(command.iter().cloned());
        Ok((exe, args))
    } else {
        Ok((PathBuf::from(first), command[1..].to_vec()))
    }
}

/// Runs the job to its end; `started` is told the ranks and the master once all are running.
pub fn run(
    job: &LaunchJob,
    topcoat_commands: &[String],
    started: &mut dyn FnMut(&Started),
) -> Result<(), LaunchError> {
    if !(job.grace.is_finite() && job.grace >= 0.0) {
        return Err(LaunchError::Spec(format!(
            "--grace {}: expected a number of seconds, 0 or more",
            job.grace
        )));
    }
    let (program, args) = resolve_command(&job.command, topcoat_commands, job.threads)?;
    launch::launch(
        &LaunchSpec {
            nproc_per_node: job.nproc_per_node,
            nnodes: job.nnodes,
            node_rank: job.node_rank,
            master_addr: job.master_addr.clone(),
            master_port: job.master_port,
            program,
            args,
            grace: Duration::from_secs_f64(job.grace),
        },
        started,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topcoat_command_runs_this_executable_with_the_threads_given() {
        let names = vec!["pretrain".to_string()];
        let cmd: Vec<OsString> = vec!["pretrain".into(), "--max-steps".into(), "3".into()];
        let (exe, args) = resolve_command(&cmd, &names, Some(2)).unwrap();
        assert_eq!(exe, std::env::current_exe().unwrap());
        assert_eq!(args, ["--threads", "2", "pretrain", "--max-steps", "3"]);
        let cmd: Vec<OsString> = vec!["sh".into(), "-c".into(), "true".into()];
        let (exe, args) = resolve_command(&cmd, &names, Some(2)).unwrap();
        assert_eq!(
            (exe, args),
            (PathBuf::from("sh"), vec!["-c".into(), "true".into()])
        );
    }
}
