//! Every stage's data across data-parallel ranks: rank `r` of `W` draws exactly micro-batches
//! `r, r + W, ...` of the stream one process draws (compared token for token at W = 2 and 3,
//! across epoch boundaries); a data position saved at W = 2 restores at W = 3 and W = 1 to the
//! same next global micro-batch; validation partial sums of the W ranks add up, in rank order,
//! to the one-process sum and count; DPO's per-rank reference log-probabilities equal the
//! one-process values for the same pairs; RL ranks sample their own rollouts, the same per
//! global micro-batch at every world size.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use topcoat::backend::cpu::CpuBackend;
use topcoat::commands::inputs::TokenizerArg;
use topcoat::commands::prepare::{prepare_sft, EMBEDDED_CORPUS};
use topcoat::config::ModelConfig;
use topcoat::data::{
    self, Loader, PairLoader, PairSplit, PrefsPrepareOptions, RankSlice, SftPrepareOptions,
    Tokenizer,
};
use topcoat::model::Gpt;
use topcoat::rng::Rng;
use topcoat::stages::dpo::{Dpo, DpoLoss};
use topcoat::stages::pretrain::{split_files, Pretrain};
use topcoat::stages::reward::Reward;
use topcoat::stages::rl::{FnScorer, Rl, RlConfig};
use topcoat::stages::sft::{Sft, SftBatch};
use topcoat::stages::PreparedData;
use topcoat::train::{Objective, ValPartial};

type Be = CpuBackend;

/// Ranks' partial sums added in rank order differ from one process's sum only by the order of
/// f64 additions of the same per-batch sums (the batches themselves are bit-identical).
const SUM_TOL: f64 = 1e-12;

fn tokenizer(dir: &Path) -> (Tokenizer, PathBuf) {
    let text = String::from_utf8_lossy(&EMBEDDED_CORPUS[..20_000]).into_owned();
    let tok = Tokenizer::train_bpe([text.as_str()].into_iter(), 300, |_, _| {}).unwrap();
    let path = dir.join("tokenizer.json");
    tok.save(&path).unwrap();
    (tok, path)
}

fn tiny(vocab: usize, t: usize, seed: u64) -> Gpt<Be> {
    let cfg = ModelConfig {
        vocab_size: vocab,
        padded_vocab_size: vocab.next_multiple_of(64),
        n_layer: 2,
        n_head: 2,
        n_embd: 16,
        max_seq_len: t,
    };
    Gpt::init(&CpuBackend, &cfg, seed).unwrap()
}

/// The partials of every rank, added in rank order.
fn in_rank_order(parts: &[ValPartial]) -> ValPartial {
    let mut total = ValPartial::default();
    parts.iter().for_each(|p| total.add(p));
    total
}

fn assert_adds_up(what: &str, parts: &[ValPartial], one: ValPartial) {
    let total = in_rank_order(parts);
    assert_eq!(
        total.count, one.count,
        "{what}: counts {parts:?} vs {one:?}"
    );
    assert!(
        (total.sum - one.sum).abs() <= SUM_TOL * one.sum.abs(),
        "{what}: sums {parts:?} add to {}, one process {}",
        total.sum,
        one.sum
    );
    assert!(one.count > 0.0, "{what}: nothing validated");
}

// ---- pretrain ------------------------------------------------------------------------------

fn text_data(dir: &Path, tok: &Tokenizer) -> PathBuf {
    let src = dir.join("corpus.txt");
    std::fs::write(&src, &EMBEDDED_CORPUS[20_000..30_000]).unwrap();
    let val = dir.join("held_out.txt");
    std::fs::write(&val, &EMBEDDED_CORPUS[30_000..34_000]).unwrap();
    let out = dir.join("text");
    let opts = data::PrepareOptions {
        shard_tokens: 1_500,
        val_inputs: Some(vec![val]),
        ..data::PrepareOptions::new(&out)
    };
    data::prepare(&[&src], tok, &opts, &|_| {}).unwrap();
    out
}

fn loader(files: &[PathBuf], r: RankSlice, vocab: usize) -> Loader {
    Loader::sequential(files, 3, 16, r.rank, r.world, vocab)
        .unwrap()
        .shuffled(11)
}

