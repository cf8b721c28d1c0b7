//! `bench` as library calls on the runtime's backend: the step benchmark (MFU against a
//! measured matmul peak, peak memory), the per-op profile (`--kernels`, through the
//! [`Profiled`] wrapper), the stages side by side (`--stage`) and generation with and without
//! the KV cache (`--generate`). The timing loops live in `timing.rs`; the binary prints the
//! tables.

mod timing;

pub use timing::{
    bench_generate, bench_stages, bench_train, measure_matmul_tflops, median, BenchResult,
    BenchStage, GenBenchResult,
};

use super::CommandError;
use crate::backend::profile::{OpTally, Profiled};
use crate::backend::{Backend, Role};
use crate::config::ModelConfig;
use crate::model::{BatchFlag, MemoryPlan};
use crate::runtime::Runtime;
use std::collections::BTreeMap;

type Result<T> = std::result::Result<T, CommandError>;

/// What to time: a model shape and the steps.
#[derive(Clone, Debug)]
pub struct BenchJob {
    pub model: ModelConfig,
    /// Rows and tokens per row of each step.
    pub batch_size: usize,
    pub seq_len: usize,
    /// Untimed steps first (kernel loading, matmul algorithm choice), then timed ones.
    pub warmup: usize,
    pub steps: usize,
    /// Include the gradient norm and AdamW (false: forward + backward only).
    pub optimizer: bool,
    /// Activation recompute level of every model the benchmark times (`--recompute`).
    pub recompute: u8,
}

impl BenchJob {
    /// Refuses a `seq_len` past the model's context or a zero size, naming the flag.
    pub fn check(&self) -> Result<()> {
        for (flag, v) in [
            ("--batch-size", self.batch_size),
            ("--seq-len", self.seq_len),
            ("--steps", self.steps),
        ] {
            if v == 0 {
                return Err(CommandError::arg(flag, "0: must be at least 1"));
            }
        }
        if self.recompute > 2 {
            let msg = format!("{}: must be 0, 1 or 2", self.recompute);
            return Err(CommandError::arg("--recompute", msg));
        }
        if self.seq_len > self.model.max_seq_len {
            return Err(CommandError::arg(
                "--seq-len",
                format!(
                    "{} exceeds the model's max_seq_len {}",
                    self.seq_len, self.model.max_seq_len
                ),
            ));
        }
        Ok(())
    }

    /// [`Self::check`], and the memory plan against what `be`'s device has free (refused
    /// with the flag that would make it fit); the plan.
    fn check_on<B: Backend>(&self, be: &B) -> Result<MemoryPlan> {
        self.check()?;
        let (b, t) = (self.batch_size, self.seq_len);
        let opts = crate::model::PlanOptions {
            recompute: self.recompute,
            ..Default::default()
        };
        // bench takes --lora-rank: a full model's advice may name it.
        let batch = BatchFlag::ROWS_LORA;
        crate::commands::preflight::check_memory(be, &self.model, b, t, opts, batch, 0)
    }
}

/// The configuration summary ([`crate::commands::plan::describe`]) of `job` on the runtime's
/// backend, its storage as that backend keeps it.
pub fn plan_text(rt: &Runtime, job: &BenchJob, name: &str, storage: &str) -> String {
    crate::on_backend!(rt, be => {
        let bytes = |r| be.element_bytes(r);
        let shape = (job.batch_size, job.seq_len);
        let free = be.memory_available();
        let storage = format!("{storage}: {}", crate::commands::plan::storage_name(&bytes));
        let storage = storage.as_str();
        crate::commands::plan::describe(name, &job.model, shape, job.recompute, &bytes, storage, free)
    })
}

/// What the step benchmark measured, with the peak it is compared against.
pub struct StepReport {
    pub result: BenchResult,
    /// Peak dense TFLOP/s for MFU: given, or measured (with the matmul size used).
    pub peak_tflops: f64,
    pub measured_peak_n: Option<usize>,
    /// The memory plan of the timed steps, and the most memory the process held by their end
    /// (`Backend::peak_memory`; `None` where the backend cannot tell).
    pub plan: MemoryPlan,
    pub peak_memory: Option<u64>,
}

