//! Model sizes and activation recompute: gradients at recompute 0, 1 and 2 are the same bit
//! for bit (plain and packed rows), the activations allocated shrink as the memory plan says,
//! the plan of gpt2-1558m against hand arithmetic, and the shape flags and keys of the CLI
//! (`pretrain`, `info`, `bench`) with their named errors.

mod common;

use common::cli::{fails, ok, prepare_small_corpus, s};
use topcoat::backend::cpu::CpuBackend;
use topcoat::backend::{Backend, Role};
use topcoat::config::ModelConfig;
use topcoat::model::{Gpt, MemoryPlan, Packing, PlanOptions};
use topcoat::rng::Rng;

/// A random small shape (two layers or three, widths that divide) for a fresh seed.
fn random_config(rng: &mut Rng) -> ModelConfig {
    let n_head = 1 + rng.below(3) as usize;
    let vocab_size = 40 + rng.below(30) as usize;
    ModelConfig {
        vocab_size,
        padded_vocab_size: vocab_size.div_ceil(64) * 64,
        n_layer: 2 + rng.below(2) as usize,
        n_head,
        n_embd: n_head * 8 * (1 + rng.below(2) as usize),
        max_seq_len: 32,
        family: Default::default(),
        lora: None,
    }
}

/// Random ids below `v`; targets with about one in five masked (-1).
fn tokens(rng: &mut Rng, n: usize, v: usize, masked: bool) -> Vec<i32> {
    (0..n)
        .map(|_| {
            if masked && rng.below(5) == 0 {
                -1
            } else {
                rng.below(v as u64) as i32
            }
        })
        .collect()
}

/// Loss bits and every gradient's bits after two accumulated micro-batches at `level`.
fn grads_at<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    seed: u64,
    batches: &[(Vec<i32>, Vec<i32>)],
    packing: Option<&Packing>,
    (b, t): (usize, usize),
    level: u8,
) -> (Vec<u32>, Vec<Vec<u32>>) {
    let mut model = Gpt::init(be, cfg, seed).unwrap();
    model.set_recompute(level).unwrap();
    let mut losses = Vec::new();
    for (inputs, targets) in batches {
        let loss = model
            .forward_backward_with(be, inputs, targets, packing, b, t, 0.5)
            .unwrap();
        losses.push(loss.mean.to_bits());
    }
    let grads = model.grad_values(be).unwrap();
    let bits = grads
        .iter()
        .map(|g| g.iter().map(|x| x.to_bits()).collect())
        .collect();
    (losses, bits)
}

/// Recompute changes what is kept, never the arithmetic: the CPU gradients of every parameter
/// and the losses are bit-identical at levels 0, 1 and 2, for plain and packed rows.
#[test]
fn recompute_gives_bit_identical_gradients_cpu() {
    let be = CpuBackend::new();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut rng = Rng::new(seed);
    let cfg = random_config(&mut rng);
    let (b, t) = (2 + rng.below(2) as usize, 12 + rng.below(8) as usize);
    let v = cfg.vocab_size;
    let batches: Vec<_> = (0..2)
        .map(|_| {
            (
                tokens(&mut rng, b * t, v, false),
                tokens(&mut rng, b * t, v, true),
            )
        })
        .collect();
    // Each row holds two examples kept apart (the packed path's attention differs).
    let lengths: Vec<Vec<usize>> = (0..b)
        .map(|_| {
            let first = 1 + rng.below(t as u64 - 2) as usize;
            vec![first, t - first]
        })
        .collect();
    let packing = Packing::from_lengths(&lengths, t).unwrap();
    for pack in [None, Some(&packing)] {
        let base = grads_at(&be, &cfg, seed, &batches, pack, (b, t), 0);
        assert!(
            base.1.iter().flatten().any(|&x| x != 0),
            "gradients are zero"
        );
        for level in [1, 2] {
            let other = grads_at(&be, &cfg, seed, &batches, pack, (b, t), level);
            assert_eq!(base.0, other.0, "loss at recompute {level} (seed {seed})");
            for (i, (g0, g)) in base.1.iter().zip(&other.1).enumerate() {
                assert!(
                    g0 == g,
                    "tensor {i} gradient at recompute {level}, packed {} (seed {seed})",
                    pack.is_some()
                );
            }
        }
    }
}

