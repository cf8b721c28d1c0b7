//! One function per command: flags into a library job, the runtime opened once for the
//! commands that compute, the result printed. The list of commands is [`run`]'s match.

use super::args::*;
use super::print::{self, note, PrepareProgress};
use anyhow::{Context, Result};
use std::io::{IsTerminal, Write};
use topcoat::backend::cuda::KernelVariants;
use topcoat::commands::chat::ChatOptions;
use topcoat::commands::demo::DemoJob;
use topcoat::commands::dpo::DpoStage;
use topcoat::commands::eval::{EvalGenerateJob, EvalLossJob, EvalPairsJob};
use topcoat::commands::prepare::{self, PrepareTextJob};
use topcoat::commands::pretrain::{embedded_data, PretrainStage};
use topcoat::commands::report::card::CARD_FILE;
use topcoat::commands::report::REPORT_FILE;
use topcoat::commands::reward::RewardStage;
use topcoat::commands::rl::RlStage;
use topcoat::commands::sft::SftStage;
use topcoat::commands::stage::{self, Stage, TrainJob};
use topcoat::commands::{self, CommandError};
use topcoat::config::RunConfig;
use topcoat::data::{PrefsPrepareOptions, SftPrepareOptions};
use topcoat::generate::SampleOptions;
use topcoat::runtime::{Runtime, RuntimeOptions};
use topcoat::train::run_dir::RunDirLock;

/// Runs the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    // Only the commands that compute get a thread pool: `info` and `report` read files.
    let computes = !matches!(
        cli.command,
        Command::Info { .. } | Command::Plan(_) | Command::Report(_) | Command::Launch(_)
    );
    if let (Some(n), true) = (cli.threads, computes) {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting --threads")?;
    }
    match cli.command {
        Command::Prepare(PrepareArgs { kind: None, text }) => prepare_text(&text),
        Command::Prepare(PrepareArgs {
            kind: Some(PrepareKind::Sft(a)),
            ..
        })
        | Command::PrepareSft(a) => prepare_sft(&a),
        Command::Prepare(PrepareArgs {
            kind: Some(PrepareKind::Prefs(a)),
            ..
        }) => prepare_prefs(&a),
        Command::Tokenizer(TokenizerCmd::Train(a)) => tokenizer_train(&a),
        Command::Pretrain(a) => pretrain(&a),
        Command::Sft(a) => train(&a.flags, a.out, false, |run| {
            run.pack |= a.pack;
            a.lora.apply(run);
            Ok(SftStage {
                init: a.init,
                data: a.data,
            })
        }),
        Command::Reward(a) => train(&a.flags, a.out, false, |run| {
            a.lora.apply(run);
            Ok(RewardStage {
                init: a.init,
                data: a.data,
            })
        }),
        Command::Dpo(a) => train(&a.flags, a.out, false, |run| {
            a.lora.apply(run);
            Ok(DpoStage {
                init: a.init,
                data: a.data,
                beta: a.beta,
                loss: a.loss,
            })
        }),
        Command::Rl(a) => train(&a.flags, a.out, false, |run| {
            a.lora.apply(run);
            Ok(RlStage {
                init: a.init,
                reward: a.reward,
                prompts: a.prompts,
                k: a.k,
                kl_coef: a.kl_coef,
                clip: a.clip,
                max_new_tokens: a.max_new_tokens,
                epochs: a.epochs,
            })
        }),
        Command::Sample(a) => sample(&a),
        Command::Chat(a) => chat(&a),
        Command::Eval(cmd) => eval(&cmd),
        Command::Info(a) => info(&a),
        Command::Plan(a) => plan(&a),
        Command::Bench(a) => super::bench::bench(&a),
        Command::Demo(a) => demo(&a),
        Command::Report(a) => report(&a),
        Command::Launch(a) => launch(a, cli.threads),
        Command::Import(ImportCmd::Hf(a)) => import_hf(&a),
        Command::Export(ExportCmd::Hf(a)) => export_hf(&a),
    }
}

/// `topcoat launch`: the ranks run this executable when the command is a topcoat command.
fn launch(a: LaunchArgs, threads: Option<usize>) -> Result<()> {
    use clap::CommandFactory;
    let names: Vec<String> = Cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect();
    let job = topcoat::commands::launch::LaunchJob {
        nproc_per_node: a.nproc_per_node,
        nnodes: a.nnodes,
        node_rank: a.node_rank,
        master_addr: a.master_addr,
        master_port: a.master_port,
        grace: a.grace,
        command: a.command,
        threads,
    };
    topcoat::commands::launch::run(&job, &names, &mut |s| {
        note(&format!(
            "launch: ranks {}..{} of {} started, rendezvous at {}",
            s.ranks[0],
            s.ranks[s.ranks.len() - 1],
            s.world_size,
            s.master
        ))
    })?;
    Ok(())
}

