//! Measuring each round's model for the report card: the evaluation questions and held-out
//! pairs loaded once, then one call per round. Every reply is greedy; sampled replies (for the
//! KL estimate) use a fixed seed, so a finished run measures the same numbers again.

use super::data::{read_pair_field, read_questions, Sources};
use super::measure::{
    ask, masked_logps, preference_accuracy, reward_scores, sampled_kl, score_replies, scored_reply,
    stops, token_f1, Asked, Question, Style, BATCH_ROWS,
};
use super::plan::DemoPlan;
use crate::backend::{Backend, SampleParams};
use crate::commands::inputs::resolve_checkpoint;
use crate::commands::report::card::{PolicyRound, Replies, RewardRound, RlPoint};
use crate::data::prefs::{read_preferences, render_pair, RenderedPair};
use crate::data::Tokenizer;
use crate::model::{Gpt, RewardModel};
use crate::rng::Rng;
use crate::scoring::normalized_match;
use crate::train::{checkpoint, TrainError};
use std::collections::BTreeMap;
use std::path::Path;

type Result<T> = std::result::Result<T, TrainError>;

const GREEDY: SampleParams = SampleParams {
    temperature: 0.0,
    top_k: 0,
    top_p: 1.0,
};

/// Questions shown side by side in the report, per lemma group.
pub const SAMPLES_PER_GROUP: usize = 2;

/// The evaluation sets, tokenized for the run's tokenizer.
pub struct Evaluation {
    pub tok: Tokenizer,
    pub questions: Vec<Question>,
    /// Indices into `questions` of the held-out group.
    pub heldout: Vec<usize>,
    pub heldout_pairs: Vec<RenderedPair>,
    pub heldout_kinds: Vec<String>,
    pub train_pairs: Vec<RenderedPair>,
    /// Knowledge-probe pairs and the lemma group of each.
    pub probe_pairs: Vec<RenderedPair>,
    pub probe_groups: Vec<String>,
    reply_tokens: usize,
    trajectory_questions: usize,
    seed: u64,
}

/// Loads a checkpoint (or a run directory's newest) onto `be`.
pub fn load<B: Backend>(be: &B, path: &Path) -> Result<Gpt<B>> {
    let ckpt = resolve_checkpoint(path)?;
    checkpoint::load_model(be, &ckpt, None)
}

impl Evaluation {
    /// Reads the evaluation files of `src`, keeping at most `questions_per_group` questions of
    /// each group (file order) and as many training pairs as there are held-out pairs.
    pub fn open(src: &Sources, tok: Tokenizer, plan: &DemoPlan) -> Result<Self> {
        let mut questions = read_questions(&src.file("eval_questions.jsonl"))?;
        if let Some(cap) = plan.questions_per_group {
            let mut seen: BTreeMap<String, usize> = BTreeMap::new();
            questions.retain(|q| {
                let n = seen.entry(q.group.clone()).or_default();
                *n += 1;
                *n <= cap
            });
        }
        let heldout: Vec<usize> = (0..questions.len())
            .filter(|&i| questions[i].group == "heldout")
            .collect();
        let pairs_path = src.file("eval_prefs.jsonl");
        let heldout_pairs: Vec<RenderedPair> = read_preferences(&pairs_path)?
            .iter()
            .map(|p| render_pair(&tok, p))
            .collect::<std::result::Result<_, _>>()?;
        let heldout_kinds = read_pair_field(&pairs_path, "kind")?;
        let probe_path = src.file("eval_probe.jsonl");
        let probe_pairs = read_preferences(&probe_path)?
            .iter()
            .map(|p| render_pair(&tok, p))
            .collect::<std::result::Result<_, _>>()?;
        let probe_groups = read_pair_field(&probe_path, "group")?;
        let train_pairs = read_preferences(&src.file("prefs.jsonl"))?
            .iter()
            .take(heldout_pairs.len())
            .map(|p| render_pair(&tok, p))
            .collect::<std::result::Result<_, _>>()?;
        Ok(Self {
            tok,
            questions,
            heldout,
            heldout_pairs,
            heldout_kinds,
            train_pairs,
            probe_pairs,
            probe_groups,
            reply_tokens: plan.reply_tokens,
            trajectory_questions: plan.trajectory_questions,
            seed: plan.pretrain.seed,
        })
    }

