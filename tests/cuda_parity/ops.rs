//! Encoder, layernorm, elementwise ops, matmul, the fused matmul + GELU pair and fill_zero.

use super::*;

fn encoder<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(1);
    for (b, t, tmax, c, v, packed) in [
        (2, 5, 7, 12, 11, false),
        (3, 33, 40, 100, 7, false),
        (1, 64, 64, 257, 300, false),
        (2, 5, 7, 12, 11, true),
        (3, 45, 40, 100, 7, true),
        (2, 64, 64, 257, 300, true),
    ] {
        let ids = ids_for(&mut rng, b * t, v);
        let pos = packed.then(|| packed_positions(&mut rng, b, t, tmax, 6));
        let (wte, wpe) = (randn(&mut rng, v * c, 1.0), randn(&mut rng, tmax * c, 1.0));
        let mut want = vec![0.0; b * t * c];
        cpu.encoder_forward(&mut want, &ids, pos.as_ref(), &wte, &wpe, b, t, c)
            .unwrap();
        let mut out = up(be, &nan(b * t * c), Role::Activation);
        let (gte, gpe) = (up(be, &wte, Role::Param), up(be, &wpe, Role::Param));
        let gids = be.upload_ids(&ids).unwrap();
        let gpos = pos.as_ref().map(|p| be.upload_ids(p).unwrap());
        be.encoder_forward(&mut out, &gids, gpos.as_ref(), &gte, &gpe, b, t, c)
            .unwrap();
        assert_close("encoder_forward out", &down(be, &out), &want, BF16_TOL);

        let dout = randn(&mut rng, b * t * c, 1.0);
        let (mut dwte, mut dwpe) = (randn(&mut rng, v * c, 1.0), randn(&mut rng, tmax * c, 1.0));
        let (mut gdte, mut gdpe) = (up(be, &dwte, Role::Grad), up(be, &dwpe, Role::Grad));
        cpu.encoder_backward(&mut dwte, &mut dwpe, &dout, &ids, pos.as_ref(), b, t, c)
            .unwrap();
        let gdout = up(be, &dout, Role::Activation);
        be.encoder_backward(&mut gdte, &mut gdpe, &gdout, &gids, gpos.as_ref(), b, t, c)
            .unwrap();
        assert_close("encoder_backward dwte", &down(be, &gdte), &dwte, F32_TOL);
        assert_close("encoder_backward dwpe", &down(be, &gdpe), &dwpe, F32_TOL);
    }
    // A position outside [0, Tmax) is refused before launching.
    let (b, t, tmax, c) = (1, 4, 4, 8);
    let (wte, wpe) = (
        up(be, &randn(&mut rng, 3 * c, 1.0), Role::Param),
        up(be, &randn(&mut rng, tmax * c, 1.0), Role::Param),
    );
    let ids = be.upload_ids(&[0, 1, 2, 0]).unwrap();
    let pos = be.upload_ids(&[0, 1, 4, 0]).unwrap();
    let mut out = up(be, &nan(b * t * c), Role::Activation);
    match be.encoder_forward(&mut out, &ids, Some(&pos), &wte, &wpe, b, t, c) {
        Err(BackendError::Invalid { msg, .. }) => assert!(msg.contains("position 4"), "{msg}"),
        other => panic!("encoder_forward with position 4 of 4: {other:?}"),
    }
}
parity_tests!(encoder => encoder_cpu, encoder_cuda);

