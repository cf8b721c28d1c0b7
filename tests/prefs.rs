//! Preference data: `prepare prefs` reports bad lines by file, line and field, drops and counts
//! pairs that do not fit, writes a pair shard that reads back exactly as rendered, and the pair
//! loader lays batches out as documented and resumes where it stood.

use std::path::Path;
use std::process::Command;
use topcoat::commands::prepare::EMBEDDED_CORPUS;
use topcoat::data::chat::{render, Message, Role};
use topcoat::data::prefs::{parse_pref_line, render_pair};
use topcoat::data::{
    fill_pair_batch, prepare_prefs, DataError, PairLoader, PairSplit, PrefsPrepareOptions,
    Tokenizer,
};

fn small_tokenizer() -> Tokenizer {
    let text = String::from_utf8_lossy(&EMBEDDED_CORPUS[..20_000]).into_owned();
    Tokenizer::train_bpe([text.as_str()].into_iter(), 300, |_, _| {}).unwrap()
}

fn pair_line(prompt: &str, chosen: &str, rejected: &str) -> String {
    serde_json::json!({"prompt": prompt, "chosen": chosen, "rejected": rejected}).to_string()
}

/// `n` distinct pairs of varied lengths, one line each.
fn pairs_jsonl(n: usize) -> String {
    (0..n)
        .map(|i| {
            pair_line(
                &format!(
                    "Question {i}: is a cat {} an animal?",
                    "very ".repeat(i % 4)
                ),
                &format!("Yes, a cat is an animal ({i})."),
                &format!("No{}.", "!".repeat(i % 3)),
            ) + "\n"
        })
        .collect()
}

