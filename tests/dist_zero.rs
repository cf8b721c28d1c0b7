//! ZeRO-1 and checkpoints across ranks, on the CPU backend with 2 and 3 ranks in threads
//! joined by the host collective (loopback TCP):
//! sharded updates equal unsharded ones bit for bit, a sharded save writes the same bytes as
//! an unsharded one, a resume at another world size hands each rank its moment shards, and a
//! failure on one rank reaches the others by name.

mod common;

use common::randn;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;
use topcoat::backend::cpu::CpuBackend;
use topcoat::backend::{AdamWStep, Backend, Role};
use topcoat::config::{ModelConfig, RunConfig};
use topcoat::data::Tokenizer;
use topcoat::dist::{rendezvous, Collective, HostCollective, Meeting, RankInfo, Solo};
use topcoat::model::Gpt;
use topcoat::optim::{shard_owners, AdamW};
use topcoat::rng::Rng;
use topcoat::train::checkpoint::{self, TrainState};

/// `world` host collectives (loopback TCP, ports picked by the OS), in rank order.
fn host_group(world: usize) -> Vec<HostCollective> {
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("127.0.0.1:{}", l.local_addr().unwrap().port())
    };
    let joins: Vec<_> = (0..world)
        .map(|rank| {
            let meeting = Meeting::Tcp { addr: addr.clone() };
            std::thread::spawn(move || {
                let info = RankInfo {
                    rank,
                    world_size: world,
                    local_rank: rank,
                    launcher: "test".into(),
                };
                let star = rendezvous(&info, &meeting, Duration::from_secs(10)).unwrap();
                HostCollective::new(star, Duration::from_secs(20)).unwrap()
            })
        })
        .collect();
    joins.into_iter().map(|j| j.join().unwrap()).collect()
}

