//! `import hf` and `export hf` on the committed Hugging Face fixtures (tests/fixtures/hf,
//! written by scripts/make_hf_fixtures.py): every fixture model (GPT-2, Llama with GQA, Llama 3
//! RoPE scaling and three shards, Llama MQA in bf16, Qwen2 with biases in f16, Mistral) gives
//! the reference library's float64 logits within a named f32 tolerance, its loss and its
//! greedy tokens; import then export gives back the fixture's tensors bit for bit and a
//! config.json that parses to the same model; bad inputs are named errors that leave no
//! output behind.

mod common;

use common::cli::{copy_dir, fails, ok, s};
use common::hf_fixtures::{argmax, fixture, reference};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use topcoat::backend::cpu::CpuBackend;
use topcoat::hf::{self, Arch};
use topcoat::model::{Gpt, KvCache};

/// f32 forward against the float64 reference: `max |logit - ref| / max |ref|`. Measured on
/// these fixtures: 5e-7 to 8e-7 (f32 rounding through 2 layers of width 64); 5e-6 leaves room
/// for other summation orders and still fails on any wrong weight, norm or bias.
const LOGIT_TOL_F32: f64 = 5e-6;
/// The f32 mean loss against the float64 reference loss, relative (measured: at most 5e-8).
const LOSS_TOL_F32: f64 = 1e-6;

const FIXTURES: [&str; 5] = ["gpt2", "llama", "llama_mqa_bf16", "qwen2", "mistral"];

/// Each fixture read by the library runs on the CPU backend to the reference's logits (every
/// position of both rows), loss (next-token cross entropy over 22 targets) and 6 greedy
/// tokens (decoded with the KV cache).
#[test]
fn every_fixture_gives_the_reference_logits_loss_and_greedy_tokens() {
    let be = CpuBackend::new();
    for name in FIXTURES {
        let dir = fixture(name);
        let r = reference(&dir);
        let m = hf::read_model(&dir, &|_| {}).unwrap();
        let (b, t, v) = (2, 12, m.cfg.vocab_size);
        assert_eq!(v, 420, "{name}");
        let mut model = Gpt::from_values(&be, &m.cfg, m.values).unwrap();
        model.forward(&be, &r.ids, b, t).unwrap();
        let (mut max_err, mut max_ref) = (0f64, 0f64);
        for row in 0..b {
            for pos in 0..t {
                let got = model.logits_at(&be, row, pos).unwrap();
                let want = &r.logits[(row * t + pos) * v..][..v];
                for (g, w) in got.iter().zip(want) {
                    max_err = max_err.max((*g as f64 - w).abs());
                    max_ref = max_ref.max(w.abs());
                }
            }
        }
        let rel = max_err / max_ref;
        println!("{name}: logits max error {rel:.2e} of max |logit| {max_ref:.3}");
        assert!(rel <= LOGIT_TOL_F32, "{name}: logits off by {rel:.3e}");

        let targets: Vec<i32> = (0..b * t)
            .map(|i| if i % t == t - 1 { -1 } else { r.ids[i + 1] })
            .collect();
        let loss = model.forward_loss(&be, &r.ids, &targets, b, t).unwrap();
        assert_eq!(loss.tokens, 22);
        let loss_err = (loss.mean as f64 - r.loss).abs() / r.loss;
        println!("{name}: loss {} vs {} ({loss_err:.2e})", loss.mean, r.loss);
        assert!(
            loss_err <= LOSS_TOL_F32,
            "{name}: loss {} vs {}",
            loss.mean,
            r.loss
        );

        let mut cache = KvCache::new(&be, &m.cfg, 1).unwrap();
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

/// Every tensor of a safetensors file or of an index's shards: name -> (dtype, shape, bytes).
fn tensors_of(dir: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("model") && n.ends_with(".safetensors")
        })
        .collect();
    files.sort();
    let mut out = BTreeMap::new();
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, t) in st.tensors() {
            out.insert(name, (t.dtype(), t.shape().to_vec(), t.data().to_vec()));
        }
    }
    out
}