/// The reward model's backward (from the final hidden state, not the logits) goes through the
/// same recompute: its gradients are bit-identical at levels 0, 1 and 2 too.
#[test]
fn recompute_gives_bit_identical_reward_gradients_cpu() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(std::process::id() as u64 ^ 0xbeef);
    let cfg = random_config(&mut rng);
    let (b, t) = (3, 10);
    let inputs = tokens(&mut rng, b * t, cfg.vocab_size, false);
    let last: Vec<usize> = (0..b).map(|_| rng.below(t as u64) as usize).collect();
    let drewards: Vec<f32> = (0..b).map(|_| rng.normal()).collect();
    let at = |level| {
        let mut model = Gpt::init(&be, &cfg, 5).unwrap();
        model.init_reward_head(&be, 6).unwrap();
        model.set_recompute(level).unwrap();
        let pass = model.reward_forward(&be, &inputs, b, t, &last).unwrap();
        model
            .reward_backward(&be, &inputs, &pass, &drewards)
            .unwrap();
        let grads = model.grad_values(&be).unwrap();
        let bits: Vec<Vec<u32>> = grads
            .iter()
            .map(|g| g.iter().map(|x| x.to_bits()).collect())
            .collect();
        (
            pass.rewards.iter().map(|r| r.to_bits()).collect::<Vec<_>>(),
            bits,
        )
    };
    let base = at(0);
    assert!(
        base.1.iter().flatten().any(|&x| x != 0),
        "gradients are zero"
    );
    for level in [1, 2] {
        assert!(at(level) == base, "reward gradients at recompute {level}");
    }
}

/// The buffers the model allocates shrink by what the plan says, and a level out of range is
/// refused.
#[test]
fn activation_bytes_follow_the_plan() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(7);
    let cfg = random_config(&mut rng);
    let (b, t) = (3, 16);
    let (n, c, l) = (b * t, cfg.n_embd, cfg.n_layer);
    let mut model = Gpt::init(&be, &cfg, 1).unwrap();
    let inputs = tokens(&mut rng, n, cfg.vocab_size, false);
    let mut elems = Vec::new();
    for level in [0, 1, 2] {
        model.set_recompute(level).unwrap();
        model.forward(&be, &inputs, b, t).unwrap();
        let got = model.activation_elements(&be).unwrap();
        let opts = PlanOptions {
            recompute: level,
            ..PlanOptions::default()
        };
        let plan = MemoryPlan::training_with(&cfg, b, t, opts, |_| 4);
        // The plan also counts the backward's scratch (10 NC), the per-position losses (N)
        // and the attention statistics (N NH per layer), none of them Activation buffers
        // of the forward pass.
        let other = 10 * n * c + n + l * n * cfg.n_head;
        // One logit chunk holds every row at this size (the logits are counted apart).
        let acts = plan.activations + plan.logits;
        assert_eq!(acts, 4 * (got + other) as u128, "level {level}");
        elems.push(got);
    }
    assert_eq!(elems[0] - elems[1], 4 * n * c * (l - 1));
    assert_eq!(elems[1] - elems[2], 2 * n * c * l - n * c);
    let e = model.set_recompute(3).unwrap_err().to_string();
    assert!(e.contains("recompute level 3: must be 0, 1 or 2"), "{e}");
}

