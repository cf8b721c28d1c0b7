//! `topcoat bench`: the step benchmark (MFU, peak memory), the per-op profile (`--kernels`),
//! the stages side by side (`--stage`) and generation with and without the KV cache
//! (`--generate`). The timing itself lives in the library (`topcoat::bench`, `topcoat::profile`);
//! this file picks the backend and prints the tables.

use anyhow::{bail, Result};
use topcoat::backend::cpu::CpuBackend;
use topcoat::backend::cuda::CudaBackend;
use topcoat::backend::{Backend, Role};
use topcoat::bench::{self, BenchStage};
use topcoat::config::ModelConfig;
use topcoat::profile::{OpTally, Profiled};
use topcoat::run::{self, DeviceKind};

use crate::cli::BenchArgs;

pub fn bench(a: &BenchArgs) -> Result<()> {
    let (device, why) = run::resolve_device(&a.device)?;
    let cfg = ModelConfig::preset(&a.preset, a.vocab_size)?;
    if a.generate {
        return bench_generate(a, &cfg, device, &why);
    }
    if a.seq_len > cfg.max_seq_len {
        bail!(
            "--seq-len {} exceeds the {} preset's max_seq_len {}",
            a.seq_len,
            a.preset,
            cfg.max_seq_len
        );
    }
    println!(
        "bench: {} preset ({:.2} M parameters, vocab {} padded {}), B={}, T={}, {}, {} threads, device {why}",
        a.preset,
        cfg.num_params() as f64 / 1e6,
        cfg.vocab_size,
        cfg.padded_vocab_size,
        a.batch_size,
        a.seq_len,
        if a.no_optimizer { "forward+backward" } else { "forward+backward+AdamW" },
        rayon::current_num_threads()
    );
    if a.stage != "pretrain" {
        return bench_stages(a, device, &cfg);
    }
    let on_step = |i: usize, ms: f64| {
        let tag = if i < a.warmup { " (warm-up)" } else { "" };
        eprintln!("step {:>3}: {ms:9.1} ms{tag}", i + 1);
    };
    match device {
        DeviceKind::Cpu => bench_on(&CpuBackend, &cfg, a, on_step),
        DeviceKind::Cuda => bench_on(&CudaBackend::new(0)?, &cfg, a, on_step),
    }
}

/// `bench` on one backend: the step benchmark, or with `--kernels` the per-op profile.
fn bench_on<B: Backend>(
    be: &B,
    cfg: &ModelConfig,
    a: &BenchArgs,
    on_step: impl FnMut(usize, f64),
) -> Result<()> {
    let (b, t, optimizer) = (a.batch_size, a.seq_len, !a.no_optimizer);
    if a.kernels {
        let profiled = Profiled::new(be);
        // The warm-up steps load kernels and pick matmul algorithms: keep them out.
        bench::bench_train(&profiled, cfg, b, t, a.warmup, 0, optimizer, |_, _| {})?;
        profiled.reset();
        let r = bench::bench_train(&profiled, cfg, b, t, 0, a.steps, optimizer, on_step)?;
        print_profile(&profiled.tally(), r.step_ms.len());
        return Ok(());
    }
    let r = bench::bench_train(be, cfg, b, t, a.warmup, a.steps, optimizer, on_step)?;
    let peak = if a.peak_tflops > 0.0 {
        a.peak_tflops
    } else {
        // Large enough to fill an H100; a CPU gets a size it finishes in about a second.
        let n = if be.element_bytes(Role::Activation) == 2 {
            8192
        } else {
            1024
        };
        let tflops = bench::measure_matmul_tflops(be, n)?;
        println!("measured peak: {tflops:.1} TFLOP/s ({n}x{n}x{n} matmul on this backend)");
        tflops
    };
    let memory = r
        .peak_memory_bytes
        .map(|m| format!("{:.1} GiB", m as f64 / (1u64 << 30) as f64))
        .unwrap_or_else(|| "n/a".into());
    println!("| median step ms | tokens/s | model TFLOP/s | MFU | peak memory |");
    println!("| --- | --- | --- | --- | --- |");
    let tflops = r.gflops / 1e3;
    // A CPU's rate is a few GFLOP/s: keep its digits.
    let decimals = if tflops < 1.0 { 4 } else { 1 };
    println!(
        "| {:.1} | {:.0} | {tflops:.decimals$} | {:.1}% | {memory} |",
        r.median_ms,
        r.tokens_per_s,
        100.0 * r.gflops / 1e3 / peak
    );
    Ok(())
}

