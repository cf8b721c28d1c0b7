//! LoRA through the CLI on the CPU, on the committed tiny Llama fixture imported with `import
//! hf`: sft with `--lora-rank` lowers the validation loss, leaves every base tensor of its
//! checkpoint bit-identical to the base and keeps optimizer moments for the adapters only; the
//! PEFT adapter folder beside the checkpoint, given to `sample`/`eval --adapter` with the base,
//! gives the LoRA run's own text and loss; `export hf --merge` gives the run's loss, `export hf`
//! without it the adapter; DPO with LoRA starts at ln 2 with reference log-probabilities equal
//! to the policy's; reward with LoRA trains its head; rl with LoRA runs; a LoRA run resumes bit
//! for bit; and the errors: LoRA without a base, `--merge` on a full run, a bad target.

mod common;

use common::cli::{assert_unchanged, fails, ok, s, snapshot};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `import hf` of the tiny Llama fixture (vocab 420, 2 layers, d 64) into `dir/base`.
fn base(dir: &Path) -> PathBuf {
    let out = dir.join("base");
    ok(&["import", "hf", "tests/fixtures/hf/llama", "--out", &s(&out)]);
    out
}

/// `prepare sft` of 24 short conversations (4 held out) with the base's tokenizer and chat
/// template, into `dir/sft_data`.
fn sft_data(dir: &Path, base: &Path) -> PathBuf {
    let chats: Vec<String> = (0..24)
        .map(|i| {
            let t = ["cats", "dogs", "owls", "bees"][i % 4];
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("Tell me about {t}.")},
                {"role": "assistant", "content": format!("{t} are {t}.")},
            ]})
            .to_string()
        })
        .collect();
    std::fs::write(dir.join("chats.jsonl"), chats.join("\n")).unwrap();
    let out = dir.join("sft_data");
    ok(&[
        "prepare",
        "sft",
        &s(&dir.join("chats.jsonl")),
        "--out",
        &s(&out),
        "--tokenizer",
        &s(base),
        "--val-fraction",
        "0.2",
    ]);
    out
}

/// `prepare` of a small text corpus with the base's tokenizer into `dir/text` (for `eval loss`).
fn text_data(dir: &Path, base: &Path) -> PathBuf {
    let docs = dir.join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(
        docs.join("a.txt"),
        "Cats are cats. Dogs are dogs. ".repeat(30),
    )
    .unwrap();
    let out = dir.join("text");
    ok(&[
        "prepare",
        &s(&docs),
        "--out",
        &s(&out),
        "--tokenizer",
        &s(base),
    ]);
    out
}

/// `prepare prefs` of 12 pairs with the base's tokenizer, into `dir/prefs`.
fn prefs_data(dir: &Path, base: &Path) -> PathBuf {
    let lines: Vec<String> = (0..12)
        .map(|i| {
            serde_json::json!({
                "prompt": format!("Is a cat {i} small?"),
                "chosen": "A cat is small.",
                "rejected": "no",
            })
            .to_string()
        })
        .collect();
    std::fs::write(dir.join("prefs.jsonl"), lines.join("\n")).unwrap();
    let out = dir.join("prefs");
    ok(&[
        "prepare",
        "prefs",
        &s(&dir.join("prefs.jsonl")),
        "--out",
        &s(&out),
        "--tokenizer",
        &s(base),
    ]);
    out
}

/// `stage --out OUT` on the CPU with `extra`, which must succeed; its output.
fn run<S: AsRef<str>>(stage: &str, out: &Path, extra: &[S]) -> String {
    let mut a = vec![
        stage.to_string(),
        "--out".into(),
        s(out),
        "--device".into(),
        "cpu".into(),
    ];
    a.extend(extra.iter().map(|x| x.as_ref().to_string()));
    ok(&a)
}

/// Every record of a run's metrics.jsonl.
fn records(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `(step, value)` of every record that has `key`.
fn series(out: &Path, key: &str) -> Vec<(u64, f64)> {
    records(out)
        .iter()
        .filter_map(|r| Some((r["step"].as_u64()?, r.get(key)?.as_f64()?)))
        .collect()
}

/// Each tensor's name and raw bytes in a safetensors file.
fn tensors(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| (name, view.data().to_vec()))
        .collect()
}

