//! Which modules a PEFT `target_modules` names, by PEFT's rules, and what topcoat writes there.
//!
//! PEFT matches every module name of the base model (`model.layers.0.self_attn.q_proj`,
//! GPT-2's `transformer.h.0.attn.c_attn`): a string is a regular expression the whole name
//! must match (`re.fullmatch`), `"all-linear"` every projection, and a list matches a name
//! equal to an entry or ending in `.` + an entry. `exclude_modules` removes names by the same
//! rules. topcoat has adapters on the attention and MLP projections only, the same targets in
//! every layer; a name matched outside them is refused by name.

use crate::config::{LoraConfig, LoraTarget, ModelConfig};
use crate::model::ParamLayout;
use serde_json::Value;

/// One module of the Hugging Face model a PEFT config could name: its full name and, where
/// topcoat can put an adapter there, the adapter's layer and target.
pub struct Module {
    pub name: String,
    pub site: Option<(usize, LoraTarget)>,
}

/// The Hugging Face module path (as PEFT names it, under `base_model.model.`) of topcoat
/// adapter tensor `spec_name` (`h.0.attn.c_attn.lora_A.weight` -> `transformer.h.0.attn.c_attn`).
pub fn module_of(base: &ModelConfig, spec_name: &str) -> String {
    let stem = spec_name
        .strip_suffix(".lora_A.weight")
        .or_else(|| spec_name.strip_suffix(".lora_B.weight"))
        .unwrap_or(spec_name);
    if base.llama().is_some() {
        stem.to_string()
    } else {
        format!("transformer.{stem}")
    }
}

/// `base` with an adapter on every projection it offers (rank 1): its layout lists every site.
fn all_sites(base: &ModelConfig) -> ParamLayout {
    let mut c = base.clone();
    c.lora = Some(LoraConfig {
        rank: 1,
        alpha: 1.0,
        dropout: 0.0,
        targets: LoraTarget::all_for(base),
    });
    ParamLayout::new(&c)
}

/// Every module of `base`'s Hugging Face model (`GPT2LMHeadModel` or `LlamaForCausalLM`
/// and the same-named Qwen2 and Mistral), containers included.
pub fn modules(base: &ModelConfig) -> Vec<Module> {
    let layout = all_sites(base);
    let mut out: Vec<Module> = layout
        .lora
        .iter()
        .map(|s| Module {
            name: module_of(base, &layout.specs[s.a].name),
            site: Some((s.layer, s.target)),
        })
        .collect();
    let (top, per_layer, layers): (&[&str], &[&str], &str) = if base.llama().is_some() {
        (
            &[
                "model",
                "model.embed_tokens",
                "model.layers",
                "model.norm",
                "model.rotary_emb",
                "lm_head",
            ],
            &[
                "",
                ".self_attn",
                ".mlp",
                ".mlp.act_fn",
                ".input_layernorm",
                ".post_attention_layernorm",
            ],
            "model.layers",
        )
    } else {
        (
            &[
                "transformer",
                "transformer.wte",
                "transformer.wpe",
                "transformer.drop",
                "transformer.h",
                "transformer.ln_f",
                "lm_head",
            ],
            &[
                "",
                ".ln_1",
                ".attn",
                ".attn.attn_dropout",
                ".attn.resid_dropout",
                ".ln_2",
                ".mlp",
                ".mlp.act",
                ".mlp.dropout",
            ],
            "transformer.h",
        )
    };
    let plain = |name: String| Module { name, site: None };
    out.extend(top.iter().map(|n| plain(n.to_string())));
    for l in 0..base.n_layer {
        out.extend(per_layer.iter().map(|s| plain(format!("{layers}.{l}{s}"))));
    }
    out
}

/// A compiled `target_modules` / `exclude_modules` value.
pub enum Pattern {
    /// A regular expression matched against the whole name.
    Regex(fancy_regex::Regex),
    /// Names matched exactly or as a `.`-separated suffix.
    List(Vec<String>),
    /// PEFT's `"all-linear"`: every projection (never the output head).
    AllLinear,
}

