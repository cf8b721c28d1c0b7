//! `topcoat report` on a synthetic demo run directory: the page parses as strict XML, holds a
//! plot with a drawn line for every stage and the RL-vs-KL plot, the card table has a row per
//! round, every sample prompt appears, card values appear formatted; the errors name the file
//! and line; the SVG scale maps the data extremes onto the plot edges; the CLI writes the page.

use roxmltree::{Document, Node, ParsingOptions};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use topcoat::commands::report::card::{
    AnswerScore, BaseRound, PolicyRound, Replies, ReportCard, RewardRound, RlPoint, Sample,
    SftRound, StageRun, CARD_FILE,
};
use topcoat::commands::report::svg::{self, Scale};
use topcoat::commands::report::{render_report, write_report, ReportError};
use topcoat::rng::Rng;

/// `(stage name, directory)` of the five demo stages.
const STAGES: [(&str, &str); 5] = [
    ("pretrain", "base"),
    ("sft", "sft"),
    ("reward", "reward"),
    ("dpo", "dpo"),
    ("rl", "rl"),
];
const STEPS: usize = 40;
const VAL_EVERY: usize = 8;
/// Plots a full run has: a loss plot per stage, reward accuracy, dpo margins and accuracies,
/// rl reward and KL per step, and plot-rl-kl.
const PLOTS: usize = 5 + 1 + 2 + 2 + 1;

fn frac(rng: &mut Rng) -> f64 {
    0.05 + 0.9 * rng.next_f64()
}

fn replies(rng: &mut Rng) -> Replies {
    let groups: BTreeMap<String, AnswerScore> = ["train", "heldout", "control"]
        .iter()
        .map(|g| {
            let s = AnswerScore {
                n: 8 + rng.below(8) as usize,
                exact: frac(rng),
                f1: frac(rng),
            };
            (g.to_string(), s)
        })
        .collect();
    Replies {
        question_rate: frac(rng),
        answer_rate: frac(rng),
        mean_tokens: 5.0 + 20.0 * rng.next_f64(),
        groups,
    }
}

fn policy(rng: &mut Rng) -> PolicyRound {
    PolicyRound {
        heldout_pref_accuracy: frac(rng),
        win_rate_vs_sft: frac(rng),
        kl_to_sft: 10.0 * rng.next_f64(),
        replies: replies(rng),
    }
}

/// A card with plausible random values; sample prompts hold characters that must be escaped.
fn card(rng: &mut Rng) -> ReportCard {
    let stages = (STAGES.iter())
        .map(|(name, dir)| StageRun {
            name: name.to_string(),
            dir: dir.to_string(),
            steps: STEPS,
            wall_s: 5.0 + 100.0 * rng.next_f64(),
            tokens_per_s: 1e3 + 1e5 * rng.next_f64(),
        })
        .collect();
    let rl_trajectory = (0..6)
        .map(|i| RlPoint {
            step: i * 10,
            kl_to_sft: i as f64 * (0.5 + rng.next_f64()),
            proxy_reward: i as f64 * 0.3 + 0.1 * rng.next_f64(),
            gold_exact: frac(rng),
            gold_f1: frac(rng),
        })
        .collect();
    let samples = (0..4)
        .map(|i| Sample {
            prompt: format!("What does 'w{i}<&>\"x\"' mean?"),
            group: ["train", "heldout", "control"][i % 3].to_string(),
            reference: format!("reference {i} | with a pipe"),
            replies: ["base", "sft", "dpo", "rl"]
                .iter()
                .map(|r| (r.to_string(), format!("{r} reply {} <b>", rng.below(1000))))
                .collect(),
        })
        .collect();
    let probe = |rng: &mut Rng| {
        ["heldout", "control"]
            .iter()
            .map(|g| (g.to_string(), frac(rng)))
            .collect()
    };
    ReportCard {
        version: 1,
        device: "cpu (no CUDA device)".into(),
        preset: "tiny".into(),
        data: "embedded".into(),
        wall_s: 400.0 * rng.next_f64() + 60.0,
        stages,
        base: BaseRound {
            val_loss_start: 8.0 + rng.next_f64(),
            val_loss: 3.0 + rng.next_f64(),
            replies: replies(rng),
            knowledge_probe: probe(rng),
        },
        sft: SftRound {
            replies: replies(rng),
            heldout_pref_accuracy: frac(rng),
            knowledge_probe: probe(rng),
        },
        reward: RewardRound {
            heldout_pair_accuracy: frac(rng),
            train_pair_accuracy: frac(rng),
            heldout_by_kind: ["hard", "question", "random"]
                .iter()
                .map(|k| (k.to_string(), frac(rng)))
                .collect(),
        },
        dpo: policy(rng),
        rl: policy(rng),
        rl_trajectory,
        samples,
    }
}