/// Import then export (in the fixture's own dtype) writes the fixture's tensors again: the
/// same names, shapes, dtypes and bytes, the shards gathered into one file; the exported
/// config.json reads back as the same model (a Mistral as the Llama it is the same graph as).
#[test]
fn import_then_export_gives_back_every_fixture_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, dtype) in [
        ("gpt2", "f32"),
        ("llama", "f32"),
        ("llama_mqa_bf16", "bf16"),
        ("qwen2", "f16"),
        ("mistral", "f32"),
    ] {
        let run = tmp.path().join(format!("{name}-run"));
        let out = tmp.path().join(format!("{name}-hf"));
        let text = ok(&["import", "hf", &s(&fixture(name)), "--out", &s(&run)]);
        assert!(text.contains("use it as --init or --checkpoint"), "{text}");
        ok(&[
            "export",
            "hf",
            &s(&run),
            "--out",
            &s(&out),
            "--dtype",
            dtype,
        ]);
        let want = tensors_of(&fixture(name));
        let got = tensors_of(&out);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{name}: tensor names"
        );
        for (k, w) in &want {
            let g = &got[k];
            assert_eq!((g.0, &g.1), (w.0, &w.1), "{name}: {k} dtype and shape");
            assert!(g.2 == w.2, "{name}: {k} values differ");
        }
        let a = hf::read_model(&fixture(name), &|_| {}).unwrap();
        let b = hf::read_model(&out, &|_| {}).unwrap();
        assert_eq!(b.cfg, a.cfg, "{name}: config");
        let arch = if a.arch == Arch::Mistral {
            Arch::Llama
        } else {
            a.arch
        };
        assert_eq!(b.arch, arch, "{name}: architecture");
        for f in ["config.json", "generation_config.json", "tokenizer.json"] {
            assert!(out.join(f).is_file(), "{name}: no {f}");
        }
        assert!(!tmp.path().join(format!(".{name}-hf.tmp")).exists());
    }
}

/// A fixture directory copied into `tmp` under `name`, changed by `edit`.
fn broken(tmp: &Path, fixture_name: &str, name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let dir = tmp.join(name);
    copy_dir(&fixture(fixture_name), &dir);
    edit(&dir);
    dir
}

