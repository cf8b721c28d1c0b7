//! PEFT LoRA adapter directories in and out (docs/FORMATS.md, "PEFT adapter directories"):
//! `adapter_config.json` and `adapter_model.safetensors` as PEFT's `save_pretrained` writes
//! them and `PeftModel.from_pretrained` reads them.
//!
//! Tensor names are `base_model.model.<Hugging Face module>.lora_A.weight` / `.lora_B.weight`
//! (`model.layers.0.self_attn.q_proj`, GPT-2's `transformer.h.0.attn.c_attn`), `A [r, in]` and
//! `B [out, r]` for Linear and GPT-2's Conv1D modules alike (PEFT's `fan_in_fan_out` only
//! transposes the merged delta), so topcoat's adapter tensors are written as they are. Which
//! modules carry adapters is PEFT's `target_modules` (peft_targets.rs); every setting that
//! would make PEFT compute something else (DoRA, rsLoRA, per-module ranks, extra trained
//! modules, a subset of layers) is refused by name.

use super::config::Arch;
use super::export::{encode, pretty, Staging};
use super::peft_targets::{self, Pattern};
use super::read::HfWeights;
use super::{io_err, HfDtype, HfError, Result};
use crate::config::{LoraConfig, LoraTarget, ModelConfig};
use crate::model::ParamLayout;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Map, Value};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// The adapter's settings.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The adapter's tensors.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// What PEFT puts before the base model's module names (`PeftModel.base_model.model`).
const PREFIX: &str = "base_model.model.";

/// PEFT's name of topcoat adapter tensor `spec_name` of a `base` model.
fn peft_name(base: &ModelConfig, spec_name: &str) -> String {
    let gpt2 = if base.llama().is_some() {
        ""
    } else {
        "transformer."
    };
    format!("{PREFIX}{gpt2}{spec_name}")
}

/// `cfg` without its adapters.
fn base_of(cfg: &ModelConfig) -> ModelConfig {
    let mut base = cfg.clone();
    base.lora = None;
    base
}

/// A JSON number for an f32 setting, as its shortest decimal (`0.1`, not `0.100000001...`);
/// a whole number as an integer where `int` (PEFT writes `"lora_alpha": 8`, `"lora_dropout":
/// 0.0`).
fn number(x: f32, int: bool) -> Value {
    if int && x.fract() == 0.0 && x.abs() < 1e9 {
        json!(x as i64)
    } else {
        json!(x.to_string().parse::<f64>().unwrap_or(x as f64))
    }
}

/// Writes the adapters of a LoRA model as PEFT adapter directory `dir` (which must not
/// exist): `cfg` has `lora`, and `adapters` are its layout's tensors from
/// `num_base_tensors()` on, in layout order. `base_model_name_or_path` is null.
pub fn write_adapter(dir: &Path, cfg: &ModelConfig, adapters: &[Vec<f32>]) -> Result<()> {
    write_adapter_with_base(dir, cfg, adapters, None)
}

/// [`write_adapter`], recording `base_model` (a hub id or a path) as
/// `base_model_name_or_path`.
pub fn write_adapter_with_base(
    dir: &Path,
    cfg: &ModelConfig,
    adapters: &[Vec<f32>],
    base_model: Option<&str>,
) -> Result<()> {
    let bad = |what: String| HfError::BadAdapterInput {
        dir: dir.to_path_buf(),
        what,
    };
    let lora = cfg
        .lora
        .as_ref()
        .ok_or_else(|| bad("the model has no adapters (its config has no \"lora\")".into()))?;
    if dir.exists() {
        return Err(HfError::OutputExists {
            path: dir.to_path_buf(),
        });
    }
    let layout = ParamLayout::new(cfg);
    let specs = &layout.specs[layout.num_base_tensors()..];
    if adapters.len() != specs.len() {
        return Err(bad(format!(
            "{} adapter tensors given; {} adapters on {} layers have {}",
            adapters.len(),
            lora.targets.len(),
            cfg.n_layer,
            specs.len()
        )));
    }
    let base = base_of(cfg);
    let file = dir.join(ADAPTER_WEIGHTS);
    let mut tensors = Vec::with_capacity(specs.len());
    for (spec, v) in specs.iter().zip(adapters) {
        if v.len() != spec.numel() {
            return Err(HfError::ShapeMismatch {
                file,
                tensor: spec.name.clone(),
                expected: spec.shape.clone(),
                found: vec![v.len()],
            });
        }
        tensors.push((
            peft_name(&base, &spec.name),
            spec.shape.clone(),
            encode(v, HfDtype::F32),
        ));
    }
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| HfError::BadSafetensors {
                    file: file.clone(),
                    msg: format!("tensor {name}: {e:?}"),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let weights =
        safetensors::serialize(views, &Some(meta)).map_err(|e| HfError::BadSafetensors {
            file: file.clone(),
            msg: format!("{e:?}"),
        })?;
    let config = json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "exclude_modules": null,
        // PEFT's Conv1D layers (GPT-2) store the base weight [in, out]; the adapter tensors
        // have the same shapes either way.
        "fan_in_fan_out": base.llama().is_none(),
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": number(lora.alpha, true),
        "lora_bias": false,
        "lora_dropout": number(lora.dropout, false),
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": lora.rank,
        "rank_pattern": {},
        "revision": null,
        "target_modules": peft_targets::target_names(&base, &lora.targets),
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": false,
    });
    let staging = Staging::new(dir)?;
    staging.write(ADAPTER_WEIGHTS, &weights)?;
    staging.write(ADAPTER_CONFIG, &pretty(&config))?;
    staging.commit()?;
    Ok(())
}

