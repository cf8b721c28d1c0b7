//! The block-causal products against plain loops over every `(i, j)`, in f64, at a `T`
//! spanning several blocks with a short last one (the integration tests use a short `T`),
//! plain causal and with examples packed into rows (starts that skip whole blocks, cross
//! block boundaries, and single-token examples), and grouped key/value heads against repeated
//! ones.

use super::*;

const B: usize = 2;
const T: usize = 2 * BLOCK + 13;
const C: usize = 12;
const NH: usize = 3;

/// Deterministic pseudo-random values in [-1, 1).
fn values(len: usize, seed: u64) -> Vec<f64> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect()
}

/// Row-by-row reference: (out, lse, dqkv) from the formulas in the doc comments; query `i` of
/// row `bb` attends keys `starts[bb*T + i] ..= i`.
fn naive(qkv: &[f64], dout: &[f64], starts: &[i32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let hs = C / NH;
    let scale = 1.0 / (hs as f64).sqrt();
    let at = |bb: usize, i: usize, part: usize, h: usize| (bb * T + i) * 3 * C + part * C + h * hs;
    let (mut out, mut lse, mut dqkv) = (
        vec![0.0; B * T * C],
        vec![0.0; B * NH * T],
        vec![0.0; B * T * 3 * C],
    );
    for bb in 0..B {
        for h in 0..NH {
            let s = |i: usize, j: usize| {
                (0..hs)
                    .map(|d| qkv[at(bb, i, 0, h) + d] * qkv[at(bb, j, 1, h) + d])
                    .sum::<f64>()
                    * scale
            };
            let mut p = vec![vec![0.0; T]; T];
            let first = |i: usize| starts[bb * T + i] as usize;
            for i in 0..T {
                let max = (first(i)..=i)
                    .map(|j| s(i, j))
                    .fold(f64::NEG_INFINITY, f64::max);
                let l = max
                    + (first(i)..=i)
                        .map(|j| (s(i, j) - max).exp())
                        .sum::<f64>()
                        .ln();
                lse[(bb * NH + h) * T + i] = l;
                for j in first(i)..=i {
                    p[i][j] = (s(i, j) - l).exp();
                    for d in 0..hs {
                        out[(bb * T + i) * C + h * hs + d] += p[i][j] * qkv[at(bb, j, 2, h) + d];
                    }
                }
            }
            for i in 0..T {
                let dy = |d: usize| dout[(bb * T + i) * C + h * hs + d];
                let d_i: f64 = (0..hs)
                    .map(|d| dy(d) * out[(bb * T + i) * C + h * hs + d])
                    .sum();
                for j in first(i)..=i {
                    let dp: f64 = (0..hs).map(|d| dy(d) * qkv[at(bb, j, 2, h) + d]).sum();
                    let ds = p[i][j] * (dp - d_i) * scale;
                    for d in 0..hs {
                        dqkv[at(bb, j, 2, h) + d] += p[i][j] * dy(d);
                        dqkv[at(bb, i, 0, h) + d] += ds * qkv[at(bb, j, 1, h) + d];
                        dqkv[at(bb, j, 1, h) + d] += ds * qkv[at(bb, i, 0, h) + d];
                    }
                }
            }
        }
    }
    (out, lse, dqkv)
}

fn assert_close(what: &str, got: &[f64], want: &[f64]) {
    let err = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    let norm = want.iter().map(|b| b * b).sum::<f64>().sqrt();
    assert!(
        err <= 1e-12 * norm,
        "{what}: relative error {:.3e}",
        err / norm
    );
}

/// Runs the blocked forward and backward with `starts` (or none) against [`naive`].
fn check(starts: Option<&[i32]>, seed: u64) {
    let plain: Vec<i32> = vec![0; B * T];
    let qkv = values(B * T * 3 * C, seed);
    let dout = values(B * T * C, seed + 1);
    let (want_out, want_lse, want_dqkv) = naive(&qkv, &dout, starts.unwrap_or(&plain));
    let (mut out, mut lse) = (vec![f64::NAN; B * T * C], vec![f64::NAN; B * NH * T]);
    attention_forward(&mut out, &mut lse, &qkv, starts, B, T, C, NH);
    assert_close("out", &out, &want_out);
    assert_close("lse", &lse, &want_lse);
    let mut dqkv = vec![0.0; B * T * 3 * C];
    attention_backward(&mut dqkv, &dout, &qkv, &out, &lse, starts, B, T, C, NH);
    assert_close("dqkv", &dqkv, &want_dqkv);
}

#[test]
fn block_causal_attention_matches_row_loops_across_blocks() {
    check(None, 1);
}

#[test]
fn packed_attention_matches_row_loops_across_blocks() {
    // Row 0: examples at [0, 5), [5, 70) (crosses the first block boundary), [70, 135)
    // (its later rows skip the whole first block), [135, T). Row 1: one long example, examples
    // of 3 tokens, then a run of single-token examples.
    let mut starts = Vec::with_capacity(B * T);
    for i in 0..T {
        starts.push(match i {
            0..5 => 0,
            5..70 => 5,
            70..135 => 70,
            _ => 135,
        });
    }
    for i in 0..T {
        starts.push(match i {
            0..100 => 0,
            100..121 => (100 + (i - 100) / 3 * 3) as i32,
            _ => i as i32,
        });
    }
    crate::backend::shapes::attention_starts("test", Some(&starts), B, T).unwrap();
    check(Some(&starts), 3);
}

/// Multi-query attention (`NKV = 1`) at a `T` spanning several blocks, plain and packed in
/// examples of 50 tokens: the same as multi-head attention on the key/value head repeated for
/// every query head, whose key/value gradients sum into the shared head.
#[test]
fn grouped_kv_heads_match_repeated_heads_across_blocks() {
    let hs = C / NH;
    let w = (NH + 2) * hs;
    let qkv = values(B * T * w, 5);
    let dout = values(B * T * C, 6);
    let mha: Vec<f64> = qkv
        .chunks(w)
        .flat_map(|row| {
            let (q, kv) = row.split_at(C);
            let (k, v) = kv.split_at(hs);
            let mut r = q.to_vec();
            (0..NH).for_each(|_| r.extend_from_slice(k));
            (0..NH).for_each(|_| r.extend_from_slice(v));
            r
        })
        .collect();
    let packed: Vec<i32> = (0..B * T).map(|k| (k % T - k % T % 50) as i32).collect();
    for starts in [None, Some(&packed[..])] {
        let (mut out, mut lse) = (vec![f64::NAN; B * T * C], vec![f64::NAN; B * NH * T]);
        attention_gqa_forward(&mut out, &mut lse, &qkv, starts, B, T, C, NH, 1);
        let (mut out_m, mut lse_m) = (vec![f64::NAN; B * T * C], vec![f64::NAN; B * NH * T]);
        attention_forward(&mut out_m, &mut lse_m, &mha, starts, B, T, C, NH);
        assert_close("out", &out, &out_m);
        assert_close("lse", &lse, &lse_m);
        let mut g = vec![f64::NAN; B * T * w];
        attention_gqa_backward(&mut g, &dout, &qkv, &out, &lse, starts, B, T, C, NH, 1);
        let mut g_m = vec![f64::NAN; B * T * 3 * C];
        attention_backward(&mut g_m, &dout, &mha, &out, &lse, starts, B, T, C, NH);
        let want: Vec<f64> = g_m
            .chunks(3 * C)
            .flat_map(|row| {
                let mut r = row[..C].to_vec();
                for part in 1..3 {
                    r.extend(
                        (0..hs).map(|d| (0..NH).map(|h| row[part * C + h * hs + d]).sum::<f64>()),
                    );
                }
                r
            })
            .collect();
        assert_close("dqkv", &g, &want);
    }
}
