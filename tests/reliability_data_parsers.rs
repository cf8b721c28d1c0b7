//! No data parser panics: random and mutated bytes fed to shard headers (both magics), SFT
//! and preference `.idx`/`.bin` files, JSONL lines (text, SFT, preferences), `tokenizer.json`
//! and `dataset.json` each give a named error (proptest). The command-line cases are in
//! `reliability_data.rs`.

mod common;

use std::path::Path;

use proptest::prelude::*;
use topcoat::data::chat::parse_line;
use topcoat::data::prefs::parse_pref_line;
use topcoat::data::{prepare, write_shard, Manifest, PairSplit, SftSplit, Shard, Tokenizer};

/// One valid line of each JSONL kind, the seeds of the mutations.
const CHAT: &str = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A cat is small."}]}"#;
const PAIR: &str = r#"{"prompt": "hi", "chosen": "A cat is small.", "rejected": "A dog."}"#;

/// A mutation of `base`: a few bytes overwritten, then cut or extended.
fn mutated(base: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let n = base.len().max(1);
    (
        prop::collection::vec((0..n, any::<u8>()), 0..8),
        0..n + 16,
        prop::collection::vec(any::<u8>(), 0..16),
    )
        .prop_map(move |(flips, cut, tail)| {
            let mut b = base.clone();
            for (i, v) in flips {
                if i < b.len() {
                    b[i] = v;
                }
            }
            b.truncate(cut);
            b.extend(tail);
            b
        })
}

/// A valid shard of a few tokens (u16 or u32), as bytes.
fn valid_shard(wide: bool) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.bin");
    let vocab = if wide { 70_000 } else { 300 };
    write_shard(&path, &[1, 2, 3, 4, 5, 6], vocab).unwrap();
    std::fs::read(path).unwrap()
}

/// A valid prepared directory of `kind` (`sft` or `prefs`), its files as (name, bytes); made
/// once per kind.
fn valid_prepared(kind: &str) -> Vec<(String, Vec<u8>)> {
    static SFT: std::sync::OnceLock<Vec<(String, Vec<u8>)>> = std::sync::OnceLock::new();
    static PREFS: std::sync::OnceLock<Vec<(String, Vec<u8>)>> = std::sync::OnceLock::new();
    let cell = if kind == "sft" { &SFT } else { &PREFS };
    cell.get_or_init(|| make_prepared(kind)).clone()
}

fn make_prepared(kind: &str) -> Vec<(String, Vec<u8>)> {
    let dir = tempfile::tempdir().unwrap();
    let tok =
        Tokenizer::train_bpe(["hello there, a cat is small"].into_iter(), 270, |_, _| {}).unwrap();
    let input = dir.path().join("in.jsonl");
    let out = dir.path().join("out");
    if kind == "sft" {
        std::fs::write(&input, format!("{CHAT}\n{CHAT}\n")).unwrap();
        topcoat::data::prepare_sft(
            &input,
            &tok,
            &topcoat::data::SftPrepareOptions {
                val_fraction: 0.0,
                ..topcoat::data::SftPrepareOptions::new(&out)
            },
        )
        .unwrap();
    } else {
        std::fs::write(&input, format!("{PAIR}\n{PAIR}\n")).unwrap();
        topcoat::data::prepare_prefs(
            &input,
            &tok,
            &topcoat::data::PrefsPrepareOptions {
                val_fraction: 0.0,
                ..topcoat::data::PrefsPrepareOptions::new(&out)
            },
        )
        .unwrap();
    }
    std::fs::read_dir(&out)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            (n, std::fs::read(&p).unwrap())
        })
        .collect()
}

fn with_file<T>(name: &str, bytes: &[u8], f: impl FnOnce(&Path) -> T) -> T {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    f(&path)
}

/// Opens the sidecar split of `kind` after replacing its `.idx` (or `.bin`) with `bytes`;
/// returns the error text, or "" when it opened.
fn open_split(kind: &str, files: &[(String, Vec<u8>)], which: &str, bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    for (n, b) in files {
        std::fs::write(dir.path().join(n), b).unwrap();
    }
    let name = format!("{kind}_train");
    std::fs::write(dir.path().join(format!("{name}.{which}")), bytes).unwrap();
    let r = if kind == "sft" {
        SftSplit::open(dir.path(), &name, 270).map(|_| ())
    } else {
        PairSplit::open(dir.path(), &name, 270).map(|_| ())
    };
    r.err().map(|e| e.to_string()).unwrap_or_default()
}

