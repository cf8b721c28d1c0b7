//! Pretraining and SFT data across data-parallel ranks: rank `r` of `W` draws exactly
//! micro-batches `r, r + W, ...` of the stream one process draws (compared token for token at
//! W = 2 and 3, across epoch boundaries); a data position saved at W = 2 restores at W = 3 and
//! W = 1 to the same next global micro-batch; validation partial sums of the W ranks add up, in
//! rank order, to the one-process sum and count. Preferences and RL: dist_stages_prefs.rs.

mod common;

use common::ranks::{assert_adds_up, prepared, tiny, tokenizer, Be};
use std::path::{Path, PathBuf};
use topcoat::backend::cpu::CpuBackend;
use topcoat::commands::inputs::TokenizerArg;
use topcoat::commands::prepare::{prepare_sft, EMBEDDED_CORPUS};
use topcoat::data::{self, Loader, RankSlice, SftPrepareOptions, Tokenizer};
use topcoat::model::Gpt;
use topcoat::stages::pretrain::{split_files, Pretrain};
use topcoat::stages::sft::{Sft, SftBatch};
use topcoat::train::{Objective, ValPartial};

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
