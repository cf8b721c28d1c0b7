//! `export hf RUN --out DIR`: a topcoat checkpoint as a Hugging Face model directory that
//! transformers loads with `from_pretrained`: `config.json`, `model.safetensors` (un-fused,
//! unpadded, Hugging Face's names and orientation, in `--dtype`), `generation_config.json`,
//! and the tokenizer where the run has a Hugging Face one.
//!
//! A LoRA run's checkpoint exports as its adapters in PEFT's layout (`adapter_config.json`,
//! `adapter_model.safetensors`: what `PeftModel.from_pretrained` loads over the base), or, with
//! `merge`, as the full model with the adapters merged into the base weights
//! ([`crate::model::lora::merged`]).
//!
//! The directory is assembled in `.DIR.tmp` beside `DIR`, every file fsynced, then renamed
//! into place: a failure leaves no `DIR` and no temporary directory.

use super::config::Arch;
use super::{io_err, names, HfDtype, HfError, Result};
use crate::config::ModelConfig;
use crate::data::{Tokenizer, TokenizerKind};
use crate::model::reward;
use crate::train::checkpoint;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What `export hf` takes besides the two directories.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Element type of the written tensors (default f32: the checkpoint's values exactly).
    pub dtype: HfDtype,
    /// A LoRA checkpoint: write the full model with the adapters merged in, not the adapters.
    pub merge: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            dtype: HfDtype::F32,
            merge: false,
        }
    }
}

/// What an export wrote, for the command's report.
#[derive(Clone, Debug)]
pub struct ExportSummary {
    pub arch: Arch,
    pub cfg: ModelConfig,
    pub tensors: usize,
    pub bytes: u64,
    /// The files written, by name.
    pub files: Vec<String>,
    /// What became of the tokenizer, in a sentence.
    pub tokenizer_note: String,
    pub out: PathBuf,
    /// What was written: `model` (a full model, merged or not) or `adapter` (a LoRA run's
    /// adapters in PEFT's layout).
    pub kind: &'static str,
}

