//! The binary's own modules: the flags (`args.rs`), one function per command that turns flags
//! into a library job and prints the result (`dispatch.rs`, `bench.rs`), and the printed
//! lines and tables (`print.rs`). Nothing here computes; the library's `commands` do.

pub mod args;
mod bench;
pub mod dispatch;
mod print;
