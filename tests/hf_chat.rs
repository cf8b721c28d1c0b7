//! A model's own chat template beyond `prepare sft`: `topcoat chat` on a checkpoint with a
//! Hugging Face tokenizer, and preference pairs rendered with it.

mod common;
mod hf_common;
use common::cli::s;
use hf_common::*;

use std::path::Path;

use topcoat::data::chat::{render, render_prompt, Message, Role};

/// `topcoat chat` on a checkpoint with a Hugging Face tokenizer renders the whole conversation
/// with the model's template each turn (replies kept as text) and stops at the template's end
/// of turn: its replies equal greedy decoding without a cache on those renders.
#[test]
fn chat_renders_with_the_models_template_and_stops_at_its_end_of_turn() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    use topcoat::backend::cpu::CpuBackend;
    use topcoat::config::{pad_vocab, ModelConfig};
    use topcoat::generate::{generate_uncached, SampleOptions, TextStream};
    use topcoat::model::{Gpt, Init, ParamLayout};
    use topcoat::rng::Rng;
    use topcoat::train::checkpoint;

    let be = CpuBackend::new();
    let tmp = tempfile::tempdir().unwrap();
    let tok = hf_tok(&fixtures().join("qwen2"));
    let cfg = ModelConfig {
        vocab_size: tok.vocab_size(),
        padded_vocab_size: pad_vocab(tok.vocab_size()),
        n_layer: 2,
        n_head: 2,
        n_embd: 32,
        max_seq_len: 256,
        family: Default::default(),
        lora: None,
    };
    let mut rng = Rng::new(5);
    let values = ParamLayout::new(&cfg)
        .specs
        .iter()
        .map(|s| {
            (0..s.numel())
                .map(|_| match s.init {
                    Init::Normal(_) | Init::Uniform(_) => 0.2 * rng.normal(),
                    Init::Zeros => 0.1 * rng.normal(),
                    Init::Ones => 1.0 + 0.1 * rng.normal(),
                })
                .collect()
        })
        .collect();
    let mut model = Gpt::from_values(&be, &cfg, values).unwrap();
    let ckpt = tmp.path().join("ckpt");
    checkpoint::save(&be, &ckpt, &model, &tok, None).unwrap();

    let (system, q1, q2, max_new) = ("Be brief.", "What is a cat?", "And a dog?", 6);
    let mut child = Command::new(env!("CARGO_BIN_EXE_topcoat"))
        .args([
            "chat",
            "--checkpoint",
            &s(&ckpt),
            "--device",
            "cpu",
            "--temperature",
            "0",
        ])
        .args(["--system", system, "--max-new-tokens", &max_new.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{q1}\n{q2}\n").as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );

    let end = tok.end_of_turn();
    let mut reply = |messages: &[Message]| {
        let context = render_prompt(&tok, messages).unwrap();
        let opts = SampleOptions {
            max_tokens: max_new,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            ..Default::default()
        };
        let ids = generate_uncached(&be, &mut model, &context, &opts, |_| {}).unwrap();
        let cut = ids
            .iter()
            .position(|&t| t == end || t == tok.eot())
            .unwrap_or(ids.len());
        ids[..cut].to_vec()
    };
    let mut conv = vec![msg(Role::System, system), msg(Role::User, q1)];
    let r1 = reply(&conv);
    conv.push(msg(Role::Assistant, &tok.decode(&r1)));
    conv.push(msg(Role::User, q2));
    let r2 = reply(&conv);
    assert!(
        !r1.is_empty() || !r2.is_empty(),
        "both replies empty: a weak test"
    );
    let streamed = |ids: &[u32]| {
        let mut st = TextStream::new(&tok);
        ids.iter().map(|&t| st.push(t)).collect::<String>()
    };
    assert_eq!(out, format!("{}\n{}\n", streamed(&r1), streamed(&r2)));
}

/// A preference pair rendered with a model's template ends with the end-of-turn token that
/// closes the reply (what a reward model reads and RL stops at), as topcoat's own ends with
/// `<|end|>`: ChatML's newline after `<|im_end|>` is dropped.
#[test]
fn preference_pairs_end_at_the_templates_end_of_turn() {
    use topcoat::data::prefs::{parse_pref_line, render_pair};
    let tok = hf_tok(&fixtures().join("qwen2"));
    let line = r#"{"prompt": "Name a pet.", "chosen": "A cat.", "rejected": "A rock."}"#;
    let p = parse_pref_line(Path::new("p.jsonl"), 1, line).unwrap();
    let r = render_pair(&tok, &p).unwrap();
    let user = msg(Role::User, "Name a pet.");
    let full = render(&tok, &[user.clone(), msg(Role::Assistant, "A cat.")]).unwrap();
    let n = full.ids.len();
    assert_eq!(tok.decode(&full.ids[n - 1..]), "\n");
    assert_eq!(r.chosen.ids, full.ids[..n - 1]);
    assert_eq!(*r.chosen.ids.last().unwrap(), tok.end_of_turn());
    let prompt = render(&tok, &[user]).unwrap();
    assert_eq!(r.chosen.response_start, prompt.ids.len());
    assert_eq!(r.chosen.ids[..r.chosen.response_start], prompt.ids[..]);
    assert_eq!(
        masked_runs(&tok, &r.chosen.ids, &r.chosen.mask),
        ["A cat.<|im_end|>"]
    );
    assert_eq!(
        masked_runs(&tok, &r.rejected.ids, &r.rejected.mask),
        ["A rock.<|im_end|>"]
    );
}
