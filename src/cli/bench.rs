//! `topcoat bench`: flags into a [`BenchJob`], the runtime opened with the A/B switches, and
//! the tables printed: the step benchmark (MFU, peak memory), the per-op profile
//! (`--kernels`), the stages side by side (`--stage`) and generation with and without the KV
//! cache (`--generate`). The timing lives in the library (`topcoat::commands::bench`).

use super::args::BenchArgs;
use super::print::note;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use topcoat::backend::cuda::CudaOptions;
use topcoat::backend::profile::OpTally;
use topcoat::commands;
use topcoat::commands::bench::{self, BenchJob, BenchStage};
use topcoat::config::{ModelConfig, RunConfig};
use topcoat::runtime::{Runtime, RuntimeOptions};

pub fn bench(a: &BenchArgs) -> Result<()> {
    let cuda = CudaOptions {
        attention: a
            .attention
            .parse()
            .map_err(|e| anyhow::anyhow!("--attention: {e}"))?,
        gelu_epilogue: a.gelu_epilogue == "on",
        kernels: super::dispatch::kernels_from_env()?,
    };
    let rt = Runtime::open(&RuntimeOptions {
        device: a.device.device,
        cuda,
        collective: a.device.collective,
        master_addr: a.device.master_addr.clone(),
    })?;
    let why = rt.description();
    let mut run = RunConfig {
        preset: a.preset.clone(),
        ..RunConfig::default()
    };
    a.shape.apply(&mut run);
    let mut cfg = run.model_config(a.vocab_size)?;
    a.lora.apply(&mut cfg)?;
    if a.generate {
        return generation(&rt, a, &cfg);
    }
    let job = BenchJob {
        model: cfg.clone(),
        batch_size: a.batch_size,
        seq_len: a.seq_len,
        warmup: a.warmup,
        steps: a.steps,
        optimizer: !a.no_optimizer,
        recompute: a.recompute,
    };
    job.check()?;
    let name = super::dispatch::shape_name(&run);
    let storage = format!("{} storage", rt.description());
    print!("{}", bench::plan_text(&rt, &job, &name, &storage));
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
        return stages(&rt, a, &job);
    }
    let on_step = |i: usize, ms: f64| {
        let tag = if i < a.warmup { " (warm-up)" } else { "" };
        note(&format!("step {:>3}: {ms:9.1} ms{tag}", i + 1));
    };
    if a.kernels {
        let (tally, steps) = bench::kernels(&rt, &job, on_step)?;
        print_profile(&tally, steps);
        return Ok(());
    }
    let report = bench::steps(&rt, &job, a.peak_tflops, on_step)?;
    if let Some(n) = report.measured_peak_n {
        println!(
            "measured peak: {:.1} TFLOP/s ({n}x{n}x{n} matmul on this backend)",
            report.peak_tflops
        );
    }
    let r = &report.result;
    let peak = report.peak_memory.or(r.peak_memory_bytes.map(|m| m as u64));
    let memory = peak
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
        100.0 * tflops / report.peak_tflops
    );
    println!("{}", commands::plan::peak_line(peak, &report.plan));
    Ok(())
}

/// The per-op table of `bench --kernels`: time per step, share, and achieved rates.
fn print_profile(tally: &BTreeMap<&'static str, OpTally>, steps: usize) {
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

fn generation(rt: &Runtime, a: &BenchArgs, cfg: &ModelConfig) -> Result<()> {
    println!(
        "bench --generate: {} preset ({:.2} M parameters, vocab {}), B=1, prompt {} tokens, {} new tokens (greedy), {} threads, device {}",
        a.preset,
        cfg.num_params() as f64 / 1e6,
        cfg.vocab_size,
        a.prompt_len,
        a.new_tokens,
        rayon::current_num_threads(),
        rt.description()
    );
    let on_run = |name: &str, s: f64| note(&format!("{name:>18}: {s:8.3} s"));
    let r = bench::generation(rt, cfg, a.prompt_len, a.new_tokens, a.runs, on_run)?;
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
fn stages(rt: &Runtime, a: &BenchArgs, job: &BenchJob) -> Result<()> {
    let stages: Vec<BenchStage> = match a.stage.as_str() {
        "all" => vec![BenchStage::Pretrain, BenchStage::Sft, BenchStage::Dpo],
        one => vec![one
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--stage: {e}"))
            .context("bench")?],
    };
    let on_step = |s: BenchStage, i: usize, ms: f64| {
        let tag = if i < a.warmup { " (warm-up)" } else { "" };
        note(&format!("{s:?} step {:>3}: {ms:9.1} ms{tag}", i + 1));
    };
    let results = bench::stages(rt, job, &stages, on_step)?;
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