/// Opens the runtime for `--device` (with the kernel code `TOPCOAT_KERNELS` names) and says
/// what it chose and why.
fn open_runtime(mut opts: RuntimeOptions) -> Result<Runtime> {
    opts.cuda.kernels = kernels_from_env()?;
    let rt = Runtime::open(&opts)?;
    note(&format!("device: {}", rt.description()));
    Ok(rt)
}

/// `TOPCOAT_KERNELS` (`auto`, the default, or `generic`: the compute_80 PTX on any card), read
/// here so that the library reads no environment.
pub fn kernels_from_env() -> Result<KernelVariants> {
    let value = std::env::var("TOPCOAT_KERNELS").ok();
    Ok(KernelVariants::from_env_value(value.as_deref())?)
}

fn device(d: &DeviceArgs) -> RuntimeOptions {
    RuntimeOptions {
        device: d.device,
        collective: d.collective,
        master_addr: d.master_addr.clone(),
        ..RuntimeOptions::default()
    }
}

fn prepare_text(a: &PrepareTextArgs) -> Result<()> {
    let out = a.out.clone().context("--out is required")?;
    let job = PrepareTextJob {
        inputs: a.inputs.clone(),
        out,
        tokenizer: a.tokenizer.clone(),
        vocab_size: a.vocab_size,
        val_fraction: a.val_fraction,
        shard_tokens: a.shard_tokens,
    };
    let shown = PrepareProgress::new();
    let (summary, tok) = prepare::prepare_text(&job, &note, &|ev| shown.event(&ev))?;
    shown.finish();
    print::prepared_text(&job.out, &summary, tok.vocab_size());
    Ok(())
}

fn prepare_sft(a: &PrepareChatArgs) -> Result<()> {
    let opts = SftPrepareOptions {
        max_len: a.max_len,
        val_fraction: a.val_fraction,
        ..SftPrepareOptions::new(&a.out)
    };
    let s = prepare::prepare_sft(&a.input, &a.tokenizer, &opts)?;
    print::prepared_sft(&a.out, &s, a.max_len);
    Ok(())
}

fn prepare_prefs(a: &PrepareChatArgs) -> Result<()> {
    let opts = PrefsPrepareOptions {
        max_len: a.max_len,
        val_fraction: a.val_fraction,
        ..PrefsPrepareOptions::new(&a.out)
    };
    let s = prepare::prepare_prefs(&a.input, &a.tokenizer, &opts)?;
    print::prepared_prefs(&a.out, &s, a.max_len);
    Ok(())
}

fn tokenizer_train(a: &TokenizerTrainArgs) -> Result<()> {
    let tok = prepare::train_tokenizer(&a.inputs, a.vocab_size, &|_| {})?;
    tok.save(&a.out)?;
    println!(
        "{}: byte-level BPE with {} ids",
        a.out.display(),
        tok.vocab_size()
    );
    Ok(())
}

/// The run config: the stage's defaults, then the TOML file, then the flags.
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
         checkpoint_every <- a.checkpoint_every, seed <- a.seed,
         divergence_factor <- a.divergence_factor, recompute <- a.recompute, zero <- a.zero);
    a.shape.apply(&mut cfg);
    // Nonsense values stop here, before any data is read or the device opened.
    cfg.validate()?;
    for n in cfg.notes() {
        note(&format!("note: {n}"));
    }
    Ok(cfg)
}

/// A training command: the run config over the stage's defaults, the runtime, the stage's own
/// part (which may adjust the run config, or fail before any time is spent), the stage
/// runner, the summary. `writes_out`: the stage's own part writes into the run directory, so
/// the run directory is locked before it (the runner shares that lock).
fn train<S: Stage>(
    flags: &RunFlags,
    out: std::path::PathBuf,
    writes_out: bool,
    stage: impl FnOnce(&mut RunConfig) -> Result<S>,
) -> Result<()> {
    let mut run = run_config(flags, S::defaults())?;
    let rt = open_runtime(device(&flags.device))?;
    // Rank 0 alone locks the run directory, and prepares what the stage writes there before the
    // other ranks read it.
    let writer = rt.rank_info().is_writer();
    let _lock = if writes_out && writer {
        Some(RunDirLock::acquire(&out)?)
    } else {
        None
    };
    let stage = rt.after_rank_zero(|| stage(&mut run))??;
    let job = TrainJob {
        run,
        resume: flags.resume,
        overwrite: flags.overwrite,
        ..TrainJob::new(stage, out)
    };
    let summary = stage::train(&rt, &job, &note)?;
    if writer {
        print::train_summary(&summary);
    }
    Ok(())
}

