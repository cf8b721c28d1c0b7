//! The named model presets: GPT-2 sizes (`tiny` to `gpt2-1558m`, llm.c's d12 to d48) and the
//! Llama family's (`llama-tiny`, and the shapes of SmolLM2-135M, Llama-3.2-1B and
//! Llama-3.1-8B), each for the vocabulary of the tokenizer it will train with.

use super::{pad_vocab, ConfigError, Family, LlamaShape, ModelConfig, RopeScaling};

/// Names accepted by [`ModelConfig::preset`].
pub const PRESETS: &[&str] = &[
    "tiny",
    "small",
    "gpt2-124m",
    "gpt2-350m",
    "gpt2-774m",
    "gpt2-1558m",
    "llama-tiny",
    "smollm2-135m",
    "llama-3.2-1b",
    "llama-3.1-8b",
];

impl ModelConfig {
    /// A named preset for a tokenizer of `vocab_size` tokens.
    pub fn preset(name: &str, vocab_size: usize) -> Result<Self, ConfigError> {
        if let Some(cfg) = llama_preset(name, vocab_size) {
            cfg.validate()?;
            return Ok(cfg);
        }
        let (n_layer, n_head, n_embd, max_seq_len) = match name {
            // Seconds per step on two CPU cores.
            "tiny" => (4, 4, 128, 256),
            // A step up for a workstation GPU or a patient CPU.
            "small" => (6, 6, 384, 512),
            // GPT-2 small.
            "gpt2-124m" => (12, 12, 768, 1024),
            // GPT-2 medium, large and XL (llm.c's d24, d36, d48).
            "gpt2-350m" => (24, 16, 1024, 1024),
            "gpt2-774m" => (36, 20, 1280, 1024),
            "gpt2-1558m" => (48, 25, 1600, 1024),
            other => return Err(ConfigError::UnknownPreset(other.to_string())),
        };
        let cfg = Self {
            vocab_size,
            padded_vocab_size: pad_vocab(vocab_size),
            n_layer,
            n_head,
            n_embd,
            max_seq_len,
            family: Family::Gpt2,
            lora: None,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The Llama-family presets (random init): a CPU-sized one and the shapes of SmolLM2-135M,
/// Llama-3.2-1B and Llama-3.1-8B.
fn llama_preset(name: &str, vocab_size: usize) -> Option<ModelConfig> {
    let (n_layer, n_head, n_embd, max_seq_len, shape) = match name {
        "llama-tiny" => (4, 4, 128, 256, LlamaShape::new(2, 384)),
        "smollm2-135m" => (
            30,
            9,
            576,
            2048,
            LlamaShape {
                rope_theta: 100_000.0,
                tie_embeddings: true,
                ..LlamaShape::new(3, 1536)
            },
        ),
        "llama-3.2-1b" => (
            16,
            32,
            2048,
            8192,
            LlamaShape {
                rope_theta: 500_000.0,
                rope_scaling: Some(RopeScaling {
                    factor: 32.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192,
                }),
                tie_embeddings: true,
                ..LlamaShape::new(8, 8192)
            },
        ),
        // Llama-3.1-8B: 8,030,261,248 parameters with its 128,256-token vocabulary.
        "llama-3.1-8b" => (
            32,
            32,
            4096,
            8192,
            LlamaShape {
                rope_theta: 500_000.0,
                rope_scaling: Some(RopeScaling {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192,
                }),
                tie_embeddings: false,
                ..LlamaShape::new(8, 14336)
            },
        ),
        _ => return None,
    };
    Some(ModelConfig {
        vocab_size,
        padded_vocab_size: pad_vocab(vocab_size),
        n_layer,
        n_head,
        n_embd,
        max_seq_len,
        family: Family::Llama(shape),
        lora: None,
    })
}
