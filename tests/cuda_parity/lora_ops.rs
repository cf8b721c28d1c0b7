//! LoRA's ops against the CPU reference: the column-slice add and copy (bf16 storage, shapes
//! off every block size), and the seeded dropout, whose mask must be the CPU's bit for bit
//! (the backward recomputes it from the seed on whichever backend runs).

use super::*;

fn columns<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(81);
    for (n, oc, col, w) in [
        (5, 12, 4, 3),
        (33, 3 * 64, 64, 64),
        (70, 577, 0, 577),
        (9, 300, 299, 1),
    ] {
        let x = randn(&mut rng, n * w, 1.0);
        let y0 = randn(&mut rng, n * oc, 1.0);
        let alpha = 1.75;
        let mut want = y0.clone();
        cpu.add_columns(&mut want, &x, n, oc, col, w, alpha)
            .unwrap();
        let mut gy = up(be, &y0, Role::Activation);
        be.add_columns(&mut gy, &up(be, &x, Role::Activation), n, oc, col, w, alpha)
            .unwrap();
        assert_close("add_columns y", &down(be, &gy), &want, BF16_TOL);
        // The columns outside the slice are untouched, bit for bit.
        let got = down(be, &gy);
        for r in 0..n {
            for j in (0..oc).filter(|j| !(col..col + w).contains(j)) {
                assert_eq!(got[r * oc + j], y0[r * oc + j], "add_columns ({r}, {j})");
            }
        }

        let mut want = vec![0.0; n * w];
        cpu.copy_columns(&mut want, &y0, n, oc, col, w, alpha)
            .unwrap();
        let mut gout = up(be, &nan(n * w), Role::Activation);
        be.copy_columns(
            &mut gout,
            &up(be, &y0, Role::Activation),
            n,
            oc,
            col,
            w,
            alpha,
        )
        .unwrap();
        assert_close("copy_columns out", &down(be, &gout), &want, BF16_TOL);
    }
}

parity_tests!(columns => columns_cpu, columns_cuda);

fn dropout<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(82);
    for (n, p, seed) in [
        (1000, 0.1f32, 3u64),
        (65_537, 0.5, u64::MAX),
        (4097, 0.0, 9),
    ] {
        let x = randn(&mut rng, n, 1.0);
        let mut want = vec![0.0; n];
        cpu.dropout_forward(&mut want, &x, n, p, seed).unwrap();
        let mut out = up(be, &nan(n), Role::Activation);
        be.dropout_forward(&mut out, &up(be, &x, Role::Activation), n, p, seed)
            .unwrap();
        let got = down(be, &out);
        // The same elements dropped, bit for bit (x has no zeros to confuse the count).
        for i in 0..n {
            assert_eq!(
                got[i] == 0.0,
                want[i] == 0.0,
                "mask at {i} (p {p}, seed {seed})"
            );
        }
        assert_close("dropout_forward out", &got, &want, BF16_TOL);
        let mut dx = up(be, &nan(n), Role::Activation);
        be.dropout_backward(&mut dx, &up(be, &x, Role::Activation), n, p, seed)
            .unwrap();
        assert_eq!(down(be, &dx), got, "the backward is the same map");
    }
}

parity_tests!(dropout => dropout_cpu, dropout_cuda);
