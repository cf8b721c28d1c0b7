//! `topcoat eval` as library calls: [`eval_loss`] (mean token loss over a prepared shard split),
//! [`eval_pairs`] (reward-model accuracy, or DPO implicit-reward accuracy against a reference,
//! on a `prepare prefs` split) and [`eval_generate`] (replies to a prompts file scored by exact
//! and normalised match, `eval.rs`). Each returns a report whose `table()` the binary prints.
//!
//! Loss: the split's windows in file order through the sequential loader, `B` rows of `T + 1`
//! tokens per batch, every full batch (or the first `max_batches`); the mean is
//! `sum of token losses / tokens`, the same sum the trainer's validation takes, so with the
//! same `B`, `T` and enough `val_batches` the two agree.
//!
//! Pairs: pairs whose sides both fit in `T` tokens, in file order, `P` per batch (`2P` rows);
//! the others are skipped and counted. Reward model (the checkpoint has a reward head and no
//! reference is given): `r` read at each side's last token. DPO: `r = beta * (logp_policy -
//! logp_reference)` over the response tokens. A pair is correct when `r_chosen > r_rejected`
//! strictly (a tie is wrong), so a policy equal to its reference scores margin 0, accuracy 0.
//!
//! Generate: each prompt is rendered with the chat template then `<|assistant|>`, the reply is
//! sampled with a KV cache (greedy by default) until `<|end|>` or end-of-text (not part of the
//! reply) or `max_new_tokens`.

use super::inputs::{check_sampling, check_tokenizers, data_tokenizer, resolve_checkpoint};
use super::CommandError;
use crate::backend::{Backend, SampleParams};
use crate::data::chat::render_prompt;
use crate::data::{fill_pair_batch, DataError, Loader, PairSplit, Tokenizer};
use crate::generate::{prompt_start, Session};
use crate::model::{Gpt, ModelError};
use crate::rng::Rng;
use crate::runtime::Runtime;
use crate::scoring::{exact_match, normalized_match, read_prompts, PairTally};
use crate::stages::pretrain::split_files;
use crate::train::{checkpoint, io_err, TrainError};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

type Result<T> = std::result::Result<T, CommandError>;

fn invalid(msg: String) -> CommandError {
    TrainError::Model(ModelError::Invalid(msg)).into()
}

/// `T` for a run: the flag, else the model's context; refuses one past the context.
fn seq_len(flag: Option<usize>, cfg_max: usize) -> Result<usize> {
    let t = flag.unwrap_or(cfg_max);
    if t == 0 || t > cfg_max {
        return Err(CommandError::arg(
            "--seq-len",
            format!("{t}: must be in 1..={cfg_max} (the checkpoint's max_seq_len)"),
        ));
    }
    Ok(t)
}

/// `eval loss`: what to measure.
#[derive(Clone, Debug)]
pub struct EvalLossJob {
    /// Checkpoint, or a run directory (its newest checkpoint).
    pub checkpoint: PathBuf,
    /// A prepared data directory (`topcoat prepare`).
    pub data: PathBuf,
    /// `val` or `train`: the `{split}_*.bin` shards.
    pub split: String,
    pub batch_size: usize,
    /// `T`; `None`: the checkpoint's max_seq_len.
    pub seq_len: Option<usize>,
    /// At most this many batches; `None`: one full pass.
    pub max_batches: Option<usize>,
}

/// What `eval loss` measured.
#[derive(Clone, Debug, PartialEq)]
pub struct LossReport {
    pub checkpoint: PathBuf,
    pub split: String,
    pub batches: usize,
    pub tokens: usize,
    /// Mean token cross-entropy (nats).
    pub loss: f32,
}

impl LossReport {
    pub fn table(&self) -> String {
        format!(
            "| checkpoint | split | batches | tokens | loss | perplexity |\n\
             | --- | --- | --- | --- | --- | --- |\n\
             | {} | {} | {} | {} | {:.4} | {:.2} |\n",
            self.checkpoint.display(),
            self.split,
            self.batches,
            self.tokens,
            self.loss,
            (self.loss as f64).exp()
        )
    }
}

/// Mean token loss of a checkpoint over one split of a prepared data directory.
pub fn eval_loss(rt: &Runtime, job: &EvalLossJob, note: &dyn Fn(&str)) -> Result<LossReport> {
    crate::on_backend!(rt, be => eval_loss_on(be, job, note))
}

