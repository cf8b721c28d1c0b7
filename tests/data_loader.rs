//! The window loader: determinism, shuffling, shifted targets, ranks, resume, sequential mode.

use std::collections::HashSet;
use std::path::PathBuf;

use topcoat::data::{write_shard, Batch, Loader, LoaderPosition};

const VOCAB: usize = 60_000;

/// Two shards of distinct tokens (every token value appears once), so a window is known by its
/// first token.
fn shards(dir: &std::path::Path) -> Vec<PathBuf> {
    let a = dir.join("train_000000.bin");
    let b = dir.join("train_000001.bin");
    write_shard(&a, &(0..1000).collect::<Vec<u32>>(), VOCAB).unwrap();
    write_shard(&b, &(1000..1750).collect::<Vec<u32>>(), VOCAB).unwrap();
    vec![a, b]
}

fn draw(l: &mut Loader, n: usize) -> Vec<Batch> {
    (0..n).map(|_| l.next_batch()).collect()
}

#[test]
fn deterministic_from_seed_and_seeds_differ() {
    let dir = tempfile::tempdir().unwrap();
    let p = shards(dir.path());
    let mut a = Loader::sequential(&p, 4, 16, 0, 1, VOCAB)
        .map(|l| l.shuffled(42))
        .unwrap();
    let mut b = Loader::sequential(&p, 4, 16, 0, 1, VOCAB)
        .map(|l| l.shuffled(42))
        .unwrap();
    let mut c = Loader::sequential(&p, 4, 16, 0, 1, VOCAB)
        .map(|l| l.shuffled(43))
        .unwrap();
    let (xa, xb, xc) = (draw(&mut a, 30), draw(&mut b, 30), draw(&mut c, 30));
    assert_eq!(xa, xb);
    assert_ne!(xa, xc);
}

#[test]
fn targets_are_inputs_shifted_by_one_and_windows_cover_shards() {
    let dir = tempfile::tempdir().unwrap();
    let p = shards(dir.path());
    let t = 16;
    let mut l = Loader::sequential(&p, 2, t, 0, 1, VOCAB)
        .map(|l| l.shuffled(1))
        .unwrap();
    // (1000 - 1) / 16 + (750 - 1) / 16 windows.
    assert_eq!(l.num_windows(), 62 + 46);
    let mut starts = HashSet::new();
    for _ in 0..l.num_windows() / 2 {
        let batch = l.next_batch();
        assert_eq!((batch.b, batch.t), (2, t));
        assert_eq!(batch.inputs.len(), 2 * t);
        for r in 0..2 {
            let x = &batch.inputs[r * t..(r + 1) * t];
            let y = &batch.targets[r * t..(r + 1) * t];
            assert_eq!(&x[1..], &y[..t - 1]);
            assert_eq!(
                y[t - 1],
                x[t - 1] + 1,
                "tokens are consecutive within a shard"
            );
            let base = if x[0] < 1000 { 0 } else { 1000 };
            assert_eq!((x[0] - base) % 16, 0, "windows start at multiples of T");
            starts.insert(x[0]);
        }
    }
    // One epoch visits every window exactly once.
    assert_eq!(starts.len() as u64, l.num_windows());
}

#[test]
fn two_ranks_see_disjoint_batches() {
    let dir = tempfile::tempdir().unwrap();
    let p = shards(dir.path());
    let mut r0 = Loader::sequential(&p, 3, 8, 0, 2, VOCAB)
        .map(|l| l.shuffled(5))
        .unwrap();
    let mut r1 = Loader::sequential(&p, 3, 8, 1, 2, VOCAB)
        .map(|l| l.shuffled(5))
        .unwrap();
    let mut whole = Loader::sequential(&p, 3, 8, 0, 1, VOCAB)
        .map(|l| l.shuffled(5))
        .unwrap();
    let n = r0.batches_per_epoch() as usize;
    let (b0, b1) = (draw(&mut r0, n), draw(&mut r1, n));
    let rows = |bs: &[Batch]| -> HashSet<Vec<i32>> {
        bs.iter()
            .flat_map(|b| b.inputs.chunks(b.t).map(|r| r.to_vec()).collect::<Vec<_>>())
            .collect()
    };
    let (s0, s1) = (rows(&b0), rows(&b1));
    assert_eq!(s0.len(), 3 * n);
    assert!(s0.is_disjoint(&s1));
    // Interleaved, the ranks draw exactly the single-process stream.
    let all = draw(&mut whole, 2 * n);
    for i in 0..n {
        assert_eq!(all[2 * i], b0[i]);
        assert_eq!(all[2 * i + 1], b1[i]);
    }
}

#[test]
fn position_resumes_exactly_across_epochs() {
    let dir = tempfile::tempdir().unwrap();
    let p = shards(dir.path());
    for (k, m) in [(3, 5), (40, 30), (0, 7)] {
        let mut a = Loader::sequential(&p, 4, 16, 1, 2, VOCAB)
            .map(|l| l.shuffled(9))
            .unwrap();
        draw(&mut a, k);
        let pos = a.position();
        let json = serde_json::to_string(&pos).unwrap();
        let want = draw(&mut a, m);
        let mut b = Loader::sequential(&p, 4, 16, 1, 2, VOCAB)
            .map(|l| l.shuffled(9))
            .unwrap();
        b.set_position(serde_json::from_str::<LoaderPosition>(&json).unwrap());
        assert_eq!(draw(&mut b, m), want, "k = {k}, m = {m}");
    }
}

#[test]
fn sequential_mode_reads_in_order_and_resets() {
    let dir = tempfile::tempdir().unwrap();
    let p = shards(dir.path());
    let mut l = Loader::sequential(&p, 2, 10, 0, 1, VOCAB).unwrap();
    let first = l.next_batch();
    assert_eq!(first.inputs[0], 0);
    assert_eq!(first.inputs[10], 10);
    let _ = l.next_batch();
    l.reset();
    assert_eq!(l.next_batch(), first);
}

#[test]
fn no_window_or_no_paths_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("small.bin");
    write_shard(&p, &[1, 2, 3, 4, 5], VOCAB).unwrap();
    let msg = Loader::sequential(&[&p], 1, 8, 0, 1, VOCAB)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("T+1 = 9"), "{msg}");
    assert!(msg.contains("small.bin (5 tokens)"), "{msg}");
    let none: [PathBuf; 0] = [];
    let msg = Loader::sequential(&none, 1, 8, 0, 1, VOCAB)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("no shard files"), "{msg}");
}
