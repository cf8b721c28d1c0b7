//! The committed demo data set (data/demo/, built by scripts/make_demo_data.py): every file
//! parses with the reader that will consume it, the lemma splits are disjoint and used as
//! promised (SFT and preference data only from train, eval pairs only from heldout), no heldout
//! or control word leaks into SFT or preference text, no control word occurs anywhere in the
//! pretraining corpus while every heldout word does, and README.md's table of line counts and
//! byte sizes matches the files.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use topcoat::data::chat::read_conversations;
use topcoat::data::prefs::read_preferences;
use topcoat::scoring::read_prompts;

fn demo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/demo")
}

fn read(name: &str) -> String {
    let path = demo_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every non-blank line of a JSONL file as a JSON object, with its 1-based line number.
fn jsonl(name: &str) -> Vec<(usize, Value)> {
    read(name)
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{name}:{}: not JSON: {e}", i + 1));
            (i + 1, v)
        })
        .collect()
}

fn field<'a>(name: &str, line: usize, v: &'a Value, key: &str) -> &'a str {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{name}:{line}: no string field \"{key}\""))
}

/// The whole words of `text`, lower-cased: maximal runs of alphanumeric characters and `_`
/// (the script's `\w+`), so "cat" is in "the cat's tail" but not in "category".
fn words_into(text: &str, out: &mut BTreeSet<String>) {
    for w in text.split(|c: char| !(c.is_alphanumeric() || c == '_')) {
        if !w.is_empty() {
            out.insert(w.to_lowercase());
        }
    }
}

struct Splits {
    train: BTreeSet<String>,
    heldout: BTreeSet<String>,
    control: BTreeSet<String>,
}

fn splits() -> Splits {
    let v: Value = serde_json::from_str(&read("splits.json")).expect("splits.json: not JSON");
    let list = |key: &str| -> BTreeSet<String> {
        let arr = v[key]
            .as_array()
            .unwrap_or_else(|| panic!("splits.json: no list \"{key}\""));
        let set: BTreeSet<String> = arr
            .iter()
            .map(|x| {
                x.as_str()
                    .expect("splits.json: a lemma is not a string")
                    .to_string()
            })
            .collect();
        assert_eq!(
            set.len(),
            arr.len(),
            "splits.json: \"{key}\" repeats a lemma"
        );
        for l in &set {
            assert!(
                l.len() >= 2 && l.chars().all(|c| c.is_ascii_lowercase()),
                "splits.json: \"{key}\" lemma {l:?} is not one lower-case ASCII word"
            );
        }
        set
    };
    Splits {
        train: list("train"),
        heldout: list("heldout"),
        control: list("control"),
    }
}

#[test]
fn splits_are_disjoint_and_non_empty() {
    let s = splits();
    for (name, set) in [
        ("train", &s.train),
        ("heldout", &s.heldout),
        ("control", &s.control),
    ] {
        assert!(!set.is_empty(), "split {name} is empty");
    }
    assert!(
        s.train.is_disjoint(&s.heldout),
        "a lemma is in train and heldout"
    );
    assert!(
        s.train.is_disjoint(&s.control),
        "a lemma is in train and control"
    );
    assert!(
        s.heldout.is_disjoint(&s.control),
        "a lemma is in heldout and control"
    );
}