/// The metrics.jsonl of one stage: a step record per step with the stage's extras and an
/// unknown key, a validation record every few steps (not for rl), one step whose loss is null.
fn metrics(stage: &str, rng: &mut Rng) -> String {
    let mut out = String::new();
    for step in 0..STEPS {
        if step % VAL_EVERY == 0 && stage != "rl" {
            let v = 4.0 / (1.0 + step as f64) + rng.next_f64();
            let mut rec = serde_json::json!({"step": step, "val_loss": v});
            if stage == "dpo" {
                rec["val_rewards/margins"] = frac(rng).into();
            }
            out.push_str(&format!("{rec}\n"));
        }
        let loss = 5.0 / (1.0 + step as f64 / 10.0) + 0.2 * rng.next_f64();
        let mut rec = serde_json::json!({"step": step + 1, "loss": loss, "lr": 1e-3,
                                         "tokens": 512, "unknown_key": [1, 2]});
        if step == 7 {
            rec["loss"] = serde_json::Value::Null;
        }
        let extras: &[&str] = match stage {
            "reward" => &["accuracy", "margin"],
            "dpo" => &["rewards/margins", "rewards/accuracies"],
            "rl" => &["reward", "kl", "entropy", "response_len", "clip_frac"],
            _ => &[],
        };
        for key in extras {
            rec[*key] = frac(rng).into();
        }
        out.push_str(&format!("{rec}\n"));
    }
    out
}

/// Writes a whole demo run directory under `dir`; returns its card.
fn synthetic_run(dir: &Path, seed: u64) -> ReportCard {
    let mut rng = Rng::new(seed);
    let card = card(&mut rng);
    std::fs::write(
        dir.join(CARD_FILE),
        serde_json::to_string_pretty(&card).unwrap(),
    )
    .unwrap();
    for (stage, sub) in STAGES {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
        std::fs::write(
            dir.join(sub).join("metrics.jsonl"),
            metrics(stage, &mut rng),
        )
        .unwrap();
    }
    card
}

/// Strict XML parse (the DOCTYPE is allowed; nothing else is forgiven).
fn parse(html: &str) -> Document<'_> {
    let opt = ParsingOptions {
        allow_dtd: true,
        ..ParsingOptions::default()
    };
    Document::parse_with_options(html, opt).unwrap_or_else(|e| panic!("not well-formed: {e}"))
}

fn by_id<'a, 'i>(doc: &'a Document<'i>, id: &str) -> Option<Node<'a, 'i>> {
    doc.descendants().find(|n| n.attribute("id") == Some(id))
}

/// The points of every polyline under `node`.
fn polylines(node: Node) -> Vec<Vec<(f64, f64)>> {
    (node.descendants())
        .filter(|n| n.tag_name().name() == "polyline")
        .map(|n| {
            (n.attribute("points").unwrap().split_whitespace())
                .map(|p| {
                    let (x, y) = p.split_once(',').unwrap();
                    (x.parse().unwrap(), y.parse().unwrap())
                })
                .collect()
        })
        .collect()
}

fn text(node: Node) -> String {
    (node.descendants())
        .filter(|n| n.is_text())
        .filter_map(|n| n.text())
        .collect::<String>()
}

