//! The parameter layout of a GPT-2 model: names, shapes, initialisation and decay groups.
//!
//! Names follow nanoGPT (`h.{l}.attn.c_attn.weight`, ...) and every matmul weight is stored
//! `[out, in]` like PyTorch's `nn.Linear`, so safetensors files and the PyTorch fixture script
//! (scripts/make_fixture.py) agree on names and shapes with no transposes.

use crate::config::ModelConfig;
use crate::rng::Rng;

/// How a tensor is initialised (GPT-2 / nanoGPT recipe).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Normal with this standard deviation.
    Normal(f32),
    Zeros,
    Ones,
}

/// One named parameter tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    /// Weight decay applies to matrices (matmul weights and embeddings), not biases or norms.
    pub decay: bool,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Indices into the parameter list for one transformer block.
#[derive(Clone, Copy, Debug)]
pub struct LayerIdx {
    pub ln1_w: usize,
    pub ln1_b: usize,
    pub qkv_w: usize,
    pub qkv_b: usize,
    pub attn_proj_w: usize,
    pub attn_proj_b: usize,
    pub ln2_w: usize,
    pub ln2_b: usize,
    pub fc_w: usize,
    pub fc_b: usize,
    pub fc_proj_w: usize,
    pub fc_proj_b: usize,
}

/// Every parameter in order, plus index helpers.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    pub specs: Vec<ParamSpec>,
    pub wte: usize,
    pub wpe: usize,
    pub layers: Vec<LayerIdx>,
    pub lnf_w: usize,
    pub lnf_b: usize,
}

impl ParamLayout {
    pub fn new(cfg: &ModelConfig) -> Self {
        let c = cfg.n_embd;
        let std = 0.02f32;
        // GPT-2 scales the residual projections by 1/sqrt(2 * n_layer).
        let proj_std = std / ((2 * cfg.n_layer) as f32).sqrt();
        let mut specs = SpecList::default();
        let wte = specs.matrix("wte.weight".into(), cfg.padded_vocab_size, c, std);
        let wpe = specs.matrix("wpe.weight".into(), cfg.max_seq_len, c, std);
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let p = |s: &str| format!("h.{l}.{s}");
            layers.push(LayerIdx {
                ln1_w: specs.vector(p("ln_1.weight"), c, Init::Ones),
                ln1_b: specs.vector(p("ln_1.bias"), c, Init::Zeros),
                qkv_w: specs.matrix(p("attn.c_attn.weight"), 3 * c, c, std),
                qkv_b: specs.vector(p("attn.c_attn.bias"), 3 * c, Init::Zeros),
                attn_proj_w: specs.matrix(p("attn.c_proj.weight"), c, c, proj_std),
                attn_proj_b: specs.vector(p("attn.c_proj.bias"), c, Init::Zeros),
                ln2_w: specs.vector(p("ln_2.weight"), c, Init::Ones),
                ln2_b: specs.vector(p("ln_2.bias"), c, Init::Zeros),
                fc_w: specs.matrix(p("mlp.c_fc.weight"), 4 * c, c, std),
                fc_b: specs.vector(p("mlp.c_fc.bias"), 4 * c, Init::Zeros),
                fc_proj_w: specs.matrix(p("mlp.c_proj.weight"), c, 4 * c, proj_std),
                fc_proj_b: specs.vector(p("mlp.c_proj.bias"), c, Init::Zeros),
            });
        }
        let lnf_w = specs.vector("ln_f.weight".into(), c, Init::Ones);
        let lnf_b = specs.vector("ln_f.bias".into(), c, Init::Zeros);
        let specs = specs.0;
        Self {
            specs,
            wte,
            wpe,
            layers,
            lnf_w,
            lnf_b,
        }
    }

    pub fn num_params(&self) -> usize {
        self.specs.iter().map(ParamSpec::numel).sum()
    }

    /// Initial values for every tensor, drawn in order from `rng`. Padded vocabulary rows
    /// (`>= vocab_size`) start at zero: no token ever selects them, and the cross-entropy
    /// ignores their logits.
    pub fn init_values(&self, cfg: &ModelConfig, rng: &mut Rng) -> Vec<Vec<f32>> {
        self.specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut v: Vec<f32> = match s.init {
                    Init::Normal(std) => (0..s.numel()).map(|_| rng.normal() * std).collect(),
                    Init::Zeros => vec![0.0; s.numel()],
                    Init::Ones => vec![1.0; s.numel()],
                };
                if i == self.wte {
                    v[cfg.vocab_size * cfg.n_embd..].fill(0.0);
                }
                v
            })
            .collect()
    }
}

/// The tensors in the order they are declared; each push returns the new tensor's index.
#[derive(Default)]
struct SpecList(Vec<ParamSpec>);

impl SpecList {
    /// A `[rows, cols]` weight matrix: normal(std) init, weight-decayed.
    fn matrix(&mut self, name: String, rows: usize, cols: usize, std: f32) -> usize {
        self.push(name, vec![rows, cols], Init::Normal(std), true)
    }

    /// A `[len]` vector (a bias or a layernorm parameter): never weight-decayed.
    fn vector(&mut self, name: String, len: usize, init: Init) -> usize {
        self.push(name, vec![len], init, false)
    }

    fn push(&mut self, name: String, shape: Vec<usize>, init: Init, decay: bool) -> usize {
        self.0.push(ParamSpec {
            name,
            shape,
            init,
            decay,
        });
        self.0.len() - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_counts_match_the_config() {
        let cfg = ModelConfig::preset("gpt2-124m", 50257).unwrap();
        let layout = ParamLayout::new(&cfg);
        assert_eq!(layout.num_params(), cfg.num_params());
        assert_eq!(layout.specs.len(), 2 + 12 * 12 + 2);
        assert_eq!(
            layout.specs[layout.layers[3].fc_w].name,
            "h.3.mlp.c_fc.weight"
        );
        assert_eq!(layout.specs[layout.layers[3].fc_w].shape, vec![3072, 768]);
    }
}
