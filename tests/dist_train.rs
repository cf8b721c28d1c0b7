//! Data-parallel training: the step loop across ranks equals one process with the same global
//! batch; the accumulate op on every backend; the run-config checks of ranks and batch sizes.
//!
//! The loop tests run W ranks as W threads of this process over an in-memory collective that
//! sums in rank order (the host collective's contract), so they specify the loop's arithmetic
//! alone; the command-line tests, which start real processes, are in dist_train_launched.rs.

mod common;

use common::cli::prepare_small_corpus;

use std::path::Path;
use std::rc::Rc;
use std::sync::{Arc, Barrier, Mutex};
use topcoat::backend::cpu::CpuBackend;
use topcoat::backend::{Backend, Role};
use topcoat::commands::stage::ranked;
use topcoat::config::{ModelConfig, RunConfig};
use topcoat::data::Tokenizer;
use topcoat::dist::{Collective, DistError, RankInfo};
use topcoat::model::Gpt;
use topcoat::rng::Rng;
use topcoat::stages::pretrain::Pretrain;
use topcoat::train::{self, TrainOptions, TrainSummary};

// ---- the accumulate op ---------------------------------------------------------------------

/// `acc += x` equals the host sum bit for bit (an odd length: the vector body and the tail),
/// and a length mismatch is named.
fn accumulate_adds_elementwise<B: Backend>(be: &B) {
    let mut rng = Rng::new(0xACC);
    let n = 4099;
    let a = common::randn(&mut rng, n, 1.0);
    let x = common::randn(&mut rng, n, 0.5);
    let mut acc = be.upload(&a, Role::Grad).unwrap();
    let xb = be.upload(&x, Role::Grad).unwrap();
    be.accumulate(&mut acc, &xb).unwrap();
    let want: Vec<f32> = a.iter().zip(&x).map(|(p, q)| p + q).collect();
    assert_eq!(be.download(&acc).unwrap(), want);
    let short = be.upload(&x[..n - 1], Role::Grad).unwrap();
    let e = be.accumulate(&mut acc, &short).unwrap_err().to_string();
    assert!(
        e.contains("accumulate") && e.contains(&format!("{}", n - 1)),
        "{e}"
    );
}

backend_tests!(accumulate_adds_elementwise => accumulate_cpu, accumulate_cuda);

// ---- an in-memory collective: ranks as threads ---------------------------------------------

/// What the ranks' threads share: one slot per rank and a barrier.
struct Shared {
    slots: Mutex<Vec<Vec<f64>>>,
    bytes: Mutex<Vec<u8>>,
    barrier: Barrier,
}

/// Sums in rank order (0, 1, 2, ...) like the host collective; synchronous.
struct Threads {
    info: RankInfo,
    shared: Arc<Shared>,
}

impl Threads {
    fn sum(&self, values: &mut [f64]) {
        let r = self.info.rank;
        self.shared.slots.lock().unwrap()[r] = values.to_vec();
        self.shared.barrier.wait();
        {
            let slots = self.shared.slots.lock().unwrap();
            values.copy_from_slice(&slots[0]);
            for other in &slots[1..] {
                for (v, o) in values.iter_mut().zip(other) {
                    *v += o;
                }
            }
        }
        self.shared.barrier.wait();
    }
}

