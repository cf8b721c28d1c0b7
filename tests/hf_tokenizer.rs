//! Hugging Face tokenizers and chat templates: a tokenizer.json (a byte-level BPE written in
//! hf_common) with its tokenizer_config.json (a ChatML template), the ids, the rendered text,
//! the assistant-only loss mask, the named errors, the round trip through topcoat's own
//! tokenizer.json and `prepare sft --tokenizer HF_DIR`; and against the reference library's
//! fixtures (tests/fixtures/hf): the corpus ids, and Llama 3's and Qwen2.5's templates.

mod common;
mod hf_common;
use common::cli::{fails, ok, s};
use hf_common::*;

use std::path::Path;

use topcoat::data::chat::{render, render_prompt, Message, Role};
use topcoat::data::{SftSplit, Tokenizer, TokenizerKind};

#[test]
fn ids_specials_and_decoding() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = hf_tok(&write_hf_dir(tmp.path(), CHATML));
    assert_eq!(tok.kind(), TokenizerKind::Hf);
    assert_eq!(tok.vocab_size(), 262);
    assert_eq!(tok.eot(), 259, "eos_token <|endoftext|>");
    assert_eq!(
        tok.end_of_turn(),
        261,
        "the template closes a reply with <|im_end|>"
    );
    assert_eq!(tok.special("<|user|>"), None);
    assert!(tok.special_tokens().is_empty());
    // "hello" -> he l l o; " the" -> Ġthe; an added token in the text is recognised.
    assert_eq!(tok.encode("hello the"), vec![256, 108, 108, 111, 258]);
    assert_eq!(tok.encode("a<|im_end|>é"), vec![97, 261, 195, 169]);
    assert_eq!(
        tok.decode(&[256, 108, 108, 111, 258, 261]),
        "hello the<|im_end|>"
    );
    assert_eq!(tok.decode(&[97, 9999, 98]), "a\u{FFFD}b");
    assert_eq!(tok.decode(&[195]), "\u{FFFD}", "half a character");
}

#[test]
fn chat_template_text_ids_and_assistant_mask() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = hf_tok(&write_hf_dir(tmp.path(), CHATML));
    let conv = [
        msg(Role::System, "Be brief."),
        msg(Role::User, "Hi"),
        msg(Role::Assistant, "Hello there"),
        msg(Role::User, ""),
        msg(Role::Assistant, "Ünïcödé ✓ the end"),
    ];
    let text = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
                <|im_start|>assistant\nHello there<|im_end|>\n<|im_start|>user\n<|im_end|>\n\
                <|im_start|>assistant\nÜnïcödé ✓ the end<|im_end|>\n";
    let t = tok.chat_template().unwrap();
    assert_eq!(
        t.render(&conv, false, &tok.template_tokens()).unwrap(),
        text
    );
    let r = render(&tok, &conv).unwrap();
    assert_eq!(r.ids, tok.encode(text));
    assert_eq!(r.ids.len(), r.loss_mask.len());
    // The reply's space tokens are in, although this tokenizer's post-processor (GPT-2's
    // `trim_offsets: true`) would trim their offsets to nothing.
    assert_eq!(
        masked_runs(&tok, &r.ids, &r.loss_mask),
        ["Hello there<|im_end|>\n", "Ünïcödé ✓ the end<|im_end|>\n"]
    );
    // The prompt: the conversation so far and what opens the reply.
    let p = render_prompt(&tok, &conv[..2]).unwrap();
    assert_eq!(
        tok.decode(&p),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    assert_eq!(r.ids[..p.len()], p[..]);
    // No system message: the template adds its default one, and the mask is still the reply.
    let r = render(&tok, &conv[1..3]).unwrap();
    assert!(tok
        .decode(&r.ids)
        .starts_with("<|im_start|>system\nYou are a helpful"));
    assert_eq!(
        masked_runs(&tok, &r.ids, &r.loss_mask),
        ["Hello there<|im_end|>\n"]
    );
}