fn file_of(files: &[(String, Vec<u8>)], name: &str) -> Vec<u8> {
    files.iter().find(|(n, _)| n == name).unwrap().1.clone()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn shard_headers_never_panic(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..2100),
            mutated(valid_shard(false)),
            mutated(valid_shard(true)),
        ]
    ) {
        with_file("s.bin", &bytes, |p| match Shard::open(p) {
            Ok(s) => {
                let _ = s.validate_vocab(300);
                prop_assert_eq!(bytes.len(), 1024 + s.len() * s.width());
                Ok(())
            }
            Err(e) => {
                prop_assert!(e.to_string().contains("s.bin"), "{}", e);
                Ok(())
            }
        })?;
    }

    #[test]
    fn sidecars_never_panic(
        sft_idx in mutated(file_of(&valid_prepared("sft"), "sft_train.idx")),
        prefs_idx in mutated(file_of(&valid_prepared("prefs"), "prefs_train.idx")),
        prefs_bin in mutated(file_of(&valid_prepared("prefs"), "prefs_train.bin")),
        random in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let sft = valid_prepared("sft");
        let prefs = valid_prepared("prefs");
        for (kind, files, which, bytes) in [
            ("sft", &sft, "idx", &sft_idx),
            ("sft", &sft, "idx", &random),
            ("prefs", &prefs, "idx", &prefs_idx),
            ("prefs", &prefs, "idx", &random),
            ("prefs", &prefs, "bin", &prefs_bin),
        ] {
            let e = open_split(kind, files, which, bytes);
            prop_assert!(e.is_empty() || e.contains(&format!("{kind}_train")), "{}", e);
        }
    }

    #[test]
    fn jsonl_lines_never_panic(
        line in prop_oneof![
            ".*",
            mutated(CHAT.as_bytes().to_vec()).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            mutated(PAIR.as_bytes().to_vec()).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        ],
        raw in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let p = Path::new("x.jsonl");
        if let Err(e) = parse_line(p, 3, &line) {
            prop_assert!(e.to_string().starts_with("x.jsonl: line 3: "), "{}", e);
        }
        if let Err(e) = parse_pref_line(p, 3, &line) {
            prop_assert!(e.to_string().starts_with("x.jsonl: line 3: "), "{}", e);
        }
        // Whole files of raw bytes through the text reader and the chat readers.
        for bytes in [raw.clone(), line.clone().into_bytes()] {
            with_file("t.jsonl", &bytes, |path| {
                for r in [
                    prepare::read_documents(&[path]).map(|_| ()),
                    topcoat::data::chat::read_conversations(path).map(|_| ()),
                    topcoat::data::prefs::read_preferences(path).map(|_| ()),
                ] {
                    if let Err(e) = r {
                        prop_assert!(e.to_string().contains("t.jsonl"), "{}", e);
                    }
                }
                Ok(())
            })?;
        }
    }

    #[test]
    fn tokenizer_and_manifest_files_never_panic(
        tok in mutated({
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("tokenizer.json");
            Tokenizer::train_bpe(["a cat is small, a dog is loyal"].into_iter(), 270, |_, _| {})
                .unwrap()
                .save(&p)
                .unwrap();
            std::fs::read(p).unwrap()
        }),
        manifest in mutated(
            br#"{"format":"topcoat-dataset","version":1,"kind":"sft","tokenizer":"tokenizer.json","files":[{"name":"sft_train.bin","bytes":1036}]}"#.to_vec()
        ),
        random in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        for bytes in [&tok, &random] {
            with_file("tokenizer.json", bytes, |p| {
                if let Err(e) = Tokenizer::load(p) {
                    prop_assert!(e.to_string().contains("tokenizer.json"), "{}", e);
                }
                Ok(())
            })?;
        }
        for bytes in [&manifest, &random] {
            with_file("dataset.json", bytes, |p| {
                if let Err(e) = Manifest::read(p.parent().unwrap()) {
                    prop_assert!(e.to_string().contains("dataset.json"), "{}", e);
                }
                Ok(())
            })?;
        }
    }
}