#[test]
fn pretrain_ranks_draw_the_global_stream_strided_and_resume_at_any_world_size() {
    let dir = tempfile::tempdir().unwrap();
    let (tok, _) = tokenizer(dir.path());
    let v = tok.vocab_size();
    let files = split_files(&text_data(dir.path(), &tok), "train").unwrap();
    assert!(files.len() >= 2, "several shards: {files:?}");
    let mut one = loader(&files, RankSlice::SOLO, v);
    let per_epoch = one.global_batches_per_epoch() as usize;
    // Past an epoch boundary, so the second epoch's shuffle is checked too.
    let global: Vec<_> = (0..per_epoch + 12).map(|_| one.next_batch()).collect();
    for world in [2, 3] {
        for rank in 0..world {
            let mut l = loader(&files, RankSlice::new(rank, world).unwrap(), v);
            for (i, g) in (rank..global.len()).step_by(world).enumerate() {
                assert_eq!(
                    l.next_batch(),
                    global[g],
                    "rank {rank} of {world}, draw {i}"
                );
            }
        }
    }

    // Five steps at W = 2: both ranks save the same position, one process's after 10 batches.
    let mut at2: Vec<Loader> = (0..2)
        .map(|r| loader(&files, RankSlice::new(r, 2).unwrap(), v))
        .collect();
    for l in &mut at2 {
        (0..5).for_each(|_| drop(l.next_batch()));
    }
    let pos = at2[0].position();
    assert_eq!(at2[1].position(), pos);
    let mut solo = loader(&files, RankSlice::SOLO, v);
    (0..10).for_each(|_| drop(solo.next_batch()));
    assert_eq!(solo.position(), pos);
    let json = serde_json::to_string(&pos).unwrap();
    for world in [3, 1] {
        for rank in 0..world {
            let mut l = loader(&files, RankSlice::new(rank, world).unwrap(), v);
            l.set_position(serde_json::from_str(&json).unwrap());
            assert_eq!(l.next_batch(), global[10 + rank], "rank {rank} of {world}");
        }
    }
}

#[test]
fn pretrain_validation_partials_add_up_to_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let (tok, _) = tokenizer(dir.path());
    let v = tok.vocab_size();
    let data = text_data(dir.path(), &tok);
    let mut model = tiny(v, 16, 3);
    let open = |r: RankSlice| Pretrain::open(&data, 3, 16, 11, r.rank, r.world, v, 7).unwrap();
    let one = open(RankSlice::SOLO)
        .validate(&CpuBackend, &mut model)
        .unwrap();
    let one = one.unwrap();
    assert_eq!(one.count, (7 * 3 * 16) as f64);
    for world in [2, 3] {
        let parts: Vec<ValPartial> = (0..world)
            .map(|r| {
                let mut o = open(RankSlice::new(r, world).unwrap());
                o.validate(&CpuBackend, &mut model).unwrap().unwrap()
            })
            .collect();
        // Seven batches: rank r scores batches r, r + W, ...
        let shares: Vec<f64> = (0..world)
            .map(|r| RankSlice::new(r, world).unwrap().share(7) as f64 * 48.0)
            .collect();
        assert_eq!(parts.iter().map(|p| p.count).collect::<Vec<_>>(), shares);
        assert_adds_up(&format!("pretrain W = {world}"), &parts, one);
    }
}

// ---- sft -----------------------------------------------------------------------------------

fn conv(user: &str, assistant: &str) -> String {
    serde_json::json!({"messages": [
        {"role": "user", "content": user},
        {"role": "assistant", "content": assistant},
    ]})
    .to_string()
}

fn sft_data(dir: &Path, tok_path: &Path) -> PathBuf {
    let words = ["one", "two", "three", "four", "five", "six", "seven"];
    let lines: Vec<String> = (0..40)
        .map(|i| {
            let ask = words[..1 + (i * 5) % 7].join(" ");
            conv(&format!("Repeat {ask} ({i})."), &format!("{ask}, done."))
        })
        .collect();
    let src = dir.join("chats.jsonl");
    std::fs::write(&src, lines.join("\n")).unwrap();
    let out = dir.join("sft");
    let opts = SftPrepareOptions {
        max_len: 60,
        val_fraction: 0.3,
        ..SftPrepareOptions::new(&out)
    };
    prepare_sft(&src, &TokenizerArg::Path(tok_path.to_path_buf()), &opts).unwrap();
    out
}

