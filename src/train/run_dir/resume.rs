//! Which run-config changes a resume accepts ([`resume_changes`]): the saved data position
//! carries over only with the same data settings and the same global batch; the world size may
//! change when the global batch stays the same.

use super::super::{Result, TrainError};
use crate::config::RunConfig;
use std::path::Path;

/// A run config's fields as `(name, value)` text, in declaration order.
fn fields(run: &RunConfig) -> Vec<(String, String)> {
    match serde_json::to_value(run) {
        Ok(serde_json::Value::Object(map)) => map
            .into_iter()
            .map(|(k, v)| {
                let text = match v {
                    serde_json::Value::String(s) => s,
                    // The config's reals are f32: shown as written (0.003, not 0.003000000026).
                    serde_json::Value::Number(n) if n.is_f64() => {
                        (n.as_f64().unwrap_or(f64::NAN) as f32).to_string()
                    }
                    other => other.to_string(),
                };
                (k, text)
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Fields the saved data position depends on: a resume must keep them. (The world size and
/// `total_batch_tokens` may change together as long as the global batch stays the same:
/// [`world_change`]; `rank` is each process's own.)
const FIXED: [&str; 5] = ["preset", "batch_size", "seq_len", "seed", "pack"];

/// Fields a resume neither refuses nor notes: checked by [`world_change`] or per process.
const SPECIAL: [&str; 3] = ["rank", "world_size", "total_batch_tokens"];

/// LoRA's settings: the model's, checked against the checkpoint's `config.json` before the model
/// is built (`commands::inputs::resumed_lora`; none given keeps the checkpoint's), so neither
/// refused nor noted here.
const LORA: [&str; 4] = ["lora_rank", "lora_alpha", "lora_dropout", "lora_targets"];

/// Tokens per optimizer step over all ranks: `total_batch_tokens`, or with 0 one micro-batch
/// per rank.
fn global_batch(run: &RunConfig) -> usize {
    if run.total_batch_tokens == 0 {
        run.world_size * run.batch_size * run.seq_len
    } else {
        run.total_batch_tokens
    }
}

/// A change of world size or `total_batch_tokens` between the checkpoint's run (`old`) and the
/// resume (`new`): `Ok(None)` when neither changed, `Ok(Some(note))` when the global batch is
/// the same (the data position, in global units, carries over), and the reason otherwise.
fn world_change(old: &RunConfig, new: &RunConfig) -> std::result::Result<Option<String>, String> {
    if old.world_size == new.world_size && old.total_batch_tokens == new.total_batch_tokens {
        return Ok(None);
    }
    let (was, now) = (global_batch(old), global_batch(new));
    let micro = new.batch_size * new.seq_len;
    let per_step = micro * new.world_size.max(1);
    if was != now {
        let fix = if new.world_size > 0 && micro > 0 && was.is_multiple_of(per_step) {
            format!(
                "set total_batch_tokens = {was} (each rank then runs {} micro-batches per step)",
                was / per_step
            )
        } else {
            format!(
                "no total_batch_tokens keeps it at world size {} with batch_size {} and seq_len \
                 {} (it must be a multiple of {per_step}); resume at world size {}, or start a \
                 new run in another --out",
                new.world_size, new.batch_size, new.seq_len, old.world_size
            )
        };
        return Err(format!(
            "it was trained with a global batch of {was} tokens per step (world_size {}, \
             total_batch_tokens {}), and world_size {} with total_batch_tokens {} makes it {now}; \
             the data position only carries over with the same global batch: {fix}",
            old.world_size, old.total_batch_tokens, new.world_size, new.total_batch_tokens
        ));
    }
    if micro == 0 || !now.is_multiple_of(per_step) {
        return Err(format!(
            "its global batch of {now} tokens is not a multiple of world_size {} x batch_size {} \
             x seq_len {} = {per_step}; resume at world size {}, or choose a batch_size that \
             divides it",
            new.world_size, new.batch_size, new.seq_len, old.world_size
        ));
    }
    if old.world_size == new.world_size {
        // total_batch_tokens 0 <-> its explicit value: the same run.
        return Ok(Some(format!(
            "total_batch_tokens {} -> {} (the same global batch)",
            old.total_batch_tokens, new.total_batch_tokens
        )));
    }
    Ok(Some(format!(
        "resuming at world size {} (was {}): the global batch of {now} tokens is unchanged; \
         each rank runs {} micro-batches per step",
        new.world_size,
        old.world_size,
        now / per_step
    )))
}

/// Compares the run config a checkpoint (`ckpt`, after `step` steps) was trained with (`old`)
/// with the one a resume asks for (`new`). Changes of [`FIXED`] fields, a world size or
/// `total_batch_tokens` that changes the global batch ([`world_change`]), or a `max_steps`
/// below `step`, are a [`TrainError::ResumeMismatch`]; the others (schedule, optimizer,
/// cadence, the ZeRO stage, a world size that keeps the global batch) are returned as notes
/// (`field old -> new`, and the world-size sentence).
pub fn resume_changes(
    ckpt: &Path,
    step: usize,
    old: &RunConfig,
    new: &RunConfig,
) -> Result<Vec<String>> {
    let old_fields = fields(old);
    let new_fields = fields(new);
    let (mut refused, mut notes) = (Vec::new(), Vec::new());
    for ((name, was), (_, now)) in old_fields.iter().zip(&new_fields) {
        if was == now || SPECIAL.contains(&name.as_str()) || LORA.contains(&name.as_str()) {
            continue;
        }
        let change = format!("{name} {was} -> {now}");
        if FIXED.contains(&name.as_str()) {
            refused.push(change);
        } else {
            notes.push(change);
        }
    }
    let mismatch = |why: String| TrainError::ResumeMismatch {
        ckpt: ckpt.to_path_buf(),
        why,
    };
    if !refused.is_empty() {
        return Err(mismatch(format!(
            "it was trained with other data settings ({}), and its data position only carries \
             over with the same ones; resume with the original values, or start a new run \
             in another --out",
            refused.join(", ")
        )));
    }
    match world_change(old, new) {
        Ok(Some(note)) => notes.insert(0, note),
        Ok(None) => {}
        Err(why) => return Err(mismatch(why)),
    }
    if new.max_steps < step {
        return Err(mismatch(format!(
            "it is at step {step}, past the requested max_steps {}; ask for max_steps {step} \
             or more",
            new.max_steps
        )));
    }
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_refuses_data_fields_and_notes_the_rest() {
        let old = RunConfig::default();
        let new = RunConfig {
            batch_size: 4,
            seed: 7,
            ..old.clone()
        };
        let err = resume_changes(Path::new("ck"), 10, &old, &new)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("batch_size 8 -> 4") && err.contains("seed 1337 -> 7"),
            "{err}"
        );
        let new = RunConfig {
            learning_rate: 1e-3,
            ..old.clone()
        };
        let notes = resume_changes(Path::new("ck"), 10, &old, &new).unwrap();
        assert_eq!(notes, vec!["learning_rate 0.003 -> 0.001".to_string()]);
        let short = RunConfig {
            max_steps: 5,
            ..old.clone()
        };
        let err = resume_changes(Path::new("ck"), 10, &old, &short)
            .unwrap_err()
            .to_string();
        assert!(err.contains("past the requested max_steps 5"), "{err}");
    }

    /// A run config at `world` ranks with `tbt` total_batch_tokens (micro-batch 2 x 16 = 32).
    fn at(world: usize, tbt: usize) -> RunConfig {
        RunConfig {
            batch_size: 2,
            seq_len: 16,
            world_size: world,
            total_batch_tokens: tbt,
            ..RunConfig::default()
        }
    }

    fn why(old: &RunConfig, new: &RunConfig) -> String {
        match resume_changes(Path::new("ck"), 4, old, new).unwrap_err() {
            TrainError::ResumeMismatch { why, .. } => why,
            e => panic!("not a mismatch: {e}"),
        }
    }

    #[test]
    fn another_world_size_with_the_same_global_batch_is_a_note() {
        let notes = resume_changes(Path::new("ck"), 4, &at(3, 192), &at(2, 192)).unwrap();
        assert_eq!(
            notes,
            vec![
                "resuming at world size 2 (was 3): the global batch of 192 tokens is unchanged; \
                 each rank runs 3 micro-batches per step"
                    .to_string()
            ]
        );
        let other_rank = RunConfig {
            rank: 2,
            zero: 1,
            ..at(3, 192)
        };
        let notes = resume_changes(Path::new("ck"), 4, &at(3, 192), &other_rank).unwrap();
        assert_eq!(
            notes,
            vec!["zero 0 -> 1".to_string()],
            "rank is never compared"
        );
        // One micro-batch per rank at world size 2 is total_batch_tokens 64 spelled out.
        let notes = resume_changes(Path::new("ck"), 4, &at(2, 0), &at(2, 64)).unwrap();
        assert_eq!(
            notes,
            vec!["total_batch_tokens 0 -> 64 (the same global batch)".to_string()]
        );
        let notes = resume_changes(Path::new("ck"), 4, &at(2, 0), &at(1, 64)).unwrap();
        assert_eq!(
            notes,
            vec![
                "resuming at world size 1 (was 2): the global batch of 64 tokens is unchanged; \
                 each rank runs 2 micro-batches per step"
                    .to_string()
            ]
        );
    }

    #[test]
    fn a_world_size_that_changes_the_global_batch_is_refused() {
        assert_eq!(
            why(&at(3, 0), &at(2, 0)),
            "it was trained with a global batch of 96 tokens per step (world_size 3, \
             total_batch_tokens 0), and world_size 2 with total_batch_tokens 0 makes it 64; the \
             data position only carries over with the same global batch: no total_batch_tokens \
             keeps it at world size 2 with batch_size 2 and seq_len 16 (it must be a multiple of \
             64); resume at world size 3, or start a new run in another --out"
        );
        assert_eq!(
            why(&at(2, 0), &at(1, 0)),
            "it was trained with a global batch of 64 tokens per step (world_size 2, \
             total_batch_tokens 0), and world_size 1 with total_batch_tokens 0 makes it 32; the \
             data position only carries over with the same global batch: set \
             total_batch_tokens = 64 (each rank then runs 2 micro-batches per step)"
        );
        assert_eq!(
            why(&at(2, 192), &at(4, 192)),
            "its global batch of 192 tokens is not a multiple of world_size 4 x batch_size 2 x \
             seq_len 16 = 128; resume at world size 2, or choose a batch_size that divides it"
        );
    }
}
