//! Model and run configurations: named presets, TOML files, and flag overrides.
//!
//! A run is described by a [`RunConfig`] (TOML). Every field has a default, so a TOML file only
//! names what differs; CLI flags override the file. The model shape lives in [`ModelConfig`],
//! which is also written next to every checkpoint as `config.json`.

mod family;
mod lora;
mod lora_run;
mod presets;

pub use family::{Family, LlamaShape, RopeScaling};
pub use lora::{LoraConfig, LoraTarget};
pub use lora_run::{lora_line, resume_lora};
pub use presets::PRESETS;

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{path}: cannot read config: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid TOML: {msg}")]
    Parse { path: PathBuf, msg: String },
    #[error("unknown preset `{0}` (known: {known})", known = PRESETS.join(", "))]
    UnknownPreset(String),
    #[error("invalid model config: {0}")]
    Invalid(String),
    /// A run-config field out of range: names the TOML key, the flag that sets it (where one
    /// does), the value and what it must be.
    #[error("{key}{flag} is {value}: {expected}", flag = flag.map(|f| format!(" ({f})")).unwrap_or_default())]
    Field {
        key: &'static str,
        flag: Option<&'static str>,
        value: String,
        expected: String,
    },
}

/// Shape of a model of either family ([`Family`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Real vocabulary size (token ids are `< vocab_size`).
    pub vocab_size: usize,
    /// Embedding rows: `vocab_size` rounded up to a multiple of 64, for aligned GPU matmuls.
    pub padded_vocab_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// Longest sequence (GPT-2: rows of the position embedding; Llama: the longest the run
    /// takes, RoPE itself has no table).
    pub max_seq_len: usize,
    /// The architecture family and its own settings (absent in older checkpoints: GPT-2).
    #[serde(default)]
    pub family: Family,
    /// Low-rank adapters beside the projections (a LoRA run's model; `None`: full weights).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
}

/// Rounds `v` up to a multiple of 64.
pub fn pad_vocab(v: usize) -> usize {
    v.div_ceil(64) * 64
}

impl ModelConfig {
    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// The Llama-family settings, `None` for GPT-2.
    pub fn llama(&self) -> Option<&LlamaShape> {
        match &self.family {
            Family::Gpt2 => None,
            Family::Llama(s) => Some(s),
        }
    }

    /// Key/value heads (`n_head` for GPT-2).
    pub fn n_kv_head(&self) -> usize {
        self.llama().map_or(self.n_head, |s| s.n_kv_head)
    }

    /// Width of one position's fused `q | k | v` row: `(n_head + 2 n_kv_head) * head_size`.
    pub fn qkv_width(&self) -> usize {
        (self.n_head + 2 * self.n_kv_head()) * self.head_size()
    }

    /// Width of the MLP's hidden layer (GPT-2: `4 C`).
    pub fn mlp_width(&self) -> usize {
        self.llama()
            .map_or(4 * self.n_embd, |s| s.intermediate_size)
    }

    /// The family's name as configs and messages spell it.
    pub fn family_name(&self) -> &'static str {
        match self.family {
            Family::Gpt2 => "gpt2",
            Family::Llama(_) => "llama",
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.vocab_size == 0 || self.n_layer == 0 || self.n_head == 0 || self.max_seq_len == 0 {
            return bad(format!("all sizes must be positive: {self:?}"));
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return bad(format!(
                "n_embd {} is not divisible by n_head {}",
                self.n_embd, self.n_head
            ));
        }
        if let Some(l) = self.llama() {
            if l.n_kv_head == 0 || !self.n_head.is_multiple_of(l.n_kv_head) {
                return bad(format!(
                    "n_kv_head {} must divide n_head {}",
                    l.n_kv_head, self.n_head
                ));
            }
            if !self.head_size().is_multiple_of(2) {
                return bad(format!(
                    "head size {} must be even for rotary embeddings",
                    self.head_size()
                ));
            }
            if l.intermediate_size == 0 || l.rope_theta <= 0.0 || l.rms_eps <= 0.0 {
                return bad(format!(
                    "intermediate_size, rope_theta and rms_eps must be positive: {l:?}"
                ));
            }
        }
        if self.padded_vocab_size < self.vocab_size {
            return bad(format!(
                "padded_vocab_size {} < vocab_size {}",
                self.padded_vocab_size, self.vocab_size
            ));
        }
        if let Some(lora) = &self.lora {
            lora.validate(self)?;
        }
        Ok(())
    }