/// Reads PEFT adapter directory `dir` for a model of `base_cfg` (its `lora` is ignored):
/// the adapters' settings and tensors (F32, BF16 or F16 in the file), in the layout order of
/// `base_cfg` with `lora` set to them, ready to follow the base tensors.
pub fn read_adapter(dir: &Path, base_cfg: &ModelConfig) -> Result<(LoraConfig, Vec<Vec<f32>>)> {
    let base = base_of(base_cfg);
    let cfg_path = dir.join(ADAPTER_CONFIG);
    if !cfg_path.is_file() {
        return Err(not_an_adapter(dir));
    }
    let bytes = std::fs::read(&cfg_path).map_err(io_err(&cfg_path))?;
    let value: Value = serde_json::from_slice(&bytes).map_err(|e| HfError::Json {
        path: cfg_path.clone(),
        msg: e.to_string(),
    })?;
    let map = value.as_object().ok_or_else(|| HfError::Json {
        path: cfg_path.clone(),
        msg: "not a JSON object".into(),
    })?;
    let keys = Keys {
        path: &cfg_path,
        map,
    };
    keys.check_supported(base.n_layer)?;
    let (rank, alpha, dropout) = keys.numbers()?;

    let file = dir.join(ADAPTER_WEIGHTS);
    if !file.is_file() {
        let bin = dir.join("adapter_model.bin").is_file();
        return Err(HfError::NotAnAdapter {
            dir: dir.to_path_buf(),
            what: if bin {
                "no adapter_model.safetensors, only adapter_model.bin (PyTorch pickles are \
                 not read: save the adapter with safe_serialization=True)"
            } else {
                "adapter_config.json but no adapter_model.safetensors"
            }
            .into(),
        });
    }
    let weights = HfWeights::open_single(&file)?;
    check_family(&base, &weights, &file)?;
    let targets = keys.targets(&base)?;
    let lora = LoraConfig {
        rank,
        alpha,
        dropout,
        targets,
    };
    let mut cfg = base.clone();
    cfg.lora = Some(lora.clone());
    let layout = ParamLayout::new(&cfg);
    let specs = &layout.specs[layout.num_base_tensors()..];
    let mut read = BTreeSet::new();
    let mut values = Vec::with_capacity(specs.len());
    for spec in specs {
        let name = peft_name(&base, &spec.name);
        values.push(weights.read_f32(&name, &spec.shape).map_err(|e| match e {
            HfError::MissingTensor { file, tensor } => HfError::MissingTensor {
                file,
                tensor: format!("{tensor} (target_modules names its module)"),
            },
            e => e,
        })?);
        read.insert(name);
    }
    if let Some(extra) = weights.names().find(|n| !read.contains(*n)) {
        return Err(HfError::UnexpectedTensor {
            file,
            tensor: extra.into(),
            why: format!(
                "adapter_config.json's target_modules puts adapters on {} only",
                names(&lora.targets)
            ),
        });
    }
    Ok((lora, values))
}

fn names(targets: &[LoraTarget]) -> String {
    targets
        .iter()
        .map(|t| t.name())
        .collect::<Vec<_>>()
        .join(",")
}