    fn prompts(&self) -> Vec<&str> {
        self.questions.iter().map(|q| q.prompt.as_str()).collect()
    }

    /// Greedy replies to every question.
    pub fn ask<B: Backend>(&self, be: &B, model: &Gpt<B>, style: Style) -> Result<Asked> {
        self.ask_these(be, model, &self.prompts(), style)
    }

    /// Greedy replies to `prompts`.
    fn ask_these<B: Backend>(
        &self,
        be: &B,
        model: &Gpt<B>,
        prompts: &[&str],
        style: Style,
    ) -> Result<Asked> {
        let mut rng = Rng::new(self.seed);
        Ok(ask(
            be,
            model,
            &self.tok,
            prompts,
            style,
            self.reply_tokens,
            &GREEDY,
            &mut rng,
        )?)
    }

    pub fn replies(&self, asked: &Asked) -> Replies {
        score_replies(&self.questions, asked)
    }

    /// The question indices shown side by side: the first few of each group.
    pub fn sample_indices(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for g in ["train", "heldout", "control"] {
            out.extend(
                (0..self.questions.len())
                    .filter(|&i| self.questions[i].group == g)
                    .take(SAMPLES_PER_GROUP),
            );
        }
        out
    }

    /// `(logp chosen, logp rejected)` of each pair's response under `model`.
    fn pair_logps<B: Backend>(
        &self,
        be: &B,
        model: &mut Gpt<B>,
        pairs: &[RenderedPair],
    ) -> Result<Vec<(f64, f64)>> {
        let rows: Vec<(Vec<u32>, Vec<bool>)> = pairs
            .iter()
            .flat_map(|p| {
                [
                    (p.chosen.ids.clone(), p.chosen.mask.clone()),
                    (p.rejected.ids.clone(), p.rejected.mask.clone()),
                ]
            })
            .collect();
        let l = masked_logps(be, model, &rows, self.tok.eot(), BATCH_ROWS)?;
        Ok(l.chunks(2).map(|c| (c[0], c[1])).collect())
    }

    /// Fraction of held-out pairs where `model` gives the chosen response the higher
    /// log-probability.
    pub fn heldout_pref_accuracy<B: Backend>(&self, be: &B, model: &mut Gpt<B>) -> Result<f64> {
        Ok(preference_accuracy(&self.pair_logps(
            be,
            model,
            &self.heldout_pairs,
        )?))
    }

    /// The knowledge probe: by lemma group, the fraction of probe pairs where `model` gives the
    /// right gloss the higher log-probability.
    pub fn knowledge_probe<B: Backend>(
        &self,
        be: &B,
        model: &mut Gpt<B>,
    ) -> Result<BTreeMap<String, f64>> {
        let logps = self.pair_logps(be, model, &self.probe_pairs)?;
        let mut by_group: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for (lp, group) in logps.into_iter().zip(&self.probe_groups) {
            by_group.entry(group.clone()).or_default().push(lp);
        }
        Ok(by_group
            .into_iter()
            .map(|(g, pairs)| (g, preference_accuracy(&pairs)))
            .collect())
    }

    fn pair_rewards<B: Backend>(
        &self,
        be: &B,
        rm: &mut RewardModel<B>,
        pairs: &[RenderedPair],
    ) -> Result<Vec<(f64, f64)>> {
        let seqs: Vec<Vec<u32>> = pairs
            .iter()
            .flat_map(|p| [p.chosen.ids.clone(), p.rejected.ids.clone()])
            .collect();
        let r = reward_scores(be, rm, &seqs, self.tok.eot(), BATCH_ROWS)?;
        Ok(r.chunks(2).map(|c| (c[0], c[1])).collect())
    }

    /// The reward model's pair accuracy on held-out and training pairs, and by kind.
    pub fn reward_round<B: Backend>(&self, be: &B, rm: &mut RewardModel<B>) -> Result<RewardRound> {
        let held = self.pair_rewards(be, rm, &self.heldout_pairs)?;
        let train = self.pair_rewards(be, rm, &self.train_pairs)?;
        let mut by_kind: BTreeMap<String, (usize, usize)> = BTreeMap::new();
        for ((c, r), kind) in held.iter().zip(&self.heldout_kinds) {
            let e = by_kind.entry(kind.clone()).or_default();
            e.0 += usize::from(c > r);
            e.1 += 1;
        }
        Ok(RewardRound {
            heldout_pair_accuracy: preference_accuracy(&held),
            train_pair_accuracy: preference_accuracy(&train),
            heldout_by_kind: by_kind
                .into_iter()
                .map(|(k, (right, n))| (k, right as f64 / n as f64))
                .collect(),
        })
    }