fn eval_loss_on<B: Backend>(be: &B, job: &EvalLossJob, note: &dyn Fn(&str)) -> Result<LossReport> {
    let ckpt = resolve_checkpoint(&job.checkpoint)?;
    let tok = checkpoint::load_tokenizer(&ckpt)?;
    check_tokenizers(
        &ckpt,
        &tok,
        &job.data,
        &data_tokenizer(&job.data)?,
        "prepare",
    )?;
    let mut model = checkpoint::load_model(be, &ckpt, None)?;
    let t = seq_len(job.seq_len, model.cfg.max_seq_len)?;
    let files = split_files(&job.data, &job.split)?;
    let mut loader = Loader::sequential(&files, job.batch_size, t, 0, 1, model.cfg.vocab_size)?;
    let full = loader.batches_per_epoch() as usize;
    let n = job.max_batches.map_or(full, |m| m.clamp(1, full));
    note(&format!(
        "eval loss: {} on {} {} ({} shard(s), {} windows of T = {t}), {n} batch(es) of B = {} on {}",
        ckpt.display(),
        job.data.display(),
        job.split,
        files.len(),
        loader.num_windows(),
        job.batch_size,
        be.name()
    ));
    let (mut sum, mut tokens) = (0.0f64, 0usize);
    for _ in 0..n {
        let batch = loader.next_batch();
        let loss = model.forward_loss(be, &batch.inputs, &batch.targets, batch.b, batch.t)?;
        sum += loss.sum;
        tokens += loss.tokens;
    }
    Ok(LossReport {
        checkpoint: ckpt,
        split: job.split.clone(),
        batches: n,
        tokens,
        loss: (sum / tokens.max(1) as f64) as f32,
    })
}

/// `eval pairs`: what to score.
#[derive(Clone, Debug)]
pub struct EvalPairsJob {
    /// A reward checkpoint, or (with `reference`) a DPO policy; or a run directory.
    pub checkpoint: PathBuf,
    /// The DPO reference (the SFT model); `None` scores with the checkpoint's reward head.
    pub reference: Option<PathBuf>,
    /// DPO's beta (implicit reward scale).
    pub beta: f64,
    /// A `prepare prefs` directory.
    pub data: PathBuf,
    /// `val` or `train`: `prefs_{split}.{bin,idx}`.
    pub split: String,
    /// Pairs per batch (`2 *` this many rows).
    pub batch_size: usize,
    /// `T`; `None`: the checkpoint's max_seq_len.
    pub seq_len: Option<usize>,
}

/// What `eval pairs` measured.
#[derive(Clone, Debug, PartialEq)]
pub struct PairReport {
    /// `reward` or `dpo`.
    pub mode: &'static str,
    pub split: String,
    /// Pairs skipped because a side is longer than `T` tokens.
    pub skipped: usize,
    pub tally: PairTally,
}

impl PairReport {
    pub fn table(&self) -> String {
        let x = &self.tally;
        format!(
            "| mode | split | pairs | skipped | accuracy | mean margin | reward chosen | reward rejected | loss |\n\
             | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n\
             | {} | {} | {} | {} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} |\n",
            self.mode,
            self.split,
            x.pairs,
            self.skipped,
            x.accuracy(),
            x.margin(),
            x.mean_chosen(),
            x.mean_rejected(),
            x.loss()
        )
    }
}

/// Reward-model or DPO implicit-reward accuracy on the pairs of one split.
pub fn eval_pairs(rt: &Runtime, job: &EvalPairsJob, note: &dyn Fn(&str)) -> Result<PairReport> {
    crate::on_backend!(rt, be => eval_pairs_on(be, job, note))
}

/// Loads a checkpoint after checking its tokenizer against the data's.
fn load_checked<B: Backend>(
    be: &B,
    path: &Path,
    data: &Path,
    data_tok: &Tokenizer,
) -> Result<(PathBuf, Tokenizer, Gpt<B>)> {
    let ckpt = resolve_checkpoint(path)?;
    let tok = checkpoint::load_tokenizer(&ckpt)?;
    check_tokenizers(&ckpt, &tok, data, data_tok, "prepare prefs")?;
    let model = checkpoint::load_model(be, &ckpt, None)?;
    Ok((ckpt, tok, model))
}