#[test]
fn report_has_every_plot_table_and_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let card = synthetic_run(tmp.path(), 20260301);
    let out = tmp.path().join("report.html");
    let summary = write_report(tmp.path(), &out).unwrap();
    assert_eq!(summary.plots, PLOTS, "{summary:?}");
    assert!(summary.notes.is_empty(), "{:?}", summary.notes);
    let html = std::fs::read_to_string(&out).unwrap();
    assert_eq!(html, render_report(tmp.path()).unwrap());
    assert!(html.starts_with("<!DOCTYPE html>"));
    let doc = parse(&html);

    // Self-contained: no script, nothing fetched.
    for n in doc.descendants() {
        assert_ne!(n.tag_name().name(), "script");
        assert!(n.attribute("src").is_none() && n.attribute("href").is_none());
    }
    let svgs = doc.descendants().filter(|n| n.tag_name().name() == "svg");
    assert_eq!(svgs.count(), PLOTS);

    let mut ids: Vec<String> = STAGES.iter().map(|(s, _)| format!("plot-{s}")).collect();
    ids.extend(
        [
            "plot-reward-accuracy",
            "plot-dpo-margins",
            "plot-dpo-accuracies",
            "plot-rl-reward",
            "plot-rl-kl",
        ]
        .map(String::from),
    );
    for id in &ids {
        let plot = by_id(&doc, id).unwrap_or_else(|| panic!("no element {id}"));
        assert_eq!(plot.tag_name().name(), "svg", "{id}");
        let lines = polylines(plot);
        assert!(lines.iter().any(|l| l.len() >= 2), "{id}: no line");
        for (x, y) in lines.iter().flatten() {
            assert!(
                (0.0..=svg::WIDTH).contains(x) && (0.0..=svg::HEIGHT).contains(y),
                "{id}: point ({x}, {y}) outside the plot"
            );
        }
    }
    // The train loss skips the null loss: one point fewer than steps.
    let loss = &polylines(by_id(&doc, "plot-pretrain").unwrap())[0];
    assert_eq!(loss.len(), STEPS - 1);
    // proxy reward, gold F1 and gold exact: one point per RL checkpoint.
    let kl = polylines(by_id(&doc, "plot-rl-kl").unwrap());
    assert_eq!(kl.len(), 3);
    assert!(kl.iter().all(|l| l.len() == card.rl_trajectory.len()));

    let table = by_id(&doc, "card").unwrap();
    let rows: Vec<Node> = (table.descendants())
        .filter(|n| n.tag_name().name() == "tr")
        .skip(1)
        .collect();
    let rounds: Vec<String> = rows
        .iter()
        .map(|r| text(r.first_element_child().unwrap()))
        .collect();
    assert_eq!(rounds, ["base", "sft", "reward model", "dpo", "rl"]);
    let reward_row = text(rows[2]);
    let acc = format!("{:.1}%", card.reward.heldout_pair_accuracy * 100.0);
    assert!(reward_row.contains(&acc), "{acc} not in {reward_row}");
    let kl_cell = format!("{:.2}", card.rl.kl_to_sft);
    assert!(text(rows[4]).contains(&kl_cell), "{kl_cell}");

    let samples = text(by_id(&doc, "samples").unwrap());
    for s in &card.samples {
        assert!(samples.contains(&s.prompt), "{} missing", s.prompt);
        for (_, reply) in &s.replies {
            assert!(samples.contains(reply), "{reply} missing");
        }
    }
    assert!(html.contains("&#39;w0&lt;&amp;&gt;&quot;x&quot;&#39;"));
    let stages = text(by_id(&doc, "stages").unwrap());
    assert!(stages.contains(&format!("{:.0}", card.stages[3].tokens_per_s)));
}

#[test]
fn markdown_tables_have_a_row_per_round_and_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let card = synthetic_run(tmp.path(), 7);
    let md = card.table();
    for round in ["base", "sft", "reward model", "dpo", "rl", "demo total"] {
        assert!(md.contains(&format!("| {round} |")), "{round}:\n{md}");
    }
    assert!(md.contains(&format!("{:.1}%", card.dpo.win_rate_vs_sft * 100.0)));
    let samples = card.samples_table();
    assert_eq!(samples.lines().count(), 2 + card.samples.len());
    assert!(samples.contains("reference 0 \\| with a pipe"), "{samples}");
}

