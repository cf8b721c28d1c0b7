//! How big each round of the demo is, picked for the device: on a CPU the `tiny` model and
//! step counts that finish the whole pipeline in under 15 minutes on two cores; on a GPU the
//! `small` model and longer runs; `--quick` a reduced run of a few minutes (the test suite's).

use crate::commands::dpo::DpoStage;
use crate::commands::reward::RewardStage;
use crate::commands::rl::RlStage;
use crate::commands::sft::SftStage;
use crate::commands::stage::Stage;
use crate::config::RunConfig;
use crate::runtime::DeviceKind;

/// The sizes of one demo run.
#[derive(Clone, Debug, PartialEq)]
pub struct DemoPlan {
    /// Vocabulary of the BPE trained on the corpus.
    pub vocab_size: usize,
    pub pretrain: RunConfig,
    pub sft: RunConfig,
    pub reward: RunConfig,
    pub dpo: RunConfig,
    pub rl: RunConfig,
    pub dpo_beta: f64,
    /// RL: completions per prompt, new tokens per completion, KL coefficient.
    pub rl_k: usize,
    pub rl_max_new: usize,
    pub rl_kl_coef: f64,
    /// Most new tokens of an evaluation reply.
    pub reply_tokens: usize,
    /// Most questions evaluated per lemma group (`None`: all).
    pub questions_per_group: Option<usize>,
    /// Held-out questions behind each point of the RL trajectory.
    pub trajectory_questions: usize,
}

/// Sizes for `device`; `quick` shrinks every stage for a smoke run.
pub fn plan(device: DeviceKind, quick: bool, seed: u64) -> DemoPlan {
    let gpu = device == DeviceKind::Cuda;
    let preset = if gpu { "small" } else { "tiny" };
    // Optimizer steps per stage: [pretrain, sft, reward, dpo, rl]. On a GPU, pretraining
    // stops at 400 steps (6.6M tokens, ~57 passes over the embedded corpus's 116K training
    // tokens; measured on an H200: validation loss 9.09 -> 6.42). 3,000 steps memorised the
    // corpus: 6.68 at step 500, back up to 9.16 at the end.
    let steps: [usize; 5] = match (gpu, quick) {
        (false, false) => [900, 150, 80, 80, 60],
        (false, true) => [120, 60, 30, 40, 12],
        (true, false) => [400, 600, 300, 300, 200],
        (true, true) => [400, 100, 50, 50, 20],
    };
    let base = |mut r: RunConfig, steps: usize| {
        r.preset = preset.into();
        r.max_steps = steps;
        r.seed = seed;
        r.warmup_steps = r.warmup_steps.min(steps / 10).max(1);
        r
    };
    let pretrain = RunConfig {
        batch_size: if gpu { 64 } else { 16 },
        seq_len: if gpu { 256 } else { 128 },
        learning_rate: if gpu { 1e-3 } else { 3e-3 },
        warmup_steps: 20,
        val_every: steps[0] / 6,
        val_batches: 4,
        checkpoint_every: steps[0] / 3,
        ..base(RunConfig::default(), steps[0])
    };
    let sft = RunConfig {
        batch_size: if gpu { 32 } else { 8 },
        seq_len: 128,
        pack: true,
        val_every: steps[1] / 3,
        checkpoint_every: steps[1],
        ..base(SftStage::defaults(), steps[1])
    };
    let reward = RunConfig {
        batch_size: if gpu { 64 } else { 16 },
        seq_len: 96,
        learning_rate: 1e-4,
        val_every: steps[2] / 2,
        checkpoint_every: steps[2],
        ..base(RewardStage::defaults(), steps[2])
    };
    let dpo = RunConfig {
        batch_size: if gpu { 32 } else { 8 },
        seq_len: 96,
        learning_rate: 1e-4,
        val_every: steps[3] / 2,
        checkpoint_every: steps[3],
        ..base(DpoStage::defaults(), steps[3])
    };
    let rl = RunConfig {
        batch_size: if gpu { 16 } else { 4 },
        seq_len: 80,
        learning_rate: 3e-5,
        // Every checkpoint is kept and becomes one point of the RL trajectory.
        checkpoint_every: (steps[4] / 6).max(1),
        ..base(RlStage::defaults(), steps[4])
    };
    DemoPlan {
        vocab_size: if gpu { 8192 } else { 4096 },
        pretrain,
        sft,
        reward,
        dpo,
        rl,
        dpo_beta: 0.1,
        rl_k: 4,
        rl_max_new: 40,
        rl_kl_coef: 0.05,
        reply_tokens: 40,
        questions_per_group: if quick { Some(48) } else { None },
        trajectory_questions: if quick { 32 } else { 96 },
    }
}