fn prepared(dir: &Path, b: usize, t: usize, v: usize, r: RankSlice) -> PreparedData<'_> {
    PreparedData {
        dir,
        batch_size: b,
        seq_len: t,
        seed: 5,
        vocab_size: v,
        pad: 0,
        val_batches: 5,
        ranks: r,
    }
}

#[test]
fn sft_ranks_draw_the_global_stream_packed_or_not_and_resume_at_any_world_size() {
    let dir = tempfile::tempdir().unwrap();
    let (tok, tok_path) = tokenizer(dir.path());
    let v = tok.vocab_size();
    let data = sft_data(dir.path(), &tok_path);
    for pack in [false, true] {
        let open = |r: RankSlice| {
            Sft::open(&prepared(&data, 2, 64, v, r))
                .unwrap()
                .with_packing(pack)
        };
        let mut one = open(RankSlice::SOLO);
        let n = one.num_examples();
        // Enough batches for more than an epoch even when packed.
        let global: Vec<SftBatch> = (0..n + 6).map(|_| one.next_batch()).collect();
        assert_eq!(global[0].packing.is_some(), pack);
        for world in [2, 3] {
            for rank in 0..world {
                let mut s = open(RankSlice::new(rank, world).unwrap());
                for (i, g) in (rank..global.len()).step_by(world).enumerate() {
                    let got = s.next_batch();
                    assert_eq!(
                        got, global[g],
                        "pack {pack}: rank {rank} of {world}, draw {i}"
                    );
                }
            }
        }

        // Four steps at W = 2: the same position on both ranks, one process's after 8.
        let pos: Vec<serde_json::Value> = (0..2)
            .map(|r| {
                let mut s = open(RankSlice::new(r, 2).unwrap());
                (0..4).for_each(|_| drop(s.next_batch()));
                Objective::<Be>::data_position(&s)
            })
            .collect();
        assert_eq!(pos[0], pos[1]);
        let mut solo = open(RankSlice::SOLO);
        (0..8).for_each(|_| drop(solo.next_batch()));
        assert_eq!(Objective::<Be>::data_position(&solo), pos[0]);
        for world in [3, 1] {
            for rank in 0..world {
                let mut s = open(RankSlice::new(rank, world).unwrap());
                Objective::<Be>::set_data_position(&mut s, &pos[0]).unwrap();
                assert_eq!(
                    s.next_batch(),
                    global[8 + rank],
                    "pack {pack}: {rank} of {world}"
                );
            }
        }
    }
}

#[test]
fn sft_validation_partials_add_up_to_one_process_packed_or_not() {
    let dir = tempfile::tempdir().unwrap();
    let (tok, tok_path) = tokenizer(dir.path());
    let v = tok.vocab_size();
    let data = sft_data(dir.path(), &tok_path);
    let mut model = tiny(v, 64, 4);
    for pack in [false, true] {
        let part = |r: RankSlice, model: &mut Gpt<Be>| {
            let mut s = Sft::open(&prepared(&data, 2, 64, v, r))
                .unwrap()
                .with_packing(pack);
            s.validate(&CpuBackend, model).unwrap().unwrap()
        };
        let one = part(RankSlice::SOLO, &mut model);
        for world in [2, 3] {
            let parts: Vec<ValPartial> = (0..world)
                .map(|r| part(RankSlice::new(r, world).unwrap(), &mut model))
                .collect();
            if !pack {
                // Five unpacked batches: every rank scores at least one.
                assert!(parts.iter().all(|p| p.count > 0.0), "{parts:?}");
            }
            assert_adds_up(&format!("sft pack {pack} W = {world}"), &parts, one);
        }
    }
}

// ---- reward and dpo (pairs) ----------------------------------------------------------------