#[test]
fn a_template_that_rewrites_earlier_turns_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    // Earlier assistant turns are shortened (as templates that drop reasoning do).
    let rewriting = "{% for m in messages %}{% if m.role == 'assistant' and not loop.last %}[{{ m.role }}]{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let dir = write_hf_dir(tmp.path(), rewriting);
    let tok = hf_tok(&dir);
    let conv = [
        msg(Role::User, "a"),
        msg(Role::Assistant, "b"),
        msg(Role::User, "c"),
        msg(Role::Assistant, "d"),
    ];
    let e = render(&tok, &conv).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "{}: chat template: cannot mask assistant message 1",
            dir.join("tokenizer_config.json").display()
        )),
        "{e}"
    );
    // One turn is fine.
    let r = render(&tok, &conv[..2]).unwrap();
    assert_eq!(masked_runs(&tok, &r.ids, &r.loss_mask), ["b<|im_end|>\n"]);
}

#[test]
fn bad_files_are_named_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_hf_dir(tmp.path(), CHATML);
    let (json, config) = (
        dir.join("tokenizer.json"),
        dir.join("tokenizer_config.json"),
    );
    let err = |j: &Path, c: Option<&Path>| Tokenizer::from_hf_files(j, c).unwrap_err().to_string();

    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, "{\"model\": {\"type\": \"BPE\", ").unwrap();
    let e = err(&bad, None);
    assert!(
        e.starts_with(&format!("{}: tokenizer file: invalid JSON", bad.display())),
        "{e}"
    );
    std::fs::write(&bad, r#"{"model": {"type": "NoSuchModel"}}"#).unwrap();
    let e = err(&bad, None);
    assert!(
        e.starts_with(&format!(
            "{}: tokenizer file: not a Hugging Face tokenizer.json",
            bad.display()
        )),
        "{e}"
    );
    // `--tokenizer` and checkpoints read it through `load` too.
    let e = Tokenizer::load(&bad).unwrap_err().to_string();
    assert!(e.contains("not a Hugging Face tokenizer.json"), "{e}");

    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["chat_template"] = "{% for m in messages %}{{ m.content }".into();
    std::fs::write(&config, c.to_string()).unwrap();
    let e = err(&json, Some(&config));
    assert!(
        e.starts_with(&format!(
            "{}: chat template: does not compile",
            config.display()
        )),
        "{e}"
    );
    c["chat_template"] =
        "{{ raise_exception('Only user and assistant roles are supported') }}".into();
    std::fs::write(&config, c.to_string()).unwrap();
    let tok = Tokenizer::from_hf_files(&json, Some(&config)).unwrap();
    let e = render(&tok, &[msg(Role::User, "x"), msg(Role::Assistant, "y")])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!(
            "{}: chat template: failed to render",
            config.display()
        )),
        "{e}"
    );
    assert!(
        e.contains("Only user and assistant roles are supported"),
        "{e}"
    );

    c["chat_template"] = serde_json::json!([{"name": "tool_use", "template": "x"}]);
    std::fs::write(&config, c.to_string()).unwrap();
    let e = err(&json, Some(&config));
    assert!(
        e.contains("a list without a \"default\" template (names: tool_use)"),
        "{e}"
    );
    c["chat_template"] = serde_json::json!([{"name": "tool_use", "template": "x"},
        {"name": "default", "template": CHATML}]);
    c["eos_token"] = "<|nope|>".into();
    std::fs::write(&config, c.to_string()).unwrap();
    let e = err(&json, Some(&config));
    assert!(e.contains("eos_token \"<|nope|>\""), "{e}");
    assert!(e.contains("is not in the vocabulary"), "{e}");
    c["eos_token"] = "<|im_end|>".into();
    std::fs::write(&config, c.to_string()).unwrap();
    let tok = Tokenizer::from_hf_files(&json, Some(&config)).unwrap();
    assert_eq!(
        tok.chat_template().unwrap().source(),
        CHATML,
        "the list's default"
    );
    assert_eq!(tok.eot(), 261);

    // Without a template the conversation cannot be rendered (no topcoat chat tokens either).
    let tok = Tokenizer::from_hf_files(&json, None).unwrap();
    assert_eq!(
        tok.eot(),
        259,
        "no config: <|endoftext|> is found in the vocabulary"
    );
    let e = render(&tok, &[msg(Role::Assistant, "y")])
        .unwrap_err()
        .to_string();
    assert!(e.contains("has no chat template"), "{e}");
}