/// The step benchmark; `peak_tflops <= 0` measures the backend's own matmul peak.
pub fn steps(
    rt: &Runtime,
    job: &BenchJob,
    peak_tflops: f64,
    on_step: impl FnMut(usize, f64),
) -> Result<StepReport> {
    job.check()?;
    crate::on_backend!(rt, be => steps_on(be, job, peak_tflops, on_step))
}

fn steps_on<B: Backend>(
    be: &B,
    job: &BenchJob,
    peak_tflops: f64,
    on_step: impl FnMut(usize, f64),
) -> Result<StepReport> {
    let plan = job.check_on(be)?;
    let (b, t) = (job.batch_size, job.seq_len);
    let result = bench_train(
        be,
        (&job.model, job.recompute),
        b,
        t,
        job.warmup,
        job.steps,
        job.optimizer,
        on_step,
    )?;
    // Before the matmul peak is measured: its buffers are no part of a training step.
    let peak_memory = be.peak_memory();
    if peak_tflops > 0.0 {
        return Ok(StepReport {
            result,
            peak_tflops,
            measured_peak_n: None,
            plan,
            peak_memory,
        });
    }
    // Large enough to fill an H100; a CPU gets a size it finishes in about a second.
    let n = if be.element_bytes(Role::Activation) == 2 {
        8192
    } else {
        1024
    };
    Ok(StepReport {
        result,
        peak_tflops: measure_matmul_tflops(be, n)?,
        measured_peak_n: Some(n),
        plan,
        peak_memory,
    })
}

/// The per-op profile of `job.steps` training steps: each op's tally, and the steps timed.
pub fn kernels(
    rt: &Runtime,
    job: &BenchJob,
    on_step: impl FnMut(usize, f64),
) -> Result<(BTreeMap<&'static str, OpTally>, usize)> {
    job.check()?;
    crate::on_backend!(rt, be => kernels_on(be, job, on_step))
}

fn kernels_on<B: Backend>(
    be: &B,
    job: &BenchJob,
    on_step: impl FnMut(usize, f64),
) -> Result<(BTreeMap<&'static str, OpTally>, usize)> {
    job.check_on(be)?;
    let profiled = Profiled::new(be);
    let (b, t, optimizer) = (job.batch_size, job.seq_len, job.optimizer);
    // The warm-up steps load kernels and pick matmul algorithms: keep them out.
    bench_train(
        &profiled,
        (&job.model, job.recompute),
        b,
        t,
        job.warmup,
        0,
        optimizer,
        |_, _| {},
    )?;
    profiled.reset();
    let r = bench_train(
        &profiled,
        (&job.model, job.recompute),
        b,
        t,
        0,
        job.steps,
        optimizer,
        on_step,
    )?;
    Ok((profiled.tally(), r.step_ms.len()))
}

/// The stages' micro-steps side by side (see `timing.rs`).
pub fn stages(
    rt: &Runtime,
    job: &BenchJob,
    stages: &[BenchStage],
    on_step: impl FnMut(BenchStage, usize, f64),
) -> Result<Vec<BenchResult>> {
    job.check()?;
    let (b, t, w, n, opt) = (
        job.batch_size,
        job.seq_len,
        job.warmup,
        job.steps,
        job.optimizer,
    );
    crate::on_backend!(rt, be => {
        job.check_on(be)?;
        Ok(bench_stages(be, (&job.model, job.recompute), stages, b, t, w, n, opt, on_step)?)
    })
}

/// Greedy generation with and without the KV cache: `runs` timed runs of `new_tokens` after a
/// random prompt of `prompt_len` tokens.
pub fn generation(
    rt: &Runtime,
    model: &ModelConfig,
    prompt_len: usize,
    new_tokens: usize,
    runs: usize,
    on_run: impl FnMut(&str, f64),
) -> Result<GenBenchResult> {
    if prompt_len == 0 || new_tokens == 0 || prompt_len + new_tokens > model.max_seq_len {
        return Err(CommandError::arg(
            "--prompt-len/--new-tokens",
            format!(
                "{prompt_len} + {new_tokens} must be positive and fit the model's max_seq_len {}",
                model.max_seq_len
            ),
        ));
    }
    Ok(crate::on_backend!(rt, be => {
        bench_generate(be, model, prompt_len, new_tokens, runs, on_run)
    })?)
}