fn layernorm<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(2);
    for (n, c) in [(3, 12), (37, 100), (300, 768), (9, 1000)] {
        let (a, r) = (randn(&mut rng, n * c, 1.0), randn(&mut rng, n * c, 1.0));
        let (w, bias) = (randn(&mut rng, c, 1.0), randn(&mut rng, c, 0.5));
        let (mut res, mut out) = (vec![0.0; n * c], vec![0.0; n * c]);
        let (mut mean, mut rstd) = (vec![0.0; n], vec![0.0; n]);
        cpu.residual_layernorm_forward(
            &mut res, &mut out, &mut mean, &mut rstd, &a, &r, &w, &bias, n, c,
        )
        .unwrap();
        let (ga, gr) = (up(be, &a, Role::Activation), up(be, &r, Role::Activation));
        let (gw, gb) = (up(be, &w, Role::Param), up(be, &bias, Role::Param));
        let mut gres = up(be, &nan(n * c), Role::Activation);
        let mut gout = up(be, &nan(n * c), Role::Activation);
        let mut gmean = up(be, &nan(n), Role::Activation);
        let mut grstd = up(be, &nan(n), Role::Activation);
        be.residual_layernorm_forward(
            &mut gres, &mut gout, &mut gmean, &mut grstd, &ga, &gr, &gw, &gb, n, c,
        )
        .unwrap();
        assert_close(
            "residual_layernorm residual",
            &down(be, &gres),
            &res,
            BF16_TOL,
        );
        assert_close("residual_layernorm out", &down(be, &gout), &out, BF16_TOL);
        assert_close(
            "residual_layernorm rstd",
            &down(be, &grstd),
            &rstd,
            BF16_TOL,
        );

        // Plain forward on the bf16-rounded residual, so both sides see the same input.
        let inp: Vec<f32> = res.iter().map(|&x| bf16_round(x)).collect();
        let ginp = up(be, &inp, Role::Activation);
        cpu.layernorm_forward(&mut out, &mut mean, &mut rstd, &inp, &w, &bias, n, c)
            .unwrap();
        let mut gout = up(be, &nan(n * c), Role::Activation);
        let mut gmean = up(be, &nan(n), Role::Activation);
        let mut grstd = up(be, &nan(n), Role::Activation);
        be.layernorm_forward(&mut gout, &mut gmean, &mut grstd, &ginp, &gw, &gb, n, c)
            .unwrap();
        assert_close("layernorm_forward out", &down(be, &gout), &out, BF16_TOL);
        assert_close("layernorm_forward mean", &down(be, &gmean), &mean, BF16_TOL);
        assert_close("layernorm_forward rstd", &down(be, &grstd), &rstd, BF16_TOL);

        let dout = randn(&mut rng, n * c, 1.0);
        let mut dinp = randn(&mut rng, n * c, 1.0);
        let (mut dw, mut db) = (randn(&mut rng, c, 1.0), randn(&mut rng, c, 1.0));
        let mut gdinp = up(be, &dinp, Role::Activation);
        let (mut gdw, mut gdb) = (up(be, &dw, Role::Grad), up(be, &db, Role::Grad));
        cpu.layernorm_backward(
            &mut dinp,
            Some(&mut dw),
            Some(&mut db),
            &dout,
            &inp,
            &w,
            &mean,
            &rstd,
            n,
            c,
        )
        .unwrap();
        let gdout = up(be, &dout, Role::Activation);
        be.layernorm_backward(
            &mut gdinp,
            Some(&mut gdw),
            Some(&mut gdb),
            &gdout,
            &ginp,
            &gw,
            &gmean,
            &grstd,
            n,
            c,
        )
        .unwrap();
        assert_close(
            "layernorm_backward dinp",
            &down(be, &gdinp),
            &dinp,
            BF16_TOL,
        );
        assert_close("layernorm_backward dweight", &down(be, &gdw), &dw, BF16_TOL);
        assert_close("layernorm_backward dbias", &down(be, &gdb), &db, F32_TOL);
    }
}
parity_tests!(layernorm => layernorm_cpu, layernorm_cuda);