/// The error for a directory without `adapter_config.json`, saying what it is instead.
fn not_an_adapter(dir: &Path) -> HfError {
    let what = if dir.join("manifest.json").is_file() {
        "no adapter_config.json: a topcoat checkpoint, not a PEFT adapter directory; give it \
         to --init (a LoRA run's checkpoint carries its adapters)"
    } else if dir.join("config.json").is_file() {
        "no adapter_config.json: a full Hugging Face model (config.json), not a PEFT adapter \
         directory; import it with `import hf` and give it to --init"
    } else if dir.is_dir() {
        "no adapter_config.json, so not a PEFT adapter directory"
    } else {
        "no such directory (a PEFT adapter directory holds adapter_config.json and \
         adapter_model.safetensors)"
    };
    HfError::NotAnAdapter {
        dir: dir.to_path_buf(),
        what: what.into(),
    }
}

/// Refuses an adapter whose tensors name the other family's modules (a GPT-2 adapter on a
/// Llama-family base, or the reverse).
fn check_family(base: &ModelConfig, weights: &HfWeights, file: &Path) -> Result<()> {
    let llama = base.llama().is_some();
    let other = if llama {
        ("transformer.h.", "GPT-2")
    } else {
        ("model.layers.", "Llama-family")
    };
    let wrong = weights.names().find(|n| {
        n.strip_prefix(PREFIX)
            .is_some_and(|m| m.starts_with(other.0))
    });
    match wrong {
        Some(tensor) => Err(HfError::AdapterBaseMismatch {
            file: file.to_path_buf(),
            tensor: tensor.into(),
            found: other.1,
            expected: Arch::of_config(base).class().into(),
        }),
        None => Ok(()),
    }
}

/// The keys of `adapter_config.json`, with getters that name the file and key on error.
struct Keys<'a> {
    path: &'a PathBuf,
    map: &'a Map<String, Value>,
}

