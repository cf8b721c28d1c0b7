//! The parameter layout of a model of either family: names, shapes, initialisation and decay
//! groups.
//!
//! Names follow nanoGPT (`h.{l}.attn.c_attn.weight`, ...) and every matmul weight is stored
//! `[out, in]` like PyTorch's `nn.Linear`, so safetensors files and the PyTorch fixture script
//! (scripts/make_fixture.py) agree on names and shapes with no transposes.

use crate::config::{LlamaShape, LoraConfig, LoraTarget, ModelConfig};
use crate::rng::Rng;

/// How a tensor is initialised (GPT-2 / nanoGPT recipe).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Normal with this standard deviation.
    Normal(f32),
    Zeros,
    Ones,
    /// Uniform in `[-bound, bound]` (LoRA's `A`: PEFT's Kaiming-uniform, bound `1/sqrt(in)`).
    Uniform(f32),
}

/// One named parameter tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    /// Weight decay applies to matrices (matmul weights and embeddings), not biases or norms.
    pub decay: bool,
    /// Trained (true) or frozen (false: a LoRA run's base weights, which keep one working
    /// copy and have no gradient, master copy or optimizer moments).
    pub trainable: bool,
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

/// Indices into the parameter list for one Llama-family block. `qkv_w` is q, k and v stacked
/// (`[(NH + 2 NKV) * hs, C]`, Hugging Face's `q_proj`, `k_proj`, `v_proj` one after the other)
/// and `gate_up_w` is `gate_proj` over `up_proj` (`[2 I, C]`), so that each is one matmul.
#[derive(Clone, Copy, Debug)]
pub struct LlamaLayerIdx {
    pub ln1_w: usize,
    pub qkv_w: usize,
    /// Qwen2's q/k/v biases, stacked like the weight.
    pub qkv_b: Option<usize>,
    pub o_w: usize,
    pub ln2_w: usize,
    pub gate_up_w: usize,
    pub down_w: usize,
}

/// One LoRA adapter (config/lora.rs): `A [rank, in]` and `B [width, rank]` beside the
/// projection whose weight is tensor `base` (`[out, in]`), adding to its output's columns
/// `col .. col + width` (a slice of a fused projection, or all of it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraSlot {
    pub layer: usize,
    pub target: LoraTarget,
    /// The base projection's weight tensor.
    pub base: usize,
    /// The projection's input width (`in`) and full output width (`out`).
    pub in_dim: usize,
    pub out_dim: usize,
    /// The columns of the output this adapter adds to.
    pub col: usize,
    pub width: usize,
    /// Tensor indices of `A` and `B`.
    pub a: usize,
    pub b: usize,
}

/// Every parameter in order, plus index helpers. GPT-2 fills `layers`, `wpe` and `lnf_b`; the
/// Llama family fills `llama_layers` and, with an untied head, `lm_head`.
#[derive(Clone, Debug)]
pub struct ParamLayout {
    pub specs: Vec<ParamSpec>,
    /// Token embedding `[VP, C]`; also the output head when `lm_head` is `None`.
    pub wte: usize,
    pub wpe: Option<usize>,
    pub layers: Vec<LayerIdx>,
    pub llama_layers: Vec<LlamaLayerIdx>,
    pub lnf_w: usize,
    pub lnf_b: Option<usize>,
    /// An untied output head `[VP, C]`.
    pub lm_head: Option<usize>,
    /// A LoRA model's adapters (`cfg.lora`), by layer then target in layout order; their
    /// tensors follow every base tensor, and the base tensors are then frozen.
    pub lora: Vec<LoraSlot>,
}

impl ParamLayout {
    pub fn new(cfg: &ModelConfig) -> Self {
        let mut layout = Self::base(cfg);
        if let Some(lora) = &cfg.lora {
            layout.add_lora(cfg, lora);
        }
        layout
    }

