//! Flags of `launch`.

use clap::Args;
use std::ffi::OsString;

#[derive(Args)]
pub struct LaunchArgs {
    /// Processes (ranks) to start on this node, one per GPU.
    #[arg(long)]
    pub nproc_per_node: usize,
    /// Nodes in the job (more than one: pass --master-addr and --master-port on every node).
    #[arg(long, default_value_t = 1)]
    pub nnodes: usize,
    /// This node's place among the nodes, 0..nnodes-1.
    #[arg(long, default_value_t = 0)]
    pub node_rank: usize,
    /// Rank 0's host (default 127.0.0.1).
    #[arg(long)]
    pub master_addr: Option<String>,
    /// Rank 0's rendezvous port (default: a free port, one node only).
    #[arg(long)]
    pub master_port: Option<u16>,
    /// Seconds the other ranks get to exit on their own once one has failed, before they are killed.
    #[arg(long, default_value_t = 10.0)]
    pub grace: f64,
    /// What every rank runs, after `--`: a topcoat command (`pretrain --data ...`) or any program.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}