fn prefs_data(dir: &Path, tok: &Tokenizer) -> PathBuf {
    let things = [
        "the sky",
        "grass",
        "snow",
        "coal",
        "a lemon",
        "a tomato",
        "the sea",
        "an orange",
        "milk",
        "a leaf",
        "a cloud",
        "the sun",
        "a plum",
        "rust",
        "ash",
        "a rose",
    ];
    let lines: Vec<String> = things
        .iter()
        .enumerate()
        .map(|(i, x)| {
            serde_json::json!({
                "prompt": format!("What color is {x}?"),
                "chosen": format!("It is colour {i}."),
                "rejected": "no",
            })
            .to_string()
        })
        .collect();
    let src = dir.join("prefs.jsonl");
    std::fs::write(&src, lines.join("\n")).unwrap();
    let out = dir.join("prefs");
    let opts = PrefsPrepareOptions {
        max_len: 32,
        val_fraction: 0.5,
        ..PrefsPrepareOptions::new(&out)
    };
    let s = data::prepare_prefs(&src, tok, &opts).unwrap();
    assert!(s.train_pairs >= 6 && s.val_pairs >= 6, "{s:?}");
    out
}

fn pair_loader(data: &Path, v: usize, r: RankSlice) -> PairLoader {
    let split = PairSplit::open(data, "prefs_train", v).unwrap();
    PairLoader::new(split, 2, 32, 0, 9).unwrap().with_ranks(r)
}

#[test]
fn pair_ranks_draw_the_global_stream_strided_and_resume_at_any_world_size() {
    let dir = tempfile::tempdir().unwrap();
    let (tok, _) = tokenizer(dir.path());
    let v = tok.vocab_size();
    let data = prefs_data(dir.path(), &tok);
    let mut one = pair_loader(&data, v, RankSlice::SOLO);
    let global: Vec<_> = (0..one.num_pairs() + 5).map(|_| one.next_batch()).collect();
    for world in [2, 3] {
        for rank in 0..world {
            let mut l = pair_loader(&data, v, RankSlice::new(rank, world).unwrap());
            for (i, g) in (rank..global.len()).step_by(world).enumerate() {
                assert_eq!(
                    l.next_batch(),
                    global[g],
                    "rank {rank} of {world}, draw {i}"
                );
            }
        }
    }
    // Through the objectives' saved form (reward and dpo share the pair stream).
    let pp = |r: RankSlice| prepared(&data, 4, 32, v, r);
    let mut at2: Vec<Reward> = (0..2)
        .map(|r| Reward::open(&pp(RankSlice::new(r, 2).unwrap())).unwrap())
        .collect();
    let mut l2: Vec<PairLoader> = (0..2)
        .map(|r| pair_loader(&data, v, RankSlice::new(r, 2).unwrap()))
        .collect();
    for l in &mut l2 {
        (0..3).for_each(|_| drop(l.next_pairs()));
    }
    assert_eq!(l2[0].position(), l2[1].position());
    let pos = serde_json::to_value(l2[0].position()).unwrap();
    for o in &mut at2 {
        Objective::<Be>::set_data_position(o, &pos).unwrap();
        assert_eq!(Objective::<Be>::data_position(o), pos);
    }
    for world in [3, 1] {
        for rank in 0..world {
            let r = RankSlice::new(rank, world).unwrap();
            let mut d = Dpo::open(&pp(r), DpoLoss::Sigmoid, 0.1).unwrap();
            Objective::<Be>::set_data_position(&mut d, &pos).unwrap();
            let mut l = pair_loader(&data, v, r);
            l.set_position(serde_json::from_value(pos.clone()).unwrap())
                .unwrap();
            assert_eq!(l.next_batch(), global[6 + rank], "rank {rank} of {world}");
        }
    }
}