impl Collective<CpuBackend> for Threads {
    fn info(&self) -> &RankInfo {
        &self.info
    }
    fn engine(&self) -> String {
        "threads (test)".into()
    }
    fn all_reduce_sum(&self, be: &CpuBackend, bufs: &mut [&mut Vec<f32>]) -> Result<(), DistError> {
        for buf in bufs.iter_mut() {
            // f32 sums in rank order, as the engines do (the f64 slot carries f32 values).
            let r = self.info.rank;
            let mine = be.download(buf).unwrap();
            self.shared.slots.lock().unwrap()[r] = mine.iter().map(|&v| v as f64).collect();
            self.shared.barrier.wait();
            {
                let slots = self.shared.slots.lock().unwrap();
                for (i, v) in buf.iter_mut().enumerate() {
                    let mut acc = slots[0][i] as f32;
                    for other in &slots[1..] {
                        acc += other[i] as f32;
                    }
                    *v = acc;
                }
            }
            self.shared.barrier.wait();
        }
        Ok(())
    }
    fn reduce_sum(
        &self,
        be: &CpuBackend,
        bufs: &mut [&mut Vec<f32>],
        _root: usize,
    ) -> Result<(), DistError> {
        self.all_reduce_sum(be, bufs)
    }
    fn broadcast(
        &self,
        _be: &CpuBackend,
        bufs: &mut [&mut Vec<f32>],
        root: usize,
    ) -> Result<(), DistError> {
        for buf in bufs.iter_mut() {
            let mut v: Vec<f64> = buf
                .iter()
                .map(|&x| {
                    if self.info.rank == root {
                        x as f64
                    } else {
                        0.0
                    }
                })
                .collect();
            self.sum(&mut v);
            buf.iter_mut().zip(v).for_each(|(b, x)| *b = x as f32);
        }
        Ok(())
    }
    fn wait(&self, _be: &CpuBackend) -> Result<(), DistError> {
        Ok(())
    }
    fn all_reduce_host(&self, values: &mut [f64]) -> Result<(), DistError> {
        self.sum(values);
        Ok(())
    }
    fn broadcast_bytes(&self, bytes: Vec<u8>, root: usize) -> Result<Vec<u8>, DistError> {
        if self.info.rank == root {
            *self.shared.bytes.lock().unwrap() = bytes;
        }
        self.shared.barrier.wait();
        let out = self.shared.bytes.lock().unwrap().clone();
        self.shared.barrier.wait();
        Ok(out)
    }
}

// ---- the loop across ranks -----------------------------------------------------------------

const B: usize = 2;
const T: usize = 16;

fn run_config(total_batch_tokens: usize) -> RunConfig {
    RunConfig {
        batch_size: B,
        seq_len: T,
        total_batch_tokens,
        max_steps: 4,
        warmup_steps: 1,
        val_every: 0,
        checkpoint_every: 0,
        ..RunConfig::default()
    }
}

/// Trains `run` as rank `rank` of `world` with `comm`; returns the summary and the weights.
fn train_rank(
    data: &Path,
    out: &Path,
    run: &RunConfig,
    rank: usize,
    world: usize,
    comm: Rc<dyn Collective<CpuBackend>>,
) -> (TrainSummary, Vec<Vec<f32>>) {
    let be = CpuBackend;
    let tok = Tokenizer::load(data.join("tokenizer.json")).unwrap();
    let cfg = ModelConfig::preset("tiny", tok.vocab_size()).unwrap();
    let mut model = Gpt::init(&be, &cfg, run.seed).unwrap();
    let mut objective =
        Pretrain::open(data, B, T, run.seed, rank, world, cfg.vocab_size, 0).unwrap();
    let opts = TrainOptions {
        run: RunConfig {
            rank,
            world_size: world,
            ..run.clone()
        },
        out_dir: out.to_path_buf(),
        resume: false,
        keep_checkpoints: 0,
        quiet: true,
    };
    let summary = train::train(&be, &comm, &mut model, &mut objective, &tok, &opts).unwrap();
    (summary, model.param_values(&be).unwrap())
}

/// W ranks (threads) with `run`; rank 0's summary and weights (every rank's weights equal).
fn train_threads(
    data: &Path,
    out: &Path,
    run: &RunConfig,
    world: usize,
) -> (TrainSummary, Vec<Vec<f32>>) {
    let shared = Arc::new(Shared {
        slots: Mutex::new(vec![Vec::new(); world]),
        bytes: Mutex::new(Vec::new()),
        barrier: Barrier::new(world),
    });
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let shared = shared.clone();
                scope.spawn(move || {
                    let info = RankInfo {
                        rank,
                        world_size: world,
                        local_rank: rank,
                        launcher: "threads (test)".into(),
                    };
                    let comm: Rc<dyn Collective<CpuBackend>> = Rc::new(Threads { info, shared });
                    train_rank(data, out, run, rank, world, comm)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, (_, w)) in results.iter().enumerate().skip(1) {
        assert!(
            *w == results[0].1,
            "rank {r}'s weights differ from rank 0's"
        );
    }
    results.into_iter().next().unwrap()
}

fn losses(s: &TrainSummary) -> Vec<(usize, u32)> {
    s.train_losses
        .iter()
        .map(|&(k, l)| (k, l.to_bits()))
        .collect()
}

/// `||a - b|| / ||b||` over all weights at once.
fn max_rel_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let flat = |v: &[Vec<f32>]| v.iter().flatten().copied().collect::<Vec<f32>>();
    common::rel_err(&flat(a), &flat(b))
}

