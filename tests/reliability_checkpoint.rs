//! Checkpoint files (docs/FORMATS.md, manifest.json): every file checksummed and verified on
//! load; an incomplete checkpoint is refused, never skipped or pruned; a failed save (a full
//! disk included) or one of non-finite values leaves nothing behind; random and mutated
//! manifests and safetensors files never panic. The command-line cases are in
//! `reliability_checkpoint_cli.rs`.

mod common;
use common::cli::{assert_unchanged, copy_dir, snapshot};
use common::safetensors_data_start as data_start;

use proptest::prelude::*;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use topcoat::backend::cpu::CpuBackend;
use topcoat::backend::Backend;
use topcoat::config::{ModelConfig, RunConfig};
use topcoat::data::Tokenizer;
use topcoat::model::Gpt;
use topcoat::optim::AdamW;
use topcoat::rng::Rng;
use topcoat::train::checkpoint::{self, TrainState};
use topcoat::train::manifest::{self, Manifest};

// ---------------------------------------------------------------- library: save and load

fn small_tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let text = "A cat is a small animal. A dog is a loyal animal. ".repeat(30);
        Tokenizer::train_bpe([text.as_str()].into_iter(), 300, |_, _| {}).unwrap()
    })
}

fn tiny_cfg(vocab: usize) -> ModelConfig {
    ModelConfig {
        vocab_size: vocab,
        padded_vocab_size: vocab.div_ceil(64) * 64,
        n_layer: 1,
        n_head: 2,
        n_embd: 16,
        max_seq_len: 16,
        family: Default::default(),
        lora: None,
    }
}

fn state(step: usize) -> TrainState {
    TrainState {
        step,
        rng: Rng::new(1),
        data: serde_json::json!({"cursor": 3}),
        run: RunConfig::default(),
        tokens_seen: 64,
        elapsed_s: 1.5,
        stage: "pretrain".into(),
    }
}

/// Saves a training checkpoint of a tiny model at `dest` with `write`.
fn save_with(dest: &Path, write: &checkpoint::WriteFile<'_>) -> topcoat::train::Result<PathBuf> {
    let be = CpuBackend;
    let tok = small_tokenizer();
    let mut model = Gpt::init(&be, &tiny_cfg(tok.vocab_size()), 7).unwrap();
    let opt = AdamW::new(&be, &topcoat::dist::Solo::new(), &mut model, 0).unwrap();
    checkpoint::save_with(&be, dest, &model, tok, Some((&opt, &state(2))), write)
}

/// A weight or moment holding a NaN or an infinity is never written: the save is refused by
/// name and leaves neither the checkpoint nor its temporary directory.
#[test]
fn non_finite_values_are_never_saved() {
    let tmp = tempfile::tempdir().unwrap();
    let be = CpuBackend;
    let tok = small_tokenizer();
    let cfg = tiny_cfg(tok.vocab_size());
    let mut good = Gpt::init(&be, &cfg, 7).unwrap();
    let mut values = good.param_values(&be).unwrap();
    values[1][3] = f32::NAN;
    let bad = Gpt::from_values(&be, &cfg, values).unwrap();
    let opt = AdamW::new(&be, &topcoat::dist::Solo::new(), &mut good, 0).unwrap();
    let dest = tmp.path().join("ckpt_000002");
    let err = checkpoint::save(&be, &dest, &bad, tok, Some((&opt, &state(2))))
        .unwrap_err()
        .to_string();
    let name = &good.layout.specs[1].name;
    assert_eq!(
        err,
        format!(
            "checkpoint {}: the weight {name} is not finite, so it is not saved",
            dest.display()
        )
    );
    let mut opt = AdamW::new(&be, &topcoat::dist::Solo::new(), &mut good, 0).unwrap();
    let m0 = opt.m[0].as_mut().unwrap();
    let mut m = be.download(m0).unwrap();
    m[0] = f32::INFINITY;
    be.write(m0, &m).unwrap();
    let err = checkpoint::save(&be, &dest, &good, tok, Some((&opt, &state(2))))
        .unwrap_err()
        .to_string();
    assert!(err.contains("the first moment of"), "{err}");
    assert_eq!(
        names(tmp.path()),
        Vec::<String>::new(),
        "nothing left behind"
    );
}

