//! `eval generate`: replies to a prompts file, scored by exact and normalised match (see the
//! module header of `eval/mod.rs`).

use super::{across, Result};
use crate::backend::{Backend, SampleParams};
use crate::commands::adapter::load_model_with_adapter;
use crate::commands::inputs::{check_sampling, resolve_checkpoint};
use crate::commands::CommandError;
use crate::data::chat::render_prompt;
use crate::dist::Collective;
use crate::generate::{prompt_start, Session};
use crate::rng::Rng;
use crate::runtime::Runtime;
use crate::scoring::{exact_match, normalized_match, read_prompts};
use crate::train::{checkpoint, io_err};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

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
    /// A PEFT adapter directory merged into the checkpoint (`--adapter`).
    pub adapter: Option<PathBuf>,
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
    crate::on_backend!(rt, be, comm => eval_generate_on(be, &**comm, job, note))
}

fn eval_generate_on<B: Backend>(
    be: &B,
    comm: &dyn Collective<B>,
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
    let model = load_model_with_adapter(be, &ckpt, job.adapter.as_deref())?;
    let end = tok.end_of_turn();
    let eot = tok.eot();
    note(&format!(
        "eval generate: {} on {} ({} prompts), {} on {}{}",
        ckpt.display(),
        job.prompts.display(),
        prompts.len(),
        if job.temperature == 0.0 {
            "greedy".to_string()
        } else {
            format!("temperature {}", job.temperature)
        },
        be.name(),
        match (comm.world_size(), job.temperature == 0.0) {
            (1, _) | (_, true) => across(comm.world_size()),
            _ => ", all on rank 0 (sampled replies share one random stream)".to_string(),
        }
    ));
    // Greedy replies do not depend on the random stream: rank r of W takes prompts r, r + W,
    // .... Sampled replies draw from one stream in prompt order, so rank 0 takes them all.
    let (rank, world) = (comm.rank(), comm.world_size());
    let (first, step) = if job.temperature == 0.0 {
        (rank, world)
    } else {
        (if rank == 0 { 0 } else { prompts.len() }, 1)
    };
    let mut session = Session::new(be, &model)?;
    let cap = session.capacity();
    let mut rng = Rng::new(job.seed);
    let mut examples = Vec::with_capacity(prompts.len());
    for p in prompts.iter().skip(first).step_by(step) {
        let ids = render_prompt(&tok, &p.messages)?;
        session.set_context(&ids[prompt_start(ids.len(), cap)..])?;
        let (reply, stop) = reply(
            &mut session,
            &params,
            &mut rng,
            job.max_new_tokens,
            [end, eot],
        )?;
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
    let examples = gather(comm, examples, prompts.len(), job.temperature == 0.0)?;
    if let (Some(out), 0) = (&job.out, rank) {
        write_results(out, &examples)?;
        note(&format!(
            "wrote {} results to {}",
            examples.len(),
            out.display()
        ));
    }
    Ok(GenReport { examples })
}

/// Samples a reply after the session's context, up to `max_new` tokens or a stop token (not
/// part of the reply); says which ended it.
fn reply<B: Backend>(
    session: &mut Session<B>,
    params: &SampleParams,
    rng: &mut Rng,
    max_new: usize,
    stops: [u32; 2],
) -> Result<(Vec<u32>, &'static str)> {
    let mut reply = Vec::new();
    while reply.len() < max_new {
        let t = session.sample(params, rng)?;
        if stops.contains(&t) {
            return Ok((reply, "end"));
        }
        reply.push(t);
        if reply.len() < max_new {
            session.push(t)?;
        }
    }
    Ok((reply, "max_new_tokens"))
}

/// Every rank's examples back in prompt order, at rank 0 (the others get theirs back): each
/// rank in turn broadcasts its examples as JSON lines. `strided`: rank `r` holds prompts
/// `r, r + W, ...`; otherwise rank 0 holds them all.
fn gather<B: Backend>(
    comm: &dyn Collective<B>,
    mine: Vec<GenExample>,
    n: usize,
    strided: bool,
) -> Result<Vec<GenExample>> {
    let (rank, world) = (comm.rank(), comm.world_size());
    if world == 1 || !strided {
        return Ok(mine);
    }
    let mut parts = Vec::with_capacity(world);
    for src in 0..world {
        let bytes = if src == rank {
            to_lines(&mine).into_bytes()
        } else {
            Vec::new()
        };
        let got = comm.broadcast_bytes(bytes, src)?;
        parts.push(from_lines(&got, src)?);
    }
    if rank != 0 {
        return Ok(mine);
    }
    let mut parts: Vec<_> = parts.into_iter().map(Vec::into_iter).collect();
    let mut all = Vec::with_capacity(n);
    for i in 0..n {
        let e = parts[i % world].next().ok_or_else(|| {
            CommandError::invalid(format!(
                "rank {} sent fewer results than the {} prompts it takes of {n}",
                i % world,
                n.saturating_sub(i % world).div_ceil(world)
            ))
        })?;
        all.push(e);
    }
    Ok(all)
}

fn to_lines(examples: &[GenExample]) -> String {
    let mut text = String::new();
    for e in examples {
        text.push_str(&serde_json::to_string(e).expect("an example serialises"));
        text.push('\n');
    }
    text
}

/// The examples `to_lines` wrote, sent by rank `src`.
fn from_lines(bytes: &[u8], src: usize) -> Result<Vec<GenExample>> {
    let bad = |why: String| CommandError::invalid(format!("rank {src}'s eval results: {why}"));
    let text = std::str::from_utf8(bytes).map_err(|e| bad(e.to_string()))?;
    text.lines()
        .map(|l| {
            let w: Wire = serde_json::from_str(l).map_err(|e| bad(e.to_string()))?;
            Ok(GenExample {
                line: w.line,
                prompt: w.prompt,
                reference: w.reference,
                output: w.output,
                exact: w.exact,
                normalized: w.normalized,
                tokens: w.tokens,
                stop: if w.stop == "end" {
                    "end"
                } else {
                    "max_new_tokens"
                },
            })
        })
        .collect()
}

/// [`GenExample`] as read back (its `stop` is a `&'static str`).
#[derive(serde::Deserialize)]
struct Wire {
    line: usize,
    prompt: String,
    reference: String,
    output: String,
    exact: bool,
    normalized: bool,
    tokens: usize,
    stop: String,
}

/// One JSON result per line.
fn write_results(out: &Path, examples: &[GenExample]) -> Result<()> {
    let text = to_lines(examples);
    let mut f = std::fs::File::create(out).map_err(io_err(out))?;
    f.write_all(text.as_bytes()).map_err(io_err(out))?;
    Ok(())
}
