//! Writes a random LoRA adapter (rank 4, alpha 8, non-zero A and B) on a Hugging Face model
//! with topcoat's PEFT writer (`hf::write_adapter_with_base`), and topcoat's logits of the
//! model with those adapters, for scripts/check_peft_export.py, which loads the adapter onto
//! the same model with PEFT and compares the logits.
//!
//! Run: `cargo run --release --example peft_export -- HF_DIR OUT TARGETS [SEED]`
//! (TARGETS as `--lora-targets` takes them: `all`, `q,k,v,o`, GPT-2's `o` or `down`, ...).
//! Writes `OUT/adapter/` (the PEFT directory) and `OUT/logits.safetensors`: `input_ids` I64
//! [2, 12] (seeded random ids), `logits` F32 [2, 12, vocab] (the adapters merged into the
//! base in f64 by `model::lora::merged`, then topcoat's f32 CPU forward) and `logits_live`
//! (the adapter forward, nothing merged).

use safetensors::tensor::{Dtype, TensorView};
use std::path::Path;
use topcoat::backend::cpu::CpuBackend;
use topcoat::config::{LoraConfig, LoraTarget};
use topcoat::hf;
use topcoat::model::{lora, Gpt, Init, ParamLayout};
use topcoat::rng::Rng;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [base_dir, out, targets, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: peft_export HF_DIR OUT TARGETS [SEED]");
    };
    let seed: u64 = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(1);
    let out = Path::new(out);
    let base = hf::read_model(Path::new(base_dir), &|_| {})?;
    let mut cfg = base.cfg.clone();
    cfg.lora = Some(LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: LoraTarget::parse_list(targets, &base.cfg)?,
    });
    let layout = ParamLayout::new(&cfg);
    let mut rng = Rng::new(seed);
    // A as PEFT initialises it, B ~ N(0, 0.2^2) in place of zeros: the adapters matter.
    let adapters: Vec<Vec<f32>> = layout.specs[layout.num_base_tensors()..]
        .iter()
        .map(|s| match s.init {
            Init::Uniform(bound) => (0..s.numel())
                .map(|_| (2.0 * rng.next_f32() - 1.0) * bound)
                .collect(),
            _ => (0..s.numel()).map(|_| 0.2 * rng.normal()).collect(),
        })
        .collect();
    std::fs::create_dir_all(out)?;
    hf::write_adapter_with_base(&out.join("adapter"), &cfg, &adapters, Some(base_dir))?;

    let (b, t, v) = (2, 12, cfg.vocab_size);
    let ids: Vec<i32> = (0..b * t)
        .map(|_| (rng.next_u64() % v as u64) as i32)
        .collect();
    let be = CpuBackend::new();
    let mut values = base.values;
    values.extend(adapters);
    let logits = |model: &mut Gpt<CpuBackend>| -> anyhow::Result<Vec<u8>> {
        model.forward(&be, &ids, b, t)?;
        let mut out = Vec::with_capacity(4 * b * t * v);
        for row in 0..b {
            for pos in 0..t {
                out.extend(
                    model
                        .logits_at(&be, row, pos)?
                        .iter()
                        .flat_map(|x| x.to_le_bytes()),
                );
            }
        }
        Ok(out)
    };
    let live = logits(&mut Gpt::from_values(&be, &cfg, values.clone())?)?;
    let (merged_cfg, merged) = lora::merged(&cfg, values);
    let merged = logits(&mut Gpt::from_values(&be, &merged_cfg, merged)?)?;
    let id_bytes: Vec<u8> = ids.iter().flat_map(|&i| (i as i64).to_le_bytes()).collect();
    let views = vec![
        (
            "input_ids",
            TensorView::new(Dtype::I64, vec![b, t], &id_bytes)?,
        ),
        (
            "logits",
            TensorView::new(Dtype::F32, vec![b, t, v], &merged)?,
        ),
        (
            "logits_live",
            TensorView::new(Dtype::F32, vec![b, t, v], &live)?,
        ),
    ];
    std::fs::write(
        out.join("logits.safetensors"),
        safetensors::serialize(views, &None)?,
    )?;
    println!(
        "{}: adapters on {} written to {}",
        base_dir,
        targets,
        out.join("adapter").display()
    );
    Ok(())
}