    /// The layout without adapters.
    fn base(cfg: &ModelConfig) -> Self {
        if let Some(shape) = cfg.llama() {
            return Self::llama(cfg, shape);
        }
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
            wpe: Some(wpe),
            layers,
            llama_layers: Vec::new(),
            lnf_w,
            lnf_b: Some(lnf_b),
            lm_head: None,
            lora: Vec::new(),
        }
    }

    /// The Llama-family layout, named as Hugging Face names the tensors (with the fused
    /// `qkv_proj` and `gate_up_proj`); normal(0.02) matrices, as `initializer_range` does.
    fn llama(cfg: &ModelConfig, shape: &LlamaShape) -> Self {
        let (c, std) = (cfg.n_embd, 0.02f32);
        let (qkv, mlp) = (cfg.qkv_width(), shape.intermediate_size);
        let mut specs = SpecList::default();
        let wte = specs.matrix(
            "model.embed_tokens.weight".into(),
            cfg.padded_vocab_size,
            c,
            std,
        );
        let mut llama_layers = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            let ln1_w = specs.vector(p("input_layernorm.weight"), c, Init::Ones);
            let qkv_w = specs.matrix(p("self_attn.qkv_proj.weight"), qkv, c, std);
            let qkv_b = shape
                .qkv_bias
                .then(|| specs.vector(p("self_attn.qkv_proj.bias"), qkv, Init::Zeros));
            llama_layers.push(LlamaLayerIdx {
                ln1_w,
                qkv_w,
                qkv_b,
                o_w: specs.matrix(p("self_attn.o_proj.weight"), c, c, std),
                ln2_w: specs.vector(p("post_attention_layernorm.weight"), c, Init::Ones),
                gate_up_w: specs.matrix(p("mlp.gate_up_proj.weight"), 2 * mlp, c, std),
                down_w: specs.matrix(p("mlp.down_proj.weight"), c, mlp, std),
            });
        }
        let lnf_w = specs.vector("model.norm.weight".into(), c, Init::Ones);
        let lm_head = (!shape.tie_embeddings)
            .then(|| specs.matrix("lm_head.weight".into(), cfg.padded_vocab_size, c, std));
        Self {
            specs: specs.0,
            wte,
            wpe: None,
            layers: Vec::new(),
            llama_layers,
            lnf_w,
            lnf_b: None,
            lm_head,
            lora: Vec::new(),
        }
    }

    /// Freezes every tensor so far and appends adapters per `lora`, layer by layer, each
    /// target in layout order: `A` uniform in `±1/sqrt(in)` (PEFT's default init), `B` zero.
    /// Names are the base module's with `.lora_A.weight` / `.lora_B.weight` (Hugging Face's
    /// module names: `model.layers.0.self_attn.q_proj.lora_A.weight`, GPT-2's
    /// `h.0.attn.c_attn.lora_A.weight`).
    fn add_lora(&mut self, cfg: &ModelConfig, lora: &LoraConfig) {
        for s in &mut self.specs {
            s.trainable = false;
        }
        let mut specs = SpecList(std::mem::take(&mut self.specs));
        let r = lora.rank;
        for layer in 0..cfg.n_layer {
            for &target in &lora.targets {
                let (module, base, col, width) = self.lora_site(cfg, layer, target);
                let shape = &specs.0[base].shape;
                let (out_dim, in_dim) = (shape[0], shape[1]);
                let bound = 1.0 / (in_dim as f32).sqrt();
                let a = specs.push(
                    format!("{module}.lora_A.weight"),
                    vec![r, in_dim],
                    Init::Uniform(bound),
                    true,
                );
                let b = specs.push(
                    format!("{module}.lora_B.weight"),
                    vec![width, r],
                    Init::Zeros,
                    true,
                );
                self.lora.push(LoraSlot {
                    layer,
                    target,
                    base,
                    in_dim,
                    out_dim,
                    col,
                    width,
                    a,
                    b,
                });
            }
        }
        self.specs = specs.0;
    }

    /// Where `target` of `layer` sits: its module name, the base weight's index, and the
    /// columns of that weight's output it covers.
    fn lora_site(
        &self,
        cfg: &ModelConfig,
        layer: usize,
        target: LoraTarget,
    ) -> (String, usize, usize, usize) {
        let c = cfg.n_embd;
        if let Some(shape) = cfg.llama() {
            let w = &self.llama_layers[layer];
            let (q, kv, i) = (
                c,
                shape.n_kv_head * cfg.head_size(),
                shape.intermediate_size,
            );
            let p = |s: &str| format!("model.layers.{layer}.{s}");
            return match target {
                LoraTarget::Q => (p("self_attn.q_proj"), w.qkv_w, 0, q),
                LoraTarget::K => (p("self_attn.k_proj"), w.qkv_w, q, kv),
                LoraTarget::V => (p("self_attn.v_proj"), w.qkv_w, q + kv, kv),
                LoraTarget::O => (p("self_attn.o_proj"), w.o_w, 0, c),
                LoraTarget::Gate => (p("mlp.gate_proj"), w.gate_up_w, 0, i),
                LoraTarget::Up => (p("mlp.up_proj"), w.gate_up_w, i, i),
                LoraTarget::Down => (p("mlp.down_proj"), w.down_w, 0, c),
                LoraTarget::Qkv => unreachable!("validated: not a llama target"),
            };
        }
        let w = &self.layers[layer];
        let p = |s: &str| format!("h.{layer}.{s}");
        match target {
            LoraTarget::Qkv => (p("attn.c_attn"), w.qkv_w, 0, 3 * c),
            LoraTarget::O => (p("attn.c_proj"), w.attn_proj_w, 0, c),
            LoraTarget::Up => (p("mlp.c_fc"), w.fc_w, 0, 4 * c),
            LoraTarget::Down => (p("mlp.c_proj"), w.fc_proj_w, 0, c),
            _ => unreachable!("validated: not a gpt2 target"),
        }
    }

    /// How many tensors the model has without its adapters (the base's tensors come first).
    pub fn num_base_tensors(&self) -> usize {
        self.lora.first().map_or(self.specs.len(), |s| s.a)
    }

    /// Elements of the trained tensors.
    pub fn num_trainable(&self) -> usize {
        self.specs
            .iter()
            .filter(|s| s.trainable)
            .map(ParamSpec::numel)
            .sum()
    }

    /// The output head's weight `[VP, C]`: `lm_head` where untied, else the token embedding.
    pub fn head(&self) -> usize {
        self.lm_head.unwrap_or(self.wte)
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
                    Init::Uniform(bound) => (0..s.numel())
                        .map(|_| (2.0 * rng.next_f32() - 1.0) * bound)
                        .collect(),
                };
                if i == self.wte || Some(i) == self.lm_head {
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
            trainable: true,
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
