//! The `topcoat` command line: parses flags, then calls the library (`topcoat::run`).

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::io::{IsTerminal, Write};
use topcoat::backend::cpu::CpuBackend;
use topcoat::backend::cuda::CudaBackend;
use topcoat::backend::{Backend, Role};
use topcoat::bench::{self, BenchStage};
use topcoat::config::{ModelConfig, RunConfig};
use topcoat::data::{self, PrefsPrepareOptions, PrepareOptions, SftPrepareOptions, Tokenizer};
use topcoat::generate::SampleOptions;
use topcoat::profile::{OpTally, Profiled};
use topcoat::run::{self, ChatOptions, DeviceKind, DpoJob, PretrainJob, RewardJob, RlJob, SftJob};
use topcoat::train::TrainSummary;

mod cli;

use cli::*;

/// The run config: `defaults`, then the TOML file, then the flags.
fn run_config(a: &RunFlags, defaults: RunConfig) -> Result<RunConfig> {
    let mut cfg = match &a.config {
        Some(p) => RunConfig::from_toml_file(p)?,
        None => defaults,
    };
    macro_rules! set {
        ($($field:ident <- $flag:expr),* $(,)?) => { $(if let Some(v) = $flag.clone() { cfg.$field = v; })* };
    }
    set!(preset <- a.preset, max_steps <- a.max_steps, batch_size <- a.batch_size, seq_len <- a.seq_len,
         total_batch_tokens <- a.total_batch_tokens, learning_rate <- a.lr, warmup_steps <- a.warmup_steps,
         weight_decay <- a.weight_decay, grad_clip <- a.grad_clip, val_every <- a.val_every,
         checkpoint_every <- a.checkpoint_every, seed <- a.seed);
    cfg.grad_accum_steps()?;
    Ok(cfg)
}

fn note(msg: &str) {
    eprintln!("{msg}");
}

fn prepare(a: &PrepareTextArgs) -> Result<()> {
    let out = a.out.as_ref().context("--out is required")?;
    let tok = match a.tokenizer.as_str() {
        "gpt2" => Tokenizer::gpt2(),
        "bpe" => {
            let docs = data::prepare::read_documents(&a.inputs)?;
            note(&format!(
                "training a {}-token BPE on {} documents",
                a.vocab_size,
                docs.len()
            ));
            Tokenizer::train_bpe(docs.iter().map(String::as_str), a.vocab_size, |_, _| {})?
        }
        path => Tokenizer::load(path).with_context(|| format!("loading tokenizer {path}"))?,
    };
    let opts = PrepareOptions {
        val_fraction: a.val_fraction,
        shard_tokens: a.shard_tokens,
        ..PrepareOptions::new(out)
    };
    let tty = std::io::stderr().is_terminal();
    let summary = data::prepare(&a.inputs, &tok, &opts, &|ev| {
        let line = run::describe_progress(&ev);
        if tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    })?;
    if tty {
        eprintln!();
    }
    tok.save(out.join("tokenizer.json"))?;
    println!(
        "{}: {} train documents ({} tokens, {} files), {} val documents ({} tokens, {} files), tokenizer.json ({} ids)",
        out.display(),
        summary.docs_train,
        summary.tokens_train,
        summary.train_files.len(),
        summary.docs_val,
        summary.tokens_val,
        summary.val_files.len(),
        tok.vocab_size()
    );
    Ok(())
}

fn prepare_sft(a: &PrepareSftArgs) -> Result<()> {
    let opts = SftPrepareOptions {
        max_len: a.max_len,
        val_fraction: a.val_fraction,
        ..SftPrepareOptions::new(&a.out)
    };
    let s = run::prepare_sft(&a.input, &a.tokenizer, &opts)?;
    println!(
        "{}: {} conversations -> {} train examples ({} tokens, {} trained on), {} val examples ({} tokens); \
         {} truncated to --max-len {}, {} dropped (no response token within it)",
        a.out.display(),
        s.conversations,
        s.train_examples,
        s.train_tokens,
        s.train_loss_tokens,
        s.val_examples,
        s.val_tokens,
        s.truncated,
        a.max_len,
        s.dropped
    );
    Ok(())
}