#[test]
fn the_manifest_lists_every_file_with_its_size_and_sha256() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = save_with(&tmp.path().join("ckpt_000002"), &checkpoint::write_synced).unwrap();
    let m = Manifest::read(&dir).unwrap();
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != manifest::FILE)
        .collect();
    on_disk.sort();
    let listed: Vec<String> = m.files.iter().map(|e| e.name.clone()).collect();
    assert_eq!(listed, on_disk);
    assert_eq!(listed.len(), 5, "{listed:?}");
    for e in &m.files {
        let bytes = std::fs::read(dir.join(&e.name)).unwrap();
        assert_eq!(e.bytes, bytes.len() as u64, "{}", e.name);
        let hex: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(e.sha256, hex, "{}", e.name);
    }
}

#[test]
fn every_loaded_file_is_verified() {
    let tmp = tempfile::tempdir().unwrap();
    let good = save_with(&tmp.path().join("good"), &checkpoint::write_synced).unwrap();
    let be = CpuBackend;
    for file in [
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "optimizer.safetensors",
        "train_state.json",
    ] {
        let dir = tmp.path().join(format!("bad_{file}"));
        copy_dir(&good, &dir);
        let path = dir.join(file);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 2; // inside JSON text and tensor data alike
        bytes[last] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let mut model = checkpoint::load_model(&be, &good, None).unwrap();
        let err = match file {
            "config.json" => checkpoint::load_config(&dir).map(|_| ()),
            "tokenizer.json" => checkpoint::load_tokenizer(&dir).map(|_| ()),
            "model.safetensors" => checkpoint::load_model(&be, &dir, None).map(|_| ()),
            _ => checkpoint::load_training(&be, &dir, &mut model, "pretrain").map(|_| ()),
        }
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(&format!("{}: {file} is corrupt (SHA-256", dir.display())),
            "{file}: {err}"
        );
    }
    // Truncated, and missing.
    let dir = tmp.path().join("short");
    copy_dir(&good, &dir);
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..100]).unwrap();
    let err = checkpoint::load_model(&be, &dir, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.safetensors is corrupt or truncated") && err.contains("has 100"),
        "{err}"
    );
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let err = checkpoint::load_model(&be, &dir, None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.safetensors is missing"), "{err}");
    // The wrong stage.
    let mut model = checkpoint::load_model(&be, &good, None).unwrap();
    let err = checkpoint::load_training(&be, &good, &mut model, "sft")
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("was written by `pretrain`") && err.contains("this is `sft`"),
        "{err}"
    );
}

#[test]
fn a_checkpoint_without_a_manifest_is_refused_never_skipped_or_pruned() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path();
    for step in [2, 4] {
        save_with(&checkpoint::dir_for(run, step), &checkpoint::write_synced).unwrap();
    }
    let newest = checkpoint::dir_for(run, 4);
    std::fs::remove_file(newest.join(manifest::FILE)).unwrap();
    let err = checkpoint::load_model(&CpuBackend, &newest, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(&format!(
            "checkpoint {}: no manifest.json",
            newest.display()
        )) && err.contains("incomplete or was written by a topcoat older"),
        "{err}"
    );
    let err = checkpoint::latest(run).unwrap_err().to_string();
    assert!(err.contains("no manifest.json"), "resume names it: {err}");
    assert_eq!(
        checkpoint::list(run).unwrap().len(),
        1,
        "only complete ones count"
    );
    topcoat::train::run_dir::prune_keeping(run, 1, None).unwrap();
    assert!(
        newest.is_dir() && checkpoint::dir_for(run, 2).is_dir(),
        "nothing pruned"
    );
}

