//! The memory budget of a workstation run (the plan's arithmetic, no GPU): the
//! llama-3.1-8b preset's size; LoRA rank 16 on Llama-3.1-8B at 1 x 2048 with recompute 2
//! fits 24 GiB, and Llama-3.2-1B at 8 x 2048 (the 12 GiB target, measured only on a
//! GPU) with its rows printed; the fit advice names a flag that makes the run fit; and the
//! commands print the budget: `plan` its rows, a training run and `bench` the budget and the
//! measured peak.

mod common;
use common::cli::{fails, ok, prepare_small_corpus, s};

use topcoat::backend::Role;
use topcoat::config::{LoraConfig, LoraTarget, ModelConfig};
use topcoat::model::{advise, Advice, BatchFlag, FitQuery, MemoryPlan, PlanOptions};

const GIB: u128 = 1 << 30;

/// CUDA's storage: bf16 weights and activations; fp32 master, gradients, moments, statistics.
fn cuda(r: Role) -> usize {
    match r {
        Role::Param | Role::Activation => 2,
        Role::Grad | Role::State | Role::Stat => 4,
    }
}

fn lora_all(mut cfg: ModelConfig, rank: usize) -> ModelConfig {
    cfg.lora = Some(LoraConfig {
        rank,
        alpha: 2.0 * rank as f32,
        dropout: 0.05,
        targets: LoraTarget::all_for(&cfg),
    });
    cfg.validate().unwrap();
    cfg
}

fn plan(cfg: &ModelConfig, b: usize, t: usize, recompute: u8) -> MemoryPlan {
    let opts = PlanOptions {
        recompute,
        ..PlanOptions::default()
    };
    MemoryPlan::training_with(cfg, b, t, opts, cuda)
}

fn g(bytes: u128) -> f64 {
    bytes as f64 / GIB as f64
}

fn rows(p: &MemoryPlan) -> String {
    format!(
        "frozen {:.2} GiB, trainable {:.3} GiB, master {:.3} GiB, moments {:.3} GiB, \
         gradients {:.3} GiB, activations {:.2}/{:.2}/{:.2} GiB (recompute 0/1/2), logits \
         {:.3} GiB, LoRA kept {:.2} GiB + scratch {:.2} GiB; total {:.2} GiB",
        g(p.frozen),
        g(p.weights),
        g(p.master),
        g(p.moments),
        g(p.grads),
        g(p.activations_at[0]),
        g(p.activations_at[1]),
        g(p.activations_at[2]),
        g(p.logits),
        g(p.lora_kept),
        g(p.lora_scratch),
        g(p.total())
    )
}

/// Llama-3.1-8B's shape: 32 layers of 4096, 32 heads over 8 KV heads, SwiGLU 14336, an
/// untied head; with its 128,256-token vocabulary, 8,030,261,248 parameters (the count
/// Hugging Face gives the model).
#[test]
fn llama_3_1_8b_preset() {
    let cfg = ModelConfig::preset("llama-3.1-8b", 128256).unwrap();
    assert_eq!(cfg.num_params(), 8_030_261_248);
    assert_eq!((cfg.n_layer, cfg.n_head, cfg.n_embd), (32, 32, 4096));
    assert_eq!(cfg.padded_vocab_size, 128256);
    let l = cfg.llama().unwrap();
    assert_eq!((l.n_kv_head, l.intermediate_size), (8, 14336));
    assert!(!l.tie_embeddings && !l.qkv_bias);
    assert_eq!((l.rope_theta, l.rms_eps), (500_000.0, 1e-5));
    let r = l.rope_scaling.as_ref().unwrap();
    assert_eq!(
        (
            r.factor,
            r.low_freq_factor,
            r.high_freq_factor,
            r.original_max_position_embeddings
        ),
        (8.0, 1.0, 4.0, 8192)
    );
    // The layout allocates exactly that many.
    let layout = topcoat::model::ParamLayout::new(&cfg);
    assert_eq!(layout.num_params(), 8_030_261_248);
}

/// LoRA r16 on every projection of Llama-3.1-8B, 1 x 2048 at recompute 2, CUDA storage:
/// the frozen bf16 base is 14.96 GiB, the adapters (42M parameters) with their master,
/// moments and gradients under 1 GiB, and the whole plan fits a 24 GiB card.
#[test]
fn llama_8b_lora_r16_fits_24_gib() {
    let cfg = lora_all(ModelConfig::preset("llama-3.1-8b", 128256).unwrap(), 16);
    let p = plan(&cfg, 1, 2048, 2);
    println!("llama-3.1-8b LoRA r16, 1 x 2048, recompute 2: {}", rows(&p));
    // Per layer: q 16 (4096 + 4096), k and v 16 (4096 + 1024), o 16 (4096 + 4096),
    // gate and up 16 (4096 + 14336), down 16 (14336 + 4096).
    let per_layer = 16 * (2 * 8192 + 2 * 5120 + 3 * 18432) as u128;
    assert_eq!(p.trainable_params, 32 * per_layer);
    assert_eq!(p.trainable_params, 41_943_040);
    assert_eq!(p.frozen, 2 * 8_030_261_248);
    assert_eq!(p.master + p.moments + p.grads, 16 * p.trainable_params);
    assert!(p.total() <= 24 * GIB, "{}", rows(&p));
    // ... and a full fine-tune of it does not come near: its weights alone are 16 bytes each.
    let full = plan(
        &ModelConfig::preset("llama-3.1-8b", 128256).unwrap(),
        1,
        2048,
        2,
    );
    assert!(full.fixed() > 100 * GIB, "{}", rows(&full));
}

