//! Data-parallel training: the step loop across ranks equals one process with the same global
//! batch; the accumulate op on every backend; the run-config checks of ranks and batch sizes.
//!
//! The loop tests run W ranks as W threads of this process over an in-memory collective that
//! sums in rank order (the host collective's contract), so they specify the loop's arithmetic
//! alone; the command-line tests start real processes.

mod common;

use common::cli::{fails, prepare_small_corpus, s};
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

#[test]
fn nccl_on_the_cpu_is_refused_at_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    prepare_small_corpus(dir.path());
    let e = fails(&[
        "pretrain",
        "--data",
        &s(&dir.path().join("data")),
        "--out",
        &s(&dir.path().join("run")),
        "--device",
        "cpu",
        "--collective",
        "nccl",
    ]);
    assert!(e.contains("--collective nccl"), "{e}");
}

// ---- processes: `topcoat launch` and the torchrun variables by hand ------------------------

const BIN: &str = env!("CARGO_BIN_EXE_topcoat");

/// `pretrain` on the CPU, B=2, T=16, `steps` steps with a checkpoint every 2, global batch
/// `total` tokens, no validation.
fn pretrain(data: &Path, out: &Path, steps: usize, total: usize, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "pretrain",
        "--data",
        &s(data),
        "--out",
        &s(out),
        "--device",
        "cpu",
        "--max-steps",
        &steps.to_string(),
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--total-batch-tokens",
        &total.to_string(),
        "--val-every",
        "0",
        "--checkpoint-every",
        "2",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

fn launch(n: usize, args: &[String]) -> String {
    let mut a = vec![
        "launch".to_string(),
        "--nproc-per-node".into(),
        n.to_string(),
        "--".into(),
        BIN.into(),
    ];
    a.extend(args.iter().cloned());
    common::cli::ok(&a)
}

/// Each step record's step, loss and gradient norm, as written (no times).
fn curve(out: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r.get("loss").is_some())
        .map(|r| format!("{} {} {}", r["step"], r["loss"], r["grad_norm"]))
        .collect()
}

/// The newest checkpoint's model.safetensors.
fn final_weights(out: &Path) -> Vec<u8> {
    let dir = topcoat::train::checkpoint::latest(out)
        .unwrap()
        .expect("a checkpoint");
    std::fs::read(dir.join("model.safetensors")).unwrap()
}

#[test]
fn launched_ranks_equal_one_process_bit_for_bit_and_zero_1_too() {
    let dir = tempfile::tempdir().unwrap();
    prepare_small_corpus(dir.path());
    let (data, p) = (dir.path().join("data"), |n: &str| dir.path().join(n));
    let zero = p("zero.toml");
    std::fs::write(&zero, "zero = 1\n").unwrap();
    for n in [2usize, 3] {
        let total = 2 * 16 * n;
        common::cli::ok(&pretrain(&data, &p(&format!("one{n}")), 4, total, &[]));
        let out = launch(n, &pretrain(&data, &p(&format!("dp{n}")), 4, total, &[]));
        assert!(
            out.contains(&format!("rank 0 of {n}")),
            "device line: {out}"
        );
        let one = curve(&p(&format!("one{n}")));
        assert_eq!(one.len(), 4);
        assert_eq!(curve(&p(&format!("dp{n}"))), one, "{n} ranks");
        assert!(final_weights(&p(&format!("dp{n}"))) == final_weights(&p(&format!("one{n}"))));
        let cfg = ["--config".to_string(), s(&zero)];
        let cfg: Vec<&str> = cfg.iter().map(|x| x.as_str()).collect();
        launch(n, &pretrain(&data, &p(&format!("z{n}")), 4, total, &cfg));
        assert_eq!(curve(&p(&format!("z{n}"))), one, "{n} ranks, zero 1");
        assert!(final_weights(&p(&format!("z{n}"))) == final_weights(&p(&format!("one{n}"))));
    }
}

