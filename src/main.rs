//! The `topcoat` command line: parses flags, then calls the library (`topcoat::run`).

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::io::{IsTerminal, Write};
use topcoat::config::RunConfig;
use topcoat::data::{self, PrefsPrepareOptions, PrepareOptions, SftPrepareOptions, Tokenizer};
use topcoat::generate::SampleOptions;
use topcoat::run::{self, ChatOptions, DpoJob, PretrainJob, RewardJob, RlJob, SftJob};
use topcoat::train::TrainSummary;

mod bench_command;
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

/// The run config of a training command (TOML, then flags, over `defaults`) and its device,
/// printing which device was chosen and why.
fn training_setup(flags: &RunFlags, defaults: RunConfig) -> Result<(RunConfig, run::DeviceKind)> {
    let run = run_config(flags, defaults)?;
    let (device, why) = run::resolve_device(&flags.device)?;
    note(&format!("device: {why}"));
    Ok((run, device))
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
            let (run, device) = training_setup(&a.flags, RunConfig::default())?;
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
            let (mut run, device) = training_setup(&a.flags, run::sft_run_defaults())?;
            run.pack |= a.pack;
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
            let (run, device) = training_setup(&a.flags, run::reward_run_defaults())?;
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
            let (run, device) = training_setup(&a.flags, run::dpo_run_defaults())?;
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
            let (run, device) = training_setup(&a.flags, run::rl_run_defaults())?;
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
                keep_checkpoints: 3,
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
        Command::Bench(a) => bench_command::bench(&a)?,
        Command::Demo(a) => {
            let (device, why) = run::resolve_device(&a.device)?;
            note(&format!("device: {why}"));
            let job = topcoat::demo::DemoJob {
                out: a.out.clone(),
                data: a.data.clone(),
                device,
                device_name: why,
                quick: a.quick,
                seed: a.seed,
            };
            let card = topcoat::demo::demo(&job, &note)?;
            println!("{}\n{}", card.table(), card.samples_table());
            println!(
                "demo finished in {:.0} s; report card: {}; report: {}",
                card.wall_s,
                a.out.join(topcoat::demo::card::CARD_FILE).display(),
                a.out.join(topcoat::report::REPORT_FILE).display()
            );
        }
        Command::Report(a) => report_command(&a)?,
    }
    Ok(())
}

fn report_command(a: &ReportArgs) -> Result<()> {
    let out = (a.out.clone()).unwrap_or_else(|| a.run_dir.join(topcoat::report::REPORT_FILE));
    let s = topcoat::report::write_report(&a.run_dir, &out)?;
    for n in &s.notes {
        note(&format!("note: {n}"));
    }
    println!("{}: {} plots, {} bytes", s.path.display(), s.plots, s.bytes);
    Ok(())
}