/// Exports checkpoint directory `ckpt` as Hugging Face directory `out`, which must not exist.
pub fn export_hf(
    ckpt: &Path,
    out: &Path,
    opts: &ExportOptions,
    progress: &dyn Fn(&str),
) -> Result<ExportSummary> {
    if out.exists() {
        return Err(HfError::OutputExists {
            path: out.to_path_buf(),
        });
    }
    let host = checkpoint::load_values(ckpt)?;
    if host.reward_head.is_some() {
        return Err(HfError::UnexpectedTensor {
            file: ckpt.join("model.safetensors"),
            tensor: reward::HEAD_WEIGHT.into(),
            why: "a reward model's scalar head has no place in a causal language model; \
                  export the SFT run it was trained from"
                .into(),
        });
    }
    let tokenizer = checkpoint::load_tokenizer(ckpt)?;
    if host.cfg.lora.is_some() && !opts.merge {
        return export_adapter(&host.cfg, &host.values, out, progress);
    }
    let (cfg, values) = crate::model::lora::merged(&host.cfg, host.values);
    let arch = Arch::of_config(&cfg);
    let prefix = if arch == Arch::Gpt2 {
        "transformer."
    } else {
        ""
    };
    let maps = names::mappings(&cfg, cfg.vocab_size, prefix);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for m in &maps {
        for (part, v) in m.parts.iter().zip(names::split(m, &values[m.spec])) {
            tensors.push((
                part.name.clone(),
                part.shape.clone(),
                encode(&v, opts.dtype),
            ));
        }
    }
    drop(values);
    let bytes: u64 = tensors.iter().map(|t| t.2.len() as u64).sum();
    progress(&format!(
        "{}: {} tensors, {:.1} MB in {}",
        arch.class(),
        tensors.len(),
        bytes as f64 / 1e6,
        opts.dtype.torch_name()
    ));

    let staging = Staging::new(out)?;
    let st_dtype = match opts.dtype {
        HfDtype::F32 => Dtype::F32,
        HfDtype::Bf16 => Dtype::BF16,
        HfDtype::F16 => Dtype::F16,
    };
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(st_dtype, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| HfError::BadSafetensors {
                    file: staging.path.join("model.safetensors"),
                    msg: format!("tensor {name}: {e:?}"),
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let weights =
        safetensors::serialize(views, &Some(meta)).map_err(|e| HfError::BadSafetensors {
            file: staging.path.join("model.safetensors"),
            msg: format!("{e:?}"),
        })?;
    let n_tensors = tensors.len();
    drop(tensors);
    staging.write("model.safetensors", &weights)?;
    drop(weights);

    let (ids, tokenizer_note) = tokenizer_files(&tokenizer, &staging)?;
    let json = to_json(arch, &cfg, opts.dtype, &ids);
    staging.write("config.json", &pretty(&json))?;
    if ids.eos.is_some() {
        let gen = serde_json::json!({"bos_token_id": ids.bos, "eos_token_id": ids.eos});
        staging.write("generation_config.json", &pretty(&gen))?;
    }
    let files = staging.commit()?;
    Ok(ExportSummary {
        arch,
        cfg,
        tensors: n_tensors,
        bytes,
        files,
        tokenizer_note,
        out: out.to_path_buf(),
        kind: "model",
    })
}

/// A LoRA run's adapters (`values` in `cfg`'s layout) as a PEFT adapter directory `out`.
fn export_adapter(
    cfg: &ModelConfig,
    values: &[Vec<f32>],
    out: &Path,
    progress: &dyn Fn(&str),
) -> Result<ExportSummary> {
    let adapters = checkpoint::adapter::adapters_of(cfg, values);
    let bytes = adapters.iter().map(|a| 4 * a.len() as u64).sum();
    progress(&format!(
        "a LoRA run: writing its {} adapter tensors in PEFT's layout (export hf --merge writes          the full model with them merged)",
        adapters.len()
    ));
    super::peft::write_adapter(out, cfg, &adapters)?;
    let mut files: Vec<String> = std::fs::read_dir(out)
        .map_err(io_err(out))?
        .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
        .collect();
    files.sort();
    let mut base = cfg.clone();
    base.lora = None;
    Ok(ExportSummary {
        arch: Arch::of_config(&base),
        cfg: cfg.clone(),
        tensors: adapters.len(),
        bytes,
        files,
        tokenizer_note: "not written (an adapter goes with its base model's tokenizer)".into(),
        out: out.to_path_buf(),
        kind: "adapter",
    })
}

/// Writes the tokenizer files the run's tokenizer has in Hugging Face's format; returns the
/// special ids for the configs and what was done, in a sentence.
fn tokenizer_files(tok: &Tokenizer, staging: &Staging) -> Result<(SpecialIds, String)> {
    // topcoat's own GPT-2 and BPE tokenizers are converted (byte-level BPE with their
    // merges, the five specials as added tokens, topcoat's chat template in Jinja).
    tok.write_hf_files(&staging.path)?;
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        let p = staging.path.join(f);
        std::fs::File::open(&p)
            .and_then(|f| f.sync_all())
            .map_err(io_err(&p))?;
    }
    let eot = tok.eot();
    let note = match tok.kind() {
        TokenizerKind::Hf => match tok.chat_template() {
            Some(_) => "tokenizer.json and tokenizer_config.json with its chat template",
            None => "tokenizer.json and tokenizer_config.json (no chat template)",
        },
        TokenizerKind::Gpt2 => {
            "topcoat's GPT-2 tokenizer converted to tokenizer.json (GPT-2's merges, topcoat's \
             chat tokens as added tokens) and tokenizer_config.json with topcoat's chat template"
        }
        TokenizerKind::Bpe => {
            "topcoat's byte-level BPE converted to tokenizer.json and tokenizer_config.json \
             with topcoat's chat template"
        }
    };
    // The bos token is a string in tokenizer_config.json; its id is what it encodes to.
    let bos = match tok.kind() {
        TokenizerKind::Hf => tok.template_tokens().bos_token.and_then(|b| {
            match tok.try_encode(&b).ok()?.as_slice() {
                [id] => Some(*id),
                _ => None,
            }
        }),
        TokenizerKind::Gpt2 | TokenizerKind::Bpe => Some(eot),
    };
    Ok((
        SpecialIds {
            bos,
            eos: Some(eot),
        },
        note.to_string(),
    ))
}

/// Token ids the exported config and generation config name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
}