#[test]
fn ranks_with_one_micro_batch_each_equal_one_process_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    prepare_small_corpus(dir.path());
    let data = dir.path().join("data");
    for world in [2, 3] {
        let run = run_config(B * T * world);
        let (one, w1) = train_rank(
            &data,
            &dir.path().join(format!("one{world}")),
            &run,
            0,
            1,
            train::solo(),
        );
        let (many, wn) = train_threads(&data, &dir.path().join(format!("dp{world}")), &run, world);
        assert_eq!(one.train_losses.len(), 4);
        assert_eq!(
            losses(&many),
            losses(&one),
            "world {world}: loss curves differ"
        );
        assert!(
            wn == w1,
            "world {world}: final weights differ (max rel {})",
            max_rel_diff(&wn, &w1)
        );
        // Only rank 0 wrote a run directory: its metrics hold the same losses.
        let metrics =
            std::fs::read_to_string(dir.path().join(format!("dp{world}/metrics.jsonl"))).unwrap();
        assert_eq!(metrics.lines().count(), 4, "{metrics}");
    }
}

/// Two micro-batches per rank: sums in another order than one process's four, so equal within
/// a stated tolerance (relative L2 distance of all weights after 4 steps), not bit for bit.
const ACCUM_TOLERANCE: f64 = 1e-5;

#[test]
fn ranks_with_two_micro_batches_each_equal_one_process_within_tolerance() {
    let dir = tempfile::tempdir().unwrap();
    prepare_small_corpus(dir.path());
    let data = dir.path().join("data");
    let run = run_config(B * T * 4);
    let (one, w1) = train_rank(&data, &dir.path().join("one"), &run, 0, 1, train::solo());
    let (two, w2) = train_threads(&data, &dir.path().join("dp"), &run, 2);
    for ((k, a), (_, b)) in one.train_losses.iter().zip(&two.train_losses) {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs(),
            "step {k}: loss {b} vs one process {a}"
        );
    }
    let d = max_rel_diff(&w2, &w1);
    println!("relative weight distance after 4 steps: {d:.3e}");
    assert!(
        d > 0.0 && d <= ACCUM_TOLERANCE,
        "relative weight distance {d}"
    );
}

// ---- refusals ------------------------------------------------------------------------------

#[test]
fn a_global_batch_not_divisible_by_the_ranks_is_refused_by_name() {
    let run = run_config(B * T * 3);
    assert_eq!(train::local_accum(&run, 3).unwrap(), 1);
    assert_eq!(train::local_accum(&run, 1).unwrap(), 3);
    assert_eq!(train::local_accum(&run_config(0), 4).unwrap(), 1);
    let e = train::local_accum(&run, 2).unwrap_err().to_string();
    assert!(
        e.contains("total_batch_tokens 96") && e.contains("2 * 16 * 2 = 64"),
        "{e}"
    );
}

#[test]
fn a_run_config_naming_other_ranks_than_the_launcher_is_refused() {
    let info = RankInfo {
        rank: 1,
        world_size: 2,
        local_rank: 1,
        launcher: "torchrun".into(),
    };
    let got = ranked(&RunConfig::default(), &info, "pretrain").unwrap();
    assert_eq!((got.rank, got.world_size), (1, 2));
    let set = RunConfig {
        rank: 0,
        world_size: 4,
        ..RunConfig::default()
    };
    let e = ranked(&set, &info, "pretrain").err().unwrap().to_string();
    assert!(
        e.contains("world_size = 4") && e.contains("this process is rank 1 of 2 (torchrun)"),
        "{e}"
    );
}