/// The per-op table of `bench --kernels`: time per step, share, and achieved rates.
fn print_profile(tally: &std::collections::BTreeMap<&'static str, OpTally>, steps: usize) {
    let steps = steps.max(1) as f64;
    let total: f64 = tally.values().map(|x| x.seconds).sum();
    let mut rows: Vec<_> = tally.iter().collect();
    rows.sort_by(|x, y| y.1.seconds.total_cmp(&x.1.seconds));
    println!("| op | calls/step | ms/step | share | GB/s | TFLOP/s |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (name, x) in rows {
        let rate = |v: f64, unit: f64| {
            if v > 0.0 {
                format!("{:.2}", v / x.seconds / unit)
            } else {
                "-".into()
            }
        };
        println!(
            "| {name} | {:.0} | {:.2} | {:.1}% | {} | {} |",
            x.calls as f64 / steps,
            x.seconds * 1e3 / steps,
            100.0 * x.seconds / total,
            rate(x.bytes, 1e9),
            rate(x.flops, 1e12)
        );
    }
    println!(
        "| total (each op waited for) | | {:.2} | | | |",
        total * 1e3 / steps
    );
}

fn bench_generate(a: &BenchArgs, cfg: &ModelConfig, device: DeviceKind, why: &str) -> Result<()> {
    if a.prompt_len == 0 || a.new_tokens == 0 || a.prompt_len + a.new_tokens > cfg.max_seq_len {
        bail!(
            "--prompt-len {} + --new-tokens {} must be positive and fit the {} preset's max_seq_len {}",
            a.prompt_len,
            a.new_tokens,
            a.preset,
            cfg.max_seq_len
        );
    }
    println!(
        "bench --generate: {} preset ({:.2} M parameters, vocab {}), B=1, prompt {} tokens, {} new tokens (greedy), {} threads, device {why}",
        a.preset,
        cfg.num_params() as f64 / 1e6,
        cfg.vocab_size,
        a.prompt_len,
        a.new_tokens,
        rayon::current_num_threads()
    );
    let on_run = |name: &str, s: f64| eprintln!("{name:>18}: {s:8.3} s");
    let (p, n, runs) = (a.prompt_len, a.new_tokens, a.runs);
    let r = match device {
        DeviceKind::Cpu => bench::bench_generate(&CpuBackend, cfg, p, n, runs, on_run)?,
        DeviceKind::Cuda => {
            let be = CudaBackend::new(0)?;
            bench::bench_generate(&be, cfg, p, n, runs, on_run)?
        }
    };
    println!("| KV cache tokens/s | no cache tokens/s | speed-up | same greedy tokens |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| {:.1} | {:.1} | {:.1}x | {} |",
        r.cached_tokens_per_s,
        r.uncached_tokens_per_s,
        r.cached_tokens_per_s / r.uncached_tokens_per_s,
        if r.same_tokens { "yes" } else { "no" }
    );
    Ok(())
}

/// `bench --stage sft|dpo|all`: the stages' steps interleaved on one model shape.
fn bench_stages(a: &BenchArgs, device: DeviceKind, cfg: &ModelConfig) -> Result<()> {
    let stages: Vec<BenchStage> = match a.stage.as_str() {
        "all" => vec![BenchStage::Pretrain, BenchStage::Sft, BenchStage::Dpo],
        one => vec![one.parse().map_err(anyhow::Error::msg)?],
    };
    let on_step = |s: BenchStage, i: usize, ms: f64| {
        let tag = if i < a.warmup { " (warm-up)" } else { "" };
        eprintln!("{s:?} step {:>3}: {ms:9.1} ms{tag}", i + 1);
    };
    let (b, t, opt) = (a.batch_size, a.seq_len, !a.no_optimizer);
    let (w, n) = (a.warmup, a.steps);
    let results = match device {
        DeviceKind::Cpu => {
            bench::bench_stages(&CpuBackend, cfg, &stages, b, t, w, n, opt, on_step)?
        }
        DeviceKind::Cuda => {
            let be = CudaBackend::new(0)?;
            bench::bench_stages(&be, cfg, &stages, b, t, w, n, opt, on_step)?
        }
    };
    let base = stages
        .iter()
        .position(|&s| s == BenchStage::Pretrain)
        .map(|i| results[i].tokens_per_s);
    println!("| stage | median step ms | tokens/s | vs pretrain |");
    println!("| --- | --- | --- | --- |");
    for (s, r) in stages.iter().zip(&results) {
        let ratio = base.map_or("-".to_string(), |p| format!("{:.2}", r.tokens_per_s / p));
        println!(
            "| {} | {:.1} | {:.0} | {ratio} |",
            format!("{s:?}").to_lowercase(),
            r.median_ms,
            r.tokens_per_s
        );
    }
    Ok(())
}