fn eval_pairs_on<B: Backend>(
    be: &B,
    job: &EvalPairsJob,
    note: &dyn Fn(&str),
) -> Result<PairReport> {
    if job.batch_size == 0 {
        return Err(CommandError::arg("--batch-size", "must be at least 1 pair"));
    }
    let data_tok = data_tokenizer(&job.data)?;
    let (ckpt, tok, mut model) = load_checked(be, &job.checkpoint, &job.data, &data_tok)?;
    let mut reference = match &job.reference {
        Some(r) => {
            if !(job.beta > 0.0 && job.beta.is_finite()) {
                return Err(CommandError::arg(
                    "--beta",
                    format!("{}: must be a positive number", job.beta),
                ));
            }
            let (rdir, _, rmodel) = load_checked(be, r, &job.data, &data_tok)?;
            if rmodel.cfg != model.cfg {
                return Err(invalid(format!(
                    "reference {} has another model shape than the policy {}",
                    rdir.display(),
                    ckpt.display()
                )));
            }
            Some(rmodel)
        }
        None => {
            if model.reward_head().is_none() {
                return Err(invalid(format!(
                    "{} has no reward head: give a reward checkpoint, or a DPO policy with \
                     --reference SFT_CHECKPOINT",
                    ckpt.display()
                )));
            }
            None
        }
    };
    let t = seq_len(job.seq_len, model.cfg.max_seq_len)?;
    if t < 2 {
        return Err(CommandError::arg(
            "--seq-len",
            "must be at least 2 for pairs",
        ));
    }
    let name = format!("prefs_{}", job.split);
    if !job.data.join(format!("{name}.bin")).exists() {
        return Err(DataError::InvalidArgument(format!(
            "{}: no {name}.bin (a `topcoat prepare prefs` directory has prefs_train and prefs_val)",
            job.data.display()
        ))
        .into());
    }
    let split = PairSplit::open(&job.data, &name, model.cfg.vocab_size)?;
    let usable: Vec<usize> = (0..split.len()).filter(|&i| split.fits(i, t)).collect();
    let mode = if reference.is_some() { "dpo" } else { "reward" };
    note(&format!(
        "eval pairs ({mode}): {} on {} {}: {} pairs ({} skipped: a side longer than T = {t}), {} per batch, on {}",
        ckpt.display(),
        job.data.display(),
        job.split,
        usable.len(),
        split.len() - usable.len(),
        job.batch_size,
        be.name()
    ));
    if usable.is_empty() {
        return Err(invalid(format!(
            "none of the {} pairs fits in T = {t} tokens per side",
            split.len()
        )));
    }
    let mut tally = PairTally::default();
    let p = job.batch_size;
    for chunk in usable.chunks(p) {
        let batch = fill_pair_batch(&split, chunk, p, t, tok.eot());
        let rows = batch.rows();
        let rewards: Vec<f64> = match reference.as_mut() {
            None => model
                .reward_forward(be, &batch.inputs, rows, t, &batch.last)?
                .rewards
                .into_iter()
                .map(f64::from)
                .collect(),
            Some(r) => {
                let pi = model.sequence_logps(be, &batch.inputs, &batch.targets, rows, t)?;
                let re = r.sequence_logps(be, &batch.inputs, &batch.targets, rows, t)?;
                pi.iter()
                    .zip(&re)
                    .map(|(a, b)| job.beta * (a - b))
                    .collect()
            }
        };
        tally.add(&rewards, batch.pairs);
    }
    Ok(PairReport {
        mode,
        split: job.split.clone(),
        skipped: split.len() - usable.len(),
        tally,
    })
}

/// `eval generate`: what to generate and how.
#[derive(Clone, Debug)]
pub struct EvalGenerateJob {
    pub checkpoint: PathBuf,
    /// Prompts JSONL (docs/FORMATS.md).
    pub prompts: PathBuf,
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
    /// Where to write one JSON result per prompt.
    pub out: Option<PathBuf>,
}

/// One scored prompt.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GenExample {
    /// 1-based line of the prompts file.
    pub line: usize,
    /// The content of the last prompt message.
    pub prompt: String,
    pub reference: String,
    pub output: String,
    pub exact: bool,
    pub normalized: bool,
    /// Reply tokens generated (the stop token not counted).
    pub tokens: usize,
    /// `end` (`<|end|>` or end-of-text) or `max_new_tokens`.
    pub stop: &'static str,
}