/// Runs `body(rank's collective)` on `world` ranks in threads; the results in rank order.
fn on_ranks<T: Send>(
    world: usize,
    body: impl Fn(&dyn Collective<CpuBackend>) -> T + Sync,
) -> Vec<T> {
    let group = host_group(world);
    std::thread::scope(|s| {
        let handles: Vec<_> = group
            .iter()
            .map(|c| s.spawn(|| body(c as &dyn Collective<CpuBackend>)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let text = "A cat is a small animal. A dog is a loyal animal. ".repeat(30);
        Tokenizer::train_bpe([text.as_str()].into_iter(), 300, |_, _| {}).unwrap()
    })
}

fn cfg() -> ModelConfig {
    let vocab = tokenizer().vocab_size();
    ModelConfig {
        vocab_size: vocab,
        padded_vocab_size: vocab.div_ceil(64) * 64,
        n_layer: 2,
        n_head: 2,
        n_embd: 16,
        max_seq_len: 16,
        family: Default::default(),
        lora: None,
    }
}

fn run_cfg() -> RunConfig {
    RunConfig {
        weight_decay: 0.1,
        ..RunConfig::default()
    }
}

/// Steps `from..to` of AdamW on `model`, with the same random gradients on every rank (as if
/// already summed) drawn from the step number.
fn steps(
    be: &CpuBackend,
    comm: &dyn Collective<CpuBackend>,
    model: &mut Gpt<CpuBackend>,
    opt: &mut AdamW<CpuBackend>,
    from: u64,
    to: u64,
) {
    for step in from..to {
        let mut rng = Rng::new(1000 + step);
        for g in model.grads.iter_mut().flatten() {
            let n = be.len(g);
            be.write(g, &randn(&mut rng, n, 0.5)).unwrap();
        }
        let lr = 1e-2 / (1 + step) as f32;
        opt.update(be, comm, model, &run_cfg(), lr, 0.75).unwrap();
    }
}

fn state(step: usize, world: usize) -> TrainState {
    TrainState {
        step,
        rng: Rng::new(5),
        data: serde_json::json!({"tokens": 4096}),
        run: RunConfig {
            world_size: world,
            ..run_cfg()
        },
        tokens_seen: 4096,
        elapsed_s: 2.0,
        stage: "pretrain".into(),
    }
}

fn bits(values: &[Vec<f32>]) -> Vec<Vec<u32>> {
    values
        .iter()
        .map(|v| v.iter().map(|x| x.to_bits()).collect())
        .collect()
}

/// The weights and moments (all tensors) of one process with zero 0 after `n` steps.
fn reference(n: u64) -> (Gpt<CpuBackend>, AdamW<CpuBackend>) {
    let be = CpuBackend;
    let mut model = Gpt::init(&be, &cfg(), 42).unwrap();
    let mut opt = AdamW::new(&be, &Solo::new(), &mut model, 0).unwrap();
    steps(&be, &Solo::new(), &mut model, &mut opt, 0, n);
    (model, opt)
}

fn moments(be: &CpuBackend, opt: &AdamW<CpuBackend>) -> Vec<Option<(Vec<f32>, Vec<f32>)>> {
    opt.m
        .iter()
        .zip(&opt.v)
        .map(|(m, v)| {
            Some((
                be.download(m.as_ref()?).unwrap(),
                be.download(v.as_ref()?).unwrap(),
            ))
        })
        .collect()
}

fn zero1_equals_zero0(world: usize) {
    let (ref_model, ref_opt) = reference(5);
    let be = CpuBackend;
    let want_w = bits(&ref_model.param_values(&be).unwrap());
    let want_m = moments(&be, &ref_opt);
    let full = ref_opt.full_state_bytes(&be);
    let per_rank = on_ranks(world, |comm| {
        let mut model = Gpt::init(&be, &cfg(), 42).unwrap();
        let mut opt = AdamW::new(&be, comm, &mut model, 1).unwrap();
        steps(&be, comm, &mut model, &mut opt, 0, 5);
        assert_eq!(
            bits(&model.param_values(&be).unwrap()),
            want_w,
            "rank {}",
            comm.rank()
        );
        for (i, got) in moments(&be, &opt).into_iter().enumerate() {
            match got {
                Some(got) => assert_eq!(Some(got), want_m[i], "moments of tensor {i}"),
                None => assert!(!opt.owns(i)),
            }
        }
        (opt.state_bytes(&be), opt.zero_line(&be).unwrap())
    });
    let total: u64 = per_rank.iter().map(|(b, _)| b).sum();
    assert_eq!(total, full, "the shards partition the state");
    let most = per_rank.iter().map(|(b, _)| *b).max().unwrap();
    assert!(
        most < full / world as u64 + full / 4,
        "balanced: {most} of {full}"
    );
    assert_eq!(
        per_rank[0].1,
        format!(
            "ZeRO-1: optimizer state {:.1} MB on rank 0 instead of {:.1} MB unsharded",
            per_rank[0].0 as f64 / 1e6,
            full as f64 / 1e6
        )
    );
}

#[test]
fn zero1_equals_zero0_bit_for_bit_on_2_ranks() {
    zero1_equals_zero0(2);
}

#[test]
fn zero1_equals_zero0_bit_for_bit_on_3_ranks() {
    zero1_equals_zero0(3);
}

/// Every file of a checkpoint directory, by name.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Checkpoint `ckpt_000004` of 4 steps with zero 1 on 2 ranks, in `run`.
fn save_on_two_ranks(run: &Path) -> PathBuf {
    save_on_ranks(run, 2, 1)
}

/// Checkpoint `ckpt_000004` of 4 steps with ZeRO stage `zero` on `world` ranks, in `run`.
fn save_on_ranks(run: &Path, world: usize, zero: u8) -> PathBuf {
    let be = CpuBackend;
    let dest = checkpoint::dir_for(run, 4);
    let dirs = on_ranks(world, |comm| {
        let mut model = Gpt::init(&be, &cfg(), 42).unwrap();
        let mut opt = AdamW::new(&be, comm, &mut model, zero).unwrap();
        steps(&be, comm, &mut model, &mut opt, 0, 4);
        checkpoint::save_ranked(&be, comm, &dest, &model, tokenizer(), &opt, &state(4, 1)).unwrap()
    });
    assert_eq!(dirs, vec![dest.clone(); world]);
    dest
}

#[test]
fn a_zero1_save_writes_the_bytes_of_a_zero0_save() {
    let tmp = tempfile::tempdir().unwrap();
    let sharded = save_on_two_ranks(&tmp.path().join("sharded"));
    let (model, opt) = reference(4);
    let plain = checkpoint::dir_for(&tmp.path().join("plain"), 4);
    checkpoint::save(
        &CpuBackend,
        &plain,
        &model,
        tokenizer(),
        Some((&opt, &state(4, 1))),
    )
    .unwrap();
    let (a, b) = (files(&sharded), files(&plain));
    assert_eq!(
        a.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        [
            "config.json",
            "manifest.json",
            "model.safetensors",
            "optimizer.safetensors",
            "tokenizer.json",
            "train_state.json"
        ]
    );
    assert!(a == b, "the checkpoints differ");
    for (world, zero) in [(3, 1), (2, 0)] {
        let other = save_on_ranks(&tmp.path().join(format!("w{world}z{zero}")), world, zero);
        assert!(
            files(&other) == b,
            "{world} ranks, zero {zero}: the checkpoints differ"
        );
    }
}

#[test]
fn a_resume_at_3_ranks_from_2_gives_each_rank_its_shards_and_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = save_on_two_ranks(tmp.path());
    let be = CpuBackend;
    let (ref_model, ref_opt) = reference(4);
    let want_m = moments(&be, &ref_opt);
    let numels: Vec<usize> = ref_model.layout.specs.iter().map(|s| s.numel()).collect();
    let owners = shard_owners(&numels, 3);
    let (cont_model, _) = reference(7);
    let want_w = bits(&cont_model.param_values(&be).unwrap());
    on_ranks(3, |comm| {
        let (mut model, mut opt, st) =
            checkpoint::resume_ranked(&be, comm, &dir, &cfg(), "pretrain", 1).unwrap();
        assert_eq!((st.step, opt.step), (4, 4));
        assert_eq!(opt.owner, owners);
        for (i, got) in moments(&be, &opt).into_iter().enumerate() {
            if owners[i] == comm.rank() {
                assert_eq!(got, want_m[i], "rank {} tensor {i}", comm.rank());
            } else {
                assert_eq!(
                    got,
                    None,
                    "rank {} holds tensor {i} of rank {}",
                    comm.rank(),
                    owners[i]
                );
            }
        }
        steps(&be, comm, &mut model, &mut opt, 4, 7);
        assert_eq!(bits(&model.param_values(&be).unwrap()), want_w);
    });
}

#[test]
fn a_failed_save_on_rank_0_reaches_every_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let blocker = tmp.path().join("not_a_dir");
    std::fs::write(&blocker, b"x").unwrap();
    let dest = checkpoint::dir_for(&blocker, 2);
    let be = CpuBackend;
    let errs = on_ranks(3, |comm| {
        let mut model = Gpt::init(&be, &cfg(), 42).unwrap();
        let mut opt = AdamW::new(&be, comm, &mut model, 1).unwrap();
        steps(&be, comm, &mut model, &mut opt, 0, 2);
        checkpoint::save_ranked(&be, comm, &dest, &model, tokenizer(), &opt, &state(2, 3))
            .unwrap_err()
            .to_string()
    });
    assert!(
        errs[0].contains(&blocker.display().to_string()),
        "{}",
        errs[0]
    );
    for e in &errs[1..] {
        assert_eq!(
            *e,
            format!(
                "checkpoint {}: rank 0 failed to save it: {}",
                dest.display(),
                errs[0]
            )
        );
    }
}

