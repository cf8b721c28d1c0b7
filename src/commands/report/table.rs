//! The report card as tables: one row per round, the stage timings, and the fixed prompts with
//! every round's reply. [`Grid`] holds the cells once; the demo prints them as Markdown
//! ([`ReportCard::table`], [`ReportCard::samples_table`]) and `topcoat report` renders the same
//! grids as HTML.

use super::card::{PolicyRound, Replies, ReportCard};
use std::collections::BTreeMap;

/// Lemma groups of the answer scores, in column order.
pub const GROUPS: [&str; 3] = ["train", "heldout", "control"];

/// Replies longer than this many characters are cut in the Markdown samples table.
pub const SAMPLE_CHARS: usize = 80;

/// Shown in a cell whose round does not measure that column (or whose value is not finite).
pub const NOT_MEASURED: &str = "-";

/// A table of plain-text cells: a header and rows of the same width.
#[derive(Clone, Debug, PartialEq)]
pub struct Grid {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Grid {
    /// GitHub-flavoured Markdown: `|` escaped, line breaks flattened to spaces.
    pub fn markdown(&self) -> String {
        let line = |cells: &[String]| {
            let cells: Vec<String> = cells.iter().map(|c| markdown_cell(c)).collect();
            format!("| {} |\n", cells.join(" | "))
        };
        let mut s = line(&self.header);
        s.push_str(&format!("|{}\n", " --- |".repeat(self.header.len())));
        for row in &self.rows {
            s.push_str(&line(row));
        }
        s
    }
}

fn markdown_cell(text: &str) -> String {
    text.replace('|', "\\|")
        .replace("\r\n", " ")
        .replace(['\n', '\r'], " ")
}

/// `0.1234` -> `12.3%`; not finite -> `-`.
pub fn pct(fraction: f64) -> String {
    if fraction.is_finite() {
        format!("{:.1}%", fraction * 100.0)
    } else {
        NOT_MEASURED.to_string()
    }
}

/// A number with `decimals` digits; not finite -> `-`.
pub fn num(value: f64, decimals: usize) -> String {
    if value.is_finite() {
        format!("{value:.decimals$}")
    } else {
        NOT_MEASURED.to_string()
    }
}

/// Seconds as `42.0 s` below two minutes, else `12 min 05 s`.
pub fn duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        NOT_MEASURED.to_string()
    } else if seconds < 120.0 {
        format!("{seconds:.1} s")
    } else {
        let s = seconds.round() as u64;
        format!("{} min {:02} s", s / 60, s % 60)
    }
}

/// `text` cut to at most `max` characters, the cut marked with `...`.
pub fn trim_chars(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let kept: String = text.chars().take(max.saturating_sub(3)).collect();
    format!("{}...", kept.trim_end())
}

