//! PEFT adapter directories (src/hf/peft.rs) on the committed fixtures written by PEFT itself
//! (tests/fixtures/hf/peft_llama and peft_gpt2, by scripts/make_hf_fixtures.py): the base
//! model imported, the adapter read and merged gives the PeftModel's float64 logits within
//! the hf_import tests' f32 tolerance, its loss and its greedy tokens, and so does the live
//! adapter forward (not merged); what topcoat writes reads
//! back bit for bit, with PEFT's names; every adapter topcoat cannot compute is a named error.

mod common;

use common::cli::{copy_dir, fails, s};
use common::hf_fixtures::{argmax, fixture, reference, Reference};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use topcoat::backend::cpu::CpuBackend;
use topcoat::config::{LoraConfig, LoraTarget, ModelConfig};
use topcoat::hf::{self, HfError};
use topcoat::model::{lora, Gpt, KvCache, ParamLayout};
use topcoat::rng::Rng;

/// f32 forward against the float64 reference, `max |logit - ref| / max |ref|`: the tolerance
/// of tests/hf_import.rs (measured there 5e-7 to 8e-7 on the base fixtures).
const LOGIT_TOL_F32: f64 = 5e-6;
/// The f32 mean loss against the float64 reference loss, relative (as in hf_import.rs).
const LOSS_TOL_F32: f64 = 1e-6;

/// (adapter fixture, base fixture, lora_dropout it was saved with).
const ADAPTERS: [(&str, &str, f32); 2] = [("peft_llama", "llama", 0.1), ("peft_gpt2", "gpt2", 0.0)];

/// The model's logits at every position of `r.ids` (2 rows of 12) against the reference's:
/// the relative error.
fn logits_error(be: &CpuBackend, model: &mut Gpt<CpuBackend>, r: &Reference, v: usize) -> f64 {
    let (b, t) = (2, 12);
    model.forward(be, &r.ids, b, t).unwrap();
    let (mut max_err, mut max_ref) = (0f64, 0f64);
    for row in 0..b {
        for pos in 0..t {
            let got = model.logits_at(be, row, pos).unwrap();
            let want = &r.logits[(row * t + pos) * v..][..v];
            for (g, w) in got.iter().zip(want) {
                max_err = max_err.max((*g as f64 - w).abs());
                max_ref = max_ref.max(w.abs());
            }
        }
    }
    max_err / max_ref
}

/// The PEFT fixtures read onto their imported base and merged (`model::lora::merged`) give
/// the PeftModel's logits, loss and greedy tokens; the settings read are the ones PEFT saved.
#[test]
fn peft_adapters_merged_give_the_peft_model_logits_loss_and_greedy_tokens() {
    let be = CpuBackend::new();
    for (name, base_name, dropout) in ADAPTERS {
        let r = reference(&fixture(name));
        let base = hf::read_model(&fixture(base_name), &|_| {}).unwrap();
        let (lora_cfg, adapters) = hf::read_adapter(&fixture(name), &base.cfg).unwrap();
        assert_eq!(
            lora_cfg,
            LoraConfig {
                rank: 4,
                alpha: 8.0,
                dropout,
                targets: LoraTarget::all_for(&base.cfg),
            },
            "{name}"
        );
        let mut cfg = base.cfg.clone();
        cfg.lora = Some(lora_cfg);
        let mut values = base.values.clone();
        values.extend(adapters);
        let (merged_cfg, merged) = lora::merged(&cfg, values);
        assert_eq!(merged_cfg, base.cfg);
        // The adapters matter: the base alone is far from the reference.
        let mut plain = Gpt::from_values(&be, &base.cfg, base.values).unwrap();
        let base_err = logits_error(&be, &mut plain, &r, base.cfg.vocab_size);
        assert!(
            base_err > 0.1,
            "{name}: base alone off by only {base_err:.2e}"
        );

        let mut model = Gpt::from_values(&be, &merged_cfg, merged).unwrap();
        let rel = logits_error(&be, &mut model, &r, merged_cfg.vocab_size);
        println!("{name}: merged logits max error {rel:.2e} (base alone {base_err:.2})");
        assert!(rel <= LOGIT_TOL_F32, "{name}: logits off by {rel:.3e}");

        let (b, t) = (2, 12);
        let targets: Vec<i32> = (0..b * t)
            .map(|i| if i % t == t - 1 { -1 } else { r.ids[i + 1] })
            .collect();
        let loss = model.forward_loss(&be, &r.ids, &targets, b, t).unwrap();
        let loss_err = (loss.mean as f64 - r.loss).abs() / r.loss;
        println!("{name}: loss {} vs {} ({loss_err:.2e})", loss.mean, r.loss);
        assert!(
            loss_err <= LOSS_TOL_F32,
            "{name}: loss {} vs {}",
            loss.mean,
            r.loss
        );

        let mut cache = KvCache::new(&be, &merged_cfg, 1).unwrap();
        model
            .extend(&be, &mut cache, &r.prompt, r.prompt.len())
            .unwrap();
        let mut greedy = Vec::new();
        for _ in 0..r.greedy.len() {
            let next = argmax(&cache.logits_row(&be, 0).unwrap());
            greedy.push(next);
            model.extend(&be, &mut cache, &[next as i32], 1).unwrap();
        }
        assert_eq!(greedy, r.greedy, "{name}: greedy tokens");
    }
}