    /// Parameters counted the usual way: every weight, the tied head once, padding rows included.
    pub fn num_params(&self) -> usize {
        let (c, l) = (self.n_embd, self.n_layer);
        if let Some(s) = self.llama() {
            let qkv = self.qkv_width();
            let bias = if s.qkv_bias { qkv } else { 0 };
            let per_layer = 2 * c + qkv * c + bias + c * c + 3 * c * s.intermediate_size;
            let head = if s.tie_embeddings {
                0
            } else {
                self.padded_vocab_size * c
            };
            return self.padded_vocab_size * c + head + l * per_layer + c;
        }
        let per_layer = 2 * c
            + (3 * c * c + 3 * c)
            + (c * c + c)
            + 2 * c
            + (4 * c * c + 4 * c)
            + (4 * c * c + c);
        self.padded_vocab_size * c + self.max_seq_len * c + l * per_layer + 2 * c
    }

    /// Training FLOPs per token: `6 N + 12 L C T` with `N` excluding the position embedding
    /// (PaLM appendix B; the convention of docs/PERF.md).
    pub fn flops_per_token(&self, seq_len: usize) -> f64 {
        let positions = match self.family {
            Family::Gpt2 => self.max_seq_len * self.n_embd,
            Family::Llama(_) => 0,
        };
        let n = (self.num_params() - positions) as f64;
        6.0 * n + 12.0 * (self.n_layer * self.n_embd * seq_len) as f64
    }
}

/// Everything a training run needs besides the data and the tokenizer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Model preset name (see [`PRESETS`]); the vocabulary comes from the tokenizer.
    pub preset: String,
    /// Micro-batch rows.
    pub batch_size: usize,
    /// Sequence length of each row (`<= max_seq_len`).
    pub seq_len: usize,
    /// Tokens per optimizer step; a multiple of `batch_size * seq_len` (gradient accumulation).
    /// 0 means one micro-batch per step.
    pub total_batch_tokens: usize,
    pub max_steps: usize,
    pub learning_rate: f32,
    /// Final learning rate as a fraction of the peak, reached at `max_steps` by cosine decay.
    pub min_lr_ratio: f32,
    pub warmup_steps: usize,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Global gradient-norm clip (0 disables).
    pub grad_clip: f32,
    /// Validation every this many steps (0 disables), over `val_batches` micro-batches.
    pub val_every: usize,
    pub val_batches: usize,
    /// Checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: usize,
    pub seed: u64,
    /// Data-parallel rank and world size (each rank reads its own windows).
    pub rank: usize,
    pub world_size: usize,
    /// SFT only: pack several whole examples into each row, kept apart (`stages::sft`).
    pub pack: bool,
    /// Stop the run as diverged when a step's mean loss exceeds the lowest loss of the run so
    /// far by more than this many times `max(1, |lowest|)` (0 disables; a non-finite loss
    /// always stops it). The margin scales with `|lowest|` floored at 1 because not every
    /// stage's loss is a positive cross-entropy (DPO starts near ln 2, RL's is near 0).
    pub divergence_factor: f32,
    /// Model shape overrides beside the preset (`--n-layer --n-head --n-embd --context`); `None`
    /// keeps the preset's value.
    pub n_layer: Option<usize>,
    pub n_head: Option<usize>,
    pub n_embd: Option<usize>,
    /// Longest sequence the model takes (rows of its position embedding).
    pub context: Option<usize>,
    /// Activation recompute (llm.c's levels): 0 stores every activation, 1 recomputes the
    /// GELU output in the backward pass, 2 also the layernorm outputs.
    pub recompute: u8,
    /// ZeRO stage: 0 keeps the whole optimizer state on every rank, 1 shards the AdamW moments
    /// and fp32 master weights across the data-parallel ranks.
    pub zero: u8,
    /// LoRA (`--lora-rank`): train low-rank adapters beside a frozen base (`lora_run.rs`);
    /// `None` trains every weight.
    pub lora_rank: Option<usize>,
    /// `--lora-alpha` (default `2 * lora_rank`).
    pub lora_alpha: Option<f32>,
    /// `--lora-dropout` on the adapters' input while training.
    pub lora_dropout: f32,
    /// `--lora-targets`: `all` or a list such as `q,k,v,o,gate,up,down`.
    pub lora_targets: String,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            preset: "tiny".into(),
            batch_size: 8,
            seq_len: 256,
            total_batch_tokens: 0,
            max_steps: 300,
            learning_rate: 3e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 20,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            val_every: 50,
            val_batches: 8,
            checkpoint_every: 100,
            seed: 1337,
            rank: 0,
            world_size: 1,
            pack: false,
            divergence_factor: 3.0,
            n_layer: None,
            n_head: None,
            n_embd: None,
            context: None,
            recompute: 0,
            zero: 0,
            lora_rank: None,
            lora_alpha: None,
            lora_dropout: 0.0,
            lora_targets: "all".into(),
        }
    }
}