/// The newest checkpoint of a run directory.
fn newest(run: &Path) -> PathBuf {
    let mut ckpts: Vec<PathBuf> = std::fs::read_dir(run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("ckpt_")
        })
        .collect();
    ckpts.sort();
    ckpts.pop().expect("a checkpoint")
}

/// The loss `eval loss` reports for `checkpoint` (plus `extra` flags) on `data`'s train split.
fn eval_loss(checkpoint: &Path, data: &Path, extra: &[&str]) -> f64 {
    let mut a = vec![
        "eval".to_string(),
        "loss".into(),
        "--device".into(),
        "cpu".into(),
        "--checkpoint".into(),
        s(checkpoint),
        "--data".into(),
        s(data),
        "--split".into(),
        "train".into(),
        "--batch-size".into(),
        "2".into(),
        "--seq-len".into(),
        "32".into(),
        "--max-batches".into(),
        "2".into(),
    ];
    a.extend(extra.iter().map(|x| x.to_string()));
    let out = ok(&a);
    let row = out.lines().find(|r| r.contains("| train |")).expect(&out);
    row.split('|').nth(5).unwrap().trim().parse().unwrap()
}

/// Greedy `sample` from `checkpoint` (plus `extra` flags).
fn greedy(checkpoint: &Path, extra: &[&str]) -> String {
    let mut a = vec![
        "sample".to_string(),
        "--checkpoint".into(),
        s(checkpoint),
        "--prompt".into(),
        "Tell me about".into(),
        "--max-new-tokens".into(),
        "12".into(),
        "--temperature".into(),
        "0".into(),
        "--device".into(),
        "cpu".into(),
    ];
    a.extend(extra.iter().map(|x| x.to_string()));
    ok(&a)
}

/// Relative difference a merged model's loss may have from the adapters' (the merge rounds
/// `W + s B A` to f32 once; the adapter path rounds `x W^T` and `s (x A^T) B^T` apart).
const MERGE_TOL: f64 = 1e-5;

const LORA: [&str; 4] = ["--lora-rank", "4", "--lora-dropout", "0.05"];

