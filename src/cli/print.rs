//! What the binary prints: progress notes (stderr), a training run's summary, the summaries of
//! `prepare`, and `prepare`'s progress line.

use std::io::IsTerminal;
use std::path::Path;
use topcoat::data::{PrefsPrepareSummary, PrepareSummary, ProgressEvent, SftPrepareSummary};
use topcoat::train::TrainSummary;

/// A status line on stderr (stdout carries only results).
pub fn note(msg: &str) {
    eprintln!("{msg}");
}

/// What a training run did.
pub fn train_summary(s: &TrainSummary) {
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

/// `prepare`'s progress: one line rewritten in place on a terminal, one line per event
/// elsewhere. Call [`PrepareProgress::finish`] when done.
pub struct PrepareProgress {
    tty: bool,
}

impl PrepareProgress {
    pub fn new() -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
        }
    }

    pub fn event(&self, ev: &ProgressEvent) {
        let line = describe_progress(ev);
        if self.tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    }

    pub fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

/// Progress text for `prepare`.
fn describe_progress(ev: &ProgressEvent) -> String {
    match ev {
        ProgressEvent::Start { files, docs, bytes } => {
            format!(
                "{files} files, {docs} documents, {:.1} MB",
                *bytes as f64 / 1e6
            )
        }
        ProgressEvent::Progress {
            docs_done,
            docs_total,
            bytes_done,
            bytes_total,
            tokens,
        } => format!(
            "{:5.1}% | {docs_done}/{docs_total} documents | {:.1}/{:.1} MB | {tokens} tokens",
            100.0 * *bytes_done as f64 / (*bytes_total).max(1) as f64,
            *bytes_done as f64 / 1e6,
            *bytes_total as f64 / 1e6
        ),
        ProgressEvent::ShardDone { name, tokens } => format!("wrote {name} ({tokens} tokens)"),
    }
}

/// What `prepare` wrote.
pub fn prepared_text(out: &Path, s: &PrepareSummary, vocab: usize) {
    println!(
        "{}: {} train documents ({} tokens, {} files), {} val documents ({} tokens, {} files), tokenizer.json ({vocab} ids)",
        out.display(),
        s.docs_train,
        s.tokens_train,
        s.train_files.len(),
        s.docs_val,
        s.tokens_val,
        s.val_files.len(),
    );
}

/// What `prepare sft` wrote.
pub fn prepared_sft(out: &Path, s: &SftPrepareSummary, max_len: usize) {
    println!(
        "{}: {} conversations -> {} train examples ({} tokens, {} trained on), {} val examples ({} tokens); \
         {} truncated to --max-len {max_len}, {} dropped (no response token within it)",
        out.display(),
        s.conversations,
        s.train_examples,
        s.train_tokens,
        s.train_loss_tokens,
        s.val_examples,
        s.val_tokens,
        s.truncated,
        s.dropped
    );
}

/// What `prepare prefs` wrote.
pub fn prepared_prefs(out: &Path, s: &PrefsPrepareSummary, max_len: usize) {
    println!(
        "{}: {} pairs -> {} train pairs ({} tokens), {} val pairs ({} tokens); dropped {} with a side \
         longer than --max-len {max_len} (longest {} tokens), {} with identical sides",
        out.display(),
        s.pairs,
        s.train_pairs,
        s.train_tokens,
        s.val_pairs,
        s.val_tokens,
        s.too_long,
        s.longest,
        s.identical
    );
}