impl RunConfig {
    /// The model shape of a fresh model: the preset for a tokenizer of `vocab_size` ids, with
    /// the overrides `n_layer n_head n_embd context` (TOML keys, and flags of the same names)
    /// applied. Errors name the key and the flag and the values.
    pub fn model_config(&self, vocab_size: usize) -> Result<ModelConfig, ConfigError> {
        let mut cfg = ModelConfig::preset(&self.preset, vocab_size)?;
        for (key, flag, v, field) in [
            ("n_layer", "--n-layer", self.n_layer, &mut cfg.n_layer),
            ("n_head", "--n-head", self.n_head, &mut cfg.n_head),
            ("n_embd", "--n-embd", self.n_embd, &mut cfg.n_embd),
            ("context", "--context", self.context, &mut cfg.max_seq_len),
        ] {
            match v {
                Some(0) => {
                    return Err(ConfigError::Field {
                        key,
                        flag: Some(flag),
                        value: "0".into(),
                        expected: "must be at least 1".into(),
                    })
                }
                Some(v) => *field = v,
                None => {}
            }
        }
        if !cfg.n_embd.is_multiple_of(cfg.n_head) {
            return Err(ConfigError::Invalid(format!(
                "n_embd (--n-embd) {} is not divisible by n_head (--n-head) {}",
                cfg.n_embd, cfg.n_head
            )));
        }
        // A Llama preset keeps its KV heads: the query heads must come in whole groups.
        if let Some(kv) = cfg.llama().map(|l| l.n_kv_head) {
            if !cfg.n_head.is_multiple_of(kv) {
                return Err(ConfigError::Invalid(format!(
                    "n_head (--n-head) {} is not a multiple of the {} preset's {kv} key/value \
                     heads",
                    cfg.n_head, self.preset
                )));
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The shape overrides that differ from `model` (a checkpoint's), one `key (flag) V (the
    /// checkpoint has W)` each; empty when every given override matches.
    pub fn shape_mismatches(&self, model: &ModelConfig) -> Vec<String> {
        [
            ("n_layer", "--n-layer", self.n_layer, model.n_layer),
            ("n_head", "--n-head", self.n_head, model.n_head),
            ("n_embd", "--n-embd", self.n_embd, model.n_embd),
            ("context", "--context", self.context, model.max_seq_len),
        ]
        .into_iter()
        .filter_map(|(key, flag, want, have)| {
            want.filter(|&w| w != have)
                .map(|w| format!("{key} ({flag}) {w} (the checkpoint has {have})"))
        })
        .collect()
    }

    /// Reads a TOML file; missing fields take their defaults, unknown ones are an error.
    pub fn from_toml_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
    }

    /// Refuses nonsense hyper-parameters before any work, naming the field as its TOML key
    /// and its flag: a rate, decay, clip or beta out of range, a NaN or infinity, a zero size.
    /// `warmup_steps > max_steps` is allowed (the run ends during warm-up; see [`Self::notes`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn bad<T: std::fmt::Display>(
            key: &'static str,
            flag: Option<&'static str>,
            value: T,
            expected: &str,
        ) -> Result<(), ConfigError> {
            Err(ConfigError::Field {
                key,
                flag,
                value: value.to_string(),
                expected: expected.to_string(),
            })
        }
        let lr = self.learning_rate;
        if !(lr.is_finite() && lr > 0.0) {
            return bad("learning_rate", Some("--lr"), lr, "must be finite and > 0");
        }
        if !(self.min_lr_ratio >= 0.0 && self.min_lr_ratio <= 1.0) {
            let v = self.min_lr_ratio;
            let want = "must be in [0, 1] (the final rate as a fraction of the peak)";
            return bad("min_lr_ratio", None, v, want);
        }
        let wd = self.weight_decay;
        if !(wd.is_finite() && wd >= 0.0) {
            return bad(
                "weight_decay",
                Some("--weight-decay"),
                wd,
                "must be finite and >= 0",
            );
        }
        let clip = self.grad_clip;
        if !(clip.is_finite() && clip >= 0.0) {
            let want = "must be finite and >= 0 (0 disables clipping)";
            return bad("grad_clip", Some("--grad-clip"), clip, want);
        }
        for (key, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return bad(key, None, beta, "must be in [0, 1)");
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("eps", None, self.eps, "must be finite and > 0");
        }
        let factor = self.divergence_factor;
        if !(factor.is_finite() && factor >= 0.0) {
            let want = "must be finite and >= 0 (0 turns the loss-spike guard off)";
            return bad(
                "divergence_factor",
                Some("--divergence-factor"),
                factor,
                want,
            );
        }
        for (key, flag, v) in [
            ("batch_size", "--batch-size", self.batch_size),
            ("seq_len", "--seq-len", self.seq_len),
            ("max_steps", "--max-steps", self.max_steps),
        ] {
            if v == 0 {
                return bad(key, Some(flag), v, "must be at least 1");
            }
        }
        if self.recompute > 2 {
            let want =
                "must be 0 (store every activation), 1 (recompute GELU) or 2 (also layernorm)";
            return bad("recompute", Some("--recompute"), self.recompute, want);
        }
        if self.zero > 1 {
            let want = "must be 0 (no sharding) or 1 (shard the optimizer state)";
            return bad("zero", Some("--zero"), self.zero, want);
        }
        if self.val_every > 0 && self.val_batches == 0 {
            let want = format!(
                "must be at least 1 while val_every (--val-every) is {} (or set --val-every 0 \
                 to turn validation off)",
                self.val_every
            );
            return bad("val_batches", None, 0, &want);
        }
        self.grad_accum_steps()?;
        Ok(())
    }

    /// What is legal but likely not meant, one line each (the CLI prints them as notes).
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if self.warmup_steps > self.max_steps {
            notes.push(format!(
                "warmup_steps (--warmup-steps) {} is more than max_steps (--max-steps) {}: the \
                 run ends during the warm-up and never reaches the peak learning rate {}",
                self.warmup_steps, self.max_steps, self.learning_rate
            ));
        }
        notes
    }

