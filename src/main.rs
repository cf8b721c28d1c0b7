//! The `topcoat` command line: parses the flags (`cli/args.rs`), runs the command through the
//! library (`cli/dispatch.rs`, `topcoat::commands`) and prints what it returns (`cli/print.rs`).

mod cli;

use clap::{Command, CommandFactory, FromArgMatches};

fn main() -> std::process::ExitCode {
    let matches = allow_negative_numbers(cli::args::Cli::command()).get_matches();
    let cli = cli::args::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // Errors print as one readable chain, never as a debug dump with a backtrace.
    match cli::dispatch::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One write: the ranks of a launched job share the terminal, and a line written in
            // pieces would interleave with another rank's.
            let line = format!("error: {}\n", describe(&e));
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            std::process::ExitCode::FAILURE
        }
    }
}

/// Lets every flag that takes a value take a negative number (`--lr -1`, not only `--lr=-1`),
/// in every subcommand, so that the value reaches the check that names what is wrong with it
/// instead of clap reading `-1` as an unknown flag.
fn allow_negative_numbers(cmd: Command) -> Command {
    let subs: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    let mut cmd = cmd.mut_args(|a| {
        if a.get_action().takes_values() {
            a.allow_negative_numbers(true)
        } else {
            a
        }
    });
    for name in subs {
        cmd = cmd.mut_subcommand(name, allow_negative_numbers);
    }
    cmd
}

/// The error and its causes on one line, each cause once: most of the library's messages
/// already include their source (`path: op: No such file or directory`), so a cause whose
/// text is already there is not repeated.
fn describe(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}