    /// Reward-model scores of the held-out questions' replies in `asked` (chat style).
    fn heldout_rewards<B: Backend>(
        &self,
        be: &B,
        rm: &mut RewardModel<B>,
        asked: &Asked,
        which: &[usize],
    ) -> Result<Vec<f64>> {
        let end = stops(&self.tok, Style::Chat)[1];
        let seqs: Vec<Vec<u32>> = which
            .iter()
            .map(|&i| scored_reply(&asked.prompts[i], &asked.ids[i], end))
            .collect();
        Ok(reward_scores(be, rm, &seqs, self.tok.eot(), BATCH_ROWS)?)
    }

    /// Mean sampled KL from `policy` to `reference` over `prompts` (chat prompts).
    fn kl<B: Backend>(
        &self,
        be: &B,
        policy: &mut Gpt<B>,
        reference: &mut Gpt<B>,
        prompts: &[Vec<u32>],
    ) -> Result<f64> {
        Ok(sampled_kl(
            be,
            policy,
            reference,
            prompts,
            self.reply_tokens,
            &stops(&self.tok, Style::Chat),
            self.tok.eot(),
            self.seed ^ 0x6b6c,
        )?)
    }

    /// A preference-tuned policy against the SFT model (`sft_asked`: the SFT model's replies).
    pub fn policy_round<B: Backend>(
        &self,
        be: &B,
        policy: &mut Gpt<B>,
        sft: &mut Gpt<B>,
        rm: &mut RewardModel<B>,
        sft_asked: &Asked,
    ) -> Result<(PolicyRound, Asked)> {
        let asked = self.ask(be, policy, Style::Chat)?;
        let heldout_prompts: Vec<Vec<u32>> = self
            .heldout
            .iter()
            .map(|&i| asked.prompts[i].clone())
            .collect();
        let mine = self.heldout_rewards(be, rm, &asked, &self.heldout)?;
        let theirs = self.heldout_rewards(be, rm, sft_asked, &self.heldout)?;
        let wins: f64 = mine
            .iter()
            .zip(&theirs)
            .map(|(a, b)| match a.partial_cmp(b) {
                Some(std::cmp::Ordering::Greater) => 1.0,
                Some(std::cmp::Ordering::Equal) => 0.5,
                _ => 0.0,
            })
            .sum();
        let round = PolicyRound {
            heldout_pref_accuracy: self.heldout_pref_accuracy(be, policy)?,
            win_rate_vs_sft: wins / mine.len().max(1) as f64,
            kl_to_sft: self.kl(be, policy, sft, &heldout_prompts)?,
            replies: self.replies(&asked),
        };
        Ok((round, asked))
    }

    /// One point of the RL trajectory: `policy` at `step` on the first held-out questions.
    pub fn rl_point<B: Backend>(
        &self,
        be: &B,
        step: usize,
        policy: &mut Gpt<B>,
        sft: &mut Gpt<B>,
        rm: &mut RewardModel<B>,
    ) -> Result<RlPoint> {
        let which: Vec<usize> = self
            .heldout
            .iter()
            .copied()
            .take(self.trajectory_questions)
            .collect();
        let prompts: Vec<&str> = which
            .iter()
            .map(|&i| self.questions[i].prompt.as_str())
            .collect();
        let sub = self.ask_these(be, policy, &prompts, Style::Chat)?;
        let all: Vec<usize> = (0..which.len()).collect();
        let rewards = self.heldout_rewards(be, rm, &sub, &all)?;
        let n = which.len().max(1) as f64;
        let (mut exact, mut f1) = (0.0, 0.0);
        for (&i, text) in which.iter().zip(&sub.texts) {
            let reference = &self.questions[i].reference;
            exact += f64::from(u8::from(normalized_match(text, reference)));
            f1 += token_f1(text, reference);
        }
        let kl = self.kl(be, policy, sft, &sub.prompts)?;
        Ok(RlPoint {
            step,
            kl_to_sft: kl,
            proxy_reward: rewards.iter().sum::<f64>() / n,
            gold_exact: exact / n,
            gold_f1: f1 / n,
        })
    }
}
