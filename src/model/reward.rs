//! The reward model: the GPT trunk plus a scalar head, `r = w . h + b`, where `h` is the final
//! hidden state (the output of `ln_f`) at a sequence's last token (the `<|end|>` closing its
//! last assistant turn), `w` is `[1, C]` and `b` is `[1]`.
//!
//! The head's two tensors, `reward_head.weight` and `reward_head.bias`, are appended to the
//! model's parameter list, so AdamW, gradient clipping and checkpoints treat them like every
//! other parameter, and the shared training loop needs nothing new. The rest of the model is
//! kept whole, the tied LM head (`wte`) included, so a reward checkpoint loads like any other.
//!
//! The head runs on the host: after [`Gpt::forward_hidden`] the B hidden rows it reads (B x C
//! values) are downloaded, and its gradient goes back as a dense d(ln_f output) that is zero
//! except at those rows, followed by [`Gpt::backward_hidden`]. No backend op is needed.

use super::{Gpt, Init, ModelError, ParamSpec, Result};
use crate::backend::{Backend, Role};
use crate::rng::Rng;

/// Tensor name of the head's weight (`[1, C]`, like a PyTorch `nn.Linear(C, 1)`).
pub const HEAD_WEIGHT: &str = "reward_head.weight";
/// Tensor name of the head's bias (`[1]`).
pub const HEAD_BIAS: &str = "reward_head.bias";

/// Where the head's tensors sit in the model's parameter list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RewardHead {
    pub weight: usize,
    pub bias: usize,
}

/// The head's parameter specs for width `c`: the weight decays like every matrix, the bias not.
pub fn head_specs(c: usize) -> [ParamSpec; 2] {
    [
        ParamSpec {
            name: HEAD_WEIGHT.into(),
            shape: vec![1, c],
            init: Init::Normal(1.0 / (c as f32).sqrt()),
            decay: true,
            trainable: true,
        },
        ParamSpec {
            name: HEAD_BIAS.into(),
            shape: vec![1],
            init: Init::Zeros,
            decay: false,
            trainable: true,
        },
    ]
}

/// What a reward forward pass keeps for its backward pass.
#[derive(Clone, Debug)]
pub struct RewardPass {
    /// One reward per row.
    pub rewards: Vec<f32>,
    /// Per row, the hidden state the head read (`[C]`).
    pub hidden: Vec<Vec<f32>>,
    /// Per row, the position the head read.
    pub last: Vec<usize>,
    pub b: usize,
    pub t: usize,
}

/// The head's gradients for given reward gradients.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadGrads {
    /// `sum_i drewards[i] * hidden[i]`.
    pub dweight: Vec<f32>,
    /// `sum_i drewards[i]`.
    pub dbias: f32,
    /// Per row, `drewards[i] * weight`: the gradient on that row's hidden state.
    pub dhidden: Vec<Vec<f32>>,
}

/// `weight . hidden + bias`, accumulated in f64.
pub fn head_forward(weight: &[f32], bias: f32, hidden: &[f32]) -> f32 {
    let dot: f64 = weight
        .iter()
        .zip(hidden)
        .map(|(&w, &h)| w as f64 * h as f64)
        .sum();
    (dot + bias as f64) as f32
}

/// The head's backward pass on the host (see [`HeadGrads`]).
pub fn head_backward(weight: &[f32], hidden: &[Vec<f32>], drewards: &[f32]) -> HeadGrads {
    assert_eq!(hidden.len(), drewards.len(), "one reward gradient per row");
    let c = weight.len();
    let mut dweight = vec![0.0f64; c];
    for (h, &d) in hidden.iter().zip(drewards) {
        for (dw, &x) in dweight.iter_mut().zip(h) {
            *dw += d as f64 * x as f64;
        }
    }
    HeadGrads {
        dweight: dweight.into_iter().map(|x| x as f32).collect(),
        dbias: drewards.iter().map(|&d| d as f64).sum::<f64>() as f32,
        dhidden: drewards
            .iter()
            .map(|&d| weight.iter().map(|&w| d * w).collect())
            .collect(),
    }
}

impl<B: Backend> Gpt<B> {
    /// The head's place in the parameter list, when the model has one.
    pub fn reward_head(&self) -> Option<RewardHead> {
        let find = |name: &str| self.layout.specs.iter().position(|s| s.name == name);
        Some(RewardHead {
            weight: find(HEAD_WEIGHT)?,
            bias: find(HEAD_BIAS)?,
        })
    }

    fn require_head(&self) -> Result<RewardHead> {
        self.reward_head().ok_or_else(|| {
            ModelError::Invalid("the model has no reward head (reward_head.weight/bias)".into())
        })
    }

    /// Appends a reward head with these values to the parameters (gradients start at zero).
    pub fn add_reward_head(&mut self, be: &B, weight: &[f32], bias: f32) -> Result<RewardHead> {
        if self.reward_head().is_some() {
            return Err(ModelError::Invalid(
                "the model already has a reward head".into(),
            ));
        }
        let c = self.cfg.n_embd;
        if weight.len() != c {
            return Err(ModelError::Invalid(format!(
                "{HEAD_WEIGHT} has {} values, expected n_embd = {c}",
                weight.len()
            )));
        }
        for (spec, values) in head_specs(c).into_iter().zip([weight, &[bias]]) {
            self.params.push(be.upload(values, Role::Param)?);
            self.grads.push(Some(be.zeros(values.len(), Role::Grad)?));
            self.layout.specs.push(spec);
        }
        self.require_head()
    }