// ---------------------------------------------------------------- library: failed saves

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_full_disk_is_named_and_leaves_no_temp_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path();
    let prev = save_with(&checkpoint::dir_for(run, 2), &checkpoint::write_synced).unwrap();
    let prev_snap = snapshot(&prev);
    let dest = checkpoint::dir_for(run, 4);
    // A real ENOSPC from the kernel: the chosen file is written to /dev/full instead.
    for victim in [
        "model.safetensors",
        "optimizer.safetensors",
        "manifest.json",
    ] {
        let write = |path: &Path, bytes: &[u8]| {
            if path.ends_with(victim) {
                std::fs::write("/dev/full", bytes)
            } else {
                checkpoint::write_synced(path, bytes)
            }
        };
        let err = save_with(&dest, &write).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "checkpoint {}: disk full while writing {victim} (No space left on device); \
                 the previous checkpoint {} is intact; free space and resume with --resume",
                dest.display(),
                prev.display()
            )
        );
        assert_eq!(
            names(run),
            ["ckpt_000002"],
            "{victim}: no temp dir, no ckpt_000004"
        );
    }
    // Any other write error: named by its file, and cleaned up the same way.
    let write = |path: &Path, bytes: &[u8]| {
        if path.ends_with("train_state.json") {
            Err(std::io::Error::from_raw_os_error(5))
        } else {
            checkpoint::write_synced(path, bytes)
        }
    };
    let err = save_with(&dest, &write).unwrap_err().to_string();
    assert!(
        err.contains("train_state.json") && err.contains("os error 5"),
        "{err}"
    );
    assert_eq!(names(run), ["ckpt_000002"]);
    assert_unchanged(&prev, &prev_snap);
    assert_eq!(checkpoint::latest(run).unwrap(), Some(prev));
    // And the next save goes through.
    save_with(&dest, &checkpoint::write_synced).unwrap();
    assert_eq!(names(run), ["ckpt_000002", "ckpt_000004"]);
}

#[test]
fn a_stale_temp_directory_is_replaced_not_listed() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path();
    let stale = run.join(".ckpt_000002.tmp");
    std::fs::create_dir_all(stale.join("sub")).unwrap();
    std::fs::write(stale.join("junk"), b"x").unwrap();
    assert_eq!(checkpoint::latest(run).unwrap(), None);
    let dir = save_with(&checkpoint::dir_for(run, 2), &checkpoint::write_synced).unwrap();
    assert_eq!(names(run), ["ckpt_000002"]);
    assert!(Manifest::read(&dir)
        .unwrap()
        .files
        .iter()
        .all(|e| e.name != "junk"));
}

// ---------------------------------------------------------------- property tests

/// A valid checkpoint's directory, made once.
fn reference_checkpoint() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let dir = save_with(&tmp.path().join("ckpt_000002"), &checkpoint::write_synced).unwrap();
        (tmp, dir)
    })
    .1
}

/// Byte edits: `(position as a fraction of the length, xor mask)`, an optional truncation
/// (fraction) and an optional new 8-byte header length.
fn mutate(bytes: &[u8], edits: &[(f64, u8)], cut: Option<f64>, len: Option<u64>) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let header_end = data_start(bytes).min(out.len());
    for (i, &(at, mask)) in edits.iter().enumerate() {
        // Half the edits land in the header, where the parser is.
        let span = if i % 2 == 0 { header_end } else { out.len() };
        let pos = ((at * span as f64) as usize).min(span - 1);
        out[pos] ^= mask.max(1);
    }
    if let Some(n) = len {
        out[..8].copy_from_slice(&n.to_le_bytes());
    }
    if let Some(c) = cut {
        out.truncate((c * out.len() as f64) as usize);
    }
    out
}

