//! `topcoat eval` as library calls: [`eval_loss`] (mean token loss over a prepared shard split),
//! [`eval_pairs`] (reward-model accuracy, or DPO implicit-reward accuracy against a reference,
//! on a `prepare prefs` split) and [`eval_generate`] (replies to a prompts file scored by exact
//! and normalised match, `scoring.rs`), one file each. Each returns a report whose `table()` the binary prints.
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

mod generate;
mod loss;
mod pairs;

pub use generate::{eval_generate, EvalGenerateJob, GenExample, GenReport};
pub use loss::{eval_loss, EvalLossJob, LossReport};
pub use pairs::{eval_pairs, EvalPairsJob, PairReport};

use super::CommandError;

type Result<T> = std::result::Result<T, CommandError>;

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
