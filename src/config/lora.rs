//! LoRA (Hu et al. 2021): the settings of low-rank adapters beside a model's projections, and
//! which projections each family offers as targets.
//!
//! An adapter on a projection `y = x W^T` (`W [out, in]`) adds `s * (x A^T) B^T` with
//! `A [r, in]`, `B [out, r]` and `s = alpha / r` (PEFT's `lora_alpha / r`). `B` starts at zero,
//! so a fresh adapter leaves the model's output unchanged. Where topcoat fuses projections
//! (the Llama family's `qkv_proj` and `gate_up_proj`), each target is a slice of the fused
//! output's columns and keeps its own adapter, as Hugging Face's separate modules do. GPT-2's
//! `c_attn` is one module in Hugging Face too, so there q, k and v are one target, `qkv`.

use super::{ConfigError, ModelConfig};
use serde::{Deserialize, Serialize};

/// A projection an adapter can sit beside.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraTarget {
    /// Llama: `q_proj`.
    Q,
    /// Llama: `k_proj`.
    K,
    /// Llama: `v_proj`.
    V,
    /// GPT-2: `attn.c_attn` (q, k and v in one module).
    Qkv,
    /// Llama: `o_proj`; GPT-2: `attn.c_proj`.
    O,
    /// Llama: `gate_proj`.
    Gate,
    /// Llama: `up_proj`; GPT-2: `mlp.c_fc`.
    Up,
    /// Llama: `down_proj`; GPT-2: `mlp.c_proj`.
    Down,
}

impl LoraTarget {
    /// The flag spelling (`q`, `k`, `v`, `qkv`, `o`, `gate`, `up`, `down`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Q => "q",
            Self::K => "k",
            Self::V => "v",
            Self::Qkv => "qkv",
            Self::O => "o",
            Self::Gate => "gate",
            Self::Up => "up",
            Self::Down => "down",
        }
    }

    /// Every target, in layout order within a block.
    pub const ALL: [LoraTarget; 8] = [
        Self::Q,
        Self::K,
        Self::V,
        Self::Qkv,
        Self::O,
        Self::Gate,
        Self::Up,
        Self::Down,
    ];

    /// The targets a family offers, in layout order: all of its projections.
    pub fn all_for(cfg: &ModelConfig) -> Vec<LoraTarget> {
        if cfg.llama().is_some() {
            vec![
                Self::Q,
                Self::K,
                Self::V,
                Self::O,
                Self::Gate,
                Self::Up,
                Self::Down,
            ]
        } else {
            vec![Self::Qkv, Self::O, Self::Up, Self::Down]
        }
    }

    /// Parses a `--lora-targets` list (`q,k,v,o,gate,up,down`, or `all`) for a model of
    /// `cfg`'s family. On GPT-2, `q,k,v` together mean its fused `qkv`; one or two of them
    /// alone is an error, since GPT-2 computes (and Hugging Face names) them as one module.
    /// The result is sorted in layout order without repeats.
    pub fn parse_list(list: &str, cfg: &ModelConfig) -> Result<Vec<LoraTarget>, ConfigError> {
        let llama = cfg.llama().is_some();
        let family = if llama { "llama" } else { "gpt2" };
        let offered = Self::all_for(cfg);
        let mut out = Vec::new();
        for word in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
            if word == "all" {
                out.extend(offered.iter().copied());
                continue;
            }
            let t = Self::ALL
                .into_iter()
                .find(|t| t.name() == word)
                .ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "--lora-targets: unknown target `{word}`; a {family} model offers {}",
                        names(&offered)
                    ))
                })?;
            out.push(t);
        }
        if !llama {
            let qkv = [Self::Q, Self::K, Self::V];
            let given = qkv.iter().filter(|t| out.contains(t)).count();
            if given == 3 {
                out.retain(|t| !qkv.contains(t));
                out.push(Self::Qkv);
            } else if given > 0 {
                return Err(ConfigError::Invalid(format!(
                    "--lora-targets: a gpt2 model computes q, k and v in one matmul (attn.c_attn); \
                     name all three, or `qkv`, not {}",
                    names(&qkv.into_iter().filter(|t| out.contains(t)).collect::<Vec<_>>())
                )));
            }
        }
        if let Some(t) = out.iter().find(|t| !offered.contains(t)) {
            return Err(ConfigError::Invalid(format!(
                "--lora-targets: `{}` is not a projection of a {family} model, which offers {}",
                t.name(),
                names(&offered)
            )));
        }
        out.sort();
        out.dedup();
        if out.is_empty() {
            return Err(ConfigError::Invalid(
                "--lora-targets: no target named".into(),
            ));
        }
        Ok(out)
    }
}

fn names(targets: &[LoraTarget]) -> String {
    targets
        .iter()
        .map(|t| t.name())
        .collect::<Vec<_>>()
        .join(",")
}

/// The adapters of a model: stored in its `config.json` (`"lora"`), so that a checkpoint of a
/// LoRA run loads with its adapters in place.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// `r`, the adapters' inner width.
    pub rank: usize,
    /// PEFT's `lora_alpha`: the adapter's output is scaled by `alpha / rank`.
    pub alpha: f32,
    /// Dropout on the adapter's input while training (PEFT's `lora_dropout`), in `[0, 1)`.
    pub dropout: f32,
    /// The projections that carry an adapter, in layout order.
    pub targets: Vec<LoraTarget>,
}

impl LoraConfig {
    /// `alpha / rank`, the factor on every adapter's output.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// Checks the ranges, and the targets against the model's family.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<(), ConfigError> {
        if self.rank == 0 {
            return Err(ConfigError::Invalid(
                "--lora-rank must be at least 1".into(),
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(ConfigError::Invalid(format!(
                "--lora-alpha {} must be finite and > 0",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(ConfigError::Invalid(format!(
                "--lora-dropout {} must be in [0, 1)",
                self.dropout
            )));
        }
        let offered = LoraTarget::all_for(cfg);
        if let Some(t) = self.targets.iter().find(|t| !offered.contains(t)) {
            return Err(ConfigError::Invalid(format!(
                "lora target `{}` is not a projection of this model, which offers {}",
                t.name(),
                names(&offered)
            )));
        }
        if self.targets.is_empty() {
            return Err(ConfigError::Invalid("lora: no target".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_per_family() {
        let llama = ModelConfig::preset("llama-tiny", 512).unwrap();
        let gpt2 = ModelConfig::preset("tiny", 512).unwrap();
        assert_eq!(
            LoraTarget::parse_list("v,q", &llama).unwrap(),
            vec![LoraTarget::Q, LoraTarget::V]
        );
        assert_eq!(
            LoraTarget::parse_list("all", &llama).unwrap(),
            LoraTarget::all_for(&llama)
        );
        assert_eq!(
            LoraTarget::parse_list("q,k,v,down", &gpt2).unwrap(),
            vec![LoraTarget::Qkv, LoraTarget::Down]
        );
        let err = LoraTarget::parse_list("q,v", &gpt2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("attn.c_attn") && err.contains("q,v"), "{err}");
        let err = LoraTarget::parse_list("gate", &gpt2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("`gate`") && err.contains("gpt2"), "{err}");
        let err = LoraTarget::parse_list("w", &llama).unwrap_err().to_string();
        assert!(err.contains("unknown target `w`"), "{err}");
    }
}