/// Writes `bytes` as `file` of a copy of the reference checkpoint in `dir`; with `rehash`, the
/// manifest is made to match, so the parser behind the checksum is what is tested.
fn mutated_copy(dir: &Path, file: &str, bytes: &[u8], rehash: bool) {
    copy_dir(reference_checkpoint(), dir);
    std::fs::write(dir.join(file), bytes).unwrap();
    if rehash {
        let m = Manifest::of_dir(dir, &[]).unwrap();
        std::fs::write(dir.join(manifest::FILE), m.to_bytes()).unwrap();
    }
}

fn edits() -> impl Strategy<Value = Vec<(f64, u8)>> {
    proptest::collection::vec((0.0f64..1.0, any::<u8>()), 1..8)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_manifests_are_named_errors(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let err = Manifest::parse(Path::new("ckpt_000001"), &bytes).unwrap_err().to_string();
        prop_assert!(err.starts_with("checkpoint ckpt_000001: manifest.json is invalid"), "{}", err);
    }

    #[test]
    fn mutated_manifests_never_panic(edits in edits(), cut in proptest::option::of(0.0f64..1.0)) {
        let dir = reference_checkpoint();
        let bytes = std::fs::read(dir.join(manifest::FILE)).unwrap();
        let mut out = bytes.clone();
        for (at, mask) in edits {
            let pos = ((at * out.len() as f64) as usize).min(out.len() - 1);
            out[pos] ^= mask.max(1);
        }
        if let Some(c) = cut {
            out.truncate((c * out.len() as f64) as usize);
        }
        if let Err(e) = Manifest::parse(dir, &out) {
            prop_assert!(e.to_string().contains("manifest.json is invalid"), "{}", e);
        }
    }

    #[test]
    fn mutated_weights_are_named_errors(
        edits in edits(),
        cut in proptest::option::of(0.0f64..1.0),
        len in proptest::option::of(any::<u64>()),
        rehash in any::<bool>(),
    ) {
        let file = "model.safetensors";
        let good = std::fs::read(reference_checkpoint().join(file)).unwrap();
        let bad = mutate(&good, &edits, cut, len);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        mutated_copy(&dir, file, &bad, rehash);
        let be = CpuBackend;
        let loaded = checkpoint::load_model(&be, &dir, None);
        let header = checkpoint::refuse_reward_model(&dir, "sft");
        if bad == good {
            prop_assert!(loaded.is_ok());
        } else if !rehash {
            let e = loaded.err().unwrap().to_string();
            prop_assert!(e.contains(&format!("{file} is corrupt")), "{}", e);
        } else if let Err(e) = loaded {
            // The checksum matches: the safetensors parser itself names the file.
            let e = e.to_string();
            prop_assert!(e.contains(&format!("{}", dir.join(file).display())), "{}", e);
        }
        if let Err(e) = header {
            let e = e.to_string();
            prop_assert!(e.contains(file), "{}", e);
        }
    }

    #[test]
    fn mutated_optimizer_state_is_a_named_error(
        edits in edits(),
        cut in proptest::option::of(0.0f64..1.0),
        len in proptest::option::of(any::<u64>()),
        rehash in any::<bool>(),
    ) {
        let file = "optimizer.safetensors";
        let good = std::fs::read(reference_checkpoint().join(file)).unwrap();
        let bad = mutate(&good, &edits, cut, len);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        mutated_copy(&dir, file, &bad, rehash);
        let be = CpuBackend;
        let mut model = checkpoint::load_model(&be, reference_checkpoint(), None).unwrap();
        let loaded = checkpoint::load_training(&be, &dir, &mut model, "pretrain");
        if bad == good {
            prop_assert!(loaded.is_ok());
        } else if !rehash {
            let e = loaded.err().unwrap().to_string();
            prop_assert!(e.contains(&format!("{file} is corrupt")), "{}", e);
        } else if let Err(e) = loaded {
            let e = e.to_string();
            prop_assert!(e.contains(&format!("{}", dir.join(file).display())), "{}", e);
        }
    }
}