#[test]
fn a_stage_without_metrics_gets_a_note() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic_run(tmp.path(), 11);
    std::fs::remove_file(tmp.path().join("dpo/metrics.jsonl")).unwrap();
    let out = tmp.path().join("r.html");
    let summary = write_report(tmp.path(), &out).unwrap();
    assert_eq!(summary.plots, PLOTS - 3);
    assert!(
        summary.notes.iter().any(|n| n.contains("stage dpo")),
        "{:?}",
        summary.notes
    );
    let html = std::fs::read_to_string(&out).unwrap();
    let doc = parse(&html);
    assert!(by_id(&doc, "plot-dpo").is_none());
    assert!(text(by_id(&doc, "missing-dpo").unwrap()).contains("metrics.jsonl"));
    assert!(by_id(&doc, "plot-rl").is_some());
}

#[test]
fn errors_name_the_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let e = render_report(tmp.path()).unwrap_err();
    assert!(matches!(e, ReportError::NotARun { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("not a demo run directory") && msg.contains("topcoat demo"),
        "{msg}"
    );

    synthetic_run(tmp.path(), 3);
    let path = tmp.path().join("reward/metrics.jsonl");
    let good = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = good.lines().collect();
    let bad = format!(
        "{}\n{}\n{{\"step\": 3, \"loss\": oops}}\n",
        lines[0], lines[1]
    );
    std::fs::write(&path, bad).unwrap();
    let msg = render_report(tmp.path()).unwrap_err().to_string();
    assert!(
        msg.contains("reward/metrics.jsonl") && msg.contains("line 3"),
        "{msg}"
    );

    std::fs::write(&path, format!("{}\n[1, 2]\n", lines[0])).unwrap();
    let msg = render_report(tmp.path()).unwrap_err().to_string();
    assert!(msg.contains("line 2") && msg.contains("an array"), "{msg}");

    let card = tmp.path().join(CARD_FILE);
    std::fs::write(&card, "{\n  \"version\": 1,\n  \"device\": 5\n}\n").unwrap();
    let msg = render_report(tmp.path()).unwrap_err().to_string();
    assert!(msg.contains(CARD_FILE) && msg.contains("line 3"), "{msg}");
}

#[test]
fn scale_maps_data_extremes_to_the_plot_edges() {
    let data = [3.5, -1.25, f64::NAN, 7.0, 2.0];
    // y points down in SVG: the minimum goes to the bottom edge.
    let (bottom, top) = (276.0, 56.0);
    let s = Scale::fit(data, bottom, top).unwrap();
    assert_eq!(s.domain(), (-1.25, 7.0));
    assert!((s.map(-1.25) - bottom).abs() < 1e-9);
    assert!((s.map(7.0) - top).abs() < 1e-9);
    assert!((s.map(2.875) - (bottom + top) / 2.0).abs() < 1e-9);
    let (ticks, _) = s.ticks(5);
    assert!(ticks.iter().all(|t| (-1.25..=7.0).contains(t)), "{ticks:?}");
    assert!(ticks.len() >= 3, "{ticks:?}");
    assert!(Scale::fit([f64::NAN], 0.0, 1.0).is_none());
    let flat = Scale::fit([2.0, 2.0], 0.0, 100.0).unwrap();
    assert!((flat.map(2.0) - 50.0).abs() < 1e-9);
}

#[test]
fn cli_writes_the_report() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic_run(tmp.path(), 5);
    let run = |args: &[&std::ffi::OsStr]| {
        Command::new(env!("CARGO_BIN_EXE_topcoat"))
            .args(args)
            .output()
            .unwrap()
    };
    let o = run(&["report".as_ref(), tmp.path().as_os_str()]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let default = tmp.path().join("report.html");
    assert!(stdout.contains(&default.display().to_string()), "{stdout}");
    assert!(stdout.contains(&format!("{PLOTS} plots")), "{stdout}");
    parse(&std::fs::read_to_string(&default).unwrap());

    let other = tmp.path().join("elsewhere.html");
    let o = run(&[
        "report".as_ref(),
        tmp.path().as_os_str(),
        "--out".as_ref(),
        other.as_os_str(),
    ]);
    assert!(o.status.success() && other.is_file());

    let empty = tempfile::tempdir().unwrap();
    let o = run(&["report".as_ref(), empty.path().as_os_str()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("run `topcoat demo` first"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
