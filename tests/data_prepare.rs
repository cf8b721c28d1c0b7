//! `prepare`: text and JSONL inputs -> train/val shards, and its errors.

use std::path::Path;

use topcoat::data::{prepare, PrepareOptions, Shard, Tokenizer};

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn read_all(files: &[std::path::PathBuf]) -> Vec<u32> {
    files
        .iter()
        .flat_map(|f| Shard::open(f).unwrap().to_vec())
        .collect()
}

#[test]
fn text_directory_to_shards_reproduces_documents() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir_all(input.join("sub")).unwrap();
    let mut docs = Vec::new();
    for i in 0..12 {
        let text = format!(
            "Document number {i}.\nIt says hello, wörld, {} times.\n",
            i * 3
        );
        let name = if i % 2 == 0 {
            format!("{i:02}.txt")
        } else {
            format!("sub/{i:02}.md")
        };
        std::fs::write(input.join(&name), &text).unwrap();
        docs.push((name, text));
    }
    std::fs::write(input.join("ignored.bin"), "not text").unwrap();
    // Processing order is sorted path order: top-level files, then sub/.
    docs.sort_by_key(|d| input.join(&d.0));

    let tok = Tokenizer::gpt2();
    let out = dir.path().join("out");
    let mut opts = PrepareOptions::new(&out);
    opts.val_fraction = 0.25;
    opts.shard_tokens = 40;
    let events = std::cell::RefCell::new(0usize);
    let s = prepare(&[&input], &tok, &opts, &|_| *events.borrow_mut() += 1).unwrap();
    assert!(*events.borrow() > 0);
    assert_eq!(s.docs_train + s.docs_val, 12);
    assert_eq!(s.docs_val, 3);
    assert!(s.tokens_val > 0 && !s.val_files.is_empty());
    assert!(s.train_files.len() > 1, "small shard_tokens rolls over");
    // The shards, the tokenizer and the manifest; nothing else (no staging left inside).
    assert!(names(&out).iter().all(|n| n.starts_with("train_")
        || n.starts_with("val_")
        || n == "tokenizer.json"
        || n == "dataset.json"));

    let (train, val) = (read_all(&s.train_files), read_all(&s.val_files));
    assert_eq!(train.len() as u64, s.tokens_train);
    assert_eq!(val.len() as u64, s.tokens_val);
    let split = |ids: &[u32]| -> Vec<String> {
        ids.split(|&t| t == tok.eot())
            .filter(|d| !d.is_empty())
            .map(|d| tok.decode(d))
            .collect()
    };
    let (tdocs, vdocs) = (split(&train), split(&val));
    assert_eq!(*train.last().unwrap(), tok.eot());
    // Documents 3, 7, 11 (every 4th) are validation, the rest train, in order.
    let want_val: Vec<String> = [3, 7, 11].iter().map(|&i| docs[i].1.clone()).collect();
    let want_train: Vec<String> = (0..12)
        .filter(|i| i % 4 != 3)
        .map(|i| docs[i].1.clone())
        .collect();
    assert_eq!(vdocs, want_val);
    assert_eq!(tdocs, want_train);
}

#[test]
fn jsonl_documents_and_minimum_one_val_doc() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("docs.jsonl");
    std::fs::write(
        &f,
        "{\"text\": \"first doc\"}\n\n{\"text\": \"second doc\"}\n",
    )
    .unwrap();
    let tok = Tokenizer::gpt2();
    let out = dir.path().join("out");
    let s = prepare(&[&f], &tok, &PrepareOptions::new(&out), &|_| {}).unwrap();
    assert_eq!((s.docs_train, s.docs_val), (1, 1));
    assert_eq!(
        tok.decode(&read_all(&s.val_files)),
        "second doc<|endoftext|>"
    );
    assert_eq!(
        tok.decode(&read_all(&s.train_files)),
        "first doc<|endoftext|>"
    );
}

#[test]
fn malformed_jsonl_names_file_and_line_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("a_good.txt");
    std::fs::write(&good, "a fine document").unwrap();
    let f = dir.path().join("b_broken.jsonl");
    std::fs::write(
        &f,
        "{\"text\": \"ok\"}\n{\"text\": \"ok too\"}\n{\"text\": oops}\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let tok = Tokenizer::gpt2();
    let msg = prepare(&[&good, &f], &tok, &PrepareOptions::new(&out), &|_| {})
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("b_broken.jsonl: line 3: invalid JSON"),
        "{msg}"
    );
    assert!(!out.exists(), "no output left");
    assert_eq!(names(dir.path()).len(), 2, "{:?}", names(dir.path()));

    let g = dir.path().join("c_fields.jsonl");
    std::fs::write(&g, "{\"text\": \"ok\"}\n{\"body\": \"x\"}\n").unwrap();
    let msg = prepare(&[&g], &tok, &PrepareOptions::new(&out), &|_| {})
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("c_fields.jsonl: line 2: missing field \"text\""),
        "{msg}"
    );
    std::fs::write(&g, "{\"text\": 5}\n").unwrap();
    let msg = prepare(&[&g], &tok, &PrepareOptions::new(&out), &|_| {})
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("line 1: field \"text\" is a number, expected a string"),
        "{msg}"
    );
    assert!(!out.exists());
}

#[test]
fn empty_input_directory_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("nothing_here");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("data.bin"), "x").unwrap();
    let out = dir.path().join("out");
    let msg = prepare(
        &[&empty],
        &Tokenizer::gpt2(),
        &PrepareOptions::new(&out),
        &|_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("nothing_here"), "{msg}");
    assert!(msg.contains("no input files"), "{msg}");
    assert!(!out.exists() || names(&out).is_empty());
}

#[test]
fn trained_bpe_prepares_and_loads() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    let mut all = String::new();
    for i in 0..5 {
        let t = format!("Some text, file {i}. ").repeat(30);
        std::fs::write(input.join(format!("{i}.txt")), &t).unwrap();
        all.push_str(&t);
    }
    let tok = Tokenizer::train_bpe(std::iter::once(all.as_str()), 300, |_, _| {}).unwrap();
    let out = dir.path().join("out");
    let s = prepare(&[&input], &tok, &PrepareOptions::new(&out), &|_| {}).unwrap();
    assert_eq!(s.docs_val, 1);
    let l = topcoat::data::Loader::sequential(&s.train_files, 2, 8, 0, 1, tok.vocab_size());
    assert!(l.is_ok());
}

#[test]
fn preparing_again_replaces_the_shards_of_an_earlier_larger_run() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let out = dir.path().join("out");
    let tok = Tokenizer::gpt2();
    let line = |i: usize| format!("{{\"text\": \"document {i} with some words in it\"}}\n");
    std::fs::write(&input, (0..40).map(line).collect::<String>()).unwrap();
    let big = PrepareOptions {
        shard_tokens: 20,
        ..PrepareOptions::new(&out)
    };
    let first = prepare(&[&input], &tok, &big, &|_| {}).unwrap();
    assert!(
        first.train_files.len() > 3,
        "the first run should need several shards"
    );

    std::fs::write(&input, (0..4).map(line).collect::<String>()).unwrap();
    let second = prepare(&[&input], &tok, &PrepareOptions::new(&out), &|_| {}).unwrap();
    assert_eq!(second.train_files.len(), 1);
    let bins: Vec<String> = names(&out)
        .into_iter()
        .filter(|n| n.ends_with(".bin"))
        .collect();
    assert_eq!(
        bins,
        vec!["train_000000.bin", "val_000000.bin"],
        "stale shards were left behind"
    );
}