#[test]
fn a_rank_that_cannot_read_the_checkpoint_stops_every_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = save_on_two_ranks(tmp.path());
    let missing = tmp.path().join("elsewhere").join("ckpt_000004");
    let be = CpuBackend;
    let errs = on_ranks(2, |comm| {
        let at = if comm.rank() == 1 { &missing } else { &dir };
        checkpoint::resume_ranked(&be, comm, at, &cfg(), "pretrain", 1)
            .err()
            .unwrap()
            .to_string()
    });
    assert_eq!(
        errs[0],
        format!(
            "checkpoint {}: rank(s) 1 could not read it; every rank reads the checkpoint itself, \
             so the run directory must be on a filesystem all ranks share (docs/DISTRIBUTED.md)",
            dir.display()
        )
    );
    assert!(
        errs[1].contains(&missing.display().to_string()),
        "{}",
        errs[1]
    );
}

#[test]
fn a_non_finite_tensor_owned_by_rank_1_stops_the_save_on_every_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = checkpoint::dir_for(tmp.path(), 2);
    let be = CpuBackend;
    let errs = on_ranks(2, |comm| {
        let mut model = Gpt::init(&be, &cfg(), 42).unwrap();
        let mut opt = AdamW::new(&be, comm, &mut model, 1).unwrap();
        steps(&be, comm, &mut model, &mut opt, 0, 2);
        let i = opt.owner.iter().position(|&r| r == 1).unwrap();
        let mut w = be.download(&model.params[i]).unwrap();
        w[1] = f32::NAN;
        be.write(&mut model.params[i], &w).unwrap();
        let err =
            checkpoint::save_ranked(&be, comm, &dest, &model, tokenizer(), &opt, &state(2, 2))
                .unwrap_err();
        (model.layout.specs[i].name.clone(), err.to_string())
    });
    for (name, err) in &errs {
        assert_eq!(
            *err,
            format!(
                "checkpoint {}: the weight {name} is not finite, so it is not saved",
                dest.display()
            )
        );
    }
    assert!(!dest.exists());
}

/// After `release_master` a parameter still downloads and takes writes (its bf16 values, which
/// `randn` draws exactly); a backend that kept a separate fp32 master refuses AdamW on it by name.
fn release_master_keeps_the_working_copy<B: Backend>(be: &B) {
    let mut rng = Rng::new(77);
    let values = randn(&mut rng, 96, 0.5);
    let mut p = be.upload(&values, Role::Param).unwrap();
    be.release_master(&mut p).unwrap();
    assert_eq!(be.download(&p).unwrap(), values);
    let again = randn(&mut rng, 96, 0.5);
    be.write(&mut p, &again).unwrap();
    assert_eq!(be.download(&p).unwrap(), again);
    let g = be.upload(&randn(&mut rng, 96, 0.1), Role::Grad).unwrap();
    let (mut m, mut v) = (
        be.zeros(96, Role::State).unwrap(),
        be.zeros(96, Role::State).unwrap(),
    );
    let hp = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 1,
        grad_scale: 1.0,
    };
    let res = be.adamw(&mut p, &g, &mut m, &mut v, &hp);
    if be.element_bytes(Role::Param) < 4 {
        let e = res.unwrap_err().to_string();
        assert!(e.contains("fp32 master copy was released (ZeRO-1"), "{e}");
    } else {
        res.unwrap();
    }
}

backend_tests!(release_master_keeps_the_working_copy => release_master_cpu, release_master_cuda);
