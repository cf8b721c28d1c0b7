//! The `topcoat` command line: parses the flags (`cli/args.rs`), runs the command through the
//! library (`cli/dispatch.rs`, `topcoat::commands`) and prints what it returns (`cli/print.rs`).

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // Errors print as one readable chain, never as a debug dump with a backtrace.
    match cli::dispatch::run(cli::args::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            std::process::ExitCode::FAILURE
        }
    }
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