    /// Appends a freshly initialised reward head: weight normal with standard deviation
    /// `1/sqrt(C)` (rewards start with a spread of about 1, since `ln_f` outputs are of unit
    /// scale), bias zero.
    pub fn init_reward_head(&mut self, be: &B, seed: u64) -> Result<RewardHead> {
        let c = self.cfg.n_embd;
        let mut rng = Rng::new(seed);
        let std = 1.0 / (c as f32).sqrt();
        let weight: Vec<f32> = (0..c).map(|_| rng.normal() * std).collect();
        self.add_reward_head(be, &weight, 0.0)
    }

    /// The head's weight `[C]` and bias, downloaded.
    pub fn reward_head_values(&self, be: &B) -> Result<(Vec<f32>, f32)> {
        let h = self.require_head()?;
        let bias = be.download(&self.params[h.bias])?;
        Ok((be.download(&self.params[h.weight])?, bias[0]))
    }

    /// Runs the trunk on `inputs [B*T]` and reads one reward per row at position `last[row]`.
    pub fn reward_forward(
        &mut self,
        be: &B,
        inputs: &[i32],
        b: usize,
        t: usize,
        last: &[usize],
    ) -> Result<RewardPass> {
        if last.len() != b {
            return Err(ModelError::Invalid(format!(
                "{} reward positions for B = {b} rows",
                last.len()
            )));
        }
        if let Some((row, &p)) = last.iter().enumerate().find(|(_, &p)| p >= t) {
            return Err(ModelError::Invalid(format!(
                "row {row}: reward position {p} is outside T = {t}"
            )));
        }
        let (weight, bias) = self.reward_head_values(be)?;
        self.forward_hidden(be, inputs, b, t)?;
        let hidden = last
            .iter()
            .enumerate()
            .map(|(row, &p)| self.hidden_at(be, row, p))
            .collect::<Result<Vec<_>>>()?;
        Ok(RewardPass {
            rewards: hidden
                .iter()
                .map(|h| head_forward(&weight, bias, h))
                .collect(),
            hidden,
            last: last.to_vec(),
            b,
            t,
        })
    }

    /// Backward for the last [`Gpt::reward_forward`] (on these `inputs`), given the loss
    /// gradient of each reward: **accumulates** the head's and the trunk's parameter gradients.
    /// Returns the head gradients it applied.
    pub fn reward_backward(
        &mut self,
        be: &B,
        inputs: &[i32],
        pass: &RewardPass,
        drewards: &[f32],
    ) -> Result<HeadGrads> {
        if drewards.len() != pass.b {
            return Err(ModelError::Invalid(format!(
                "{} reward gradients for B = {} rows",
                drewards.len(),
                pass.b
            )));
        }
        let head = self.require_head()?;
        let (weight, _) = self.reward_head_values(be)?;
        let grads = head_backward(&weight, &pass.hidden, drewards);
        for (idx, add) in [
            (head.weight, grads.dweight.as_slice()),
            (head.bias, &[grads.dbias]),
        ] {
            // The head always trains (in full, even on a LoRA model).
            let buf = self.grads[idx]
                .as_mut()
                .expect("the reward head is trained");
            let mut g = be.download(buf)?;
            g.iter_mut().zip(add).for_each(|(x, &d)| *x += d);
            be.write(buf, &g)?;
        }
        let c = self.cfg.n_embd;
        let mut dhidden = vec![0.0f32; pass.b * pass.t * c];
        for (row, (&p, d)) in pass.last.iter().zip(&grads.dhidden).enumerate() {
            let at = (row * pass.t + p) * c;
            dhidden[at..at + c].copy_from_slice(d);
        }
        self.backward_hidden(be, inputs, pass.b, pass.t, &dhidden)?;
        Ok(grads)
    }
}

/// A model with a reward head, for scoring sequences.
pub struct RewardModel<B: Backend> {
    pub gpt: Gpt<B>,
}

impl<B: Backend> RewardModel<B> {
    /// Wraps a model that has a reward head (e.g. from `checkpoint::load_model` on a reward
    /// checkpoint).
    pub fn new(gpt: Gpt<B>) -> Result<Self> {
        gpt.require_head()?;
        Ok(Self { gpt })
    }

    /// The reward of each sequence (read at its last token), scored as one batch padded with
    /// `pad` to the longest sequence.
    pub fn score(&mut self, be: &B, seqs: &[&[u32]], pad: u32) -> Result<Vec<f32>> {
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        if seqs.is_empty() || seqs.iter().any(|s| s.is_empty()) {
            return Err(ModelError::Invalid(
                "nothing to score: an empty batch or sequence".into(),
            ));
        }
        let mut inputs = vec![pad as i32; seqs.len() * t];
        for (row, s) in seqs.iter().enumerate() {
            for (x, &id) in inputs[row * t..].iter_mut().zip(s.iter()) {
                *x = id as i32;
            }
        }
        let last: Vec<usize> = seqs.iter().map(|s| s.len() - 1).collect();
        Ok(self
            .gpt
            .reward_forward(be, &inputs, seqs.len(), t, &last)?
            .rewards)
    }
}
