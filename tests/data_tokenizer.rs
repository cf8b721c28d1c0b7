//! Tokenizers: GPT-2 ids, BPE training round trips, save/load, special tokens.

use topcoat::data::{Tokenizer, TokenizerKind, SPECIAL_TOKENS};

const SAMPLE: &str = "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs.\n\
    Numbers like 12345 and 2024 appear, as do symbols: <>!? and 'quotes' that don't stop.\n";
const UNICODE: &str = "Grüße aus Köln! 日本語のテキスト, émoji 🦀🚀 and ελληνικά.\n";

fn corpus() -> String {
    let mut s = String::new();
    for i in 0..50 {
        s.push_str(SAMPLE);
        s.push_str(UNICODE);
        s.push_str(&format!("line {i} with the number {} in it\n", i * 37));
    }
    s
}

#[test]
fn gpt2_ids_match_openai() {
    let tok = Tokenizer::gpt2();
    assert_eq!(tok.encode("Hello world"), vec![15496, 995]);
    assert_eq!(tok.eot(), 50256);
    assert_eq!(tok.vocab_size(), 50261);
    assert_eq!(tok.special("<|user|>"), Some(50258));
    assert_eq!(tok.special("<|end|>"), Some(50260));
    assert_eq!(tok.special("<|nope|>"), None);
    // Special strings in ordinary text stay text.
    let ids = tok.encode("a<|endoftext|>b");
    assert!(!ids.contains(&50256));
    assert_eq!(tok.decode(&ids), "a<|endoftext|>b");
    assert_eq!(
        tok.decode(&[15496, 50256, 50259, 995]),
        "Hello<|endoftext|><|assistant|> world"
    );
    assert_eq!(tok.decode(&tok.encode(UNICODE)), UNICODE);
}

#[test]
fn bpe_round_trips_and_compresses() {
    let text = corpus();
    let tok = Tokenizer::train_bpe(std::iter::once(text.as_str()), 400, |_, _| {}).unwrap();
    assert_eq!(tok.kind(), TokenizerKind::Bpe);
    assert_eq!(tok.vocab_size(), 400);
    for s in [SAMPLE, UNICODE, "unseen words: zyxwv qqq 9876 ¿qué?", ""] {
        assert_eq!(tok.decode(&tok.encode(s)), s);
    }
    let ids = tok.encode(SAMPLE);
    assert!(
        ids.len() * 2 < SAMPLE.len(),
        "{} ids for {} bytes",
        ids.len(),
        SAMPLE.len()
    );
    assert!(ids
        .iter()
        .all(|&i| (i as usize) < tok.vocab_size() - SPECIAL_TOKENS.len()));
}

#[test]
fn bpe_specials_are_last_distinct_and_in_range() {
    let text = corpus();
    let tok = Tokenizer::train_bpe(std::iter::once(text.as_str()), 300, |_, _| {}).unwrap();
    let ids: Vec<u32> = SPECIAL_TOKENS
        .iter()
        .map(|s| tok.special(s).unwrap())
        .collect();
    assert_eq!(ids, vec![295, 296, 297, 298, 299]);
    assert_eq!(tok.eot(), 295);
    let gpt2 = Tokenizer::gpt2();
    for t in [&tok, &gpt2] {
        let ids: Vec<u32> = SPECIAL_TOKENS
            .iter()
            .map(|s| t.special(s).unwrap())
            .collect();
        let set: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(set.len(), 5);
        assert!(ids.iter().all(|&i| (i as usize) < t.vocab_size()));
    }
    assert!(!tok
        .encode("<|user|>")
        .contains(&tok.special("<|user|>").unwrap()));
}

#[test]
fn save_load_gives_identical_encodings() {
    let dir = tempfile::tempdir().unwrap();
    let text = corpus();
    let tok = Tokenizer::train_bpe(std::iter::once(text.as_str()), 350, |_, _| {}).unwrap();
    let p = dir.path().join("tokenizer.json");
    tok.save(&p).unwrap();
    let back = Tokenizer::load(&p).unwrap();
    assert_eq!(back.vocab_size(), tok.vocab_size());
    assert_eq!(back.encode(&text), tok.encode(&text));
    let g = dir.path().join("gpt2.json");
    Tokenizer::gpt2().save(&g).unwrap();
    let g = Tokenizer::load(&g).unwrap();
    assert_eq!(g.kind(), TokenizerKind::Gpt2);
    assert_eq!(g.encode("Hello world"), vec![15496, 995]);
}

#[test]
fn load_rejects_inconsistent_file_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad_tok.json");
    std::fs::write(
        &p,
        r#"{"format":"topcoat-tokenizer","version":1,"kind":"bpe","vocab_size":999,
            "special_tokens":[],"merges":[[1,2]]}"#,
    )
    .unwrap();
    let msg = Tokenizer::load(&p).unwrap_err().to_string();
    assert!(msg.contains("bad_tok.json"), "{msg}");
    assert!(msg.contains("vocab_size is 999"), "{msg}");
}

/// BPE training speed on a real text file: `TOPCOAT_BPE_BENCH=path cargo test --test
/// data_tokenizer -- --ignored --nocapture bpe_training_speed` (test profile = opt-level 3).
#[test]
#[ignore]
fn bpe_training_speed() {
    let path = std::env::var("TOPCOAT_BPE_BENCH").expect("set TOPCOAT_BPE_BENCH to a text file");
    let text = std::fs::read_to_string(&path).unwrap();
    let t0 = std::time::Instant::now();
    let tok = Tokenizer::train_bpe(std::iter::once(text.as_str()), 4096, |_, _| {}).unwrap();
    let train_s = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let ids = tok.encode(&text);
    let enc_s = t1.elapsed().as_secs_f64();
    assert_eq!(tok.decode(&ids), text);
    println!(
        "{:.1} MB -> vocab {} in {train_s:.2} s; encode {:.1} MB/s, {:.2} bytes/token",
        text.len() as f64 / 1e6,
        tok.vocab_size(),
        text.len() as f64 / 1e6 / enc_s,
        text.len() as f64 / ids.len() as f64
    );
}