fn prepare_prefs(a: &PreparePrefsArgs) -> Result<()> {
    let opts = PrefsPrepareOptions {
        max_len: a.max_len,
        val_fraction: a.val_fraction,
        ..PrefsPrepareOptions::new(&a.out)
    };
    let s = run::prepare_prefs(&a.input, &a.tokenizer, &opts)?;
    println!(
        "{}: {} pairs -> {} train pairs ({} tokens), {} val pairs ({} tokens); dropped {} with a side \
         longer than --max-len {} (longest {} tokens), {} with identical sides",
        a.out.display(),
        s.pairs,
        s.train_pairs,
        s.train_tokens,
        s.val_pairs,
        s.val_tokens,
        s.too_long,
        a.max_len,
        s.longest,
        s.identical
    );
    Ok(())
}

fn bench(a: &BenchArgs) -> Result<()> {
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
    println!(
        "| {:.1} | {:.0} | {:.1} | {:.1}% | {memory} |",
        r.median_ms,
        r.tokens_per_s,
        r.gflops / 1e3,
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

/// `eval loss|pairs|generate`: runs the mode and prints its table.
fn eval(cmd: &EvalCmd) -> Result<()> {
    let table = match cmd {
        EvalCmd::Loss(a) => {
            let (device, why) = run::resolve_device(&a.device)?;
            note(&format!("device: {why}"));
            let job = run::EvalLossJob {
                checkpoint: a.checkpoint.clone(),
                data: a.data.clone(),
                split: a.split.clone(),
                batch_size: a.batch_size,
                seq_len: a.seq_len,
                max_batches: a.max_batches,
                device,
            };
            run::eval_loss(&job, &note)?.table()
        }
        EvalCmd::Pairs(a) => {
            let (device, why) = run::resolve_device(&a.device)?;
            note(&format!("device: {why}"));
            let job = run::EvalPairsJob {
                checkpoint: a.checkpoint.clone(),
                reference: a.reference.clone(),
                beta: a.beta,
                data: a.data.clone(),
                split: a.split.clone(),
                batch_size: a.batch_size,
                seq_len: a.seq_len,
                device,
            };
            run::eval_pairs(&job, &note)?.table()
        }
        EvalCmd::Generate(a) => {
            let (device, why) = run::resolve_device(&a.device)?;
            note(&format!("device: {why}"));
            let job = run::EvalGenerateJob {
                checkpoint: a.checkpoint.clone(),
                prompts: a.prompts.clone(),
                max_new_tokens: a.max_new_tokens,
                temperature: a.temperature,
                top_k: a.top_k,
                top_p: a.top_p,
                seed: a.seed,
                out: a.out.clone(),
                device,
            };
            run::eval_generate(&job, &note)?.table()
        }
    };
    print!("{table}");
    Ok(())
}

/// Prints what a training run did.
fn report(s: &TrainSummary) {
    let first = s.val_losses.first().map(|v| v.1);
    let last = s.val_losses.last().map(|v| v.1);
    if let (Some(f), Some(l)) = (first, last) {
        println!("validation loss {f:.4} -> {l:.4}");
    }
    println!(
        "trained to step {} in {:.1} s ({:.0} tokens/s); checkpoint: {}",
        s.final_step,
        s.elapsed.as_secs_f64(),
        s.tokens_per_s,
        s.last_checkpoint
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "none".into())
    );
}

fn main() -> std::process::ExitCode {
    // Errors print as one readable chain, never as a debug dump with a backtrace.
    match run_cli() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_cli() -> Result<()> {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting --threads")?;
    }
    match cli.command {
        Command::Prepare(PrepareArgs { kind: None, text }) => prepare(&text)?,
        Command::Tokenizer(TokenizerCmd::Train {
            inputs,
            vocab_size,
            out,
        }) => {
            let docs = data::prepare::read_documents(&inputs)?;
            let tok = Tokenizer::train_bpe(docs.iter().map(String::as_str), vocab_size, |_, _| {})?;
            tok.save(&out)?;
            println!(
                "{}: byte-level BPE with {} ids",
                out.display(),
                tok.vocab_size()
            );
        }
        Command::Pretrain(a) => {
            let run = run_config(&a.flags, RunConfig::default())?;
            let (device, why) = run::resolve_device(&a.flags.device)?;
            note(&format!("device: {why}"));
            let job = PretrainJob {
                run,
                data: a.data.clone(),
                out: a.out.clone(),
                resume: a.flags.resume,
                device,
                quiet: false,
            };
            report(&run::pretrain(&job, &note)?);
        }
        Command::Prepare(PrepareArgs {
            kind: Some(PrepareKind::Sft(a)),
            ..
        })
        | Command::PrepareSft(a) => prepare_sft(&a)?,
        Command::Prepare(PrepareArgs {
            kind: Some(PrepareKind::Prefs(a)),
            ..
        }) => prepare_prefs(&a)?,
        Command::Sft(a) => {
            let mut run = run_config(&a.flags, run::sft_run_defaults())?;
            run.pack |= a.pack;
            let (device, why) = run::resolve_device(&a.flags.device)?;
            note(&format!("device: {why}"));
            let job = SftJob {
                run,
                init: a.init.clone(),
                data: a.data.clone(),
                out: a.out.clone(),
                resume: a.flags.resume,
                device,
                quiet: false,
            };
            report(&run::sft(&job, &note)?);
        }
        Command::Reward(a) => {
            let run = run_config(&a.flags, run::reward_run_defaults())?;
            let (device, why) = run::resolve_device(&a.flags.device)?;
            note(&format!("device: {why}"));
            let job = RewardJob {
                run,
                init: a.init.clone(),
                data: a.data.clone(),
                out: a.out.clone(),
                resume: a.flags.resume,
                device,
                quiet: false,
            };
            report(&run::reward(&job, &note)?);
        }
        Command::Dpo(a) => {
            let run = run_config(&a.flags, run::dpo_run_defaults())?;
            let (device, why) = run::resolve_device(&a.flags.device)?;
            note(&format!("device: {why}"));
            let job = DpoJob {
                run,
                init: a.init.clone(),
                data: a.data.clone(),
                out: a.out.clone(),
                resume: a.flags.resume,
                device,
                quiet: false,
                beta: a.beta,
                loss: a.loss,
            };
            report(&run::dpo(&job, &note)?);
        }
        Command::Rl(a) => {
            let run = run_config(&a.flags, run::rl_run_defaults())?;
            let (device, why) = run::resolve_device(&a.flags.device)?;
            note(&format!("device: {why}"));
            let job = RlJob {
                run,
                init: a.init.clone(),
                reward: a.reward.clone(),
                prompts: a.prompts.clone(),
                out: a.out.clone(),
                resume: a.flags.resume,
                device,
                quiet: false,
                k: a.k,
                kl_coef: a.kl_coef,
                clip: a.clip,
                max_new: a.max_new,
                epochs: a.epochs,
            };
            report(&run::rl(&job, &note)?);
        }
        Command::Sample(a) => {
            if a.temperature < 0.0 {
                bail!("--temperature must be >= 0");
            }
            let (device, why) = run::resolve_device(&a.device)?;
            note(&format!("device: {why}"));
            let opts = SampleOptions {
                max_tokens: a.max_tokens,
                temperature: a.temperature,
                top_k: a.top_k,
                top_p: a.top_p,
                seed: a.seed,
                stop: None,
            };
            print!("{}", a.prompt);
            run::sample(&a.checkpoint, &a.prompt, &opts, device, |text| {
                print!("{text}");
                let _ = std::io::stdout().flush();
            })?;
            println!();
        }
        Command::Chat(a) => {
            let (device, why) = run::resolve_device(&a.device)?;
            note(&format!("device: {why}"));
            let opts = ChatOptions {
                system: a.system.clone(),
                temperature: a.temperature,
                top_k: a.top_k,
                top_p: a.top_p,
                max_new_tokens: a.max_new_tokens,
                seed: a.seed,
                device,
                show_prompt: std::io::stdin().is_terminal(),
            };
            let stdin = std::io::stdin();
            let mut input = stdin.lock();
            let mut out = std::io::stdout();
            run::chat(&a.checkpoint, &opts, &mut input, &mut out, &note)?;
        }
        Command::Eval(cmd) => eval(&cmd)?,
        Command::Info { path } => print!("{}", run::info(&path)?),
        Command::Bench(a) => bench(&a)?,
    }
    Ok(())
}