#[test]
fn reward_validation_partials_add_up_to_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let (tok, _) = tokenizer(dir.path());
    let v = tok.vocab_size();
    let data = prefs_data(dir.path(), &tok);
    let mut model = tiny(v, 32, 6);
    model.init_reward_head(&CpuBackend, 2).unwrap();
    // 2 pairs per batch, at most 5 batches.
    let part = |r: RankSlice, model: &mut Gpt<Be>| {
        let mut o = Reward::open(&prepared(&data, 4, 32, v, r)).unwrap();
        o.validate(&CpuBackend, model).unwrap().unwrap()
    };
    let one = part(RankSlice::SOLO, &mut model);
    for world in [2, 3] {
        let parts: Vec<ValPartial> = (0..world)
            .map(|r| part(RankSlice::new(r, world).unwrap(), &mut model))
            .collect();
        assert!(parts.iter().all(|p| p.count > 0.0), "{parts:?}");
        assert_adds_up(&format!("reward W = {world}"), &parts, one);
    }
}

#[test]
fn dpo_reference_is_computed_per_rank_equal_to_one_process_and_validation_adds_up() {
    let dir = tempfile::tempdir().unwrap();
    let (tok, _) = tokenizer(dir.path());
    let v = tok.vocab_size();
    let data = prefs_data(dir.path(), &tok);
    let be = CpuBackend;
    let mut reference = tiny(v, 32, 8);
    let open = |r: RankSlice| Dpo::open(&prepared(&data, 2, 32, v, r), DpoLoss::Sigmoid, 0.1);
    let solo = open(RankSlice::SOLO).unwrap();
    let full = solo.reference_pass(&be, &mut reference).unwrap();
    // Two global micro-batches (one step at W = 2): 4 of the training pairs.
    for world in [2, 3] {
        let mut union = Vec::new();
        for rank in 0..world {
            let d = open(RankSlice::new(rank, world).unwrap()).unwrap();
            let need = d.rank_pairs(1);
            assert_eq!(
                need.0.len(),
                2,
                "rank {rank} of {world}: one micro-batch of 2 pairs"
            );
            let mut table = d.empty_reference();
            d.fill_reference(&be, &mut reference, &mut table, &need)
                .unwrap();
            for (have, want, pairs, split) in [
                (&table.train, &full.train, &need.0, "train"),
                (&table.val, &full.val, &need.1, "val"),
            ] {
                for (p, got) in have.iter().enumerate() {
                    if pairs.contains(&p) {
                        assert_eq!(
                            got.map(f64::to_bits),
                            want[p].map(f64::to_bits),
                            "{split} {p}"
                        );
                    } else {
                        assert!(got[0].is_nan(), "rank {rank} computed {split} pair {p}");
                    }
                }
            }
            union.extend(need.0);
        }
        // Together the ranks cover the pairs of the first W global micro-batches.
        union.sort();
        let mut want = solo.rank_pairs(world as u64).0;
        want.sort();
        assert_eq!(union, want, "W = {world}");
    }

    // Validation against the full table: the ranks' partials add up to one process's.
    let mut policy = tiny(v, 32, 9);
    let part = |r: RankSlice, policy: &mut Gpt<Be>| {
        let mut d = open(r).unwrap();
        d.set_reference(full.clone()).unwrap();
        d.validate(&be, policy).unwrap().unwrap()
    };
    let one = part(RankSlice::SOLO, &mut policy);
    for world in [2, 3] {
        let parts: Vec<ValPartial> = (0..world)
            .map(|r| part(RankSlice::new(r, world).unwrap(), &mut policy))
            .collect();
        assert_adds_up(&format!("dpo W = {world}"), &parts, one);
    }
}

#[test]
fn dpo_refuses_a_pair_the_reference_pass_did_not_cover() {
    let dir = tempfile::tempdir().unwrap();
    let (tok, _) = tokenizer(dir.path());
    let v = tok.vocab_size();
    let data = prefs_data(dir.path(), &tok);
    let be = CpuBackend;
    let mut model = tiny(v, 32, 8);
    let r = RankSlice::new(1, 2).unwrap();
    let mut d = Dpo::open(&prepared(&data, 2, 32, v, r), DpoLoss::Sigmoid, 0.1).unwrap();
    let need = d.rank_pairs(1);
    let mut table = d.empty_reference();
    d.fill_reference(&be, &mut model, &mut table, &need)
        .unwrap();
    d.set_reference(table).unwrap();
    let mut rng = Rng::new(1);
    d.micro_step(&be, &mut model, &mut rng, 1.0).unwrap();
    let e = d.micro_step(&be, &mut model, &mut rng, 1.0).unwrap_err();
    let e = e.to_string();
    assert!(
        e.contains("rank 1 of 2: no reference log-probability for train pair")
            && e.contains("ref_logps.bin"),
        "{e}"
    );
}

