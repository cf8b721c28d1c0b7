//! The demo's report card: what each round of training measured, kept as one JSON file
//! (`RUN/report_card.json`) that `topcoat demo` writes and `topcoat report` renders.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// File name of the card inside a demo run directory.
pub const CARD_FILE: &str = "report_card.json";

/// Everything a demo run measured. Fractions are in [0, 1]; losses are nats per token.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReportCard {
    /// Schema version (1).
    pub version: u32,
    /// The device the run used, as `resolve_device` described it.
    pub device: String,
    /// Model preset of every stage (`tiny`, `small`, `gpt2-124m`).
    pub preset: String,
    /// Where the data came from (`embedded` or a directory).
    pub data: String,
    /// Wall time of the whole demo, seconds.
    pub wall_s: f64,
    /// The training stages in the order they ran.
    pub stages: Vec<StageRun>,
    pub base: BaseRound,
    pub sft: SftRound,
    pub reward: RewardRound,
    pub dpo: PolicyRound,
    pub rl: PolicyRound,
    /// RL checkpoints evaluated one by one: how proxy reward and gold accuracy move with KL.
    pub rl_trajectory: Vec<RlPoint>,
    /// The same fixed prompts answered by every round's model.
    pub samples: Vec<Sample>,
}

/// One training stage of the demo.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StageRun {
    /// `pretrain`, `sft`, `reward`, `dpo` or `rl`.
    pub name: String,
    /// Run directory of the stage, relative to the demo run directory (holds `metrics.jsonl`).
    pub dir: String,
    pub steps: usize,
    pub wall_s: f64,
    pub tokens_per_s: f64,
}

/// Normalised exact match and token F1 of greedy answers against the reference gloss.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AnswerScore {
    /// Questions asked.
    pub n: usize,
    /// Fraction answered with the reference (normalised exact match).
    pub exact: f64,
    /// Mean token F1 against the reference.
    pub f1: f64,
}

/// How a model replies to `What does 'X' mean?` (greedy decoding).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Replies {
    /// Fraction of replies that are a question (the base model's web habit).
    pub question_rate: f64,
    /// Fraction of replies that are a non-empty statement, not a question.
    pub answer_rate: f64,
    /// Mean reply length in tokens.
    pub mean_tokens: f64,
    /// Answer scores by lemma group: `train` (in SFT data), `heldout` (definition only in
    /// pretraining), `control` (in no training data at all).
    pub groups: BTreeMap<String, AnswerScore>,
}

/// Round one: the pretrained base model, asked the plain question with no chat template.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BaseRound {
    /// Validation loss before the first update and at the end.
    pub val_loss_start: f64,
    pub val_loss: f64,
    pub replies: Replies,
    /// The knowledge probe (see [`SftRound::knowledge_probe`]).
    #[serde(default)]
    pub knowledge_probe: BTreeMap<String, f64>,
}

/// Round two: the instruction-tuned model, asked through the chat template.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SftRound {
    pub replies: Replies,
    /// Fraction of held-out preference pairs where the model gives the chosen reply the higher
    /// log-probability (the baseline DPO and RL are compared against).
    pub heldout_pref_accuracy: f64,
    /// By lemma group (`heldout`, `control`): the fraction of probe pairs (a lemma's gloss
    /// against a co-hyponym's) where the model gives the right gloss the higher log-probability.
    /// Held-out above control means the model kept what pretraining said about those lemmas.
    #[serde(default)]
    pub knowledge_probe: BTreeMap<String, f64>,
}

/// The reward model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RewardRound {
    /// Fraction of held-out pairs scored `r_chosen > r_rejected`.
    pub heldout_pair_accuracy: f64,
    /// The same on the training pairs.
    pub train_pair_accuracy: f64,
    /// Held-out accuracy by kind of rejected reply (`hard`, `question`, `random`).
    pub heldout_by_kind: BTreeMap<String, f64>,
}

/// Round three: a preference-tuned policy (DPO or RL), compared with the SFT model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PolicyRound {
    /// As `SftRound::heldout_pref_accuracy`, for this policy.
    pub heldout_pref_accuracy: f64,
    /// Fraction of held-out questions where the reward model scores this policy's reply above
    /// the SFT model's (ties count half).
    pub win_rate_vs_sft: f64,
    /// Mean over held-out questions of the summed `logp_policy - logp_sft` of sampled replies.
    pub kl_to_sft: f64,
    pub replies: Replies,
}

/// One RL checkpoint, evaluated on held-out questions.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RlPoint {
    pub step: usize,
    pub kl_to_sft: f64,
    /// Mean reward-model score of the greedy replies.
    pub proxy_reward: f64,
    /// Held-out gold score: normalised exact match and token F1.
    pub gold_exact: f64,
    pub gold_f1: f64,
}

/// One fixed prompt and every round's reply to it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub prompt: String,
    /// Lemma group of the question (`train`, `heldout`, `control`).
    pub group: String,
    pub reference: String,
    /// `(round, reply)` in round order: `base`, `sft`, `dpo`, `rl`.
    pub replies: Vec<(String, String)>,
}