fn elementwise<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(3);
    for n in [1, 1000, 100_003] {
        let (a, b) = (randn(&mut rng, n, 2.0), randn(&mut rng, n, 1.0));
        let mut want = vec![0.0; n];
        let (ga, gb) = (up(be, &a, Role::Activation), up(be, &b, Role::Activation));
        cpu.residual_forward(&mut want, &a, &b, n).unwrap();
        let mut out = up(be, &nan(n), Role::Activation);
        be.residual_forward(&mut out, &ga, &gb, n).unwrap();
        assert_close("residual_forward", &down(be, &out), &want, BF16_TOL);

        cpu.gelu_forward(&mut want, &a, n).unwrap();
        let mut out = up(be, &nan(n), Role::Activation);
        be.gelu_forward(&mut out, &ga, n).unwrap();
        assert_close("gelu_forward", &down(be, &out), &want, BF16_TOL);

        let mut dinp = randn(&mut rng, n, 1.0);
        let mut gdinp = up(be, &dinp, Role::Activation);
        cpu.gelu_backward(&mut dinp, &a, &b, n).unwrap();
        be.gelu_backward(&mut gdinp, &ga, &gb, n).unwrap();
        assert_close("gelu_backward", &down(be, &gdinp), &dinp, BF16_TOL);
    }
}
parity_tests!(elementwise => elementwise_cpu, elementwise_cuda);

fn matmul<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(4);
    for (n, c, oc, with_bias) in [(5, 12, 7, true), (37, 64, 100, false), (130, 96, 257, true)] {
        let inp = randn(&mut rng, n * c, 1.0);
        let w = randn(&mut rng, oc * c, 0.2);
        let bias = randn(&mut rng, oc, 1.0);
        let mut want = vec![0.0; n * oc];
        cpu.matmul_forward(&mut want, &inp, &w, with_bias.then_some(&bias), n, c, oc)
            .unwrap();
        let (ginp, gw) = (up(be, &inp, Role::Activation), up(be, &w, Role::Param));
        let gbias = up(be, &bias, Role::Param);
        let mut out = up(be, &nan(n * oc), Role::Activation);
        be.matmul_forward(&mut out, &ginp, &gw, with_bias.then_some(&gbias), n, c, oc)
            .unwrap();
        assert_close("matmul_forward", &down(be, &out), &want, BF16_TOL);

        let dout = randn(&mut rng, n * oc, 1.0);
        let mut dinp = randn(&mut rng, n * c, 1.0);
        let (mut dw, mut db) = (randn(&mut rng, oc * c, 1.0), randn(&mut rng, oc, 1.0));
        let mut gdinp = up(be, &dinp, Role::Activation);
        let (mut gdw, mut gdb) = (up(be, &dw, Role::Grad), up(be, &db, Role::Grad));
        cpu.matmul_backward(
            &mut dinp,
            Some(&mut dw),
            with_bias.then_some(&mut db),
            &dout,
            &inp,
            &w,
            n,
            c,
            oc,
        )
        .unwrap();
        let gdout = up(be, &dout, Role::Activation);
        be.matmul_backward(
            &mut gdinp,
            Some(&mut gdw),
            with_bias.then_some(&mut gdb),
            &gdout,
            &ginp,
            &gw,
            n,
            c,
            oc,
        )
        .unwrap();
        assert_close("matmul_backward dinp", &down(be, &gdinp), &dinp, BF16_TOL);
        assert_close("matmul_backward dweight", &down(be, &gdw), &dw, F32_TOL);
        assert_close("matmul_backward dbias", &down(be, &gdb), &db, F32_TOL);
    }
}
parity_tests!(matmul => matmul_cpu, matmul_cuda);