// ---- rl ------------------------------------------------------------------------------------

/// What each micro-step of an RL objective sampled: `(prompt, completion)` per completion.
type Drawn = Rc<RefCell<Vec<(Vec<u32>, Vec<u32>)>>>;

fn rl(world: usize, rank: usize, accum: usize, drawn: &Drawn) -> Rl<Be> {
    let prompts: Vec<Vec<u32>> = (0..9u32).map(|i| vec![1 + i, 2 + 2 * i, 3]).collect();
    let cfg = RlConfig {
        prompts: 2,
        k: 2,
        kl_coef: 0.05,
        clip: 0.2,
        max_new: 4,
        epochs: 1,
        t: 12,
        accum,
        stop: None,
        pad: 0,
    };
    let log = drawn.clone();
    let scorer = FnScorer(move |p: &[u32], c: &[u32]| {
        log.borrow_mut().push((p.to_vec(), c.to_vec()));
        c.len() as f32
    });
    Rl::new(prompts, tiny(40, 12, 2), Box::new(scorer), cfg)
        .unwrap()
        .with_ranks(17, RankSlice::new(rank, world).unwrap())
}

/// Each micro-step's samples over `n` micro-steps.
fn rl_draws(o: &mut Rl<Be>, drawn: &Drawn, n: usize) -> Vec<Vec<(Vec<u32>, Vec<u32>)>> {
    let mut policy = tiny(40, 12, 2);
    let mut rng = Rng::new(0);
    (0..n)
        .map(|_| {
            let before = drawn.borrow().len();
            o.micro_step(&CpuBackend, &mut policy, &mut rng, 0.5)
                .unwrap();
            drawn.borrow()[before..].to_vec()
        })
        .collect()
}

#[test]
fn rl_ranks_sample_their_own_rollouts_the_same_per_global_micro_batch_at_any_world_size() {
    let drawn: Drawn = Rc::default();
    let global = rl_draws(&mut rl(1, 0, 6, &drawn), &drawn, 6);
    for world in [2, 3] {
        let mut firsts = Vec::new();
        for rank in 0..world {
            let mut o = rl(world, rank, 6 / world, &drawn);
            let mine = rl_draws(&mut o, &drawn, 6 / world);
            for (i, got) in mine.iter().enumerate() {
                assert_eq!(
                    got,
                    &global[i * world + rank],
                    "rank {rank} of {world}, step {i}"
                );
            }
            firsts.push(mine[0].clone());
            // One step done: the next is global micro-batch 6 at every world size.
            let pos = Objective::<Be>::data_position(&o);
            assert_eq!(pos, serde_json::json!({"global_micro_batch": 6}));
        }
        assert_ne!(
            firsts[0], firsts[1],
            "ranks 0 and 1 of {world} sampled alike"
        );
    }

    // Positions: a W = 2 one restores at W = 3 and 1; an older single-rank one reads as
    // global; one that starts no step at this world size is refused by name.
    for world in [3, 1] {
        let mut o = rl(world, world - 1, 6 / world, &drawn);
        let pos = serde_json::json!({"global_micro_batch": 6});
        Objective::<Be>::set_data_position(&mut o, &pos).unwrap();
        assert_eq!(Objective::<Be>::data_position(&o), pos);
    }
    let mut o = rl(1, 0, 6, &drawn);
    let old = serde_json::json!({"micro_steps": 4});
    Objective::<Be>::set_data_position(&mut o, &old).unwrap();
    let next = rl_draws(&mut o, &drawn, 2);
    assert_eq!(next, global[4..6].to_vec());
    let mut o = rl(3, 0, 2, &drawn);
    let e = Objective::<Be>::set_data_position(&mut o, &serde_json::json!({"micro_steps": 4}))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("global micro-batch 4 does not start a step at world size 3"),
        "{e}"
    );
}