/// What `eval generate` measured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GenReport {
    pub examples: Vec<GenExample>,
}

impl GenReport {
    pub fn exact(&self) -> usize {
        self.examples.iter().filter(|e| e.exact).count()
    }

    pub fn normalized(&self) -> usize {
        self.examples.iter().filter(|e| e.normalized).count()
    }

    pub fn table(&self) -> String {
        let n = self.examples.len().max(1) as f64;
        let mut s = String::from(
            "| examples | exact | exact % | normalised | normalised % | mean reply tokens |\n\
             | --- | --- | --- | --- | --- | --- |\n",
        );
        let _ = writeln!(
            s,
            "| {} | {} | {:.1}% | {} | {:.1}% | {:.1} |",
            self.examples.len(),
            self.exact(),
            100.0 * self.exact() as f64 / n,
            self.normalized(),
            100.0 * self.normalized() as f64 / n,
            self.examples.iter().map(|e| e.tokens).sum::<usize>() as f64 / n
        );
        s
    }
}

/// Generates a reply to every prompt of the file and scores it against the reference.
pub fn eval_generate(
    rt: &Runtime,
    job: &EvalGenerateJob,
    note: &dyn Fn(&str),
) -> Result<GenReport> {
    check_sampling(job.temperature, job.top_p, job.max_new_tokens)?;
    crate::on_backend!(rt, be => eval_generate_on(be, job, note))
}

fn eval_generate_on<B: Backend>(
    be: &B,
    job: &EvalGenerateJob,
    note: &dyn Fn(&str),
) -> Result<GenReport> {
    let params = SampleParams {
        temperature: job.temperature,
        top_k: job.top_k,
        top_p: job.top_p,
    };
    let prompts = read_prompts(&job.prompts)?;
    let ckpt = resolve_checkpoint(&job.checkpoint)?;
    let tok = checkpoint::load_tokenizer(&ckpt)?;
    let model = checkpoint::load_model(be, &ckpt, None)?;
    let end = tok
        .special("<|end|>")
        .ok_or_else(|| invalid(format!("{}: the tokenizer has no <|end|>", ckpt.display())))?;
    let eot = tok.eot();
    note(&format!(
        "eval generate: {} on {} ({} prompts), {} on {}",
        ckpt.display(),
        job.prompts.display(),
        prompts.len(),
        if job.temperature == 0.0 {
            "greedy".to_string()
        } else {
            format!("temperature {}", job.temperature)
        },
        be.name()
    ));
    let mut session = Session::new(be, &model)?;
    let cap = session.capacity();
    let mut rng = Rng::new(job.seed);
    let mut examples = Vec::with_capacity(prompts.len());
    for p in &prompts {
        let ids = render_prompt(&tok, &p.messages);
        session.set_context(&ids[prompt_start(ids.len(), cap)..])?;
        let mut reply = Vec::new();
        let mut stop = "max_new_tokens";
        while reply.len() < job.max_new_tokens {
            let t = session.sample(&params, &mut rng)?;
            if t == end || t == eot {
                stop = "end";
                break;
            }
            reply.push(t);
            if reply.len() < job.max_new_tokens {
                session.push(t)?;
            }
        }
        let output = tok.decode(&reply);
        examples.push(GenExample {
            line: p.line,
            prompt: p
                .messages
                .last()
                .map(|m| m.content.clone())
                .unwrap_or_default(),
            reference: p.reference.clone(),
            exact: exact_match(&output, &p.reference),
            normalized: normalized_match(&output, &p.reference),
            output,
            tokens: reply.len(),
            stop,
        });
    }
    if let Some(out) = &job.out {
        let mut text = String::new();
        for e in &examples {
            text.push_str(&serde_json::to_string(e).expect("an example serialises"));
            text.push('\n');
        }
        let mut f = std::fs::File::create(out).map_err(io_err(out))?;
        f.write_all(text.as_bytes()).map_err(io_err(out))?;
        note(&format!(
            "wrote {} results to {}",
            examples.len(),
            out.display()
        ));
    }
    Ok(GenReport { examples })
}