impl Keys<'_> {
    /// The value of `key`, absent and null alike `None`.
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn unsupported(&self, key: &str, found: &Value, why: &str) -> HfError {
        HfError::Unsupported {
            path: self.path.clone(),
            key: key.into(),
            found: found.to_string(),
            why: why.into(),
        }
    }

    fn bad(&self, key: &str, found: &Value, expected: &str) -> HfError {
        HfError::BadKey {
            path: self.path.clone(),
            key: key.into(),
            found: found.to_string(),
            expected: expected.into(),
        }
    }

    /// Refuses every setting under which PEFT computes something topcoat's adapters do not.
    fn check_supported(&self, n_layer: usize) -> Result<()> {
        let peft_type = self.get("peft_type").ok_or(HfError::MissingKey {
            path: self.path.clone(),
            key: "peft_type",
            why: "PEFT writes it in every adapter config",
        })?;
        if peft_type != "LORA" {
            return Err(self.unsupported(
                "peft_type",
                peft_type,
                "topcoat reads LoRA adapters (peft_type \"LORA\") only",
            ));
        }
        if let Some(t) = self.get("task_type").filter(|t| *t != "CAUSAL_LM") {
            return Err(self.unsupported(
                "task_type",
                t,
                "topcoat's models are causal language models (CAUSAL_LM)",
            ));
        }
        let is_true = |v: &Value| v.as_bool() == Some(true);
        let non_empty = |v: &Value| match v {
            Value::Object(m) => !m.is_empty(),
            Value::Array(a) => !a.is_empty(),
            Value::Bool(b) => *b,
            _ => true,
        };
        type Rule<'r> = (&'r str, &'r dyn Fn(&Value) -> bool, &'r str);
        let rules: [Rule; 11] = [
            (
                "bias",
                &|v| v != "none",
                "topcoat's adapters train no biases (bias \"none\")",
            ),
            ("lora_bias", &is_true, "topcoat's lora_B has no bias"),
            (
                "use_dora",
                &is_true,
                "DoRA's magnitude vectors are not computed",
            ),
            (
                "use_rslora",
                &is_true,
                "rsLoRA scales by lora_alpha / sqrt(r); topcoat scales by lora_alpha / r",
            ),
            (
                "rank_pattern",
                &non_empty,
                "topcoat gives every adapter the same rank r",
            ),
            (
                "alpha_pattern",
                &non_empty,
                "topcoat gives every adapter the same lora_alpha",
            ),
            (
                "modules_to_save",
                &non_empty,
                "modules trained in full beside the adapters have no place in an adapter \
                 topcoat loads",
            ),
            ("layer_replication", &non_empty, "layers are not replicated"),
            (
                "trainable_token_indices",
                &non_empty,
                "token embeddings are not trained",
            ),
            (
                "target_parameters",
                &non_empty,
                "adapters on bare parameters are not computed",
            ),
            (
                "alora_invocation_tokens",
                &non_empty,
                "activated LoRA is not computed",
            ),
        ];
        for (key, refused, why) in rules {
            if let Some(v) = self.get(key).filter(|v| refused(v)) {
                return Err(self.unsupported(key, v, why));
            }
        }
        if let Some(v) = self.get("layers_to_transform") {
            let listed: Option<BTreeSet<u64>> = match v {
                Value::Number(n) => n.as_u64().map(|n| BTreeSet::from([n])),
                Value::Array(a) => a.iter().map(Value::as_u64).collect(),
                _ => None,
            };
            let all: BTreeSet<u64> = (0..n_layer as u64).collect();
            if listed != Some(all) {
                return Err(self.unsupported(
                    "layers_to_transform",
                    v,
                    &format!(
                        "topcoat puts adapters in every layer (0..{n_layer}), not in a subset"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `r`, `lora_alpha` (PEFT's default 8) and `lora_dropout` (default 0).
    fn numbers(&self) -> Result<(usize, f32, f32)> {
        let r = self.get("r").ok_or(HfError::MissingKey {
            path: self.path.clone(),
            key: "r",
            why: "the adapters' rank",
        })?;
        let rank = r
            .as_u64()
            .filter(|&n| n > 0)
            .ok_or_else(|| self.bad("r", r, "a whole number >= 1"))? as usize;
        let alpha = match self.get("lora_alpha") {
            None => 8.0,
            Some(v) => v
                .as_f64()
                .filter(|a| a.is_finite() && *a > 0.0)
                .ok_or_else(|| self.bad("lora_alpha", v, "a number > 0"))?
                as f32,
        };
        let dropout = match self.get("lora_dropout") {
            None => 0.0,
            Some(v) => v
                .as_f64()
                .filter(|d| (0.0..1.0).contains(d))
                .ok_or_else(|| self.bad("lora_dropout", v, "a number in [0, 1)"))?
                as f32,
        };
        Ok((rank, alpha, dropout))
    }

    /// The targets `target_modules` (less `exclude_modules`) names in a `base` model: each a
    /// projection topcoat has adapters for, the same in every layer.
    fn targets(&self, base: &ModelConfig) -> Result<Vec<LoraTarget>> {
        let key = "target_modules";
        let value = self.get(key).ok_or(HfError::MissingKey {
            path: self.path.clone(),
            key,
            why: "it names the modules that carry adapters",
        })?;
        let pattern = |k: &str, v: &Value| {
            Pattern::parse(v).map_err(|found| HfError::BadKey {
                path: self.path.clone(),
                key: k.into(),
                found,
                expected: "a regular expression or a list of module names".into(),
            })
        };
        let target = pattern(key, value)?;
        let exclude = match self.get("exclude_modules") {
            Some(v) => Some(pattern("exclude_modules", v)?),
            None => None,
        };
        let modules = peft_targets::modules(base);
        let mut sites = BTreeSet::new();
        for m in &modules {
            if !target.matches(m) || exclude.as_ref().is_some_and(|e| e.matches(m)) {
                continue;
            }
            let site = m.site.ok_or_else(|| {
                self.unsupported(
                    key,
                    value,
                    &format!(
                        "it names module {}, and topcoat has adapters on the attention and MLP \
                         projections only ({})",
                        m.name,
                        peft_targets::target_names(base, &LoraTarget::all_for(base)).join(", ")
                    ),
                )
            })?;
            sites.insert(site);
        }
        let targets: BTreeSet<LoraTarget> = sites.iter().map(|s| s.1).collect();
        if targets.is_empty() {
            return Err(self.unsupported(
                key,
                value,
                &format!(
                    "it names no projection of this {} model ({})",
                    Arch::of_config(base).class(),
                    peft_targets::target_names(base, &LoraTarget::all_for(base)).join(", ")
                ),
            ));
        }
        for &t in &targets {
            if let Some(layer) = (0..base.n_layer).find(|&l| !sites.contains(&(l, t))) {
                return Err(self.unsupported(
                    key,
                    value,
                    &format!(
                        "it puts an adapter on `{}` in some layers but not in layer {layer}; \
                         topcoat puts the same adapters in every layer",
                        t.name()
                    ),
                ));
            }
        }
        Ok(targets.into_iter().collect())
    }
}
