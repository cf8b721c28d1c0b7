//! `topcoat report`: a demo run directory (`report_card.json` plus each stage's
//! `metrics.jsonl`) rendered as ONE self-contained HTML file: the card as tables, the fixed
//! prompts side by side, and plots drawn here as inline SVG (no JavaScript, no external
//! resources). The page is well-formed XML too. A stage whose `metrics.jsonl` is missing gets a
//! note in place of its plots; the rest of the report is still written.

pub mod card; // the report card's schema (report_card.json), which the demo fills
pub mod html;
pub mod plots;
pub mod svg;
pub mod table; // the card as Markdown tables (rounds, stage timings, samples)

use card::{ReportCard, CARD_FILE};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// File name of the metrics inside each stage's directory.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// File name `topcoat report` writes in the run directory unless told otherwise.
pub const REPORT_FILE: &str = "report.html";

/// Why a report could not be made; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("not a demo run directory: {} has no {CARD_FILE}; run `topcoat demo` first", dir.display())]
    NotARun { dir: PathBuf },

    #[error("{}: line {line}, column {column}: {msg}", path.display())]
    Card {
        path: PathBuf,
        line: usize,
        column: usize,
        msg: String,
    },

    #[error("{}: line {line}: {msg}", path.display())]
    MetricsLine {
        path: PathBuf,
        line: usize,
        msg: String,
    },

    #[error("{}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, ReportError>;

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> ReportError {
    let path = path.to_path_buf();
    move |source| ReportError::Io { path, op, source }
}

/// What [`write_report`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct ReportSummary {
    pub path: PathBuf,
    pub bytes: usize,
    /// `<svg>` plots in the page.
    pub plots: usize,
    /// What is missing from the page (a stage without metrics, a plot without data).
    pub notes: Vec<String>,
}

/// The records of one `metrics.jsonl`, in file order (step and validation records alike).
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub records: Vec<Map<String, Value>>,
}

impl Metrics {
    /// Reads `path`: one JSON object per line, blank lines skipped, unknown keys kept.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(io_err(path, "reading metrics"))?;
        Self::parse(&text, path)
    }

    /// Parses the text of a metrics file; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let mut records = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let err = |msg: String| ReportError::MetricsLine {
                path: path.to_path_buf(),
                line: i + 1,
                msg,
            };
            match serde_json::from_str::<Value>(line) {
                Ok(Value::Object(map)) => records.push(map),
                Ok(other) => {
                    return Err(err(format!(
                        "expected a JSON object, found {}",
                        json_kind(&other)
                    )))
                }
                Err(e) => return Err(err(format!("not JSON: {e}"))),
            }
        }
        Ok(Self { records })
    }

    /// `(step, value)` of every record holding `key` as a finite number (and a numeric step).
    pub fn series(&self, key: &str) -> Vec<(f64, f64)> {
        (self.records.iter())
            .filter_map(|r| {
                let step = r.get("step")?.as_f64()?;
                let v = r.get(key)?.as_f64()?;
                v.is_finite().then_some((step, v))
            })
            .collect()
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads `run_dir/report_card.json`.
pub fn load_card(run_dir: &Path) -> Result<ReportCard> {
    let path = run_dir.join(CARD_FILE);
    if !path.is_file() {
        return Err(ReportError::NotARun {
            dir: run_dir.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(&path).map_err(io_err(&path, "reading the card"))?;
    serde_json::from_str(&text).map_err(|e| ReportError::Card {
        line: e.line(),
        column: e.column(),
        msg: e.to_string(),
        path,
    })
}

/// The rendered page and what it holds.
struct Rendered {
    html: String,
    plots: usize,
    notes: Vec<String>,
}

fn render(run_dir: &Path) -> Result<Rendered> {
    let card = load_card(run_dir)?;
    let name = (run_dir.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| run_dir.display().to_string());
    let mut body = format!(
        "<h1>topcoat demo report: {}</h1>\n<p class=\"meta\">device: {} &#183; preset: {} &#183; \
         data: {} &#183; wall time: {} &#183; run directory: {}</p>\n",
        html::escape(&name),
        html::escape(&card.device),
        html::escape(&card.preset),
        html::escape(&card.data),
        html::escape(&table::duration(card.wall_s)),
        html::escape(&run_dir.display().to_string()),
    );
    body.push_str("<h2>Report card</h2>\n");
    body.push_str(&html::table(&card.card_grid(), "card", "card", true));
    body.push_str("<h2>Stages</h2>\n");
    body.push_str(&html::table(&card.stages_grid(), "stages", "stages", true));

    let mut plots = 0;
    let mut notes = Vec::new();
    body.push_str("<h2>Training curves</h2>\n<div class=\"plots\">\n");
    for stage in &card.stages {
        let path = run_dir.join(&stage.dir).join(METRICS_FILE);
        if !path.is_file() {
            let note = format!(
                "stage {}: no {} ({} not found), so no plots",
                stage.name,
                METRICS_FILE,
                path.display()
            );
            body.push_str(&format!(
                "<p class=\"note\" id=\"missing-{}\">{}</p>\n",
                html::escape(&stage.name),
                html::escape(&note)
            ));
            notes.push(note);
            continue;
        }
        let metrics = Metrics::read(&path)?;
        for (plot, caption) in plots::stage_plots(&stage.name, &metrics) {
            if !plot.has_data() {
                notes.push(format!("{}: no data in {}", plot.id, path.display()));
            }
            body.push_str(&figure(&plot, &caption));
            plots += 1;
        }
    }
    body.push_str("</div>\n<h2>Reward hacking: RL checkpoints against KL to the SFT model</h2>\n");
    let (plot, caption) = plots::rl_kl_plot(&card.rl_trajectory);
    if !plot.has_data() {
        notes.push(format!("{}: the card has no RL trajectory", plot.id));
    }
    body.push_str(&figure(&plot, &caption));
    plots += 1;

    body.push_str("<h2>Samples</h2>\n");
    body.push_str(&html::table(
        &card.samples_grid(None),
        "samples",
        "samples",
        false,
    ));
    let html = html::page(&format!("topcoat demo report: {name}"), &body);
    Ok(Rendered { html, plots, notes })
}

fn figure(plot: &svg::Plot, caption: &str) -> String {
    format!(
        "<figure>\n{}\n<figcaption>{}</figcaption>\n</figure>\n",
        plot.svg(),
        html::escape(caption)
    )
}

/// The report of `run_dir` as one HTML document.
pub fn render_report(run_dir: &Path) -> Result<String> {
    Ok(render(run_dir)?.html)
}

/// Renders the report of `run_dir` and writes it to `out` (through a temporary file, so a
/// failed write leaves no half page).
pub fn write_report(run_dir: &Path, out: &Path) -> Result<ReportSummary> {
    let r = render(run_dir)?;
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, &r.html).map_err(io_err(&tmp, "writing the report"))?;
    std::fs::rename(&tmp, out).map_err(io_err(out, "writing the report"))?;
    Ok(ReportSummary {
        path: out.to_path_buf(),
        bytes: r.html.len(),
        plots: r.plots,
        notes: r.notes,
    })
}