#[test]
fn every_file_parses_with_its_reader() {
    let dir = demo_dir();
    let convs = read_conversations(&dir.join("sft.jsonl")).expect("sft.jsonl");
    assert_eq!(convs.len(), jsonl("sft.jsonl").len());
    for name in ["prefs.jsonl", "eval_prefs.jsonl", "eval_probe.jsonl"] {
        let pairs = read_preferences(&dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(pairs.len(), jsonl(name).len());
    }
    let prompts = read_prompts(&dir.join("eval_questions.jsonl")).expect("eval_questions.jsonl");
    assert_eq!(prompts.len(), jsonl("eval_questions.jsonl").len());
    for (line, v) in jsonl("rl_prompts.jsonl") {
        assert!(!field("rl_prompts.jsonl", line, &v, "prompt").is_empty());
    }
    for (line, v) in jsonl("corpus.jsonl") {
        assert!(!field("corpus.jsonl", line, &v, "text").trim().is_empty());
        field("corpus.jsonl", line, &v, "source");
    }
}

#[test]
fn tuning_data_uses_train_lemmas_and_eval_data_matches_the_splits() {
    let s = splits();
    for name in ["sft.jsonl", "prefs.jsonl"] {
        for (line, v) in jsonl(name) {
            let lemma = field(name, line, &v, "lemma");
            assert!(
                s.train.contains(lemma),
                "{name}:{line}: lemma {lemma:?} is not in train"
            );
        }
    }
    let mut kinds = BTreeMap::new();
    for (line, v) in jsonl("prefs.jsonl") {
        *kinds
            .entry(field("prefs.jsonl", line, &v, "kind").to_string())
            .or_insert(0) += 1;
    }
    let keys: Vec<&str> = kinds.keys().map(String::as_str).collect();
    assert_eq!(keys, ["hard", "question", "random"], "prefs.jsonl kinds");
    for (line, v) in jsonl("eval_prefs.jsonl") {
        let lemma = field("eval_prefs.jsonl", line, &v, "lemma");
        assert!(
            s.heldout.contains(lemma),
            "eval_prefs.jsonl:{line}: {lemma:?} is not heldout"
        );
        assert_eq!(field("eval_prefs.jsonl", line, &v, "group"), "heldout");
    }
    // The knowledge probe: one hard pair for every heldout and every control lemma.
    let mut probed = BTreeSet::new();
    for (line, v) in jsonl("eval_probe.jsonl") {
        let lemma = field("eval_probe.jsonl", line, &v, "lemma");
        let want = if s.heldout.contains(lemma) {
            "heldout"
        } else if s.control.contains(lemma) {
            "control"
        } else {
            panic!("eval_probe.jsonl:{line}: {lemma:?} is neither heldout nor control")
        };
        assert_eq!(
            field("eval_probe.jsonl", line, &v, "group"),
            want,
            "line {line}"
        );
        assert_eq!(
            field("eval_probe.jsonl", line, &v, "kind"),
            "hard",
            "line {line}"
        );
        assert!(probed.insert(lemma.to_string()), "{lemma:?} probed twice");
    }
    let all: BTreeSet<String> = s.heldout.union(&s.control).cloned().collect();
    assert_eq!(
        probed, all,
        "eval_probe.jsonl must probe every heldout and control lemma"
    );
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (line, v) in jsonl("eval_questions.jsonl") {
        let lemma = field("eval_questions.jsonl", line, &v, "lemma");
        let group = field("eval_questions.jsonl", line, &v, "group");
        let split = match group {
            "train" => &s.train,
            "heldout" => &s.heldout,
            "control" => &s.control,
            other => panic!("eval_questions.jsonl:{line}: unknown group {other:?}"),
        };
        assert!(
            split.contains(lemma),
            "eval_questions.jsonl:{line}: {lemma:?} not in {group}"
        );
        assert_eq!(
            field("eval_questions.jsonl", line, &v, "prompt"),
            format!("What does '{lemma}' mean?"),
            "eval_questions.jsonl:{line}: the demo asks exactly this question"
        );
        assert!(
            seen.entry(group.to_string())
                .or_default()
                .insert(lemma.to_string()),
            "eval_questions.jsonl:{line}: {lemma:?} asked twice"
        );
    }
    assert_eq!(
        seen.get("heldout"),
        Some(&s.heldout),
        "every heldout lemma is asked"
    );
    assert_eq!(
        seen.get("control"),
        Some(&s.control),
        "every control lemma is asked"
    );
    assert!(
        !seen.get("train").is_some_and(BTreeSet::is_empty),
        "some train lemmas are asked"
    );
}

#[test]
fn heldout_and_control_words_stay_out_of_tuning_data() {
    let s = splits();
    let mut tuned = BTreeSet::new();
    for (_, v) in jsonl("sft.jsonl") {
        for m in v["messages"].as_array().expect("sft.jsonl: messages") {
            words_into(
                m["content"].as_str().expect("sft.jsonl: content"),
                &mut tuned,
            );
        }
    }
    for (line, v) in jsonl("prefs.jsonl") {
        for key in ["prompt", "chosen", "rejected"] {
            words_into(field("prefs.jsonl", line, &v, key), &mut tuned);
        }
    }
    for (line, v) in jsonl("rl_prompts.jsonl") {
        words_into(field("rl_prompts.jsonl", line, &v, "prompt"), &mut tuned);
    }
    let leaked: Vec<&String> = s
        .heldout
        .union(&s.control)
        .filter(|l| tuned.contains(*l))
        .collect();
    assert!(
        leaked.is_empty(),
        "heldout/control words in SFT, preference or RL text: {leaked:?}"
    );
}

#[test]
fn corpus_holds_every_heldout_word_and_no_control_word() {
    let s = splits();
    let mut corpus = BTreeSet::new();
    for (line, v) in jsonl("corpus.jsonl") {
        words_into(field("corpus.jsonl", line, &v, "text"), &mut corpus);
    }
    let leaked: Vec<&String> = s.control.iter().filter(|l| corpus.contains(*l)).collect();
    assert!(
        leaked.is_empty(),
        "control words in corpus.jsonl: {leaked:?}"
    );
    let missing: Vec<&String> = s.heldout.iter().filter(|l| !corpus.contains(*l)).collect();
    assert!(
        missing.is_empty(),
        "heldout words missing from corpus.jsonl: {missing:?}"
    );
    let missing: Vec<&String> = s.train.iter().filter(|l| !corpus.contains(*l)).collect();
    assert!(
        missing.is_empty(),
        "train words missing from corpus.jsonl: {missing:?}"
    );
}

#[test]
fn readme_table_matches_the_files() {
    let readme = read("README.md");
    for name in topcoat::commands::demo::FILES
        .iter()
        .filter(|f| f.ends_with(".jsonl"))
    {
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{name}` |")))
            .unwrap_or_else(|| panic!("README.md: no table row for {name}"));
        let cells: Vec<String> = row.split('|').map(|c| c.trim().replace(',', "")).collect();
        let lines = jsonl(name).len().to_string();
        let bytes = std::fs::metadata(demo_dir().join(name))
            .unwrap()
            .len()
            .to_string();
        assert_eq!(cells[2], lines, "README.md: line count of {name}");
        assert_eq!(cells[3], bytes, "README.md: byte size of {name}");
    }
}