/// One score per lemma group, `a / b / c`.
fn by_group(replies: &Replies, score: impl Fn(f64, f64) -> f64) -> String {
    GROUPS
        .iter()
        .map(|g| match replies.groups.get(*g) {
            Some(s) => pct(score(s.exact, s.f1)),
            None => NOT_MEASURED.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

/// The columns every answering round shares: question rate .. F1 by group.
fn reply_cells(r: &Replies) -> [String; 4] {
    [
        pct(r.question_rate),
        pct(r.answer_rate),
        by_group(r, |exact, _| exact),
        by_group(r, |_, f1| f1),
    ]
}

/// The knowledge probe as a note: how often the right gloss beats a co-hyponym's.
fn probe_note(probe: &BTreeMap<String, f64>) -> String {
    let get = |g: &str| probe.get(g).map_or(NOT_MEASURED.to_string(), |&x| pct(x));
    format!(
        "right gloss preferred: held-out {}, control {}",
        get("heldout"),
        get("control")
    )
}

fn policy_row(name: &str, p: &PolicyRound) -> Vec<String> {
    let [q, a, exact, f1] = reply_cells(&p.replies);
    vec![
        name.to_string(),
        NOT_MEASURED.into(),
        q,
        a,
        exact,
        f1,
        pct(p.heldout_pref_accuracy),
        pct(p.win_rate_vs_sft),
        num(p.kl_to_sft, 2),
        num(p.replies.mean_tokens, 1),
        String::new(),
    ]
}

impl ReportCard {
    /// One row per round (base, sft, reward model, dpo, rl); a column a round does not measure
    /// holds `-`.
    pub fn card_grid(&self) -> Grid {
        let header = [
            "round",
            "val loss",
            "question rate",
            "answer rate",
            "exact (train / heldout / control)",
            "F1 (train / heldout / control)",
            "held-out pref. accuracy",
            "win rate vs SFT",
            "KL to SFT",
            "reply tokens",
            "notes",
        ];
        Grid {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: vec![
                self.base_row(),
                self.sft_row(),
                self.reward_row(header.len()),
                policy_row("dpo", &self.dpo),
                policy_row("rl", &self.rl),
            ],
        }
    }

    fn base_row(&self) -> Vec<String> {
        let dash = || NOT_MEASURED.to_string();
        let [q, a, exact, f1] = reply_cells(&self.base.replies);
        let loss = format!(
            "{} -> {}",
            num(self.base.val_loss_start, 3),
            num(self.base.val_loss, 3)
        );
        let tokens = num(self.base.replies.mean_tokens, 1);
        let note = format!(
            "plain question, no chat template; {}",
            probe_note(&self.base.knowledge_probe)
        );
        vec![
            "base".into(),
            loss,
            q,
            a,
            exact,
            f1,
            dash(),
            dash(),
            dash(),
            tokens,
            note,
        ]
    }

    fn sft_row(&self) -> Vec<String> {
        let dash = || NOT_MEASURED.to_string();
        let [q, a, exact, f1] = reply_cells(&self.sft.replies);
        let tokens = num(self.sft.replies.mean_tokens, 1);
        let pref = pct(self.sft.heldout_pref_accuracy);
        let note = format!("chat template; {}", probe_note(&self.sft.knowledge_probe));
        vec![
            "sft".into(),
            dash(),
            q,
            a,
            exact,
            f1,
            pref,
            dash(),
            dash(),
            tokens,
            note,
        ]
    }

    /// The reward model's row: held-out pair accuracy, and by kind in the notes.
    fn reward_row(&self, width: usize) -> Vec<String> {
        let kinds: Vec<String> = (self.reward.heldout_by_kind.iter())
            .map(|(kind, acc)| format!("{kind} {}", pct(*acc)))
            .collect();
        let mut note = format!("train pairs {}", pct(self.reward.train_pair_accuracy));
        if !kinds.is_empty() {
            note.push_str(&format!("; held-out by kind: {}", kinds.join(", ")));
        }
        let mut row = vec![NOT_MEASURED.to_string(); width];
        row[0] = "reward model".into();
        row[6] = pct(self.reward.heldout_pair_accuracy);
        row[10] = note;
        row
    }

    /// One row per training stage, then the whole demo's wall time.
    pub fn stages_grid(&self) -> Grid {
        let mut rows: Vec<Vec<String>> = (self.stages.iter())
            .map(|s| {
                vec![
                    s.name.clone(),
                    s.dir.clone(),
                    s.steps.to_string(),
                    duration(s.wall_s),
                    num(s.tokens_per_s, 0),
                ]
            })
            .collect();
        rows.push(vec![
            "demo total".into(),
            NOT_MEASURED.into(),
            self.stages
                .iter()
                .map(|s| s.steps)
                .sum::<usize>()
                .to_string(),
            duration(self.wall_s),
            NOT_MEASURED.into(),
        ]);
        Grid {
            header: ["stage", "dir", "steps", "wall time", "tokens/s"]
                .iter()
                .map(|h| h.to_string())
                .collect(),
            rows,
        }
    }

    /// The rounds that answered the fixed prompts, in order of first appearance.
    pub fn sample_rounds(&self) -> Vec<String> {
        let mut rounds: Vec<String> = Vec::new();
        for (round, _) in self.samples.iter().flat_map(|s| &s.replies) {
            if !rounds.contains(round) {
                rounds.push(round.clone());
            }
        }
        rounds
    }

    /// Each fixed prompt, its group and reference, then every round's reply side by side; each
    /// reply cut to `max_chars` characters when given.
    pub fn samples_grid(&self, max_chars: Option<usize>) -> Grid {
        let rounds = self.sample_rounds();
        let cut = |t: &str| match max_chars {
            Some(n) => trim_chars(t, n),
            None => t.to_string(),
        };
        let rows = (self.samples.iter())
            .map(|s| {
                let mut row = vec![s.prompt.clone(), s.group.clone(), cut(&s.reference)];
                for round in &rounds {
                    let reply = s.replies.iter().find(|(r, _)| r == round);
                    row.push(reply.map_or_else(|| NOT_MEASURED.to_string(), |(_, t)| cut(t)));
                }
                row
            })
            .collect();
        let mut header: Vec<String> = vec!["prompt".into(), "group".into(), "reference".into()];
        header.extend(rounds);
        Grid { header, rows }
    }

    /// The report card as Markdown: the rounds table, then the stage timings.
    pub fn table(&self) -> String {
        format!(
            "{}\n{}",
            self.card_grid().markdown(),
            self.stages_grid().markdown()
        )
    }

    /// The fixed prompts and every round's reply as Markdown, replies cut to about 80 characters.
    pub fn samples_table(&self) -> String {
        self.samples_grid(Some(SAMPLE_CHARS)).markdown()
    }
}

#[cfg(test)]
mod tests {
    use super::super::card::{AnswerScore, Sample};
    use super::*;

    #[test]
    fn markdown_escapes_pipes_and_flattens_lines() {
        let g = Grid {
            header: vec!["a".into(), "b".into()],
            rows: vec![vec!["x|y".into(), "one\ntwo".into()]],
        };
        assert_eq!(
            g.markdown(),
            "| a | b |\n| --- | --- |\n| x\\|y | one two |\n"
        );
    }

    #[test]
    fn rounds_and_percentages() {
        let mut card = ReportCard::default();
        card.sft.replies.groups.insert(
            "heldout".into(),
            AnswerScore {
                n: 7,
                exact: 0.4286,
                f1: 0.61,
            },
        );
        card.reward.heldout_by_kind.insert("hard".into(), 0.875);
        let grid = card.card_grid();
        let names: Vec<&str> = grid.rows.iter().map(|r| r[0].as_str()).collect();
        assert_eq!(names, ["base", "sft", "reward model", "dpo", "rl"]);
        assert!(grid.rows.iter().all(|r| r.len() == grid.header.len()));
        assert_eq!(grid.rows[1][4], "- / 42.9% / -");
        assert!(
            grid.rows[2][10].contains("hard 87.5%"),
            "{:?}",
            grid.rows[2]
        );
    }

    #[test]
    fn samples_are_cut_and_side_by_side() {
        let card = ReportCard {
            samples: vec![Sample {
                prompt: "What does 'a|b' mean?".into(),
                group: "train".into(),
                reference: "a thing".into(),
                replies: vec![
                    ("base".into(), "x".repeat(200)),
                    ("sft".into(), "ok".into()),
                ],
            }],
            ..ReportCard::default()
        };
        let md = card.samples_table();
        assert!(
            md.starts_with("| prompt | group | reference | base | sft |"),
            "{md}"
        );
        assert!(md.contains("'a\\|b'"), "{md}");
        let long = md.lines().nth(2).unwrap().split(" | ").nth(3).unwrap();
        assert_eq!(long.chars().count(), SAMPLE_CHARS, "{long}");
    }
}
