//! Architecture families: GPT-2 (learned positions, LayerNorm, GELU MLP, tied head) and the
//! Llama family (RoPE, RMSNorm, SwiGLU MLP, grouped-query attention), which also covers Qwen2
//! (q/k/v biases) and Mistral (same graph). A [`super::ModelConfig`] names its family; the
//! shape fields shared by both (`n_layer`, `n_head`, `n_embd`, `max_seq_len`) stay on the config.

use serde::{Deserialize, Serialize};

/// Which graph a model runs. Serialised as `"gpt2"` or `{"llama": {...}}` inside a checkpoint's
/// `config.json`; a config from before families existed has none and is GPT-2.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    #[default]
    Gpt2,
    Llama(LlamaShape),
}

/// What a Llama-family model adds to the shared shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaShape {
    /// Key/value heads; divides `n_head` (`n_head`: plain multi-head, 1: multi-query).
    pub n_kv_head: usize,
    /// Width of the SwiGLU MLP's hidden layer.
    pub intermediate_size: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// Llama 3's frequency scaling of RoPE, where the model has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// RMSNorm epsilon.
    pub rms_eps: f64,
    /// The output head shares the token embedding (`lm_head` is absent).
    pub tie_embeddings: bool,
    /// q, k and v projections carry biases (Qwen2).
    pub qkv_bias: bool,
}

/// Llama 3's RoPE frequency scaling (`rope_type: "llama3"` in Hugging Face configs): long
/// wavelengths are divided by `factor`, short ones kept, the band between blended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

impl LlamaShape {
    /// A shape with Llama's usual settings: no biases, untied head, theta 10000, eps 1e-5.
    pub fn new(n_kv_head: usize, intermediate_size: usize) -> Self {
        Self {
            n_kv_head,
            intermediate_size,
            rope_theta: 10_000.0,
            rope_scaling: None,
            rms_eps: 1e-5,
            tie_embeddings: false,
            qkv_bias: false,
        }
    }

    /// The RoPE inverse frequencies for head size `hs`, `hs / 2` of them, computed as Hugging
    /// Face's `_compute_default_rope_parameters` and `_compute_llama3_parameters` do: in f32
    /// (`theta ^ -(2i / hs)`, then the Llama 3 band scaling), so that the angles `pos * f`
    /// match the reference library's bit for bit.
    pub fn rope_inv_freq(&self, hs: usize) -> Vec<f32> {
        let base = self.rope_theta as f32;
        let mut freqs: Vec<f32> = (0..hs / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / hs as f32))
            .collect();
        if let Some(s) = &self.rope_scaling {
            let old = s.original_max_position_embeddings as f32;
            let low_wavelen = old / s.low_freq_factor as f32;
            let high_wavelen = old / s.high_freq_factor as f32;
            for f in &mut freqs {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= s.factor as f32;
                } else if wavelen >= high_wavelen {
                    let smooth = (old / wavelen - s.low_freq_factor as f32)
                        / (s.high_freq_factor as f32 - s.low_freq_factor as f32);
                    *f = (1.0 - smooth) * *f / s.factor as f32 + smooth * *f;
                }
            }
        }
        freqs
    }
}
