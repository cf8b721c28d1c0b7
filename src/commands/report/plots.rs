//! Which plots the report draws: a loss plot per stage (`plot-<stage>`), the stages' own
//! metrics (reward accuracy, DPO margins and accuracies, RL reward and KL per step), and
//! `plot-rl-kl`, proxy reward and gold scores of the RL checkpoints against KL to the SFT model.

use super::card::RlPoint;
use super::svg::{Plot, Series};
use super::Metrics;

/// Extra plots per stage: `(stage, id suffix, title, y axis, metric keys)`. Each key is drawn
/// per step, and its `val_`-prefixed twin per validation when the file has it.
const EXTRA: &[(&str, &str, &str, &str, &[&str])] = &[
    (
        "reward",
        "accuracy",
        "reward model: pair accuracy",
        "fraction of pairs",
        &["accuracy"],
    ),
    (
        "dpo",
        "margins",
        "dpo: implicit reward margin",
        "chosen - rejected",
        &["rewards/margins"],
    ),
    (
        "dpo",
        "accuracies",
        "dpo: implicit reward accuracy",
        "fraction of pairs",
        &["rewards/accuracies"],
    ),
    (
        "rl",
        "reward",
        "rl: reward-model score of the samples",
        "mean reward",
        &["reward"],
    ),
    (
        "rl",
        "train-kl",
        "rl: KL to the reference per completion",
        "nats per completion",
        &["kl"],
    ),
];

/// A step series and, when present, its validation twin (dashed, with markers).
fn with_val(metrics: &Metrics, key: &str) -> Vec<Series> {
    let mut out = vec![Series::line(key, metrics.series(key))];
    let val_key = format!("val_{key}");
    let val = metrics.series(&val_key);
    if !val.is_empty() {
        out.push(Series {
            dashed: true,
            markers: true,
            ..Series::line(&val_key, val)
        });
    }
    out
}

/// The plots of one stage with their captions: its loss, then its own metrics.
pub fn stage_plots(stage: &str, metrics: &Metrics) -> Vec<(Plot, String)> {
    let mut loss = vec![Series::line("train loss", metrics.series("loss"))];
    let val = metrics.series("val_loss");
    if !val.is_empty() {
        loss.push(Series {
            dashed: true,
            markers: true,
            ..Series::line("val loss", val)
        });
    }
    let mut plots = vec![(
        Plot {
            id: format!("plot-{stage}"),
            title: format!("{stage}: loss"),
            x_label: "step".into(),
            y_label: "loss".into(),
            series: loss,
            ..Plot::default()
        },
        format!(
            "{stage}: training loss per optimizer step (solid) and, where logged, \
             validation loss (dashed, dots), from the stage's metrics.jsonl; linear scales."
        ),
    )];
    for (_, suffix, title, y_label, keys) in EXTRA.iter().filter(|e| e.0 == stage) {
        let series = keys.iter().flat_map(|k| with_val(metrics, k)).collect();
        plots.push((
            Plot {
                id: format!("plot-{stage}-{suffix}"),
                title: title.to_string(),
                x_label: "step".into(),
                y_label: y_label.to_string(),
                series,
                ..Plot::default()
            },
            format!("{title}, per optimizer step (validation dashed where logged)."),
        ));
    }
    plots
}

/// The RL checkpoints against KL to the SFT model: proxy reward on the left axis, gold exact
/// and F1 on the right. The caption says where gold F1 peaks and whether the proxy kept rising
/// past it (the policy gaming the reward model).
pub fn rl_kl_plot(trajectory: &[RlPoint]) -> (Plot, String) {
    let pick = |f: fn(&RlPoint) -> f64| -> Vec<(f64, f64)> {
        trajectory.iter().map(|p| (p.kl_to_sft, f(p))).collect()
    };
    let dots = |name: &str, points, right| Series {
        right,
        markers: true,
        ..Series::line(name, points)
    };
    let plot = Plot {
        id: "plot-rl-kl".into(),
        title: "rl: proxy reward and gold score vs KL to SFT".into(),
        x_label: "KL to the SFT model (nats per reply)".into(),
        y_label: "proxy reward (reward-model score)".into(),
        y2_label: "gold score (fraction)".into(),
        series: vec![
            dots("proxy reward", pick(|p| p.proxy_reward), false),
            dots("gold F1", pick(|p| p.gold_f1), true),
            Series {
                dashed: true,
                ..dots("gold exact", pick(|p| p.gold_exact), true)
            },
        ],
    };
    let mut caption = String::from(
        "Each dot is an RL checkpoint, joined in step order. Two y scales: the proxy reward \
         (mean reward-model score of greedy replies to held-out questions) on the left axis, \
         the held-out gold exact match and token F1 (fractions) on the right axis.",
    );
    caption.push(' ');
    caption.push_str(&hacking_note(trajectory));
    (plot, caption)
}

/// Where gold F1 peaks, and whether the proxy reward rose after it while gold F1 fell.
fn hacking_note(trajectory: &[RlPoint]) -> String {
    let finite = |p: &&RlPoint| p.gold_f1.is_finite() && p.proxy_reward.is_finite();
    let points: Vec<&RlPoint> = trajectory.iter().filter(finite).collect();
    let (Some(peak), Some(last)) = (
        points.iter().max_by(|a, b| a.gold_f1.total_cmp(&b.gold_f1)),
        points.last(),
    ) else {
        return "The card has no RL trajectory.".into();
    };
    let mut note = format!(
        "Gold F1 peaks at step {} (KL {:.2}, F1 {:.3}).",
        peak.step, peak.kl_to_sft, peak.gold_f1
    );
    if last.step > peak.step && last.proxy_reward > peak.proxy_reward && last.gold_f1 < peak.gold_f1
    {
        note.push_str(&format!(
            " After it the proxy reward still rises ({:.3} -> {:.3}) while gold F1 falls \
             ({:.3} -> {:.3}): the policy is gaming the reward model.",
            peak.proxy_reward, last.proxy_reward, peak.gold_f1, last.gold_f1
        ));
    }
    note
}