/// The `config.json` of `cfg` exported as `arch` with tensors of `dtype`: every key the
/// reference library needs, RoPE both as `rope_parameters` (5.x) and `rope_theta` +
/// `rope_scaling` (4.x), and `dtype` beside `torch_dtype`, so that either version loads it.
pub fn to_json(arch: Arch, cfg: &ModelConfig, dtype: HfDtype, ids: &SpecialIds) -> Value {
    let mut v = match (arch, cfg.llama()) {
        (Arch::Gpt2, _) | (_, None) => json!({
            "activation_function": "gelu_new",
            "n_embd": cfg.n_embd,
            "n_head": cfg.n_head,
            "n_inner": null,
            "n_layer": cfg.n_layer,
            "n_positions": cfg.max_seq_len,
            "layer_norm_epsilon": crate::backend::cpu::layernorm::EPS,
            "scale_attn_weights": true,
            "tie_word_embeddings": true,
        }),
        (_, Some(s)) => {
            let mut params = json!({"rope_theta": s.rope_theta, "rope_type": "default"});
            let scaling = s.rope_scaling.as_ref().map(|r| {
                json!({
                    "rope_type": "llama3",
                    "factor": r.factor,
                    "low_freq_factor": r.low_freq_factor,
                    "high_freq_factor": r.high_freq_factor,
                    "original_max_position_embeddings": r.original_max_position_embeddings,
                })
            });
            if let (Some(Value::Object(sc)), Value::Object(p)) = (&scaling, &mut params) {
                p.extend(sc.clone());
            }
            let mut v = json!({
                "hidden_act": "silu",
                "hidden_size": cfg.n_embd,
                "head_dim": cfg.head_size(),
                "intermediate_size": s.intermediate_size,
                "max_position_embeddings": cfg.max_seq_len,
                "num_attention_heads": cfg.n_head,
                "num_hidden_layers": cfg.n_layer,
                "num_key_value_heads": s.n_kv_head,
                "rms_norm_eps": s.rms_eps,
                "rope_parameters": params,
                "rope_theta": s.rope_theta,
                "rope_scaling": scaling,
                "tie_word_embeddings": s.tie_embeddings,
            });
            let extra = match arch {
                Arch::Qwen2 => json!({"use_sliding_window": false, "sliding_window": null}),
                Arch::Mistral => json!({"sliding_window": null}),
                _ => json!({"attention_bias": false, "mlp_bias": false}),
            };
            if let (Value::Object(m), Value::Object(e)) = (&mut v, extra) {
                m.extend(e);
            }
            v
        }
    };
    if let Value::Object(m) = &mut v {
        m.extend([
            ("architectures".into(), json!([arch.class()])),
            ("model_type".into(), json!(arch.model_type())),
            ("vocab_size".into(), json!(cfg.vocab_size)),
            ("dtype".into(), json!(dtype.torch_name())),
            ("torch_dtype".into(), json!(dtype.torch_name())),
            ("bos_token_id".into(), json!(ids.bos)),
            ("eos_token_id".into(), json!(ids.eos)),
            ("use_cache".into(), json!(true)),
        ]);
    }
    v
}

pub(super) fn pretty(v: &serde_json::Value) -> Vec<u8> {
    let mut s = serde_json::to_vec_pretty(v).expect("JSON values serialize");
    s.push(b'\n');
    s
}

/// `v` as little-endian bytes of `dtype` (round to nearest even, as torch converts).
pub(super) fn encode(v: &[f32], dtype: HfDtype) -> Vec<u8> {
    match dtype {
        HfDtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        HfDtype::Bf16 => v
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        HfDtype::F16 => v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
    }
}

/// The output directory being assembled in `.NAME.tmp` beside it; removed when dropped
/// uncommitted.
pub(super) struct Staging {
    path: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl Staging {
    pub(super) fn new(dest: &Path) -> Result<Self> {
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
        let name = dest.file_name().unwrap_or_default().to_string_lossy();
        let path = parent.join(format!(".{name}.tmp"));
        if path.exists() {
            // A stale one from a killed export: never a result.
            std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
        }
        std::fs::create_dir(&path).map_err(io_err(&path))?;
        Ok(Self {
            path,
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    pub(super) fn write(&self, file: &str, bytes: &[u8]) -> Result<()> {
        let p = self.path.join(file);
        checkpoint::write_synced(&p, bytes).map_err(io_err(&p))
    }

    /// Syncs the directory and renames it into place; returns the files in it.
    pub(super) fn commit(mut self) -> Result<Vec<String>> {
        let mut files: Vec<String> = std::fs::read_dir(&self.path)
            .map_err(io_err(&self.path))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
        files.sort();
        std::fs::File::open(&self.path)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.path))?;
        if self.dest.exists() {
            return Err(HfError::OutputExists {
                path: self.dest.clone(),
            });
        }
        std::fs::rename(&self.path, &self.dest).map_err(io_err(&self.dest))?;
        self.committed = true;
        Ok(files)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