#[test]
fn round_trip_through_topcoats_tokenizer_json_and_hf_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_hf_dir(&tmp.path().join("model"), CHATML);
    let tok = hf_tok(&dir);
    let conv = [
        msg(Role::User, "hello the"),
        msg(Role::Assistant, "the hello"),
    ];
    let want = render(&tok, &conv).unwrap();

    let saved = tmp.path().join("tokenizer.json");
    tok.save(&saved).unwrap();
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&saved).unwrap()).unwrap();
    assert_eq!(file["format"], "topcoat-tokenizer");
    assert_eq!(file["kind"], "hf");
    assert_eq!(file["vocab_size"], 262);
    assert_eq!(file["hf"], tokenizer_json());
    assert_eq!(file["chat_template"], CHATML);
    assert_eq!(file["eos_token"], "<|endoftext|>");
    let back = Tokenizer::load(&saved).unwrap();
    assert_eq!(back.fingerprint(), tok.fingerprint());
    assert_eq!(back.chat_template().unwrap().source(), CHATML);
    assert_eq!((back.eot(), back.end_of_turn()), (259, 261));
    assert_eq!(render(&back, &conv).unwrap(), want);

    // A raw Hugging Face tokenizer.json loads with the config beside it.
    let raw = Tokenizer::load(dir.join("tokenizer.json")).unwrap();
    assert_eq!(raw.fingerprint(), tok.fingerprint());

    // Written back as Hugging Face files, and read again: the same tokenizer.
    let out = tmp.path().join("export");
    back.write_hf_files(&out).unwrap();
    let again = hf_tok(&out);
    assert_eq!(again.fingerprint(), tok.fingerprint());
    assert_eq!(render(&again, &conv).unwrap(), want);

    // Another template is another tokenizer.
    let other = hf_tok(&write_hf_dir(&tmp.path().join("other"), "{{ messages }}"));
    assert_ne!(other.fingerprint(), tok.fingerprint());
}

#[test]
fn prepare_sft_with_a_hf_model_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = write_hf_dir(&tmp.path().join("model"), CHATML);
    let convs = [
        vec![msg(Role::User, "hello"), msg(Role::Assistant, "the hello")],
        vec![
            msg(Role::System, "Be kind."),
            msg(Role::User, "é?"),
            msg(Role::Assistant, "ok"),
            msg(Role::User, "and the"),
            msg(Role::Assistant, "he"),
        ],
    ];
    let lines: Vec<String> = convs
        .iter()
        .map(|c| {
            let m: Vec<serde_json::Value> = c
                .iter()
                .map(|m| serde_json::json!({"role": m.role.name(), "content": m.content}))
                .collect();
            serde_json::json!({ "messages": m }).to_string()
        })
        .collect();
    let input = tmp.path().join("chats.jsonl");
    std::fs::write(&input, lines.join("\n")).unwrap();
    let out = tmp.path().join("sft");
    let text = ok(&[
        "prepare",
        "sft",
        &s(&input),
        "--out",
        &s(&out),
        "--tokenizer",
        &s(&dir),
        "--val-fraction",
        "0",
    ]);
    assert!(text.contains("2 conversations"), "{text}");
    let tok = hf_tok(&dir);
    let saved = Tokenizer::load(out.join("tokenizer.json")).unwrap();
    assert_eq!(saved.fingerprint(), tok.fingerprint());
    let split = SftSplit::open(&out, "sft_train", tok.vocab_size()).unwrap();
    assert_eq!(split.len(), 2);
    let mut runs = Vec::new();
    for (i, conv) in convs.iter().enumerate() {
        let (ids, mask) = split.example(i);
        let r = render(&tok, conv).unwrap();
        assert_eq!((ids, mask), (&r.ids[..], &r.loss_mask[..]), "example {i}");
        runs.extend(masked_runs(&tok, ids, mask));
    }
    runs.sort();
    assert_eq!(
        runs,
        ["he<|im_end|>\n", "ok<|im_end|>\n", "the hello<|im_end|>\n"]
    );

    // A template that cannot be masked stops `prepare sft` with its name.
    let bad = write_hf_dir(
        &tmp.path().join("bad"),
        "{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}>{% endif %}",
    );
    let t = fails(&[
        "prepare",
        "sft",
        &s(&input),
        "--out",
        &s(&tmp.path().join("sft2")),
        "--tokenizer",
        &s(&bad),
    ]);
    assert!(
        t.contains("tokenizer_config.json: chat template: cannot mask"),
        "{t}"
    );
}

