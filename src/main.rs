//! The `topcoat` command line (being written).
fn main() {}
