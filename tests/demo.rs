//! The reduced demo (`topcoat demo --quick`) end to end on the CPU: every round trains on the
//! embedded data, the report card is written, and the directions the three rounds must show
//! hold. A second call on the same directory reuses every stage and measures the same card.

use topcoat::commands::demo::{demo, DemoJob};
use topcoat::commands::report::card::ReportCard;
use topcoat::runtime::Runtime;

/// Pretraining must take at least this much (nats per token) off the validation loss of the
/// untrained model (8.3 for a 4,096-token vocabulary).
const MIN_PRETRAIN_DROP: f64 = 1.5;
/// SFT's answer rate must beat the base model's by at least this much (the base model,
/// asked a plain question, mostly goes on with more questions).
const MIN_ANSWER_RATE_GAIN: f64 = 0.3;
/// The reward model must beat a coin flip on held-out pairs by this much.
const MIN_REWARD_OVER_CHANCE: f64 = 0.05;

fn check_directions(card: &ReportCard) {
    assert!(
        card.base.val_loss < card.base.val_loss_start - MIN_PRETRAIN_DROP,
        "pretraining took validation loss from {} only to {}",
        card.base.val_loss_start,
        card.base.val_loss
    );
    assert!(
        card.sft.replies.answer_rate > card.base.replies.answer_rate + MIN_ANSWER_RATE_GAIN,
        "answer rate: base {}, sft {}",
        card.base.replies.answer_rate,
        card.sft.replies.answer_rate
    );
    assert!(
        card.reward.heldout_pair_accuracy > 0.5 + MIN_REWARD_OVER_CHANCE,
        "reward model held-out pair accuracy {}",
        card.reward.heldout_pair_accuracy
    );
    assert!(
        card.dpo.heldout_pref_accuracy > card.sft.heldout_pref_accuracy,
        "held-out preference accuracy: sft {}, dpo {}",
        card.sft.heldout_pref_accuracy,
        card.dpo.heldout_pref_accuracy
    );
}

#[test]
fn quick_demo_runs_every_round_and_shows_each_direction() {
    let dir = tempfile::tempdir().unwrap();
    // A relative run directory, as the README's command gives one (the only test in this
    // binary, so changing the working directory affects no other).
    std::env::set_current_dir(dir.path()).unwrap();
    let job = DemoJob {
        out: "demo".into(),
        data: None,
        quick: true,
        seed: 1337,
    };
    let card = demo(&Runtime::cpu(), &job, &|_| {}).unwrap();
    check_directions(&card);

    let names: Vec<&str> = card.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["pretrain", "sft", "reward", "dpo", "rl"]);
    for s in &card.stages {
        assert!(s.steps > 0 && s.wall_s > 0.0, "{s:?}");
        assert!(job.out.join(&s.dir).join("metrics.jsonl").is_file());
    }
    for g in ["train", "heldout", "control"] {
        assert!(card.sft.replies.groups[g].n > 0, "no {g} questions");
    }
    for probe in [&card.base.knowledge_probe, &card.sft.knowledge_probe] {
        let groups: Vec<&str> = probe.keys().map(String::as_str).collect();
        assert_eq!(groups, ["control", "heldout"]);
    }
    // The trajectory starts at the SFT model itself (KL exactly 0) and has one point per kept
    // RL checkpoint.
    assert_eq!(card.rl_trajectory[0].step, 0);
    assert_eq!(card.rl_trajectory[0].kl_to_sft, 0.0);
    assert!(card.rl_trajectory.len() >= 3);
    assert_eq!(card.samples.len(), 6);
    for s in &card.samples {
        let rounds: Vec<&str> = s.replies.iter().map(|(r, _)| r.as_str()).collect();
        assert_eq!(rounds, ["base", "sft", "dpo", "rl"]);
    }
    // The file holds exactly the card returned, and the page was rendered from it.
    let text = std::fs::read_to_string(job.out.join("report_card.json")).unwrap();
    assert_eq!(text, serde_json::to_string_pretty(&card).unwrap());
    let page = std::fs::read_to_string(job.out.join("report.html")).unwrap();
    assert!(page.contains("id=\"plot-rl-kl\""));

    // Started again, the demo reuses every stage and measures the same numbers.
    let again = demo(&Runtime::cpu(), &job, &|_| {}).unwrap();
    assert_eq!(again.base, card.base);
    assert_eq!(again.sft, card.sft);
    assert_eq!(again.dpo, card.dpo);
    assert_eq!(again.rl_trajectory, card.rl_trajectory);
    assert_eq!(again.stages, card.stages);
}