/// Llama-3.2-1B with LoRA r16 on every projection, 8 x 2048 at each recompute level: the
/// plan's rows, printed for docs/PERF.md, and its activations by hand. The target is
/// a peak <= 12 GiB measured on a GPU; the plan says 19.3 GiB at recompute 2, 7.3 GiB over,
/// and its activations dominate: each of the 16 blocks keeps the gate/up product (2 x 8192
/// wide), five residual-width rows and q/k/v for all 16,384 positions.
#[test]
fn llama_1b_lora_r16_8x2048() {
    let cfg = lora_all(ModelConfig::preset("llama-3.2-1b", 128256).unwrap(), 16);
    let base = cfg.num_params() as u128;
    let n: u128 = 8 * 2048;
    let mut totals = Vec::new();
    for level in 0..=2 {
        let p = plan(&cfg, 8, 2048, level);
        println!(
            "llama-3.2-1b LoRA r16, 8 x 2048, recompute {level}: {}",
            rows(&p)
        );
        assert_eq!(p.frozen, 2 * base);
        // Per layer: q, o 16 (2048 + 2048); k, v 16 (2048 + 512); gate, up 16 (2048 +
        // 8192); down 16 (8192 + 2048).
        let per_layer = 16 * (2 * 4096 + 2 * 2560 + 3 * 10240) as u128;
        assert_eq!(p.trainable_params, 16 * per_layer);
        // Seven adapters per layer keep N x 16 each. The scratch: the forward's one buffer per
        // distinct output or (dropout) input width {512, 2048, 8192}; the backward's du
        // (N x 16) and dxl per distinct input width {2048, 8192}.
        assert_eq!(p.lora_kept, 2 * 16 * 7 * n * 16);
        assert_eq!(
            p.lora_scratch,
            2 * n * ((512 + 2048 + 8192) + (16 + 2048 + 8192))
        );
        totals.push(p.total());
    }
    // Recompute 2 by hand (C 2048, q/k/v 3072, I 8192, 32 heads): per block and position
    // 5 C + qkv + 2 I in bf16 and 2 + 32 statistics in fp32; shared by the blocks I + C;
    // around them encoded and ln_f (2 C), lnf_mean (1) and the backward's scratch (3 C +
    // qkv + 3 I) in bf16, lnf_rstd and the losses in fp32.
    let (c, qkv, i) = (2048u128, 3072u128, 8192u128);
    let per_block = 2 * (5 * c + qkv + 2 * i) + 4 * (2 + 32);
    let around = 2 * ((i + c) + 2 * c + 1 + 3 * c + qkv + 3 * i) + 4 + 4;
    let p = plan(&cfg, 8, 2048, 2);
    assert_eq!(p.activations, n * (16 * per_block + around));
    assert!(totals[0] > totals[1] && totals[1] > totals[2]);
    let over = g(totals[2]) - 12.0;
    println!(
        "recompute 2: {:.2} GiB planned, {over:.2} GiB over the 12 GiB target; activations {:.2} \
         GiB of it ({:.2} GiB the gate/up products alone)",
        g(totals[2]),
        g(p.activations),
        g(16 * n * 2 * 2 * i)
    );
}

