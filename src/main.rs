//! The `topcoat` command line: parses the flags (`cli/args.rs`), runs the command through the
//! library (`cli/dispatch.rs`, `topcoat::commands`) and prints what it returns (`cli/print.rs`).

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    // Errors print as one readable chain, never as a debug dump with a backtrace.
    match cli::dispatch::run(cli::args::Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
