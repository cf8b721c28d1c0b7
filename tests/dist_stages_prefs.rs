//! Preference and RL data across data-parallel ranks: pair streams strided by rank and resumed
//! at any world size, reward and DPO validation partial sums adding up to one process's, DPO's
//! per-rank reference log-probabilities equal to one process's, and RL ranks sampling their own
//! rollouts, the same per global micro-batch at every world size.

mod common;

use common::ranks::{assert_adds_up, prepared, tiny, tokenizer, Be};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use topcoat::backend::cpu::CpuBackend;
use topcoat::data::{self, PairLoader, PairSplit, PrefsPrepareOptions, RankSlice, Tokenizer};
use topcoat::model::Gpt;
use topcoat::rng::Rng;
use topcoat::stages::dpo::{Dpo, DpoLoss};
use topcoat::stages::reward::Reward;
use topcoat::stages::rl::{FnScorer, Rl, RlConfig};
use topcoat::train::{Objective, ValPartial};

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