impl Pattern {
    /// Parses a config value (a string or a list of strings); `Err` says what was found.
    pub fn parse(v: &Value) -> Result<Self, String> {
        match v {
            Value::String(s) if s == "all-linear" => Ok(Self::AllLinear),
            Value::String(s) => fancy_regex::Regex::new(&format!("^(?:{s})$"))
                .map(Self::Regex)
                .map_err(|e| format!("\"{s}\", a regular expression that does not parse: {e}")),
            Value::Array(items) => items
                .iter()
                .map(|i| i.as_str().map(str::to_string).ok_or_else(|| i.to_string()))
                .collect::<Result<Vec<_>, _>>()
                .map(Self::List)
                .map_err(|bad| format!("a list holding {bad}, not only module names")),
            other => Err(other.to_string()),
        }
    }

    /// Whether module `m` matches.
    pub fn matches(&self, m: &Module) -> bool {
        match self {
            Self::Regex(re) => re.is_match(&m.name).unwrap_or(false),
            Self::List(names) => names
                .iter()
                .any(|t| m.name == *t || m.name.ends_with(&format!(".{t}"))),
            Self::AllLinear => m.site.is_some(),
        }
    }
}

/// What topcoat writes as `target_modules` for `targets`: module names PEFT matches as
/// suffixes, each naming exactly one kind of projection (GPT-2's two `c_proj` apart by their
/// parent: `attn.c_proj` is `o`, `mlp.c_proj` is `down`).
pub fn target_names(base: &ModelConfig, targets: &[LoraTarget]) -> Vec<&'static str> {
    let llama = base.llama().is_some();
    targets
        .iter()
        .map(|t| match (llama, t) {
            (true, LoraTarget::Q) => "q_proj",
            (true, LoraTarget::K) => "k_proj",
            (true, LoraTarget::V) => "v_proj",
            (true, LoraTarget::O) => "o_proj",
            (true, LoraTarget::Gate) => "gate_proj",
            (true, LoraTarget::Up) => "up_proj",
            (true, LoraTarget::Down) => "down_proj",
            (false, LoraTarget::Qkv) => "c_attn",
            (false, LoraTarget::O) => "attn.c_proj",
            (false, LoraTarget::Up) => "c_fc",
            (false, LoraTarget::Down) => "mlp.c_proj",
            (_, t) => unreachable!("validated: {} is not a target of this family", t.name()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both GPT-2 `c_proj` modules match the bare name, one each the names topcoat writes;
    /// a regex matches whole names only; `all-linear` leaves out the head.
    #[test]
    fn matching_follows_peft() {
        let gpt2 = ModelConfig::preset("tiny", 100).unwrap();
        let mods = modules(&gpt2);
        let hit = |p: &Pattern| -> Vec<&str> {
            mods.iter()
                .filter(|m| p.matches(m))
                .map(|m| m.name.as_str())
                .filter(|n| n.contains(".h.0."))
                .collect()
        };
        let list = |v: &[&str]| Pattern::parse(&serde_json::json!(v)).unwrap();
        assert_eq!(
            hit(&list(&["c_proj"])),
            ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"]
        );
        let ours = target_names(&gpt2, &[LoraTarget::O]);
        assert_eq!(hit(&list(&ours)), ["transformer.h.0.attn.c_proj"]);
        let ours = target_names(&gpt2, &[LoraTarget::Down]);
        assert_eq!(hit(&list(&ours)), ["transformer.h.0.mlp.c_proj"]);
        let re = Pattern::parse(&serde_json::json!(r"transformer\.h\.\d+\.attn\.c_proj")).unwrap();
        assert_eq!(hit(&re), ["transformer.h.0.attn.c_proj"]);
        let partial = Pattern::parse(&serde_json::json!("c_proj")).unwrap();
        assert!(hit(&partial).is_empty());
        let all = Pattern::parse(&serde_json::json!("all-linear")).unwrap();
        assert_eq!(
            mods.iter().filter(|m| all.matches(m)).count(),
            4 * gpt2.n_layer
        );
        assert!(!mods.iter().any(|m| m.name == "lm_head" && all.matches(m)));
    }
}