/// Rewrites `file` with `edit` applied to its tensor list.
fn rewrite(file: &Path, edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
    let bytes = std::fs::read(file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut list: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    edit(&mut list);
    let views: Vec<_> = list
        .iter()
        .map(|(n, d, sh, b)| (n.clone(), TensorView::new(*d, sh.clone(), b).unwrap()))
        .collect();
    std::fs::write(file, safetensors::serialize(views, &None).unwrap()).unwrap();
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// Each bad input is refused with an error naming the file, the key or tensor, and what was
/// expected; no output directory (nor its temporary sibling) is left behind.
#[test]
fn bad_inputs_are_named_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let cases: Vec<(PathBuf, String)> = vec![
        (
            broken(t, "gpt2", "bert", |d| {
                edit_config(d, |v| v["model_type"] = "bert".into())
            }),
            "config.json: unsupported architecture model_type \"bert\"; topcoat imports \
             GPT2LMHeadModel (gpt2), LlamaForCausalLM (llama), Qwen2ForCausalLM (qwen2), \
             MistralForCausalLM (mistral)"
                .into(),
        ),
        (
            broken(t, "llama", "classifier", |d| {
                edit_config(d, |v| {
                    v["architectures"] = serde_json::json!(["LlamaForSequenceClassification"])
                })
            }),
            "unsupported architecture \"LlamaForSequenceClassification\" (model_type \"llama\")"
                .into(),
        ),
        (
            broken(t, "gpt2", "missing", |d| {
                rewrite(&d.join("model.safetensors"), |l| {
                    l.retain(|x| x.0 != "transformer.h.1.mlp.c_fc.weight")
                })
            }),
            "model.safetensors: missing tensor transformer.h.1.mlp.c_fc.weight".into(),
        ),
        (
            broken(t, "qwen2", "shape", |d| {
                rewrite(&d.join("model.safetensors"), |l| {
                    let x = l
                        .iter_mut()
                        .find(|x| x.0 == "model.layers.0.self_attn.k_proj.weight")
                        .unwrap();
                    x.2 = vec![x.2[1], x.2[0]];
                })
            }),
            "model.safetensors: tensor model.layers.0.self_attn.k_proj.weight has shape \
             [64, 32], expected [32, 64]"
                .into(),
        ),
        (
            broken(t, "llama", "truncated", |d| {
                let p = d.join("model-00002-of-00003.safetensors");
                let len = std::fs::metadata(&p).unwrap().len();
                let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
                f.set_len(len - 100).unwrap();
            }),
            "model-00002-of-00003.safetensors: truncated safetensors file: its header says".into(),
        ),
        (
            broken(t, "mistral", "extra", |d| {
                rewrite(&d.join("model.safetensors"), |l| {
                    let mut b = l[0].clone();
                    b.0 = "model.layers.0.self_attn.o_proj.bias".into();
                    b.2 = vec![64];
                    b.3.truncate(64 * 4);
                    l.push(b);
                })
            }),
            "model.safetensors: unexpected tensor model.layers.0.self_attn.o_proj.bias: it is \
             not part of the graph topcoat computes"
                .into(),
        ),
        (
            broken(t, "mistral", "window", |d| {
                edit_config(d, |v| v["sliding_window"] = 16.into())
            }),
            "config.json: \"sliding_window\" = 16 is not supported: topcoat attends to the \
             whole causal context"
                .into(),
        ),
        (
            broken(t, "gpt2", "notok", |d| {
                std::fs::remove_file(d.join("tokenizer.json")).unwrap()
            }),
            "notok: no tokenizer.json; pass --tokenizer gpt2".into(),
        ),
    ];
    for (dir, want) in cases {
        let run = t.join("runs").join(dir.file_name().unwrap());
        let text = fails(&["import", "hf", &s(&dir), "--out", &s(&run)]);
        assert!(text.contains(&want), "{}: {text}", dir.display());
        assert!(!run.exists(), "{}", run.display());
    }
    let leftovers: Vec<_> = std::fs::read_dir(t.join("runs"))
        .map(|r| r.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// `--tokenizer gpt2` on a directory without tokenizer.json: the checkpoint gets topcoat's
/// GPT-2 tokenizer (50261 ids), the embedding keeps the model's 420 rows and zero rows for
/// the ids beyond; an existing --out is refused.
#[test]
fn gpt2_tokenizer_flag_grows_the_vocabulary_with_zero_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = broken(tmp.path(), "gpt2", "gpt2", |d| {
        std::fs::remove_file(d.join("tokenizer.json")).unwrap()
    });
    let run = tmp.path().join("run");
    let text = ok(&[
        "import",
        "hf",
        &s(&dir),
        "--out",
        &s(&run),
        "--tokenizer",
        "gpt2",
    ]);
    assert!(
        text.contains("the tokenizer has 50261 ids, 49841 more"),
        "{text}"
    );
    let be = CpuBackend::new();
    let model = topcoat::train::checkpoint::load_model(&be, &run, None).unwrap();
    assert_eq!(
        (model.cfg.vocab_size, model.cfg.padded_vocab_size),
        (50261, 50304)
    );
    let wte = &model.param_values(&be).unwrap()[model.layout.wte];
    let m = hf::read_model(&fixture("gpt2"), &|_| {}).unwrap();
    let c = m.cfg.n_embd;
    assert_eq!(wte[..420 * c], m.values[model.layout.wte][..420 * c]);
    assert!(wte[420 * c..].iter().all(|&x| x == 0.0));
    let again = fails(&[
        "import",
        "hf",
        &s(&dir),
        "--out",
        &s(&run),
        "--tokenizer",
        "gpt2",
    ]);
    assert!(
        again.contains("already exists; choose a new --out"),
        "{again}"
    );
}

/// GPT-2 as the oldest uploads store it: no `transformer.` prefix, the causal-mask buffers
/// `attn.bias` / `attn.masked_bias`, and the tied head saved as `lm_head.weight`. It imports
/// to the same checkpoint weights as the fixture, naming what it skipped; a saved head that
/// differs from the embedding is refused.
#[test]
fn old_gpt2_layout_imports_and_a_differing_tied_head_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let old = |name: &str, head_delta: f32| {
        broken(t, "gpt2", name, |d| {
            rewrite(&d.join("model.safetensors"), |l| {
                for x in l.iter_mut() {
                    x.0 = x.0.trim_start_matches("transformer.").to_string();
                }
                let mut head = l.iter().find(|x| x.0 == "wte.weight").unwrap().clone();
                head.0 = "lm_head.weight".into();
                let first = f32::from_le_bytes(head.3[..4].try_into().unwrap()) + head_delta;
                head.3[..4].copy_from_slice(&first.to_le_bytes());
                l.push(head);
                for layer in 0..2 {
                    for buf in ["attn.bias", "attn.masked_bias"] {
                        let data: Vec<u8> =
                            (0..16u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
                        l.push((
                            format!("h.{layer}.{buf}"),
                            Dtype::F32,
                            vec![1, 1, 4, 4],
                            data,
                        ));
                    }
                }
            })
        })
    };
    let fresh = t.join("fresh");
    ok(&["import", "hf", &s(&fixture("gpt2")), "--out", &s(&fresh)]);
    let run = t.join("old-run");
    let text = ok(&["import", "hf", &s(&old("old", 0.0)), "--out", &s(&run)]);
    for skipped in ["lm_head.weight", "h.0.attn.bias", "h.1.attn.masked_bias"] {
        assert!(
            text.contains(&format!("skipped {skipped} ")),
            "{skipped}: {text}"
        );
    }
    let weights = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
    assert!(
        weights(&run) == weights(&fresh),
        "the old layout gives other weights"
    );
    let e = fails(&[
        "import",
        "hf",
        &s(&old("differs", 0.5)),
        "--out",
        &s(&t.join("x")),
    ]);
    assert!(
        e.contains(
            "unexpected tensor lm_head.weight: config.json ties the output head to wte.weight \
             (tie_word_embeddings), but this head differs from it"
        ),
        "{e}"
    );
}

/// Export of a run with topcoat's GPT-2 tokenizer: its weights (all 50261 rows) and the
/// tokenizer converted to Hugging Face's files, giving the same ids; a reward model (its
/// scalar head) and an existing --out are refused, leaving nothing behind.
#[test]
fn export_says_what_it_cannot_write() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let dir = broken(t, "gpt2", "gpt2", |d| {
        std::fs::remove_file(d.join("tokenizer.json")).unwrap()
    });
    let run = t.join("run");
    ok(&[
        "import",
        "hf",
        &s(&dir),
        "--out",
        &s(&run),
        "--tokenizer",
        "gpt2",
    ]);
    let out = t.join("out");
    let text = ok(&["export", "hf", &s(&run), "--out", &s(&out)]);
    assert!(
        text.contains("tokenizer: topcoat's GPT-2 tokenizer converted to tokenizer.json"),
        "{text}"
    );
    let exported = topcoat::data::tokenizer::Tokenizer::from_hf_files(
        &out.join("tokenizer.json"),
        Some(&out.join("tokenizer_config.json")),
    )
    .unwrap();
    let text = "Exported, the tokenizer still encodes the same: 12 caf\u{e9}s!";
    assert_eq!(
        exported.encode(text),
        topcoat::data::tokenizer::Tokenizer::gpt2().encode(text)
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["vocab_size"], 50261);
    assert_eq!(cfg["eos_token_id"], 50256);
    assert_eq!(
        tensors_of(&out)["transformer.wte.weight"].1,
        vec![50261, 64]
    );
    let again = fails(&["export", "hf", &s(&run), "--out", &s(&out)]);
    assert!(
        again.contains("out: already exists; choose a new --out"),
        "{again}"
    );

    let be = CpuBackend::new();
    let mut model = topcoat::train::checkpoint::load_model(&be, &run, None).unwrap();
    model.init_reward_head(&be, 1).unwrap();
    let tok = topcoat::train::checkpoint::load_tokenizer(&run).unwrap();
    let reward = t.join("reward");
    topcoat::train::checkpoint::save(&be, &reward, &model, &tok, None).unwrap();
    let refused = t.join("refused");
    let e = fails(&["export", "hf", &s(&reward), "--out", &s(&refused)]);
    assert!(
        e.contains("unexpected tensor reward_head.weight: a reward model's scalar head"),
        "{e}"
    );
    assert!(!refused.exists() && !t.join(".refused.tmp").exists());
}

/// The wrong directory, as a tired user gives it: a topcoat run or checkpoint (its own
/// `config.json`), an empty directory, a shard file; each refused by name, nothing written.
#[test]
fn a_directory_that_is_not_a_hugging_face_model_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let run = t.join("run");
    ok(&["import", "hf", &s(&fixture("llama")), "--out", &s(&run)]);
    let again = t.join("again");
    let e = fails(&["import", "hf", &s(&run), "--out", &s(&again)]);
    assert!(
        e.contains("run: a topcoat checkpoint or run, not a Hugging Face model directory"),
        "{e}"
    );
    let empty = t.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = fails(&["import", "hf", &s(&empty), "--out", &s(&again)]);
    assert!(
        e.contains("empty: no config.json, so not a Hugging Face model directory"),
        "{e}"
    );
    let shard = fixture("llama").join("model-00001-of-00003.safetensors");
    let e = fails(&["import", "hf", &s(&shard), "--out", &s(&again)]);
    assert!(e.contains("not a directory"), "{e}");
    assert!(!again.exists());
}