fn pretrain(a: &PretrainArgs) -> Result<()> {
    train(&a.flags, a.out.clone(), a.data.is_none(), |run| {
        // Refuse an unknown preset or a bad shape before spending time on data.
        run.model_config(64)?;
        // Without --data: the embedded corpus, prepared under the run directory on first use.
        let data = match &a.data {
            Some(d) => d.clone(),
            None => embedded_data(&a.out, &note)?,
        };
        Ok(PretrainStage { data })
    })
}

/// `info PATH` describes a file or directory; `info` alone, a model configuration (`plan`).
fn info(a: &InfoArgs) -> Result<()> {
    if let Some(path) = &a.path {
        print!("{}", commands::info::info(path)?);
        return Ok(());
    }
    plan(&a.plan)
}

/// `plan`: the memory plan of a model and run shape, against --memory-gib when given.
fn plan(a: &PlanArgs) -> Result<()> {
    let mut run = RunConfig {
        preset: a.preset.clone(),
        ..RunConfig::default()
    };
    a.shape.apply(&mut run);
    let mut cfg = run.model_config(a.vocab_size)?;
    a.lora.apply(&mut cfg)?;
    let t = a.seq_len.unwrap_or(cfg.max_seq_len);
    if t == 0 || t > cfg.max_seq_len || a.batch_size == 0 {
        anyhow::bail!(
            "--seq-len {t} with --batch-size {}: both must be at least 1 and the sequence at \
             most the model's context {}",
            a.batch_size,
            cfg.max_seq_len
        );
    }
    let available = match a.memory_gib {
        Some(g) if g.is_finite() && g > 0.0 => Some((g * (1u64 << 30) as f64) as u64),
        Some(g) => anyhow::bail!("--memory-gib {g}: must be a positive number of GiB"),
        None => None,
    };
    let bytes = commands::plan::storage_bytes(&a.backend).expect("clap checks --backend");
    let storage = format!(
        "{} storage: {}",
        a.backend,
        commands::plan::storage_name(&bytes)
    );
    let name = shape_name(&run);
    let shape = (a.batch_size, t);
    let text =
        commands::plan::describe(&name, &cfg, shape, a.recompute, &bytes, &storage, available);
    let kernels = kernels_from_env()?;
    print!("{text}");
    if available.is_some() {
        let query = topcoat::model::FitQuery {
            cfg: &cfg,
            units: a.batch_size,
            seq_len: t,
            opts: topcoat::model::PlanOptions {
                recompute: a.recompute,
                ..Default::default()
            },
            batch: topcoat::model::BatchFlag::ROWS_LORA,
            held: 0,
        };
        let memory = format!("{} GiB", a.memory_gib.unwrap_or_default());
        match query.check(&bytes, &memory, available) {
            Ok(_) => println!("  fits in {memory}"),
            Err(e) => {
                let advice = e.advice.clone().unwrap_or_default();
                println!("  does not fit in {memory}: {advice}");
            }
        }
    }
    print!("{}", commands::info::kernels_text(kernels));
    Ok(())
}

/// The preset and the overrides, as the user gave them: `gpt2-124m preset, n_layer 6`.
pub fn shape_name(run: &RunConfig) -> String {
    let mut s = format!("{} preset", run.preset);
    for (key, v) in [
        ("n_layer", run.n_layer),
        ("n_head", run.n_head),
        ("n_embd", run.n_embd),
        ("context", run.context),
    ] {
        if let Some(v) = v {
            s += &format!(", {key} {v}");
        }
    }
    s
}

fn sample(a: &SampleArgs) -> Result<()> {
    let opts = SampleOptions {
        max_tokens: a.max_new_tokens,
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        stop: None,
    };
    let rt = open_runtime(device(&a.device))?;
    print!("{}", a.prompt);
    commands::sample::sample(
        &rt,
        &a.checkpoint,
        a.adapter.as_deref(),
        &a.prompt,
        &opts,
        |text| {
            print!("{text}");
            let _ = std::io::stdout().flush();
        },
    )?;
    println!();
    Ok(())
}

fn chat(a: &ChatArgs) -> Result<()> {
    let opts = ChatOptions {
        system: a.system.clone(),
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        max_new_tokens: a.max_new_tokens,
        seed: a.seed,
        show_prompt: std::io::stdin().is_terminal(),
        adapter: a.adapter.clone(),
    };
    let rt = open_runtime(device(&a.device))?;
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let mut out = std::io::stdout();
    commands::chat::chat(&rt, &a.checkpoint, &opts, &mut input, &mut out, &note)?;
    Ok(())
}