#[test]
fn sft_with_lora_trains_adapters_only_and_its_files_serve_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let base = base(dir.path());
    let data = sft_data(dir.path(), &base);
    let out = dir.path().join("sft");
    let mut args = vec![
        "--init",
        &s(&base),
        "--data",
        &s(&data),
        "--max-steps",
        "16",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--lr",
        "1e-2",
        "--warmup-steps",
        "1",
        "--val-every",
        "8",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    args.extend(LORA.iter().map(|x| x.to_string()));
    let a: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
    let log = run("sft", &out, &a);
    assert!(
        log.contains("LoRA r=4 alpha=8 dropout=0.05 on q,k,v,o,gate,up,down:"),
        "{log}"
    );
    assert!(log.contains("trained of"), "{log}");

    // Validation loss falls.
    let val = series(&out, "val_loss");
    assert_eq!(val.first().unwrap().0, 0, "{val:?}");
    let (first, last) = (val.first().unwrap().1, val.last().unwrap().1);
    assert!(last < first - 0.05, "val loss did not fall: {val:?}");

    // Every base tensor bit-identical; the adapters moved; moments for the adapters only.
    let ckpt = newest(&out);
    let base_t = tensors(&base.join("model.safetensors"));
    let run_t = tensors(&ckpt.join("model.safetensors"));
    for (name, bytes) in &base_t {
        assert!(run_t[name] == *bytes, "base tensor {name} changed");
    }
    let adapters: Vec<&String> = run_t.keys().filter(|k| !base_t.contains_key(*k)).collect();
    assert_eq!(adapters.len(), 2 * 2 * 7, "{adapters:?}");
    assert!(adapters
        .iter()
        .all(|k| k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight")));
    let b = &run_t["model.layers.1.mlp.down_proj.lora_B.weight"];
    assert!(b.iter().any(|&x| x != 0), "lora_B never moved");
    let moments = tensors(&ckpt.join("optimizer.safetensors"));
    let want: Vec<String> = ["m.", "v."]
        .iter()
        .flat_map(|p| adapters.iter().map(move |k| format!("{p}{k}")))
        .collect();
    let mut have: Vec<String> = moments.keys().cloned().collect();
    let mut want = want;
    have.sort();
    want.sort();
    assert_eq!(
        have, want,
        "the optimizer state holds the adapters' moments only"
    );

    // The PEFT folder beside the checkpoint; --adapter with the base gives the run's own text
    // and loss.
    let peft = ckpt.join("adapter");
    assert!(peft.join("adapter_config.json").is_file());
    assert!(peft.join("adapter_model.safetensors").is_file());
    let own = greedy(&out, &[]);
    assert_eq!(greedy(&base, &["--adapter", &s(&peft)]), own);
    assert_ne!(greedy(&base, &[]), own, "the adapters changed nothing");
    let text = text_data(dir.path(), &base);
    let own_loss = eval_loss(&out, &text, &[]);
    let adapter_loss = eval_loss(&base, &text, &["--adapter", &s(&out)]);
    assert!(
        ((adapter_loss - own_loss) / own_loss).abs() <= MERGE_TOL,
        "--adapter {adapter_loss} vs the run's {own_loss}"
    );

    // export hf --merge: a plain model with the run's loss; without --merge: the adapter.
    let merged = dir.path().join("merged_hf");
    ok(&["export", "hf", &s(&out), "--out", &s(&merged), "--merge"]);
    let reimported = dir.path().join("merged");
    ok(&["import", "hf", &s(&merged), "--out", &s(&reimported)]);
    let merged_loss = eval_loss(&reimported, &text, &[]);
    assert!(
        ((merged_loss - own_loss) / own_loss).abs() <= MERGE_TOL,
        "merged {merged_loss} vs the run's {own_loss}"
    );
    assert_eq!(greedy(&reimported, &[]), own);
    let exported = dir.path().join("adapter_hf");
    let said = ok(&["export", "hf", &s(&out), "--out", &s(&exported)]);
    assert!(said.contains("PEFT LoRA adapter"), "{said}");
    assert_eq!(
        tensors(&exported.join("adapter_model.safetensors")),
        tensors(&peft.join("adapter_model.safetensors"))
    );
}

#[test]
fn a_lora_sft_run_resumes_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let base = base(dir.path());
    let data = sft_data(dir.path(), &base);
    let args = |steps: &str| -> Vec<String> {
        let mut a: Vec<String> = [
            "--init",
            &s(&base),
            "--data",
            &s(&data),
            "--max-steps",
            steps,
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--total-batch-tokens",
            "128",
            "--val-every",
            "0",
            "--checkpoint-every",
            "2",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        a.extend(LORA.iter().map(|x| x.to_string()));
        a
    };
    let straight = dir.path().join("straight");
    run("sft", &straight, &args("4"));
    let resumed = dir.path().join("resumed");
    run("sft", &resumed, &args("2"));
    // Other LoRA settings than the checkpoint's are refused, each named with both values,
    // before the run directory is touched.
    let before = snapshot(&resumed);
    let mut other: Vec<String> = args("4").into_iter().take(16).collect();
    other.extend(
        [
            "--lora-rank",
            "8",
            "--lora-alpha",
            "3",
            "--lora-dropout",
            "0.05",
            "--resume",
        ]
        .map(String::from),
    );
    let mut cmd = vec!["sft".to_string(), "--out".into(), s(&resumed)];
    cmd.extend(["--device", "cpu"].map(String::from));
    let e = fails(&[cmd.clone(), other].concat());
    assert!(
        e.contains("cannot resume with other LoRA settings")
            && e.contains("lora_rank (--lora-rank) is 4 in the checkpoint but 8 in this run")
            && e.contains("lora_alpha (--lora-alpha) is 8 in the checkpoint but 3 in this run")
            && !e.contains("lora_dropout"),
        "{e}"
    );
    assert_unchanged(&resumed, &before);
    // None given: the checkpoint's adapters (rank, alpha, dropout, targets) carry on.
    let mut again: Vec<String> = args("4").into_iter().take(16).collect();
    assert!(!again.iter().any(|a| a.starts_with("--lora")), "{again:?}");
    again.push("--resume".into());
    let log = run("sft", &resumed, &again);
    assert!(log.contains("resuming from"), "{log}");
    assert!(log.contains("LoRA r=4 alpha=8 dropout=0.05"), "{log}");
    assert!(!log.contains("lora_rank 4 -> null"), "{log}");
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let (a, b) = (
            std::fs::read(newest(&straight).join(file)).unwrap(),
            std::fs::read(newest(&resumed).join(file)).unwrap(),
        );
        assert!(a == b, "{file} differs after a resume");
    }
    let losses = |d: &Path| series(d, "loss");
    assert_eq!(losses(&straight), losses(&resumed));
}

#[test]
fn preference_stages_with_lora_use_the_base_as_reference_and_train_the_reward_head() {
    let dir = tempfile::tempdir().unwrap();
    let base = base(dir.path());
    let prefs = prefs_data(dir.path(), &base);
    let common = |init: &Path| -> Vec<String> {
        [
            "--init",
            &s(init),
            "--seq-len",
            "48",
            "--lora-rank",
            "4",
            "--lora-targets",
            "q,v,down",
        ]
        .into_iter()
        .map(String::from)
        .collect()
    };

    // DPO: at step 0 (B = 0) the policy is its reference: loss ln 2, implicit rewards 0.
    let dpo = dir.path().join("dpo");
    let mut a = common(&base);
    a.extend(
        [
            "--data",
            &s(&prefs),
            "--batch-size",
            "2",
            "--max-steps",
            "2",
            "--val-every",
            "1",
        ]
        .map(String::from),
    );
    let log = run("dpo", &dpo, &a);
    assert!(
        log.contains("the policy with its LoRA adapters off"),
        "{log}"
    );
    assert!(log.contains("LoRA r=4 alpha=8 on q,v,down:"), "{log}");
    let r = records(&dpo);
    let val0 = r
        .iter()
        .find(|r| r["step"] == 0)
        .expect("step-0 validation");
    assert_eq!(
        val0["val_loss"].as_f64().unwrap() as f32,
        std::f32::consts::LN_2
    );
    assert_eq!(val0["val_rewards/chosen"].as_f64().unwrap(), 0.0);
    assert_eq!(val0["val_rewards/rejected"].as_f64().unwrap(), 0.0);
    let step1 = r
        .iter()
        .find(|r| r["step"] == 1 && r.get("loss").is_some())
        .unwrap();
    assert_eq!(
        step1["loss"].as_f64().unwrap() as f32,
        std::f32::consts::LN_2
    );
    assert_eq!(step1["rewards/margins"].as_f64().unwrap(), 0.0);
    let last = series(&dpo, "loss").last().unwrap().1;
    assert!(last.is_finite() && last != std::f64::consts::LN_2, "{last}");

    // Reward: the head trains in full beside the adapters (its moments are saved).
    let reward = dir.path().join("reward");
    let mut a = common(&base);
    a.extend(
        [
            "--data",
            &s(&prefs),
            "--batch-size",
            "4",
            "--max-steps",
            "3",
            "--val-every",
            "0",
            "--checkpoint-every",
            "1",
            "--lr",
            "1e-2",
        ]
        .map(String::from),
    );
    let log = run("reward", &reward, &a);
    assert!(log.contains("a new reward head (trained in full)"), "{log}");
    let ckpt = newest(&reward);
    let moments = tensors(&ckpt.join("optimizer.safetensors"));
    assert!(moments.contains_key("m.reward_head.weight"));
    assert!(moments.contains_key("m.reward_head.bias"));
    assert!(moments
        .keys()
        .all(|k| k.contains("lora_") || k.contains("reward_head")));
    // Between the checkpoints after steps 1 and 3 the head moved and the base did not
    // (the head's bias has no gradient under Bradley-Terry: it cancels in the margin).
    let (first, last) = (
        tensors(&reward.join("ckpt_000001").join("model.safetensors")),
        tensors(&ckpt.join("model.safetensors")),
    );
    assert_ne!(first["reward_head.weight"], last["reward_head.weight"]);
    for (name, bytes) in tensors(&base.join("model.safetensors")) {
        assert!(last[&name] == bytes, "base tensor {name} changed");
    }

    // RL: a few steps, the reference the policy with its adapters off.
    let prompts: Vec<String> = (0..6)
        .map(|i| serde_json::json!({ "prompt": format!("Is a cat {i} small?") }).to_string())
        .collect();
    std::fs::write(dir.path().join("prompts.jsonl"), prompts.join("\n")).unwrap();
    let rl = dir.path().join("rl");
    let mut a = common(&base);
    a.extend(
        [
            "--reward",
            &s(&reward),
            "--prompts",
            &s(&dir.path().join("prompts.jsonl")),
            "--batch-size",
            "2",
            "--k",
            "2",
            "--max-new-tokens",
            "4",
            "--max-steps",
            "2",
        ]
        .map(String::from),
    );
    let log = run("rl", &rl, &a);
    assert!(
        log.contains("reference the policy with its LoRA adapters off"),
        "{log}"
    );
    let l = series(&rl, "loss");
    assert_eq!(l.len(), 2);
    assert!(l.iter().all(|(_, x)| x.is_finite()), "{l:?}");
}

#[test]
fn lora_errors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let base = base(dir.path());
    let data = sft_data(dir.path(), &base);
    let sft = |extra: &[&str]| {
        let mut a = vec![
            "sft".to_string(),
            "--init".into(),
            s(&base),
            "--data".into(),
            s(&data),
            "--out".into(),
            s(&dir.path().join("never")),
            "--device".into(),
            "cpu".into(),
            "--max-steps".into(),
            "1".into(),
        ];
        a.extend(extra.iter().map(|x| x.to_string()));
        fails(&a)
    };
    let e = sft(&["--lora-rank", "4", "--lora-targets", "q,wq"]);
    assert!(
        e.contains(
            "--lora-targets: unknown target `wq`; a llama model offers q,k,v,o,gate,up,down"
        ),
        "{e}"
    );
    let e = sft(&["--lora-alpha", "8"]);
    assert!(
        e.contains("lora_alpha (--lora-alpha) is set but lora_rank (--lora-rank) is not"),
        "{e}"
    );
    assert!(!dir.path().join("never").join("metrics.jsonl").exists());

    // LoRA needs a base: pretrain starts a fresh model.
    let toml = dir.path().join("lora.toml");
    std::fs::write(&toml, "lora_rank = 4\nmax_steps = 1\n").unwrap();
    let e = fails(&[
        "pretrain",
        "--config",
        &s(&toml),
        "--out",
        &s(&dir.path().join("pre")),
        "--device",
        "cpu",
    ]);
    assert!(
        e.contains("pretrain: LoRA (lora_rank / --lora-rank) trains adapters beside a frozen base"),
        "{e}"
    );

    // --merge on a full run; --adapter that is not one.
    let e = fails(&[
        "export",
        "hf",
        &s(&base),
        "--out",
        &s(&dir.path().join("x")),
        "--merge",
    ]);
    assert!(
        e.contains("--merge: ") && e.contains("is not a LoRA run's checkpoint"),
        "{e}"
    );
    assert!(!dir.path().join("x").exists());
    let e = fails(&[
        "sample",
        "--checkpoint",
        &s(&base),
        "--adapter",
        &s(&data),
        "--device",
        "cpu",
    ]);
    assert!(
        e.contains("--adapter: ") && e.contains("no adapter_config.json"),
        "{e}"
    );
}