/// The live adapter forward (the LoRA model's tensors as they are: the base frozen, PEFT's
/// adapters beside its projections, nothing merged) gives the PeftModel's logits, and its
/// greedy tokens through the KV cache; with the adapters switched off, the base fixture's
/// reference logits.
#[test]
fn peft_adapters_live_give_the_peft_model_logits_and_greedy_tokens() {
    let be = CpuBackend::new();
    for (name, base_name, _) in ADAPTERS {
        let r = reference(&fixture(name));
        let base_ref = reference(&fixture(base_name));
        let base = hf::read_model(&fixture(base_name), &|_| {}).unwrap();
        let (lora_cfg, adapters) = hf::read_adapter(&fixture(name), &base.cfg).unwrap();
        let mut cfg = base.cfg.clone();
        cfg.lora = Some(lora_cfg);
        let mut values = base.values;
        values.extend(adapters);
        let mut model = Gpt::from_values(&be, &cfg, values).unwrap();
        let v = cfg.vocab_size;
        let rel = logits_error(&be, &mut model, &r, v);
        println!("{name}: live adapter logits max error {rel:.2e}");
        assert!(rel <= LOGIT_TOL_F32, "{name}: live logits off by {rel:.3e}");

        let mut cache = KvCache::new(&be, &cfg, 1).unwrap();
        model
            .extend(&be, &mut cache, &r.prompt, r.prompt.len())
            .unwrap();
        let mut greedy = Vec::new();
        for _ in 0..r.greedy.len() {
            let next = argmax(&cache.logits_row(&be, 0).unwrap());
            greedy.push(next);
            model.extend(&be, &mut cache, &[next as i32], 1).unwrap();
        }
        assert_eq!(greedy, r.greedy, "{name}: live greedy tokens");

        model.set_adapters_enabled(false);
        let off = logits_error(&be, &mut model, &base_ref, v);
        println!("{name}: adapters off, base logits max error {off:.2e}");
        assert!(
            off <= LOGIT_TOL_F32,
            "{name}: adapters off: off by {off:.3e}"
        );
    }
}