/// gpt2-1558m (llm.c's d48) by hand: 48 layers of 12 C^2 + 13 C parameters, the tied
/// embedding of 50304 padded rows, 1024 position rows and ln_f; CUDA's storage (bf16 weights
/// and activations, fp32 master, gradients and moments), B=8, T=1024.
#[test]
fn gpt2_1558m_plan_by_hand() {
    let cfg = ModelConfig::preset("gpt2-1558m", 50257).unwrap();
    let (c, l, vp) = (1600u128, 48u128, 50304u128);
    let params = l * (12 * c * c + 13 * c) + vp * c + 1024 * c + 2 * c;
    assert_eq!(params, 1_557_686_400);
    assert_eq!(cfg.num_params() as u128, params);
    let cuda = |r: Role| match r {
        Role::Param | Role::Activation => 2,
        _ => 4,
    };
    let (b, t) = (8usize, 1024usize);
    let n = (b * t) as u128;
    let nc = n * c;
    let plan_at = |recompute, zero, world_size| {
        let opts = PlanOptions {
            recompute,
            zero,
            world_size,
            logit_rows: None,
        };
        MemoryPlan::training_with(&cfg, b, t, opts, cuda)
    };
    let p = plan_at(0, 0, 1);
    assert_eq!(p.weights, 2 * params);
    assert_eq!(p.master, 4 * params);
    assert_eq!(p.grads, 4 * params);
    assert_eq!(p.moments, 8 * params);
    // Per layer: 18 NC + 4 N bf16, N x 25 log-sum-exps fp32; then encoded, ln_f and the
    // scratch (12 NC), ln_f's statistics (2 N) in bf16, losses fp32. The logits apart: one
    // chunk of the chunked classifier, 2^26 / VP = 1334 rows at most, balanced over the
    // ceil(8192 / 1334) = 7 chunks: 1171 rows of VP in bf16, with the chunk's staging (its
    // rows of ln_f and of their gradient, 2 x 1171 x C, bf16) and its 1171 fp32 losses.
    let rest = 2 * (12 * nc + 2 * n) + 4 * n;
    let per_layer = |kept_nc: u128| 2 * (kept_nc * nc + 4 * n) + 4 * n * 25;
    assert_eq!(p.activations, l * per_layer(18) + rest);
    assert_eq!(p.activations, 23_830_528_000 - 2 * n * vp); // 21.4 GiB
    let rows = 1171;
    assert_eq!(rows, 8192u128.div_ceil(8192u128.div_ceil(1334)));
    assert_eq!(p.logits, 2 * rows * vp + 2 * 2 * rows * c + 4 * rows);
    assert_eq!(
        plan_at(1, 0, 1).activations,
        l * per_layer(14) + rest + 2 * 4 * nc
    );
    assert_eq!(
        plan_at(2, 0, 1).activations,
        l * per_layer(12) + rest + 2 * 5 * nc
    );
    // ZeRO-1 over 8 ranks: the master copy and the moments are an eighth (params is a
    // multiple of 8), weights and gradients whole.
    let z = plan_at(0, 1, 8);
    assert_eq!((z.master, z.moments), (4 * params / 8, 8 * params / 8));
    assert_eq!((z.weights, z.grads), (p.weights, p.grads));
    // Over 7 ranks each holds ceil(params / 7) elements.
    assert_eq!(plan_at(0, 1, 7).moments, 8 * params.div_ceil(7));
}

/// The presets of llm.c's d24, d36 and d48.
#[test]
fn the_large_presets() {
    for (name, l, h, c) in [
        ("gpt2-350m", 24, 16, 1024),
        ("gpt2-774m", 36, 20, 1280),
        ("gpt2-1558m", 48, 25, 1600),
    ] {
        let cfg = ModelConfig::preset(name, 50257).unwrap();
        assert_eq!(
            (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.max_seq_len),
            (l, h, c, 1024),
            "{name}"
        );
    }
}

