//! PEFT adapter directories (placeholder until the full reader and writer land): the agreed
//! signatures, writing `adapter_config.json` and `adapter_model.safetensors` with PEFT's names
//! (`base_model.model.<module>.lora_A.weight`, f32), and reading them back.

use super::{io_err, HfError, Result};
use crate::config::{LoraConfig, ModelConfig};
use crate::model::ParamLayout;
use safetensors::tensor::{Dtype, TensorView};
use std::path::Path;

fn prefix(cfg: &ModelConfig) -> &'static str {
    if cfg.llama().is_some() {
        "base_model.model."
    } else {
        "base_model.model.transformer."
    }
}

/// Writes `adapters` (A then B per adapter of `cfg.lora`, in layout order) to `dir`.
pub fn write_adapter(dir: &Path, cfg: &ModelConfig, adapters: &[Vec<f32>]) -> Result<()> {
    let lora = cfg.lora.as_ref().ok_or_else(|| HfError::NotAModel {
        dir: dir.to_path_buf(),
        what: "the model has no adapters",
    })?;
    let layout = ParamLayout::new(cfg);
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut views = Vec::new();
    for (k, slot) in layout.lora.iter().enumerate() {
        for (j, idx) in [slot.a, slot.b].into_iter().enumerate() {
            let spec = &layout.specs[idx];
            let data = &adapters[2 * k + j];
            let view = TensorView::new(Dtype::F32, spec.shape.clone(), bytemuck::cast_slice(data))
                .map_err(|e| HfError::BadSafetensors {
                    file: dir.join("adapter_model.safetensors"),
                    msg: format!("{e:?}"),
                })?;
            views.push((format!("{}{}", prefix(cfg), spec.name), view));
        }
    }
    let bytes = safetensors::serialize(views, &None).map_err(|e| HfError::BadSafetensors {
        file: dir.join("adapter_model.safetensors"),
        msg: format!("{e:?}"),
    })?;
    let p = dir.join("adapter_model.safetensors");
    std::fs::write(&p, bytes).map_err(io_err(&p))?;
    let json = serde_json::json!({
        "peft_type": "LORA", "r": lora.rank, "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout, "topcoat_lora": lora,
    });
    let p = dir.join("adapter_config.json");
    std::fs::write(&p, serde_json::to_vec_pretty(&json).expect("json")).map_err(io_err(&p))?;
    Ok(())
}

/// Reads an adapter directory written by [`write_adapter`] for a base of `base_cfg`.
pub fn read_adapter(dir: &Path, base_cfg: &ModelConfig) -> Result<(LoraConfig, Vec<Vec<f32>>)> {
    let p = dir.join("adapter_config.json");
    let text = std::fs::read(&p).map_err(io_err(&p))?;
    let v: serde_json::Value = serde_json::from_slice(&text).map_err(|e| HfError::Json {
        path: p.clone(),
        msg: e.to_string(),
    })?;
    let lora: LoraConfig =
        serde_json::from_value(v["topcoat_lora"].clone()).map_err(|e| HfError::Json {
            path: p.clone(),
            msg: e.to_string(),
        })?;
    let mut cfg = base_cfg.clone();
    cfg.lora = Some(lora.clone());
    let layout = ParamLayout::new(&cfg);
    let p = dir.join("adapter_model.safetensors");
    let bytes = std::fs::read(&p).map_err(io_err(&p))?;
    let st =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| HfError::BadSafetensors {
            file: p.clone(),
            msg: format!("{e:?}"),
        })?;
    let mut out = Vec::new();
    for slot in &layout.lora {
        for idx in [slot.a, slot.b] {
            let name = format!("{}{}", prefix(&cfg), layout.specs[idx].name);
            let t = st.tensor(&name).map_err(|_| HfError::MissingTensor {
                file: p.clone(),
                tensor: name.clone(),
            })?;
            out.push(
                t.data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            );
        }
    }
    Ok((lora, out))
}