/// A LoRA config of `base` with `targets`, and fresh random (non-zero) adapter tensors.
fn random_adapters(
    base: &ModelConfig,
    targets: &[LoraTarget],
    seed: u64,
) -> (ModelConfig, Vec<Vec<f32>>) {
    let mut cfg = base.clone();
    cfg.lora = Some(LoraConfig {
        rank: 3,
        alpha: 6.5,
        dropout: 0.05,
        targets: targets.to_vec(),
    });
    let layout = ParamLayout::new(&cfg);
    let mut rng = Rng::new(seed);
    let adapters = layout.specs[layout.num_base_tensors()..]
        .iter()
        .map(|s| (0..s.numel()).map(|_| rng.normal()).collect())
        .collect();
    (cfg, adapters)
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// Every tensor of a safetensors file: name -> (dtype, shape, bytes), sorted by name.
fn tensors_of(file: &Path) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// write_adapter then read_adapter gives back the settings and every value bit for bit, for
/// both families and for GPT-2's two `c_proj` targets apart; the PEFT fixtures read and
/// written again are the same tensors (names, shapes, bytes) as PEFT wrote; the directory
/// appears whole or not at all, and an existing one is not overwritten.
#[test]
fn write_then_read_is_bit_exact_with_peft_names() {
    let tmp = tempfile::tempdir().unwrap();
    let llama = hf::read_model(&fixture("llama"), &|_| {}).unwrap().cfg;
    let gpt2 = hf::read_model(&fixture("gpt2"), &|_| {}).unwrap().cfg;
    let cases: [(&ModelConfig, Vec<LoraTarget>, Vec<&str>); 4] = [
        (
            &llama,
            LoraTarget::all_for(&llama),
            vec![
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        ),
        (
            &llama,
            vec![LoraTarget::K, LoraTarget::Up],
            vec!["k_proj", "up_proj"],
        ),
        (&gpt2, vec![LoraTarget::O], vec!["attn.c_proj"]),
        (
            &gpt2,
            vec![LoraTarget::Qkv, LoraTarget::Down],
            vec!["c_attn", "mlp.c_proj"],
        ),
    ];
    for (i, (base, targets, modules)) in cases.iter().enumerate() {
        let (cfg, adapters) = random_adapters(base, targets, 10 + i as u64);
        let dir = tmp.path().join(format!("adapter{i}"));
        hf::write_adapter(&dir, &cfg, &adapters).unwrap();
        let (got_cfg, got) = hf::read_adapter(&dir, base).unwrap();
        assert_eq!(Some(got_cfg), cfg.lora, "case {i}");
        assert_eq!(got.len(), adapters.len());
        for (g, w) in got.iter().zip(&adapters) {
            assert!(
                g.iter()
                    .map(|x| x.to_bits())
                    .eq(w.iter().map(|x| x.to_bits())),
                "case {i}"
            );
        }
        let json = read_json(&dir.join("adapter_config.json"));
        assert_eq!(json["target_modules"], json!(modules), "case {i}");
        assert_eq!(json["peft_type"], "LORA");
        assert_eq!(json["task_type"], "CAUSAL_LM");
        assert_eq!(
            (json["r"].clone(), json["lora_alpha"].clone()),
            (json!(3), json!(6.5))
        );
        assert_eq!(json["lora_dropout"], json!(0.05));
        assert_eq!(json["fan_in_fan_out"], json!(base.llama().is_none()));
        let names: Vec<String> = tensors_of(&dir.join("adapter_model.safetensors"))
            .into_iter()
            .map(|t| t.0)
            .collect();
        let want = if base.llama().is_some() {
            format!(
                "base_model.model.model.layers.1.{}.lora_B.weight",
                if i == 0 {
                    "mlp.down_proj"
                } else {
                    "mlp.up_proj"
                }
            )
        } else {
            format!(
                "base_model.model.transformer.h.1.{}.lora_A.weight",
                if i == 2 { "attn.c_proj" } else { "mlp.c_proj" }
            )
        };
        assert!(names.contains(&want), "case {i}: {want} not in {names:?}");
        assert_eq!(names.len(), 2 * targets.len() * base.n_layer);
        assert!(!tmp.path().join(format!(".adapter{i}.tmp")).exists());
    }
    let dir = tmp.path().join("adapter0");
    let (cfg, adapters) = random_adapters(&llama, &[LoraTarget::Q], 1);
    let e = hf::write_adapter(&dir, &cfg, &adapters).unwrap_err();
    assert!(matches!(e, HfError::OutputExists { .. }), "{e}");

    for (name, base_name, _) in ADAPTERS {
        let base = hf::read_model(&fixture(base_name), &|_| {}).unwrap().cfg;
        let (lora_cfg, adapters) = hf::read_adapter(&fixture(name), &base).unwrap();
        let mut cfg = base.clone();
        cfg.lora = Some(lora_cfg);
        let out = tmp.path().join(format!("{name}-again"));
        hf::write_adapter(&out, &cfg, &adapters).unwrap();
        assert_eq!(
            tensors_of(&out.join("adapter_model.safetensors")),
            tensors_of(&fixture(name).join("adapter_model.safetensors")),
            "{name}"
        );
        let (a, b) = (
            read_json(&out.join("adapter_config.json")),
            read_json(&fixture(name).join("adapter_config.json")),
        );
        for k in ["r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias"] {
            assert_eq!(a[k], b[k], "{name}: {k}");
        }
        // PEFT writes the list in its own order (the fixture script sorts it).
        let sorted = |v: &Value| {
            let mut l: Vec<String> = serde_json::from_value(v["target_modules"].clone()).unwrap();
            l.sort();
            l
        };
        assert_eq!(sorted(&a), sorted(&b), "{name}: target_modules");
    }
}

/// The fixture copied into `tmp/name`, then changed by `edit`.
fn broken(tmp: &Path, fixture_name: &str, name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let dir = tmp.join(name);
    copy_dir(&fixture(fixture_name), &dir);
    edit(&dir);
    dir
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let p = dir.join("adapter_config.json");
    let mut v = read_json(&p);
    edit(&mut v);
    std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// Rewrites the adapter's safetensors file with `edit` applied to its tensor list.
fn rewrite(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
    let file = dir.join("adapter_model.safetensors");
    let mut list = tensors_of(&file);
    edit(&mut list);
    let views: Vec<_> = list
        .iter()
        .map(|(n, d, sh, b)| (n.clone(), TensorView::new(*d, sh.clone(), b).unwrap()))
        .collect();
    std::fs::write(&file, safetensors::serialize(views, &None).unwrap()).unwrap();
}

/// bf16 and f16 adapters read as their values widened exactly; a regex `target_modules`, and
/// `all-linear`, read as the list PEFT wrote; a list naming both GPT-2 `c_proj` modules by
/// their bare name means `o` and `down`; layers_to_transform naming every layer is accepted.
#[test]
fn narrow_dtypes_and_every_target_modules_form_read() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let llama = hf::read_model(&fixture("llama"), &|_| {}).unwrap().cfg;
    let gpt2 = hf::read_model(&fixture("gpt2"), &|_| {}).unwrap().cfg;
    let (want_cfg, want) = hf::read_adapter(&fixture("peft_llama"), &llama).unwrap();
    for (dtype, round) in [
        (
            Dtype::BF16,
            (|x: f32| half::bf16::from_f32(x).to_f32()) as fn(f32) -> f32,
        ),
        (Dtype::F16, |x: f32| half::f16::from_f32(x).to_f32()),
    ] {
        let dir = broken(t, "peft_llama", &format!("{dtype:?}"), |d| {
            rewrite(d, |list| {
                for (_, dt, _, bytes) in list.iter_mut() {
                    let v: Vec<f32> = bytes
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect();
                    *bytes = v
                        .iter()
                        .flat_map(|&x| match dtype {
                            Dtype::BF16 => half::bf16::from_f32(x).to_le_bytes(),
                            _ => half::f16::from_f32(x).to_le_bytes(),
                        })
                        .collect();
                    *dt = dtype;
                }
            })
        });
        let (cfg, got) = hf::read_adapter(&dir, &llama).unwrap();
        assert_eq!(cfg, want_cfg);
        for (g, w) in got.iter().zip(&want) {
            let w: Vec<f32> = w.iter().map(|&x| round(x)).collect();
            assert_eq!(g, &w, "{dtype:?}");
        }
    }
    for (i, form) in [
        json!(r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"),
        json!("all-linear"),
    ]
    .into_iter()
    .enumerate()
    {
        let dir = broken(t, "peft_llama", &format!("form{i}"), |d| {
            edit_config(d, |v| {
                v["target_modules"] = form;
                v["layers_to_transform"] = json!([1, 0]);
            })
        });
        let (cfg, got) = hf::read_adapter(&dir, &llama).unwrap();
        assert_eq!((cfg, got), (want_cfg.clone(), want.clone()), "form {i}");
    }
    let dir = broken(t, "peft_gpt2", "bare_c_proj", |d| {
        edit_config(d, |v| {
            v["target_modules"] = json!(["c_proj", "c_attn", "c_fc"])
        })
    });
    let (cfg, _) = hf::read_adapter(&dir, &gpt2).unwrap();
    assert_eq!(cfg.targets, LoraTarget::all_for(&gpt2));
    // Only GPT-2's attention output projection, by a regex that tells the two c_proj apart.
    let dir = broken(t, "peft_gpt2", "attn_only", |d| {
        edit_config(d, |v| v["target_modules"] = json!(r".*\.attn\.c_proj"));
        rewrite(d, |list| list.retain(|x| x.0.contains(".attn.c_proj.")));
    });
    let (cfg, got) = hf::read_adapter(&dir, &gpt2).unwrap();
    assert_eq!((cfg.targets, got.len()), (vec![LoraTarget::O], 4));
}

/// Every adapter topcoat cannot load as PEFT would compute it is refused with an error naming
/// the file and the key or tensor; `import hf` of an adapter points to --adapter.
#[test]
fn adapters_topcoat_cannot_compute_are_named_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let llama = hf::read_model(&fixture("llama"), &|_| {}).unwrap().cfg;
    let key = |name: &str, k: &'static str, val: Value| {
        broken(t, "peft_llama", name, move |d| {
            edit_config(d, |v| v[k] = val)
        })
    };
    let cases: Vec<(PathBuf, String)> = vec![
        (
            broken(t, "llama", "empty", |d| {
                for e in std::fs::read_dir(d).unwrap() {
                    std::fs::remove_file(e.unwrap().path()).unwrap();
                }
            }),
            "empty: no adapter_config.json, so not a PEFT adapter directory".into(),
        ),
        (
            fixture("llama"),
            "llama: no adapter_config.json: a full Hugging Face model (config.json), not a PEFT \
             adapter directory; import it with `import hf` and give it to --init"
                .into(),
        ),
        (
            key("ia3", "peft_type", json!("IA3")),
            "adapter_config.json: \"peft_type\" = \"IA3\" is not supported: topcoat reads LoRA \
             adapters (peft_type \"LORA\") only"
                .into(),
        ),
        (
            key("dora", "use_dora", json!(true)),
            "\"use_dora\" = true is not supported: DoRA's magnitude vectors are not computed".into(),
        ),
        (
            key("rslora", "use_rslora", json!(true)),
            "\"use_rslora\" = true is not supported: rsLoRA scales by lora_alpha / sqrt(r)".into(),
        ),
        (
            key("rank_pattern", "rank_pattern", json!({"q_proj": 8})),
            "\"rank_pattern\" = {\"q_proj\":8} is not supported: topcoat gives every adapter the \
             same rank r"
                .into(),
        ),
        (
            key("alpha_pattern", "alpha_pattern", json!({"v_proj": 16})),
            "\"alpha_pattern\" = {\"v_proj\":16} is not supported".into(),
        ),
        (
            key("modules_to_save", "modules_to_save", json!(["lm_head"])),
            "\"modules_to_save\" = [\"lm_head\"] is not supported: modules trained in full".into(),
        ),
        (
            key("bias", "bias", json!("lora_only")),
            "\"bias\" = \"lora_only\" is not supported: topcoat's adapters train no biases".into(),
        ),
        (
            key("layers", "layers_to_transform", json!([0])),
            "\"layers_to_transform\" = [0] is not supported: topcoat puts adapters in every layer \
             (0..2), not in a subset"
                .into(),
        ),
        (
            key("lm_head", "target_modules", json!(["q_proj", "lm_head"])),
            "\"target_modules\" = [\"q_proj\",\"lm_head\"] is not supported: it names module \
             lm_head, and topcoat has adapters on the attention and MLP projections only (q_proj, \
             k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
                .into(),
        ),
        (
            key("embed", "target_modules", json!("model\\.embed_tokens|.*q_proj")),
            "it names module model.embed_tokens, and topcoat has adapters".into(),
        ),
        (
            key("one_layer", "target_modules", json!(r"model\.layers\.0\.self_attn\.q_proj")),
            "it puts an adapter on `q` in some layers but not in layer 1; topcoat puts the same \
             adapters in every layer"
                .into(),
        ),
        (
            key("nothing", "target_modules", json!(["c_attn"])),
            "is not supported: it names no projection of this LlamaForCausalLM model".into(),
        ),
        (
            fixture("peft_gpt2"),
            "peft_gpt2/adapter_model.safetensors: tensor base_model.model.transformer.h.0.attn.\
             c_attn.lora_A.weight is an adapter on a GPT-2 model's module, but the base model is \
             a LlamaForCausalLM"
                .into(),
        ),
        (
            broken(t, "peft_llama", "missing", |d| {
                rewrite(d, |l| l.retain(|x| !x.0.contains("layers.1.mlp.up_proj.lora_B")))
            }),
            "missing/adapter_model.safetensors: missing tensor base_model.model.model.layers.1.mlp.\
             up_proj.lora_B.weight (target_modules names its module)"
                .into(),
        ),
        (
            broken(t, "peft_llama", "extra", |d| {
                rewrite(d, |l| {
                    let mut x = l[0].clone();
                    x.0 = "base_model.model.lm_head.lora_A.weight".into();
                    l.push(x);
                })
            }),
            "extra/adapter_model.safetensors: unexpected tensor base_model.model.lm_head.lora_A.\
             weight: adapter_config.json's target_modules puts adapters on q,k,v,o,gate,up,down \
             only"
                .into(),
        ),
        (
            broken(t, "peft_llama", "misshapen", |d| {
                rewrite(d, |l| {
                    let x = l
                        .iter_mut()
                        .find(|x| x.0.ends_with("layers.0.self_attn.k_proj.lora_B.weight"))
                        .unwrap();
                    x.2 = vec![x.2[1], x.2[0]];
                })
            }),
            "misshapen/adapter_model.safetensors: tensor base_model.model.model.layers.0.self_attn.\
             k_proj.lora_B.weight has shape [4, 32], expected [32, 4]"
                .into(),
        ),
        (
            broken(t, "peft_llama", "bin", |d| {
                std::fs::rename(d.join("adapter_model.safetensors"), d.join("adapter_model.bin"))
                    .unwrap()
            }),
            "bin: no adapter_model.safetensors, only adapter_model.bin".into(),
        ),
    ];
    for (dir, want) in cases {
        let e = hf::read_adapter(&dir, &llama).unwrap_err().to_string();
        assert!(
            e.contains(&want),
            "{}:\n  got:  {e}\n  want: {want}",
            dir.display()
        );
    }
    let out = t.join("imported");
    let text = fails(&[
        "import",
        "hf",
        &s(&fixture("peft_llama")),
        "--out",
        &s(&out),
    ]);
    assert!(
        text.contains(
            "peft_llama: a PEFT adapter directory (adapter_config.json), not a model: import its \
             base model with `import hf`, give that to --init and this directory to --adapter"
        ),
        "{text}"
    );
    assert!(!out.exists());
}