#[test]
fn bad_lines_name_file_line_and_field() {
    let tok = small_tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let good = pair_line("hi", "hello", "go away");
    let cases = [
        (
            r#"{"prompt": "hi", "chosen": "hello"}"#,
            "missing field \"rejected\"",
        ),
        (
            r#"{"prompt": [{"role": "bot", "content": "x"}], "chosen": "a", "rejected": "b"}"#,
            "field \"prompt\": message 0: unknown role \"bot\"",
        ),
        (
            r#"{"prompt": "hi", "chosen": "  ", "rejected": "b"}"#,
            "field \"chosen\": empty assistant reply",
        ),
        (
            r#"{"prompt": "hi", "chosen": "a", "rejected": [{"role": "assistant", "content": ""}]}"#,
            "field \"rejected\": message 0: empty assistant content",
        ),
        (
            r#"{"prompt": "hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}"#,
            "field \"chosen\": the last message must be the assistant's",
        ),
        (
            r#"{"prompt": "hi", "chosen": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "rejected": "b"}"#,
            "a system message may only open the conversation",
        ),
        (
            r#"{"prompt": 3, "chosen": "a", "rejected": "b"}"#,
            "field \"prompt\": expected a string",
        ),
        (r#"["hi", "a", "b"]"#, "expected an object"),
        ("{oops", "invalid JSON"),
    ];
    for (bad, want) in cases {
        let path = dir.path().join("prefs.jsonl");
        std::fs::write(&path, format!("{good}\n\n{good}\n{bad}\n{good}\n")).unwrap();
        let e = prepare_prefs(&path, &tok, &PrefsPrepareOptions::new(dir.path().join("o")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("prefs.jsonl: line 4: "), "{e}");
        assert!(e.contains(want), "{e} should mention {want}");
    }
    // A system message opening an empty prompt's response is allowed.
    let ok = parse_pref_line(
        Path::new("p"),
        1,
        r#"{"prompt": [], "chosen": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}"#,
    )
    .unwrap();
    assert_eq!(ok.chosen.len(), 3);
}

#[test]
fn long_and_identical_pairs_are_dropped_and_counted() {
    let tok = small_tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let max_len = 100;
    let long_prompt = "a cat is a small animal ".repeat(20);
    let long_reply = "a dog is a loyal animal ".repeat(20);
    let mut text = pairs_jsonl(6);
    text += &(pair_line(&long_prompt, "yes", "no") + "\n"); // prompt alone exceeds the context
    text += &(pair_line("q", "yes", &long_reply) + "\n"); // one side too long
    text += &(pair_line("q", "same", "same") + "\n");
    let path = dir.path().join("prefs.jsonl");
    std::fs::write(&path, text).unwrap();
    let opts = PrefsPrepareOptions {
        max_len,
        val_fraction: 0.0,
        ..PrefsPrepareOptions::new(dir.path().join("out"))
    };
    let s = prepare_prefs(&path, &tok, &opts).unwrap();
    assert_eq!((s.pairs, s.too_long, s.identical), (9, 2, 1));
    assert_eq!((s.train_pairs, s.val_pairs), (6, 0));
    assert!(s.longest > max_len);
    let split = PairSplit::open(&opts.out, "prefs_train", tok.vocab_size()).unwrap();
    assert_eq!(split.len(), 6);
    for i in 0..split.len() {
        assert!(split.fits(i, max_len));
    }
    assert!(!opts.out.join("prefs_val.bin").exists());

    // Nothing left: an error that says why.
    std::fs::write(&path, pair_line(&long_prompt, "yes", "no") + "\n").unwrap();
    let e = prepare_prefs(&path, &tok, &opts).unwrap_err().to_string();
    assert!(
        e.contains("no pair left") && e.contains("longer than max_len 100"),
        "{e}"
    );
}

#[test]
fn pair_shard_round_trips_and_rejects_damage() {
    let tok = small_tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prefs.jsonl");
    let mut text = pairs_jsonl(20);
    // A multi-turn pair with message lists.
    text += r#"{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a pet."}], "chosen": [{"role": "assistant", "content": "A cat."}], "rejected": [{"role": "assistant", "content": "Rock."}, {"role": "user", "content": "Really?"}, {"role": "assistant", "content": "Yes."}]}"#;
    text += "\n";
    std::fs::write(&path, &text).unwrap();
    let opts = PrefsPrepareOptions {
        max_len: 128,
        val_fraction: 0.2,
        ..PrefsPrepareOptions::new(dir.path().join("out"))
    };
    let s = prepare_prefs(&path, &tok, &opts).unwrap();
    assert_eq!((s.train_pairs, s.val_pairs), (17, 4));

    // Every stored pair equals the rendering of its line, in file order within each split.
    let lines: Vec<_> = text
        .lines()
        .enumerate()
        .map(|(i, l)| render_pair(&tok, &parse_pref_line(&path, i + 1, l).unwrap()).unwrap())
        .collect();
    let train = PairSplit::open(&opts.out, "prefs_train", tok.vocab_size()).unwrap();
    let val = PairSplit::open(&opts.out, "prefs_val", tok.vocab_size()).unwrap();
    let stored: Vec<_> = (0..train.len())
        .map(|i| (&train, i))
        .chain((0..val.len()).map(|i| (&val, i)))
        .collect();
    let mut matched = vec![false; lines.len()];
    let mut last_line = [None::<usize>; 2];
    for (split, i) in stored {
        let (c, r) = (split.chosen(i), split.rejected(i));
        let k = lines
            .iter()
            .position(|p| p.chosen.ids == c.ids && p.rejected.ids == r.ids)
            .expect("stored pair matches a line");
        let want = &lines[k];
        assert_eq!(c.response_start, want.chosen.response_start);
        assert_eq!(r.response_start, want.rejected.response_start);
        assert_eq!(c.mask, want.chosen.mask.as_slice());
        assert_eq!(r.mask, want.rejected.mask.as_slice());
        let which = usize::from(std::ptr::eq(split, &val));
        assert!(last_line[which] < Some(k), "file order kept");
        last_line[which] = Some(k);
        matched[k] = true;
    }
    assert!(matched.iter().all(|&m| m), "every line stored once");

    // The multi-turn pair: system + user prompt, then the response's own turns.
    let multi = &lines[20].rejected;
    let prompt = render(
        &tok,
        &[
            Message::new(Role::System, "Be brief."),
            Message::new(Role::User, "Name a pet."),
        ],
    )
    .unwrap();
    assert_eq!(multi.response_start, prompt.ids.len());
    assert_eq!(multi.ids[..multi.response_start], prompt.ids[..]);

    // Damage: a truncated sidecar, a wrong magic, a token count that disagrees.
    let idx = opts.out.join("prefs_train.idx");
    let good = std::fs::read(&idx).unwrap();
    let expect_err = |bytes: &[u8], want: &str| {
        std::fs::write(&idx, bytes).unwrap();
        let e = PairSplit::open(&opts.out, "prefs_train", tok.vocab_size())
            .unwrap_err()
            .to_string();
        assert!(e.contains("prefs_train.idx") && e.contains(want), "{e}");
    };
    expect_err(&good[..good.len() - 1], "expected");
    let mut bad = good.clone();
    bad[0] ^= 1;
    expect_err(&bad, "magic");
    let mut bad = good.clone();
    bad[16] ^= 1;
    expect_err(&bad, "tokens but its shard holds");
    std::fs::write(&idx, &good).unwrap();
    // An SFT sidecar is not a pair sidecar.
    let e = PairSplit::open(&opts.out, "prefs_missing", tok.vocab_size()).unwrap_err();
    assert!(matches!(e, DataError::Io { .. }), "{e}");
}

#[test]
fn loader_lays_out_pairs_and_resumes() {
    let tok = small_tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("prefs.jsonl");
    std::fs::write(&path, pairs_jsonl(9)).unwrap();
    let opts = PrefsPrepareOptions {
        val_fraction: 0.0,
        ..PrefsPrepareOptions::new(dir.path().join("out"))
    };
    prepare_prefs(&path, &tok, &opts).unwrap();
    let split = PairSplit::open(&opts.out, "prefs_train", tok.vocab_size()).unwrap();
    let longest = (0..split.len())
        .map(|i| split.chosen(i).ids.len().max(split.rejected(i).ids.len()))
        .max()
        .unwrap();
    let t = longest + 3;
    let pad = tok.eot();

    // Layout: row 2i chosen, 2i+1 rejected; ids then padding; targets on the response mask only.
    let b = fill_pair_batch(&split, &[4, 1], 3, t, pad);
    assert_eq!((b.rows(), b.pairs, b.inputs.len()), (6, 2, 6 * t));
    for (row, seq) in [
        (0, split.chosen(4)),
        (1, split.rejected(4)),
        (2, split.chosen(1)),
        (3, split.rejected(1)),
    ] {
        let n = seq.ids.len();
        let inp = &b.inputs[row * t..(row + 1) * t];
        let tgt = &b.targets[row * t..(row + 1) * t];
        assert!(inp[..n].iter().zip(seq.ids).all(|(&a, &b)| a == b as i32));
        assert!(inp[n..].iter().all(|&x| x == pad as i32));
        assert_eq!((b.last[row], b.lens[row]), (n - 1, n));
        assert_eq!(b.response_start[row], seq.response_start);
        for (j, &got) in tgt.iter().enumerate() {
            let want = if j + 1 < n && seq.mask[j + 1] {
                seq.ids[j + 1] as i32
            } else {
                -1
            };
            assert_eq!(got, want, "row {row} target {j}");
            if want >= 0 {
                assert!(j + 1 > seq.response_start);
            }
        }
        assert!(tgt.iter().any(|&x| x >= 0));
    }
    assert!(b.inputs[4 * t..].iter().all(|&x| x == pad as i32));
    assert!(b.targets[4 * t..].iter().all(|&x| x == -1));
    assert_eq!(b.tokens(), b.lens[..4].iter().sum::<usize>());

    // Fit rule: with T below the longest side, those pairs are skipped and counted.
    let short = PairLoader::new(split.clone(), 2, longest - 1, pad, 7).unwrap();
    let skipped = (0..split.len())
        .filter(|&i| !split.fits(i, longest - 1))
        .count();
    assert!(skipped > 0);
    assert_eq!((short.too_long, short.num_pairs()), (skipped, 9 - skipped));
    let e = PairLoader::new(split.clone(), 2, 3, pad, 7).err().unwrap();
    assert!(e.to_string().contains("fits in T = 3"), "{e}");

    // An epoch visits every pair once; a loader restored at a position continues identically.
    let mut a = PairLoader::new(split.clone(), 3, t, pad, 7).unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let batch = a.next_batch();
        assert_eq!(batch.pairs, 3);
        for i in 0..3 {
            let row = &batch.inputs[2 * i * t..(2 * i + 1) * t];
            let k = (0..9)
                .find(|&k| {
                    let ids = split.chosen(k).ids;
                    row[..ids.len()]
                        .iter()
                        .zip(ids)
                        .all(|(&x, &y)| x == y as i32)
                        && row[ids.len()..].iter().all(|&x| x == pad as i32)
                })
                .unwrap();
            seen.push(k);
        }
    }
    seen.sort();
    assert_eq!(seen, (0..9).collect::<Vec<_>>());
    let _ = a.next_batch();
    let pos = a.position();
    let mut b2 = PairLoader::new(split.clone(), 3, t, pad, 7).unwrap();
    b2.set_position(pos).unwrap();
    for _ in 0..4 {
        assert_eq!(a.next_batch(), b2.next_batch());
    }
    let mut far = pos;
    far.cursor = 9;
    assert!(b2.set_position(far).is_err());
}

#[test]
fn prepare_prefs_command() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = small_tokenizer();
    tok.save(tmp.path().join("tokenizer.json")).unwrap();
    std::fs::write(tmp.path().join("prefs.jsonl"), pairs_jsonl(10)).unwrap();
    let p = |s: &str| tmp.path().join(s).to_string_lossy().into_owned();
    let out = Command::new(env!("CARGO_BIN_EXE_topcoat"))
        .args([
            "prepare",
            "prefs",
            &p("prefs.jsonl"),
            "--out",
            &p("data"),
            "--tokenizer",
            &p("tokenizer.json"),
            "--max-len",
            "64",
        ])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("10 pairs -> 9 train pairs") && text.contains("1 val pairs"),
        "{text}"
    );
    for f in [
        "prefs_train.bin",
        "prefs_train.idx",
        "prefs_val.idx",
        "tokenizer.json",
    ] {
        assert!(tmp.path().join("data").join(f).is_file(), "{f}");
    }
    std::fs::write(
        tmp.path().join("bad.jsonl"),
        "{\"prompt\": \"a\", \"chosen\": \"b\"}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_topcoat"))
        .args([
            "prepare",
            "prefs",
            &p("bad.jsonl"),
            "--out",
            &p("bad"),
            "--tokenizer",
            &p("tokenizer.json"),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && !text.contains("panicked"),
        "{text}"
    );
    assert!(
        text.contains("bad.jsonl: line 1: missing field \"rejected\""),
        "{text}"
    );
}