    /// Micro-batches per optimizer step.
    pub fn grad_accum_steps(&self) -> Result<usize, ConfigError> {
        let micro = self.batch_size.checked_mul(self.seq_len).ok_or_else(|| {
            ConfigError::Invalid(format!(
                "batch_size {} x seq_len {} overflows",
                self.batch_size, self.seq_len
            ))
        })?;
        if micro == 0 {
            return Err(ConfigError::Invalid(
                "batch_size and seq_len must be positive".into(),
            ));
        }
        if self.total_batch_tokens == 0 {
            return Ok(1);
        }
        if !self.total_batch_tokens.is_multiple_of(micro) {
            return Err(ConfigError::Invalid(format!(
                "total_batch_tokens {} is not a multiple of batch_size*seq_len = {micro}",
                self.total_batch_tokens
            )));
        }
        Ok(self.total_batch_tokens / micro)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_124m_matches_the_published_count() {
        let cfg = ModelConfig::preset("gpt2-124m", 50257).unwrap();
        assert_eq!(cfg.padded_vocab_size, 50304);
        // docs/PERF.md: N without the position embedding = 123,689,472 (padded, tied head once).
        assert_eq!(cfg.num_params() - 1024 * 768, 123_689_472);
    }

    #[test]
    fn toml_overrides_only_what_it_names() {
        let cfg: RunConfig = toml::from_str("max_steps = 7\nlearning_rate = 0.01").unwrap();
        assert_eq!(cfg.max_steps, 7);
        assert_eq!(cfg.batch_size, RunConfig::default().batch_size);
        assert!(toml::from_str::<RunConfig>("max_stepz = 7").is_err());
    }

    /// Every nonsense value is refused, and the message names the TOML key (and the flag).
    #[test]
    fn validate_names_the_field() {
        let ok = RunConfig::default();
        ok.validate().unwrap();
        let with = |f: fn(&mut RunConfig)| {
            let mut c = ok.clone();
            f(&mut c);
            c
        };
        type Case = (fn(&mut RunConfig), &'static str);
        let cases: [Case; 18] = [
            (
                |c| c.learning_rate = -1.0,
                "learning_rate (--lr) is -1: must be finite and > 0",
            ),
            (
                |c| c.learning_rate = f32::NAN,
                "learning_rate (--lr) is NaN",
            ),
            (
                |c| c.learning_rate = f32::INFINITY,
                "learning_rate (--lr) is inf",
            ),
            (|c| c.learning_rate = 0.0, "learning_rate (--lr) is 0"),
            (
                |c| c.weight_decay = -0.1,
                "weight_decay (--weight-decay) is -0.1",
            ),
            (|c| c.grad_clip = -1.0, "grad_clip (--grad-clip) is -1"),
            (|c| c.beta1 = 1.0, "beta1 is 1: must be in [0, 1)"),
            (|c| c.beta2 = 1.5, "beta2 is 1.5: must be in [0, 1)"),
            (|c| c.beta2 = -0.5, "beta2 is -0.5"),
            (
                |c| c.min_lr_ratio = -3.0,
                "min_lr_ratio is -3: must be in [0, 1]",
            ),
            (|c| c.min_lr_ratio = f32::NAN, "min_lr_ratio is NaN"),
            (|c| c.eps = 0.0, "eps is 0: must be finite and > 0"),
            (|c| c.eps = f32::INFINITY, "eps is inf"),
            (
                |c| c.divergence_factor = -1.0,
                "divergence_factor (--divergence-factor) is -1",
            ),
            (|c| c.batch_size = 0, "batch_size (--batch-size) is 0"),
            (|c| c.seq_len = 0, "seq_len (--seq-len) is 0"),
            (|c| c.max_steps = 0, "max_steps (--max-steps) is 0"),
            (
                |c| c.val_batches = 0,
                "val_batches is 0: must be at least 1 while val_every",
            ),
        ];
        for (f, want) in cases {
            let e = with(f).validate().unwrap_err().to_string();
            assert!(e.starts_with(want), "{e:?} should start with {want:?}");
        }
        // Legal edge values.
        with(|c| {
            (c.val_batches, c.val_every, c.grad_clip, c.weight_decay) = (0, 0, 0.0, 0.0);
            (c.beta1, c.min_lr_ratio) = (0.0, 1.0);
        })
        .validate()
        .unwrap();
        let short = with(|c| (c.max_steps, c.warmup_steps) = (3, 5));
        short.validate().unwrap();
        assert!(short.notes()[0].contains("ends during the warm-up"));
    }

    #[test]
    fn accumulation_must_divide() {
        let cfg = RunConfig {
            batch_size: 2,
            seq_len: 8,
            total_batch_tokens: 48,
            ..Default::default()
        };
        assert_eq!(cfg.grad_accum_steps().unwrap(), 3);
        let bad = RunConfig {
            total_batch_tokens: 50,
            ..cfg
        };
        assert!(bad.grad_accum_steps().is_err());
    }
}