/// For runs that do not fit, the advice names a flag; applied, the run fits, by the same
/// arithmetic. One case per flag, and flags combined where none fits alone.
#[test]
fn the_advice_makes_the_run_fit() {
    let llama_1b = ModelConfig::preset("llama-3.2-1b", 128256).unwrap();
    let llama_8b = ModelConfig::preset("llama-3.1-8b", 128256).unwrap();
    let gpt2 = ModelConfig::preset("gpt2-124m", 50257).unwrap();
    // Between the plans at recompute 0 and 2; 60% of a 64-row batch's plan.
    let between = (plan(&gpt2, 16, 1024, 0).total() + plan(&gpt2, 16, 1024, 2).total()) / 2;
    let smaller = plan(&gpt2, 64, 1024, 2).total() * 3 / 5;
    let cases: [(&ModelConfig, usize, usize, u8, u128, &str); 5] = [
        (&gpt2, 16, 1024, 0, between, "--recompute 2"),
        (&gpt2, 64, 1024, 2, smaller, "--batch-size "),
        (&llama_1b, 1, 2048, 2, 12 * GIB, "--lora-rank 16"),
        (
            &llama_8b,
            1,
            2048,
            0,
            24 * GIB,
            "--recompute 2 --lora-rank 16",
        ),
        (
            &llama_8b,
            4,
            2048,
            0,
            24 * GIB,
            "--recompute 2 --batch-size 1 --lora-rank 16",
        ),
    ];
    for (cfg, b, t, recompute, room, want) in cases {
        let q = FitQuery {
            cfg,
            units: b,
            seq_len: t,
            opts: PlanOptions {
                recompute,
                ..PlanOptions::default()
            },
            batch: BatchFlag::ROWS_LORA,
            held: 0,
        };
        assert!(q.plan(&cuda).total() > room, "{want}: the run fits already");
        let Advice::Fits { flags, plan } = advise(&q, &cuda, room) else {
            panic!("{want}: no advice fits")
        };
        assert!(flags.starts_with(want), "want {want}, got {flags}");
        // Apply the flags by hand and plan again.
        let words: Vec<&str> = flags.split(' ').collect();
        let mut cfg = cfg.clone();
        let (mut b, mut recompute) = (b, recompute);
        for pair in words.chunks(2) {
            match pair {
                ["--recompute", v] => recompute = v.parse().unwrap(),
                ["--batch-size", v] => b = v.parse().unwrap(),
                ["--lora-rank", v] => cfg = lora_all(cfg, v.parse().unwrap()),
                other => panic!("unknown flag {other:?}"),
            }
        }
        let again = self::plan(&cfg, b, t, recompute);
        assert_eq!(again, plan, "{flags}");
        assert!(again.total() <= room, "{flags}: {}", rows(&again));
        println!(
            "{want}: {flags} -> {:.2} GiB of {:.2}",
            g(again.total()),
            g(room)
        );
    }
}

/// `plan` prints every row, and with --memory-gib the verdict and the flag that fits.
#[test]
fn plan_prints_the_rows_and_the_advice() {
    let out = ok(&[
        "plan",
        "--preset",
        "llama-3.2-1b",
        "--vocab-size",
        "128256",
        "--batch-size",
        "8",
        "--seq-len",
        "2048",
        "--recompute",
        "2",
        "--lora-rank",
        "16",
        "--memory-gib",
        "24",
    ]);
    for row in [
        "LoRA r16 (alpha 32) on q,k,v,o,gate,up,down",
        "frozen weights",
        "trainable weights",
        "fp32 master",
        "AdamW moments",
        "gradients",
        "activations",
        "recompute 0: ",
        "logits",
        "LoRA activations",
        "total",
        "fits in 24 GiB",
    ] {
        assert!(out.contains(row), "{row:?} missing from\n{out}");
    }
    let out = ok(&[
        "plan",
        "--preset",
        "llama-3.1-8b",
        "--vocab-size",
        "128256",
        "--batch-size",
        "1",
        "--seq-len",
        "2048",
        "--recompute",
        "2",
        "--memory-gib",
        "24",
    ]);
    assert!(
        out.contains("does not fit in 24 GiB: train LoRA adapters")
            && out.contains("--lora-rank 16"),
        "{out}"
    );
    // `info` without a path is the same plan.
    let info = ok(&[
        "info",
        "--preset",
        "tiny",
        "--vocab-size",
        "300",
        "--lora-rank",
        "4",
    ]);
    let plan = ok(&[
        "plan",
        "--preset",
        "tiny",
        "--vocab-size",
        "300",
        "--lora-rank",
        "4",
    ]);
    assert_eq!(info, plan);
    let e = fails(&[
        "plan",
        "--preset",
        "tiny",
        "--lora-rank",
        "4",
        "--lora-targets",
        "gate",
    ]);
    assert!(
        e.contains("`gate` is not a projection of a gpt2 model"),
        "{e}"
    );
}

/// A training run prints its budget before the first step and its measured peak at the
/// end; `bench` prints the plan and the peak beside it.
#[test]
fn runs_print_the_budget_and_the_peak() {
    let tmp = tempfile::tempdir().unwrap();
    prepare_small_corpus(tmp.path());
    let out = ok(&[
        "pretrain",
        "--data",
        &s(&tmp.path().join("data")),
        "--out",
        &s(&tmp.path().join("run")),
        "--device",
        "cpu",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--val-every",
        "0",
        "--recompute",
        "1",
    ]);
    let budget = out.find("memory plan (f32 everywhere), 2 rows x 16 tokens, recompute 1");
    let step = out.find("pretrain step ");
    assert!(budget.is_some() && budget < step, "{out}");
    assert!(out.contains("(recompute 0), "), "{out}");
    assert!(
        out.contains("peak memory: ") && out.contains(" measured, "),
        "{out}"
    );
    let out = ok(&[
        "bench",
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--peak-tflops",
        "1",
    ]);
    assert!(
        out.contains("frozen weights") && out.contains("logits"),
        "{out}"
    );
    assert!(
        out.contains("peak memory: ") && out.contains(" planned ("),
        "{out}"
    );
    // A batch past the machine is refused before it allocates, naming the batch that fits.
    let e = fails(&[
        "bench",
        "--device",
        "cpu",
        "--preset",
        "tiny",
        "--batch-size",
        "100000000",
        "--seq-len",
        "256",
    ]);
    assert!(
        e.contains("lower --batch-size: --batch-size ") && e.contains(" fits, needing about "),
        "{e}"
    );
}