/// Every line of the embedded corpus encodes to the reference tokenizer's ids: the count, the
/// per-line lengths, the SHA-256 of all ids (u32 little-endian) and, in full, the first lines
/// and every line with a non-ASCII character.
#[test]
fn fixture_tokenizer_ids_equal_the_reference_on_the_whole_corpus() {
    use sha2::{Digest, Sha256};
    let want = read_json(&fixtures().join("tokenizer/corpus_ids.json"));
    let tok = Tokenizer::load(fixtures().join("tokenizer/tokenizer.json")).unwrap();
    assert_eq!(tok.kind(), TokenizerKind::Hf);
    assert_eq!(
        tok.vocab_size() as u64,
        want["vocab_size"].as_u64().unwrap()
    );
    for (name, id) in want["special_tokens"].as_object().unwrap() {
        assert_eq!(
            tok.encode(name),
            vec![id.as_u64().unwrap() as u32],
            "{name}"
        );
    }
    assert_eq!(tok.eot(), 413, "no config: <|endoftext|>");
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join(want["corpus"].as_str().unwrap());
    let texts: Vec<String> = std::fs::read_to_string(corpus)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["text"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(texts.len() as u64, want["lines"].as_u64().unwrap());
    let ids: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t)).collect();
    let lengths: Vec<u32> = ids.iter().map(|l| l.len() as u32).collect();
    assert_eq!(lengths, u32s(&want["line_lengths"]));
    let mut hash = Sha256::new();
    let mut count = 0u64;
    for &id in ids.iter().flatten() {
        hash.update(id.to_le_bytes());
        count += 1;
    }
    assert_eq!(count, want["count"].as_u64().unwrap());
    let digest: String = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(digest, want["sha256"].as_str().unwrap());
    for (i, l) in want["first_lines"].as_array().unwrap().iter().enumerate() {
        assert_eq!(l["text"].as_str().unwrap(), texts[i]);
        assert_eq!(ids[i], u32s(&l["ids"]), "line {i}");
    }
    let non_ascii = want["non_ascii_lines"].as_array().unwrap();
    assert!(!non_ascii.is_empty());
    for l in non_ascii {
        let i = l["line"].as_u64().unwrap() as usize;
        assert_eq!(l["text"].as_str().unwrap(), texts[i]);
        assert_eq!(ids[i], u32s(&l["ids"]), "line {i}");
        assert_eq!(tok.decode(&ids[i]), texts[i], "line {i} decodes back");
    }
}