/// The MLP's fused matmul + GELU pair. Widths that are multiples of 8 take cuBLASLt's GELU
/// epilogues on CUDA, the others the unfused path (`TOPCOAT_GELU_EPILOGUE=off`: all unfused).
fn matmul_gelu<B: Backend>(be: &B) {
    let cpu = CpuBackend::new();
    let mut rng = Rng::new(14);
    // (N, C, OC, bias): forward fused when OC % 8 == 0, backward when C % 8 == 0.
    for (n, c, oc, with_bias) in [
        (5, 12, 7, true),
        (37, 64, 96, false),
        (130, 96, 256, true),
        (33, 40, 20, true),
        (70, 20, 48, true),
    ] {
        let inp = randn(&mut rng, n * c, 1.0);
        let w = randn(&mut rng, oc * c, 0.3);
        let bias = randn(&mut rng, oc, 0.5);
        let (mut want, mut want_pre) = (vec![0.0; n * oc], vec![0.0; n * oc]);
        let b = with_bias.then_some(&bias);
        cpu.matmul_gelu_forward(&mut want, &mut want_pre, &inp, &w, b, n, c, oc)
            .unwrap();
        let (ginp, gw) = (up(be, &inp, Role::Activation), up(be, &w, Role::Param));
        let gbias = up(be, &bias, Role::Param);
        let mut out = up(be, &nan(n * oc), Role::Activation);
        let mut pre = up(be, &nan(n * oc), Role::Activation);
        let gb = with_bias.then_some(&gbias);
        be.matmul_gelu_forward(&mut out, &mut pre, &ginp, &gw, gb, n, c, oc)
            .unwrap();
        assert_close(
            "matmul_gelu_forward pre",
            &down(be, &pre),
            &want_pre,
            BF16_TOL,
        );
        assert_close("matmul_gelu_forward out", &down(be, &out), &want, BF16_TOL);

        // Backward of `gelu(x) @ W^T + b` for a fresh x: the matmul's input is gelu(x) [N*C].
        // gelu(x) is rounded to bf16 (what the backend stores), so both sides multiply the
        // same numbers and the fp32 weight gradients compare at F32_TOL.
        let x = randn(&mut rng, n * c, 1.5);
        let mut gelu_x = vec![0.0; n * c];
        cpu.gelu_forward(&mut gelu_x, &x, n * c).unwrap();
        let gelu_x: Vec<f32> = gelu_x.into_iter().map(bf16_round).collect();
        let dout = randn(&mut rng, n * oc, 1.0);
        let mut dx = randn(&mut rng, n * c, 1.0);
        let (mut dw, mut db) = (randn(&mut rng, oc * c, 1.0), randn(&mut rng, oc, 1.0));
        let mut gdx = up(be, &dx, Role::Activation);
        let (mut gdw, mut gdb) = (up(be, &dw, Role::Grad), up(be, &db, Role::Grad));
        cpu.matmul_gelu_backward(
            &mut dx,
            Some(&mut dw),
            with_bias.then_some(&mut db),
            &dout,
            &gelu_x,
            &w,
            &x,
            n,
            c,
            oc,
        )
        .unwrap();
        let (gdout, ggelu_x) = (
            up(be, &dout, Role::Activation),
            up(be, &gelu_x, Role::Activation),
        );
        let gx = up(be, &x, Role::Activation);
        be.matmul_gelu_backward(
            &mut gdx,
            Some(&mut gdw),
            with_bias.then_some(&mut gdb),
            &gdout,
            &ggelu_x,
            &gw,
            &gx,
            n,
            c,
            oc,
        )
        .unwrap();
        assert_close("matmul_gelu_backward dinp", &down(be, &gdx), &dx, BF16_TOL);
        assert_close(
            "matmul_gelu_backward dweight",
            &down(be, &gdw),
            &dw,
            F32_TOL,
        );
        assert_close("matmul_gelu_backward dbias", &down(be, &gdb), &db, F32_TOL);
    }
}
parity_tests!(matmul_gelu => matmul_gelu_cpu, matmul_gelu_cuda);

/// `fill_zero` on every buffer kind, at lengths that leave a ragged tail of bytes.
fn fill_zero<B: Backend>(be: &B) {
    let mut rng = Rng::new(15);
    for len in [1, 7, 8, 33, 1000, 100_003] {
        for role in [
            Role::Activation,
            Role::Grad,
            Role::State,
            Role::Param,
            Role::Stat,
        ] {
            let mut buf = up(be, &randn(&mut rng, len, 1.0), role);
            be.fill_zero(&mut buf).unwrap();
            let got = down(be, &buf);
            assert!(
                got.len() == len && got.iter().all(|&x| x == 0.0),
                "fill_zero {role:?} len {len}: {} nonzero",
                got.iter().filter(|&&x| x != 0.0).count()
            );
        }
    }
}
parity_tests!(fill_zero => fill_zero_cpu, fill_zero_cuda);