/// A free TCP port on the loopback interface.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts `topcoat args` as rank `rank` of `world` with torchrun's variables set by hand.
fn by_hand(
    rank: usize,
    world: usize,
    port: u16,
    args: &[String],
    extra_env: &[(&str, &str)],
) -> std::process::Child {
    let mut c = std::process::Command::new(BIN);
    c.args(args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in extra_env {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

/// Stated time for the surviving rank to exit after its peer dies (the dead rank's sockets
/// close at once; the collective names it on the next operation).
const FAULT_EXIT: std::time::Duration = std::time::Duration::from_secs(20);

#[test]
fn torchrun_variables_by_hand_train_and_a_killed_rank_stops_the_other_then_resume_continues() {
    let dir = tempfile::tempdir().unwrap();
    prepare_small_corpus(dir.path());
    let (data, p) = (dir.path().join("data"), |n: &str| dir.path().join(n));
    let total = 2 * 16 * 2;
    // The uninterrupted references: one process and two ranks, 6 steps.
    common::cli::ok(&pretrain(&data, &p("one"), 6, total, &[]));
    let port = free_port();
    let args = pretrain(&data, &p("hand"), 6, total, &[]);
    let kids: Vec<_> = (0..2).map(|r| by_hand(r, 2, port, &args, &[])).collect();
    for (r, k) in kids.into_iter().enumerate() {
        let o = k.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "rank {r}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert_eq!(curve(&p("hand")), curve(&p("one")));
    assert!(final_weights(&p("hand")) == final_weights(&p("one")));

    // Rank 1 aborts at step 3 (after the checkpoint of step 2): rank 0 exits with an error
    // naming rank 1, in the stated time, and the checkpoint of step 2 stays whole.
    let port = free_port();
    let args = pretrain(&data, &p("fault"), 6, total, &[]);
    let started = std::time::Instant::now();
    let kids: Vec<_> = (0..2)
        .map(|r| by_hand(r, 2, port, &args, &[(train::FAULT_ENV, "1:3")]))
        .collect();
    let outs: Vec<_> = kids
        .into_iter()
        .map(|k| k.wait_with_output().unwrap())
        .collect();
    let took = started.elapsed();
    let err0 = String::from_utf8_lossy(&outs[0].stderr).to_string();
    assert!(!outs[0].status.success() && !outs[1].status.success());
    assert!(err0.contains("rank 1"), "rank 0's error: {err0}");
    assert!(took < FAULT_EXIT, "{took:?}");
    let last = topcoat::train::checkpoint::latest(&p("fault"))
        .unwrap()
        .unwrap();
    assert!(
        last.ends_with(topcoat::train::checkpoint::dir_for(Path::new(""), 2)),
        "{}",
        last.display()
    );
    // (Resuming below reads it through its manifest's checksums.)

    // Resume it at world size 2 and at 1: both end with the uninterrupted run's weights.
    let copy = p("fault1");
    common::cli::copy_dir(&p("fault"), &copy);
    launch(2, &pretrain(&data, &p("fault"), 6, total, &["--resume"]));
    assert_eq!(
        curve(&p("fault")),
        curve(&p("one")),
        "resumed at world size 2"
    );
    assert!(final_weights(&p("fault")) == final_weights(&p("one")));
    common::cli::ok(&pretrain(&data, &copy, 6, total, &["--resume"]));
    assert_eq!(curve(&copy), curve(&p("one")), "resumed at world size 1");
    assert!(final_weights(&copy) == final_weights(&p("one")));
}

#[test]
fn launched_sft_ranks_equal_one_process_bit_for_bit_packed_or_not() {
    let dir = tempfile::tempdir().unwrap();
    prepare_small_corpus(dir.path());
    let (data, p) = (dir.path().join("data"), |n: &str| dir.path().join(n));
    common::cli::ok(&pretrain(&data, &p("base"), 2, 32, &[]));
    let words = ["one", "two", "three", "four", "five", "six", "seven"];
    let chats: Vec<String> = (0..40)
        .map(|i| {
            let ask = words[..1 + (i * 5) % 7].join(" ");
            format!(
                r#"{{"messages": [{{"role": "user", "content": "Repeat {ask} ({i})."}}, {{"role": "assistant", "content": "{ask}, done."}}]}}"#
            )
        })
        .collect();
    std::fs::write(p("chats.jsonl"), chats.join("\n")).unwrap();
    common::cli::ok(&[
        "prepare",
        "sft",
        &s(&p("chats.jsonl")),
        "--out",
        &s(&p("sft")),
        "--tokenizer",
        &s(&data),
    ]);
    for pack in [false, true] {
        let args = |out: &str| -> Vec<String> {
            let mut a: Vec<String> = [
                "sft",
                "--init",
                &s(&p("base")),
                "--data",
                &s(&p("sft")),
                "--out",
                &s(&p(out)),
                "--device",
                "cpu",
                "--max-steps",
                "3",
                "--batch-size",
                "2",
                "--seq-len",
                "64",
                "--total-batch-tokens",
                "256",
                "--val-every",
                "0",
            ]
            .iter()
            .map(|x| x.to_string())
            .collect();
            if pack {
                a.push("--pack".into());
            }
            a
        };
        let (one, dp) = (format!("sft_one_{pack}"), format!("sft_dp_{pack}"));
        common::cli::ok(&args(&one));
        launch(2, &args(&dp));
        let want = curve(&p(&one));
        assert_eq!(want.len(), 3);
        assert_eq!(curve(&p(&dp)), want, "sft, pack = {pack}");
        assert!(
            final_weights(&p(&dp)) == final_weights(&p(&one)),
            "sft, pack = {pack}"
        );
    }
}

#[test]
fn launched_dpo_ranks_equal_one_process_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    prepare_small_corpus(dir.path());
    let (data, p) = (dir.path().join("data"), |n: &str| dir.path().join(n));
    common::cli::ok(&pretrain(&data, &p("base"), 2, 32, &[]));
    let things = [
        "the sky", "grass", "snow", "coal", "a lemon", "the sea", "milk", "a leaf",
    ];
    let lines: Vec<String> = (0..32)
        .map(|i| {
            let x = things[i % things.len()];
            serde_json::json!({
                "prompt": format!("What color is {x} ({i})?"),
                "chosen": format!("It is colour {i}."),
                "rejected": "no",
            })
            .to_string()
        })
        .collect();
    std::fs::write(p("prefs.jsonl"), lines.join("\n")).unwrap();
    common::cli::ok(&[
        "prepare",
        "prefs",
        &s(&p("prefs.jsonl")),
        "--out",
        &s(&p("prefs")),
        "--tokenizer",
        &s(&data),
    ]);
    let args = |out: &str| -> Vec<String> {
        [
            "dpo",
            "--init",
            &s(&p("base")),
            "--data",
            &s(&p("prefs")),
            "--out",
            &s(&p(out)),
            "--device",
            "cpu",
            "--max-steps",
            "3",
            "--batch-size",
            "2",
            "--seq-len",
            "64",
            "--total-batch-tokens",
            "256",
            "--val-every",
            "0",
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    common::cli::ok(&args("dpo_one"));
    launch(2, &args("dpo_dp"));
    let want = curve(&p("dpo_one"));
    assert_eq!(want.len(), 3);
    assert_eq!(curve(&p("dpo_dp")), want);
    assert!(final_weights(&p("dpo_dp")) == final_weights(&p("dpo_one")));
}

/// Set-up that writes shared files runs on rank 0 first; when it fails there, the other ranks
/// stop with rank 0's message rather than racing it or waiting out a timeout.
#[test]
fn a_set_up_failure_on_rank_0_stops_the_other_ranks_with_its_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let started = std::time::Instant::now();
    let t = common::cli::fails(&[
        "launch",
        "--nproc-per-node",
        "2",
        "--",
        BIN,
        "pretrain",
        "--out",
        &out.to_string_lossy(),
        "--device",
        "cpu",
        "--preset",
        "nope",
    ]);
    assert!(t.contains("unknown preset `nope`"), "{t}");
    assert!(
        t.contains("rank 0: failed before training: unknown preset `nope`"),
        "rank 1 names rank 0 and its error: {t}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "no rank waits for a timeout"
    );
    assert!(
        !out.join("data").exists(),
        "nothing was prepared for a run that cannot start"
    );
}
