//! Token sampling against the CPU rule.

use super::*;

/// Sampled tokens may differ from the CPU's on at most this fraction of rows: only where a
/// running probability sum lands within rounding of its target (fp32 on the GPU, f64 on the CPU).
const SAMPLE_MISMATCH: f64 = 0.01;

/// Token sampling against the CPU rule, given the same bf16 logits and uniforms.
fn sample_tokens<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(10);
    let p = |temperature: f32, top_k: usize, top_p: f32| topcoat::backend::SampleParams {
        temperature,
        top_k,
        top_p,
    };
    let rules = [
        topcoat::backend::SampleParams::GREEDY,
        p(1.0, 1, 1.0),
        p(1.0, 0, 1.0),
        p(0.7, 40, 1.0),
        p(1.0, 0, 0.9),
        p(1.3, 50, 0.8),
        p(0.8, 3, 0.37),
    ];
    // (N, V, VP, tied): GPT-2's vocabulary, a small one, and coarse logits full of ties.
    for (n, v, vp, tied) in [
        (16, 50257, 50304, false),
        (300, 100, 128, false),
        (200, 300, 320, true),
    ] {
        let mut logits = randn(&mut rng, n * vp, 2.0);
        for (i, x) in logits.iter_mut().enumerate() {
            if i % vp >= v {
                *x = 1e4; // padding: must never be drawn
            } else if tied {
                *x = (*x * 2.0).round() / 2.0;
            }
        }
        let glogits = up(be, &logits, Role::Activation);
        for rule in &rules {
            let u: Vec<f32> = (0..n).map(|_| rng.next_f32()).collect();
            let want = cpu.sample_tokens(&logits, n, v, vp, rule, &u).unwrap();
            let got = be.sample_tokens(&glogits, n, v, vp, rule, &u).unwrap();
            assert!(
                got.iter().all(|&t| (t as usize) < v),
                "{rule:?}: a padded column drawn"
            );
            let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            println!("sample_tokens V={v} tied={tied} {rule:?}: {differ} of {n} rows differ");
            if rule.is_greedy() {
                assert_eq!(got, want, "greedy must match exactly");
            } else {
                assert!(
                    differ as f64 <= SAMPLE_MISMATCH * n as f64,
                    "{rule:?}: {differ} of {n} rows differ from the CPU rule"
                );
            }
        }
    }
    // Bad parameters are refused before a launch.
    let x = be.zeros(2 * 8, Role::Activation).unwrap();
    assert!(be
        .sample_tokens(&x, 2, 6, 8, &p(1.0, 0, 0.0), &[0.1, 0.2])
        .is_err());
    assert!(be
        .sample_tokens(&x, 2, 6, 8, &p(1.0, 0, 1.0), &[0.1, 1.0])
        .is_err());
}
parity_tests!(sample_tokens => sample_tokens_cpu, sample_tokens_cuda);
