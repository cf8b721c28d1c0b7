//! Shared by the Hugging Face tokenizer tests: a byte-level BPE tokenizer.json written here
//! with a ChatML tokenizer_config.json, the reference fixtures' paths, and helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use topcoat::data::chat::{Message, Role};
use topcoat::data::Tokenizer;

/// SmolLM2's (ChatML) template.
pub const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// GPT-2's byte-to-character map (printable stand-ins for every byte).
pub fn byte_chars() -> Vec<char> {
    let mut direct: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut map = vec!['\0'; 256];
    for &b in &direct {
        map[b as usize] = char::from_u32(b).unwrap();
    }
    let mut n = 0;
    for b in 0..256u32 {
        if !direct.contains(&b) {
            map[b as usize] = char::from_u32(256 + n).unwrap();
            n += 1;
            direct.push(b);
        }
    }
    map
}

/// A byte-level BPE tokenizer.json: ids 0..256 the bytes, three merges ("he", "Ġt", "Ġthe"),
/// then `<|endoftext|>` 259, `<|im_start|>` 260, `<|im_end|>` 261.
pub fn tokenizer_json() -> serde_json::Value {
    let chars = byte_chars();
    let mut vocab = serde_json::Map::new();
    for (b, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), b.into());
    }
    for (i, t) in ["he", "Ġt", "Ġthe"].iter().enumerate() {
        vocab.insert(t.to_string(), (256 + i).into());
    }
    let added: Vec<serde_json::Value> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({"id": 259 + i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": byte_level,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab,
            "merges": [["h", "e"], ["Ġ", "t"], ["Ġt", "he"]]}
    })
}

/// A Hugging Face model directory's tokenizer files in `dir`, with `template`.
pub fn write_hf_dir(dir: &Path, template: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json().to_string()).unwrap();
    let config = serde_json::json!({
        "chat_template": template,
        "bos_token": null,
        "eos_token": {"content": "<|endoftext|>", "lstrip": false, "normalized": false,
            "rstrip": false, "single_word": false, "special": true},
        "tokenizer_class": "GPT2Tokenizer"
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    dir.to_path_buf()
}

pub fn hf_tok(dir: &Path) -> Tokenizer {
    Tokenizer::from_hf_files(
        &dir.join("tokenizer.json"),
        Some(&dir.join("tokenizer_config.json")),
    )
    .unwrap()
}

pub fn msg(role: Role, content: &str) -> Message {
    Message::new(role, content)
}

/// The text of each maximal run of masked-in tokens.
pub fn masked_runs(tok: &Tokenizer, ids: &[u32], mask: &[bool]) -> Vec<String> {
    let mut runs = Vec::new();
    let mut run = Vec::new();
    for (&id, &m) in ids.iter().zip(mask) {
        if m {
            run.push(id);
        } else if !run.is_empty() {
            runs.push(tok.decode(&run));
            run.clear();
        }
    }
    if !run.is_empty() {
        runs.push(tok.decode(&run));
    }
    runs
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf")
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}