/// `info` without a path describes a configuration: parameters, FLOPs per token, the plan by
/// part with the other recompute levels beside it, and per-rank totals under ZeRO-1.
#[test]
fn info_prints_the_plan_of_a_configuration() {
    let out = ok(&["info", "--preset", "gpt2-1558m", "--batch-size", "8"]);
    for want in [
        "model: gpt2-1558m preset, 48 layers, 25 heads, d=1600, context 1024, vocab 50257 \
         (padded 50304)",
        "parameters: 1557686400 (1557.69 M)",
        // 6 (N - 1024 C) + 12 L C T.
        "FLOPs per token: 1.028e10",
        "B=8, T=1024, recompute 0:",
        "trainable weights    2.90 GiB (1557686400 parameters)",
        // The logits apart: one chunk of 1171 rows of the classifier (seven balanced chunks).
        "activations         21.43 GiB (recompute 1: 16.84 GiB, saves 4.59 GiB; recompute 2: \
         14.52 GiB, saves 6.91 GiB)",
        "logits               0.12 GiB (1171 of 8192 rows x 50304 per chunk)",
        "per rank with ZeRO-1 (--zero 1; master and moments sharded): 2 ranks",
    ] {
        assert!(out.contains(want), "{want:?} not in\n{out}");
    }
    // The shape flags: a 2-layer gpt2-124m at context 128, the CPU's f32 storage.
    let out = ok(&[
        "info",
        "--n-layer",
        "2",
        "--context",
        "128",
        "--backend",
        "cpu",
        "--recompute",
        "2",
    ]);
    let cfg = ModelConfig {
        n_layer: 2,
        max_seq_len: 128,
        ..ModelConfig::preset("gpt2-124m", 50257).unwrap()
    };
    let line = format!("parameters: {} ", cfg.num_params());
    assert!(out.contains(&line), "{line:?} not in\n{out}");
    assert!(
        out.contains("gpt2-124m preset, n_layer 2, context 128, 2 layers, 12 heads"),
        "{out}"
    );
    assert!(out.contains("T=128, recompute 2:"), "{out}");
    assert!(out.contains("    fp32 master          0.00 GiB"), "{out}");
}