/// `eval loss|pairs|generate`: runs the mode and prints its table. Across ranks every rank
/// evaluates its share; rank 0 alone prints (notes and table) and writes.
fn eval(cmd: &EvalCmd) -> Result<()> {
    use commands::eval;
    let dev = match cmd {
        EvalCmd::Loss(a) => &a.device,
        EvalCmd::Pairs(a) => &a.device,
        EvalCmd::Generate(a) => &a.device,
    };
    let rt = open_runtime(device(dev))?;
    let writer = rt.rank_info().is_writer();
    let note = |m: &str| {
        if writer {
            note(m)
        }
    };
    let table = match cmd {
        EvalCmd::Loss(a) => {
            let job = EvalLossJob {
                checkpoint: a.checkpoint.clone(),
                data: a.data.clone(),
                split: a.split.clone(),
                batch_size: a.batch_size,
                seq_len: a.seq_len,
                max_batches: a.max_batches,
                adapter: a.adapter.clone(),
            };
            eval::eval_loss(&rt, &job, &note)?.table()
        }
        EvalCmd::Pairs(a) => {
            let job = EvalPairsJob {
                checkpoint: a.checkpoint.clone(),
                reference: a.reference.clone(),
                beta: a.beta,
                data: a.data.clone(),
                split: a.split.clone(),
                batch_size: a.batch_size,
                seq_len: a.seq_len,
                adapter: a.adapter.clone(),
            };
            eval::eval_pairs(&rt, &job, &note)?.table()
        }
        EvalCmd::Generate(a) => {
            let job = EvalGenerateJob {
                checkpoint: a.checkpoint.clone(),
                prompts: a.prompts.clone(),
                max_new_tokens: a.max_new_tokens,
                temperature: a.temperature,
                top_k: a.top_k,
                top_p: a.top_p,
                seed: a.seed,
                out: a.out.clone(),
                adapter: a.adapter.clone(),
            };
            eval::eval_generate(&rt, &job, &note)?.table()
        }
    };
    if writer {
        print!("{table}");
    }
    Ok(())
}

fn demo(a: &DemoArgs) -> Result<()> {
    let rt = open_runtime(device(&a.device))?;
    let job = DemoJob {
        out: a.out.clone(),
        data: a.data.clone(),
        quick: a.quick,
        seed: a.seed,
    };
    let card = commands::demo::demo(&rt, &job, &note)?;
    println!("{}\n{}", card.table(), card.samples_table());
    println!(
        "demo finished in {:.0} s; report card: {}; report: {}",
        card.wall_s,
        a.out.join(CARD_FILE).display(),
        a.out.join(REPORT_FILE).display()
    );
    Ok(())
}

fn report(a: &ReportArgs) -> Result<()> {
    let out = (a.out.clone()).unwrap_or_else(|| a.run_dir.join(REPORT_FILE));
    let s = commands::report::write_report(&a.run_dir, &out).map_err(CommandError::from)?;
    for n in &s.notes {
        note(&format!("note: {n}"));
    }
    println!("{}: {} plots, {} bytes", s.path.display(), s.plots, s.bytes);
    Ok(())
}

fn import_hf(a: &ImportHfArgs) -> Result<()> {
    let gpt2 = a.tokenizer.as_deref() == Some("gpt2");
    let s = commands::hf::import(&a.dir, &a.out, gpt2, &note)?;
    for name in &s.skipped {
        note(&format!(
            "skipped {name} (a buffer or a tied copy of the embedding)"
        ));
    }
    if s.added_rows > 0 {
        note(&format!(
            "the tokenizer has {} ids, {} more than the model's vocabulary: their embedding \
             rows start at zero",
            s.cfg.vocab_size, s.added_rows
        ));
    }
    println!(
        "{}: {} as a {} checkpoint ({} tensors from {} file(s), {:.1} M parameters); use it \
         as --init or --checkpoint",
        s.out.display(),
        s.arch.class(),
        s.cfg.family_name(),
        s.tensors,
        s.files,
        s.cfg.num_params() as f64 / 1e6
    );
    Ok(())
}

fn export_hf(a: &ExportHfArgs) -> Result<()> {
    let s = commands::hf::export(&a.run, &a.out, a.dtype, a.merge, &note)?;
    if s.kind == "adapter" {
        println!(
            "{}: a PEFT LoRA adapter for a {} base ({} tensors, {:.1} MB): {}; \
             PeftModel.from_pretrained loads it over the base (export hf --merge writes the \
             merged full model)",
            s.out.display(),
            s.arch.class(),
            s.tensors,
            s.bytes as f64 / 1e6,
            s.files.join(", ")
        );
        return Ok(());
    }
    note(&format!("tokenizer: {}", s.tokenizer_note));
    println!(
        "{}: {} ({} tensors, {:.1} MB): {}",
        s.out.display(),
        s.arch.class(),
        s.tensors,
        s.bytes as f64 / 1e6,
        s.files.join(", ")
    );
    Ok(())
}
