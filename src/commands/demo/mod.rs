//! `topcoat demo`: the three rounds of training on the embedded demo data, measured.
//!
//! One command runs pretrain -> SFT -> reward model -> DPO -> RL on the data set of
//! `data/demo/` (WordNet definitions and FAQ pages, `data.rs`), at sizes picked for the device
//! (`plan.rs`), on the one backend the runtime opened, through the same stage runner as the
//! training commands (`runner.rs`); it measures each round's model as it finishes (`rounds.rs`,
//! `measure.rs`) and ends with the report card (`commands/report/card.rs`), written to
//! `RUN/report_card.json`, and its HTML page (`commands/report`, `RUN/report.html`). Layout of
//! `RUN`: `data/` (the source files and the prepared shards), `base/`, `sft/`, `reward/`,
//! `dpo/`, `rl/` (each a run directory with `metrics.jsonl` and checkpoints).
//!
//! Restarting: a stage whose final checkpoint exists is reused, one with an earlier checkpoint
//! resumes from it, so a stopped demo continues where it stopped; the measurements are taken
//! again (they are deterministic), and the card is written atomically at the end.

mod data;
mod measure;
mod plan;
mod rounds;
mod runner;

pub use data::{read_questions, FILES};
pub use measure::{is_question, token_f1, Question};
pub use plan::{plan, DemoPlan};

use super::report::card::{ReportCard, CARD_FILE};
use super::report::{write_report, REPORT_FILE};
use super::CommandError;
use crate::runtime::Runtime;
use crate::train::io_err;
use std::path::{Path, PathBuf};

/// A demo run as the CLI describes it.
pub struct DemoJob {
    /// The demo run directory.
    pub out: PathBuf,
    /// A demo data directory (the files of [`FILES`]); `None` uses the embedded set.
    pub data: Option<PathBuf>,
    /// A reduced run of a few minutes.
    pub quick: bool,
    pub seed: u64,
}

/// Runs the demo on the runtime's backend and returns its card (also written to
/// `out/report_card.json`, and rendered to `out/report.html`).
pub fn demo(
    rt: &Runtime,
    job: &DemoJob,
    progress: &dyn Fn(&str),
) -> Result<ReportCard, CommandError> {
    let card = crate::on_backend!(rt, be => runner::run(be, rt, job, progress))?;
    let page = job.out.join(REPORT_FILE);
    let summary = write_report(&job.out, &page)?;
    progress(&format!(
        "wrote {} ({} plots)",
        summary.path.display(),
        summary.plots
    ));
    Ok(card)
}

/// Writes `card` to `dir/report_card.json` through a temporary file and a rename.
pub fn write_card(dir: &Path, card: &ReportCard) -> Result<PathBuf, CommandError> {
    let path = dir.join(CARD_FILE);
    let tmp = dir.join(format!(".{CARD_FILE}.tmp"));
    let text = serde_json::to_string_pretty(card).expect("the card serialises");
    std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    Ok(path)
}