/// Llama 3's and Qwen2.5's templates render every fixture conversation as
/// `apply_chat_template` does (with and without the generation prompt), to the same ids, with
/// exactly the reference's assistant-only mask.
#[test]
fn fixture_chat_templates_equal_apply_chat_template() {
    for (file, eos, end_of_turn) in [("llama.json", 419, 419), ("qwen2.json", 415, 415)] {
        let fx = read_json(&fixtures().join("chat").join(file));
        let dir = fixtures().join(fx["model_dir"].as_str().unwrap());
        let tok = hf_tok(&dir);
        assert_eq!((tok.eot(), tok.end_of_turn()), (eos, end_of_turn), "{file}");
        let template = tok.chat_template().unwrap();
        let convs = fx["conversations"].as_array().unwrap();
        assert!(convs.len() >= 6, "{file}");
        for c in convs {
            let name = format!("{file}: {}", c["name"].as_str().unwrap());
            let messages: Vec<Message> = c["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    msg(
                        Role::parse(m["role"].as_str().unwrap()).unwrap(),
                        m["content"].as_str().unwrap(),
                    )
                })
                .collect();
            let tokens = tok.template_tokens();
            let text = template.render(&messages, false, &tokens).unwrap();
            assert_eq!(text, c["text"].as_str().unwrap(), "{name}");
            let prompt = &messages[..messages.len() - 1];
            let prompt_text = template.render(prompt, true, &tokens).unwrap();
            assert_eq!(prompt_text, c["prompt_text"].as_str().unwrap(), "{name}");
            let r = render(&tok, &messages).unwrap();
            assert_eq!(r.ids, u32s(&c["ids"]), "{name}");
            let mask: Vec<bool> = u32s(&c["mask"]).iter().map(|&m| m == 1).collect();
            assert_eq!(r.loss_mask, mask, "{name}");
            assert_eq!(
                render_prompt(&tok, prompt).unwrap(),
                u32s(&c["prompt_ids"]),
                "{name}"
            );
            let texts: Vec<String> = c["assistant_texts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_string())
                .collect();
            // Every reply whose text is more than its end-of-turn marker is one masked run.
            let runs = masked_runs(&tok, &r.ids, &r.loss_mask);
            assert_eq!(runs.len(), texts.len(), "{name}: {runs:?}");
            for (run, t) in runs.iter().zip(&texts) {
                assert!(
                    t.ends_with(run.as_str()) || run == t,
                    "{name}: {run:?} vs {t:?}"
                );
            }
        }
    }
}

/// topcoat's own tokenizers go out as Hugging Face files (what `export hf` writes) that give
/// the same ids on the corpus and the same conversation ids and mask through the Jinja form of
/// topcoat's template.
#[test]
fn topcoats_own_tokenizers_go_out_as_hf_files_with_the_same_ids() {
    let corpus = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/corpus/corpus.jsonl"),
    )
    .unwrap();
    let mut texts: Vec<String> = corpus
        .lines()
        .take(300)
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    texts.push("naïve café: 地球人 🌍🙂  \n\n\t x's they'll 12345 ---".into());
    let bpe = Tokenizer::train_bpe(texts.iter().map(String::as_str), 600, |_, _| {}).unwrap();
    let conv = [
        msg(Role::System, "Be brief."),
        msg(Role::User, "What is an earthman?"),
        msg(Role::Assistant, "An inhabitant of the earth."),
        msg(Role::User, "Thanks!"),
        msg(Role::Assistant, "You're welcome."),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for tok in [bpe, Tokenizer::gpt2()] {
        let dir = tmp.path().join(tok.kind_name());
        tok.write_hf_files(&dir).unwrap();
        let hf = hf_tok(&dir);
        assert_eq!(hf.vocab_size(), tok.vocab_size());
        assert_eq!((hf.eot(), hf.end_of_turn()), (tok.eot(), tok.end_of_turn()));
        let mut n = 0;
        for t in &texts {
            let ids = tok.encode(t);
            assert_eq!(hf.encode(t), ids, "{}: {t:?}", tok.kind_name());
            assert_eq!(hf.decode(&ids), tok.decode(&ids));
            n += ids.len();
        }
        assert!(n > 10_000, "{n} ids");
        assert_eq!(render(&hf, &conv).unwrap(), render(&tok, &conv).unwrap());
        assert_eq!(
            render_prompt(&hf, &conv[..2]).unwrap(),
            render_prompt(&tok, &conv[..2]).unwrap()
        );
    }
}
