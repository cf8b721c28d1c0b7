//! LoRA's ops on the CPU reference: `add_columns` and `copy_columns` exactly against their
//! definitions in f64, each the other's adjoint (which is what the adapter's backward relies
//! on); the seeded dropout's mask (the same seed the same mask, p = 0 the identity, about
//! `1 - p` kept), its backward the same map (its own adjoint); the f32 backend equal to the
//! f64 functions; and the shape errors naming the buffer or argument.

use super::*;
use topcoat::backend::cpu::lora;

/// A row slice `col .. col + W` of `OC` columns, off both edges.
const COL: usize = 2;
const W: usize = 3;

#[test]
fn column_ops_are_exact_and_adjoint() {
    let mut rng = Rng::new(71);
    let y0 = randn(N * OC, &mut rng);
    let x = randn(N * W, &mut rng);
    let alpha = 0.375; // exact in binary: f32 and f64 see the same products
    let mut y = y0.clone();
    lora::add_columns(&mut y, &x, N, OC, COL, W, alpha);
    for r in 0..N {
        for j in 0..OC {
            let want = match j.checked_sub(COL).filter(|&k| k < W) {
                Some(k) => y0[r * OC + j] + alpha * x[r * W + k],
                None => y0[r * OC + j],
            };
            assert_eq!(y[r * OC + j], want, "add_columns ({r}, {j})");
        }
    }
    // <copy(dy), x> == <dy, add(0, x)>: copy_columns is add_columns' transpose.
    let dy = randn(N * OC, &mut rng);
    let mut copied = vec![f64::NAN; N * W];
    lora::copy_columns(&mut copied, &dy, N, OC, COL, W, alpha);
    let mut added = vec![0.0; N * OC];
    lora::add_columns(&mut added, &x, N, OC, COL, W, alpha);
    let (lhs, rhs) = (dot(&copied, &x), dot(&dy, &added));
    assert!(
        (lhs - rhs).abs() <= ACC_TOL * lhs.abs().max(1.0),
        "{lhs} vs {rhs}"
    );

    // The f32 backend computes the same.
    let be = CpuBackend::new();
    let mut y32 = to32(&y0);
    be.add_columns(&mut y32, &to32(&x), N, OC, COL, W, alpha as f32)
        .unwrap();
    assert!(rel_err(&to64(&y32), &y) <= F32_TOL);
    // A copy times a power of two is exact in f32.
    let mut c32 = vec![f32::NAN; N * W];
    be.copy_columns(&mut c32, &to32(&dy), N, OC, COL, W, 0.25)
        .unwrap();
    lora::copy_columns(&mut copied, &dy, N, OC, COL, W, 0.25);
    assert_eq!(to64(&c32), copied);
}

#[test]
fn dropout_mask_follows_the_seed_and_backward_is_its_adjoint() {
    let be = CpuBackend::new();
    let mut rng = Rng::new(72);
    let n = 4099;
    let x = to32(&randn(n, &mut rng));
    let run = |p: f32, seed: u64| {
        let mut out = vec![f32::NAN; n];
        be.dropout_forward(&mut out, &x, n, p, seed).unwrap();
        out
    };
    let a = run(0.3, 5);
    assert_eq!(a, run(0.3, 5), "the same seed, the same mask");
    assert_ne!(a, run(0.3, 6), "another seed, another mask");
    assert_eq!(run(0.0, 5), x, "p = 0 is the identity");
    let scale = 1.0 / (1.0 - 0.3f32);
    let mut kept = 0;
    for (i, (&o, &xi)) in a.iter().zip(&x).enumerate() {
        if lora::dropout_keep(lora::dropout_key(5), i as u64, 0.3) {
            assert_eq!(o, xi * scale, "kept {i}");
            kept += 1;
        } else {
            assert_eq!(o, 0.0, "dropped {i}");
        }
    }
    let frac = kept as f64 / n as f64;
    assert!((frac - 0.7).abs() < 0.03, "kept {frac}");
    // Backward: the same diagonal map, so <drop(x), dy> == <x, drop_back(dy)>.
    let dy = to32(&randn(n, &mut rng));
    let mut dx = vec![f32::NAN; n];
    be.dropout_backward(&mut dx, &dy, n, 0.3, 5).unwrap();
    let (lhs, rhs) = (dot(&to64(&a), &to64(&dy)), dot(&to64(&x), &to64(&dx)));
    assert!(
        (lhs - rhs).abs() <= 1e-5 * lhs.abs().max(1.0),
        "{lhs} vs {rhs}"
    );
}

#[test]
fn lora_ops_refuse_wrong_shapes_naming_the_buffer() {
    let be = CpuBackend::new();
    let z = |n: usize| vec![0.0f32; n];
    match be.add_columns(&mut z(N * OC), &z(N * W - 1), N, OC, COL, W, 1.0) {
        Err(BackendError::Shape { op, what, .. }) => assert_eq!((op, what), ("add_columns", "x")),
        other => panic!("{other:?}"),
    }
    match be.copy_columns(&mut z(N * W), &z(N * OC), N, OC, OC - 1, W, 1.0) {
        Err(BackendError::Invalid { op, msg }) => {
            assert_eq!(op, "copy_columns");
            assert!(msg.contains("outside a row of OC = 7"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    match be.add_columns(&mut z(N * OC), &z(N * W), N, OC, COL, W, f32::NAN) {
        Err(BackendError::Invalid { msg, .. }) => assert!(msg.contains("alpha"), "{msg}"),
        other => panic!("{other:?}"),
    }
    match be.dropout_forward(&mut z(8), &z(8), 8, 1.0, 0) {
        Err(BackendError::Invalid { op, msg }) => {
            assert_eq!(op, "dropout_forward");
            assert!(msg.contains("outside [0, 1)"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
    match be.dropout_backward(&mut z(8), &z(7), 8, 0.5, 0) {
        Err(BackendError::Shape { op, what, .. }) => {
            assert_eq!((op, what), ("dropout_backward", "dout"))
        }
        other => panic!("{other:?}"),
    }
}