/// A shape that cannot be is refused naming the flags (and TOML keys) and the values, from
/// the flags and from a run config, before any data is read.
#[test]
fn bad_shapes_are_named() {
    let want = "n_embd (--n-embd) 1000 is not divisible by n_head (--n-head) 16";
    let e = fails(&["info", "--n-embd", "1000", "--n-head", "16"]);
    assert!(e.contains(want), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let out = s(&dir.path().join("run"));
    let nowhere = s(&dir.path().join("no-data"));
    let e = fails(&[
        "pretrain", "--data", &nowhere, "--out", &out, "--n-embd", "1000", "--n-head", "16",
    ]);
    assert!(e.contains(want), "{e}");
    let toml = dir.path().join("run.toml");
    std::fs::write(&toml, "n_embd = 1000\nn_head = 16\n").unwrap();
    let e = fails(&[
        "pretrain",
        "--data",
        &nowhere,
        "--out",
        &out,
        "--config",
        &s(&toml),
    ]);
    assert!(e.contains(want), "{e}");
    let e = fails(&["info", "--n-layer", "0"]);
    assert!(
        e.contains("n_layer (--n-layer) is 0: must be at least 1"),
        "{e}"
    );
    let e = fails(&["bench", "--recompute", "3"]);
    assert!(e.contains("--recompute") && e.contains("must be 0"), "{e}");
}

/// A fresh model of any shape trains (at recompute 2) and its checkpoint keeps the shape; a
/// longer `seq_len` than `--context` is refused naming both; a stage from that checkpoint
/// refuses shape flags that differ from it, naming both values, and takes ones that match.
#[test]
fn pretrain_a_custom_shape_and_keep_it() {
    let dir = tempfile::tempdir().unwrap();
    prepare_small_corpus(dir.path());
    let data = s(&dir.path().join("data"));
    let run = s(&dir.path().join("run"));
    let shape = [
        "--n-layer",
        "2",
        "--n-head",
        "2",
        "--n-embd",
        "32",
        "--context",
        "24",
    ];
    let common = [
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--max-steps",
        "2",
        "--val-every",
        "0",
    ];
    let e = fails(
        &[
            &[
                "pretrain",
                "--data",
                &data,
                "--out",
                &run,
                "--seq-len",
                "32",
            ][..],
            &shape,
            &common,
        ]
        .concat(),
    );
    assert!(
        e.contains(
            "seq_len 32 exceeds the model's context (max_seq_len 24) of the tiny preset with \
             context (--context) 24"
        ),
        "{e}"
    );
    let args = [
        &[
            "pretrain",
            "--data",
            &data,
            "--out",
            &run,
            "--seq-len",
            "16",
            "--recompute",
            "2",
        ][..],
        &shape,
        &common,
    ]
    .concat();
    let out = ok(&args);
    assert!(
        out.contains("2 layers, 2 heads, d=32, context 24, recompute 2"),
        "{out}"
    );
    let info = ok(&["info", &run]);
    assert!(
        info.contains("model: 2 layers, 2 heads, d=32, max_seq_len 24"),
        "{info}"
    );
    // An sft from it with another width is refused before its data is read.
    let sft_out = s(&dir.path().join("sft"));
    let sft = |extra: &[&str]| {
        let base = [
            "sft",
            "--init",
            &run,
            "--data",
            "no-such-dir",
            "--out",
            &sft_out,
        ];
        fails(&[&base[..], extra].concat())
    };
    let e = sft(&["--n-embd", "64", "--n-layer", "2", "--context", "48"]);
    assert!(
        e.contains("sft: sft starts from")
            && e.contains(
                "n_embd (--n-embd) 64 (the checkpoint has 32), context (--context) 48 \
                           (the checkpoint has 24)"
            )
            && !e.contains("n_layer"),
        "{e}"
    );
    // Matching flags pass that check (and stop at the missing data).
    let e = sft(&["--n-embd", "32"]);
    assert!(
        !e.contains("whose shape is fixed") && e.contains("no-such-dir"),
        "{e}"
    );
}

/// `bench` prints the plan of its configuration before timing, at its recompute level.
#[test]
fn bench_prints_the_plan_and_runs_with_recompute() {
    let out = ok(&[
        "bench",
        "--device",
        "cpu",
        "--n-layer",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--recompute",
        "1",
    ]);
    for want in [
        "model: tiny preset, n_layer 2, 2 layers, 4 heads, d=128",
        "B=2, T=16, recompute 1:",
        "(recompute 0: ",
        "adds",
        "recompute 2: ",
        "saves",
        "| median step ms |",
    ] {
        assert!(out.contains(want), "{want:?} not in\n{out}");
    }
}

/// CUDA (skipped without a device): recompute 1 and 2 give the same gradients bit for bit
/// (both run the GELU kernel, and the fused residual + layernorm kernel rounds as the plain
/// one); level 0's fused cuBLASLt GELU epilogue rounds its GELU differently, so level 0 and 1
/// agree to bf16 accuracy only.
#[test]
fn recompute_on_cuda() {
    let be = match topcoat::backend::cuda::CudaBackend::new(0) {
        Ok(be) => be,
        Err(e) => return println!("skipped: no CUDA device ({e})"),
    };
    let mut rng = Rng::new(0x5eed ^ std::process::id() as u64);
    let cfg = ModelConfig {
        vocab_size: 100,
        padded_vocab_size: 128,
        n_layer: 2,
        n_head: 4,
        n_embd: 64,
        max_seq_len: 64,
        family: Default::default(),
        lora: None,
    };
    let (b, t) = (4, 64);
    let batches: Vec<_> = (0..2)
        .map(|_| {
            (
                tokens(&mut rng, b * t, 100, false),
                tokens(&mut rng, b * t, 100, true),
            )
        })
        .collect();
    let at = |level| grads_at(&be, &cfg, 3, &batches, None, (b, t), level);
    let (g0, g1, g2) = (at(0), at(1), at(2));
    assert_eq!(g1, g2, "recompute 1 and 2 differ on CUDA");
    let floats = |g: &Vec<u32>| g.iter().map(|&x| f32::from_bits(x)).collect::<Vec<_>>();
    for (i, (a, b)) in g0.1.iter().zip(&g1.1).enumerate() {
        let e = common::rel_err(&floats(a), &floats(b));
        assert!(
            e < 2e-2,
            "tensor {i}: recompute 0 vs 1 relative error {e:.1e}"
        );
    }
}
