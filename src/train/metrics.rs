//! Metrics as JSON lines (`metrics.jsonl` in the run directory) and the live progress line,
//! [`Extras`]: the named values a stage reports beside its loss (accuracy, margin, ...), and
//! [`ValPartial`]: one rank's share of a validation loss, summed across ranks.

use super::{io_err, Result};
use serde_json::Value;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Appends one JSON object per line; on resume, forgets records past the resumed step so the
/// file reads as if the run had never stopped.
pub struct MetricsLog {
    path: PathBuf,
    file: File,
}

impl MetricsLog {
    /// Opens `dir/metrics.jsonl`. `keep_until`: `None` starts a fresh file; `Some(step)` keeps
    /// the records whose `step` is at most `step` (a resumed run).
    pub fn open(dir: &Path, keep_until: Option<usize>) -> Result<Self> {
        let path = dir.join("metrics.jsonl");
        let kept: Vec<String> = match (keep_until, path.exists()) {
            (Some(step), true) => {
                let f = File::open(&path).map_err(io_err(&path))?;
                BufReader::new(f)
                    .lines()
                    .map_while(std::result::Result::ok)
                    .filter(|line| {
                        serde_json::from_str::<Value>(line)
                            .ok()
                            .and_then(|v| v.get("step").and_then(Value::as_u64))
                            .is_some_and(|s| s as usize <= step)
                    })
                    .collect()
            }
            _ => Vec::new(),
        };
        let tmp = dir.join("metrics.jsonl.tmp");
        {
            let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
            for line in &kept {
                writeln!(f, "{line}").map_err(io_err(&tmp))?;
            }
        }
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(Self { path, file })
    }

    pub fn write(&mut self, record: &Value) -> Result<()> {
        writeln!(self.file, "{record}").map_err(io_err(&self.path))?;
        self.file.flush().map_err(io_err(&self.path))
    }
}

/// Named values a stage reports beside its loss, in the stage's order (e.g. `accuracy`,
/// `margin`). The loop writes them into the step or validation record (validation names get a
/// `val_` prefix) and onto the progress line.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Extras(pub Vec<(String, f32)>);

impl Extras {
    pub fn push(&mut self, name: impl Into<String>, value: f32) {
        self.0.push((name.into(), value));
    }

    pub fn get(&self, name: &str) -> Option<f32> {
        self.0.iter().find(|(n, _)| n == name).map(|&(_, v)| v)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds every value to the JSON object `record` as `prefix + name`.
    pub fn add_to(&self, record: &mut Value, prefix: &str) {
        if let Value::Object(map) = record {
            for (name, v) in &self.0 {
                map.insert(format!("{prefix}{name}"), Value::from(*v));
            }
        }
    }

    /// ` | name value` for each value, for the progress line.
    pub fn progress_text(&self, prefix: &str) -> String {
        self.0
            .iter()
            .map(|(name, v)| format!(" | {prefix}{name} {v:.4}"))
            .collect()
    }
}

/// One rank's share of a validation: the summed loss and what it is a sum over (tokens for
/// cross-entropy, pairs for reward and DPO). The ranks' partials added in rank order give the
/// validation of the whole set; [`ValPartial::mean`] is the loss the run reports.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ValPartial {
    pub sum: f64,
    pub count: f64,
}

impl ValPartial {
    /// `sum / count`, or `None` when nothing was counted (a rank whose share is empty, or a
    /// validation set with no scored token).
    pub fn mean(&self) -> Option<f32> {
        (self.count > 0.0).then(|| (self.sum / self.count) as f32)
    }

    /// Adds another rank's partial (callers add them in rank order, so the sum is the same on
    /// every rank and at every world size up to the rounding of that order).
    pub fn add(&mut self, other: &ValPartial) {
        self.sum += other.sum;
        self.count += other.count;
    }
}

/// Formats a duration as `1h02m`, `3m05s` or `12s`.
pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// A progress line on stderr: redrawn in place on a terminal, one line every `every` steps
/// otherwise (logs and CI stay readable).
pub struct Progress {
    tty: bool,
    every: usize,
    quiet: bool,
}

impl Progress {
    pub fn new(quiet: bool, every: usize) -> Self {
        Self {
            tty: std::io::stderr().is_terminal(),
            every: every.max(1),
            quiet,
        }
    }

    pub fn step(&self, step: usize, total: usize, text: &str) {
        if self.quiet {
            return;
        }
        if self.tty {
            eprint!("\r\x1b[2K{text}");
            if step == total {
                eprintln!();
            }
        } else if step.is_multiple_of(self.every) || step == total || step == 1 {
            eprintln!("{text}");
        }
    }

    /// A line that stays (validation results, checkpoints).
    pub fn note(&self, text: &str) {
        if self.quiet {
            return;
        }
        if self.tty {
            eprint!("\r\x1b[2K");
        }
        eprintln!("{text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_drops_records_past_the_resumed_step() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(dir.path(), None).unwrap();
        for step in 1..=5 {
            log.write(&serde_json::json!({"step": step, "loss": 1.0}))
                .unwrap();
        }
        drop(log);
        let mut log = MetricsLog::open(dir.path(), Some(3)).unwrap();
        log.write(&serde_json::json!({"step": 4, "loss": 2.0}))
            .unwrap();
        let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        let steps: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, vec![1, 2, 3, 4]);
    }

    #[test]
    fn extras_join_the_record_and_the_progress_line() {
        let mut x = Extras::default();
        x.push("accuracy", 0.75);
        x.push("margin", -0.5);
        let mut record = serde_json::json!({"step": 3});
        x.add_to(&mut record, "val_");
        assert_eq!(record["val_accuracy"], 0.75);
        assert_eq!(record["val_margin"], -0.5);
        assert_eq!(record["step"], 3);
        assert_eq!(x.get("margin"), Some(-0.5));
        assert_eq!(x.progress_text(""), " | accuracy 0.7500 | margin -0.5000");
    }

    #[test]
    fn partials_add_up_and_an_empty_one_has_no_mean() {
        let mut p = ValPartial {
            sum: 7.25,
            count: 3.0,
        };
        assert_eq!(ValPartial::default().mean(), None);
        p.add(&ValPartial {
            sum: 2.75,
            count: 1.0,
        });
        assert_eq!(
            p,
            ValPartial {
                sum: 10.0,
                count: 4.0
            }
        );
        assert_eq!(p.mean(), Some(2.5));
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(fmt_duration(Duration::from_secs(12)), "12s");
        assert_eq!(fmt_duration(Duration::from_secs(185)), "3m05s");
        assert_eq!(fmt_duration(Duration::from_secs(3720)), "1h02m");
    }
}
