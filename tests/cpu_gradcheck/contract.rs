//! What every op promises beyond its math: results independent of the thread count, and
//! wrong lengths, ids or targets refused with errors that name the buffer or row.

use super::*;

// ---- determinism ---------------------------------------------------------------------------

/// Runs a forward + backward of every family in a pool of `threads` threads; returns all outputs.
fn run_all_ops(threads: usize) -> Vec<Vec<f32>> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let be = CpuBackend;
        let mut rng = Rng::new(99);
        let (b, t, c, nh, oc, v) = (2usize, 64usize, 96usize, 4usize, 160usize, 300usize);
        let n = b * t;
        let r = |len: usize, rng: &mut Rng| to32(&randn(len, rng));
        let ids = random_ids(n, v, &mut rng);
        let (wte, wpe) = (r(v * c, &mut rng), r(t * c, &mut rng));
        let mut x = vec![0.0; n * c];
        be.encoder_forward(&mut x, &ids, None, &wte, &wpe, b, t, c)
            .unwrap();
        let (mut dwte, mut dwpe) = (vec![0.0; v * c], vec![0.0; t * c]);
        let dx = r(n * c, &mut rng);
        be.encoder_backward(&mut dwte, &mut dwpe, &dx, &ids, None, b, t, c)
            .unwrap();
        // Explicit positions (restarting every 7 tokens) sum dwpe rows by position.
        let pos: Vec<i32> = (0..n).map(|i| (i % t % 7) as i32).collect();
        let mut dwpe_pos = vec![0.0; t * c];
        be.encoder_backward(&mut dwte, &mut dwpe_pos, &dx, &ids, Some(&pos), b, t, c)
            .unwrap();
        let (lw, lb) = (r(c, &mut rng), r(c, &mut rng));
        let (mut ln, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        be.layernorm_forward(&mut ln, &mut mean, &mut rstd, &x, &lw, &lb, n, c)
            .unwrap();
        let (mut dln, mut dlw, mut dlb) = (vec![0.0; n * c], vec![0.0; c], vec![0.0; c]);
        be.layernorm_backward(
            &mut dln,
            Some(&mut dlw),
            Some(&mut dlb),
            &dx,
            &x,
            &lw,
            &mean,
            &rstd,
            n,
            c,
        )
        .unwrap();
        let (w, bias) = (r(3 * c * c, &mut rng), r(3 * c, &mut rng));
        let mut qkv = vec![0.0; n * 3 * c];
        be.matmul_forward(&mut qkv, &ln, &w, Some(&bias), n, c, 3 * c)
            .unwrap();
        let (mut att, mut lse) = (vec![0.0; n * c], vec![0.0; b * nh * t]);
        be.attention_forward(&mut att, &mut lse, &qkv, None, b, t, c, nh)
            .unwrap();
        let mut dqkv = vec![0.0; n * 3 * c];
        be.attention_backward(&mut dqkv, &dx, &qkv, &att, &lse, None, b, t, c, nh)
            .unwrap();
        // Packed rows: examples of 20 tokens.
        let starts: Vec<i32> = (0..n).map(|i| (i % t - i % t % 20) as i32).collect();
        let (mut att_p, mut lse_p) = (vec![0.0; n * c], vec![0.0; b * nh * t]);
        be.attention_forward(&mut att_p, &mut lse_p, &qkv, Some(&starts), b, t, c, nh)
            .unwrap();
        let mut dqkv_p = vec![0.0; n * 3 * c];
        be.attention_backward(
            &mut dqkv_p,
            &dx,
            &qkv,
            &att_p,
            &lse_p,
            Some(&starts),
            b,
            t,
            c,
            nh,
        )
        .unwrap();
        let (mut dmi, mut dmw, mut dmb) =
            (vec![0.0; n * c], vec![0.0; 3 * c * c], vec![0.0; 3 * c]);
        be.matmul_backward(
            &mut dmi,
            Some(&mut dmw),
            Some(&mut dmb),
            &dqkv,
            &ln,
            &w,
            n,
            c,
            3 * c,
        )
        .unwrap();
        let mut logits = r(n * oc, &mut rng);
        let mut losses = vec![0.0; n];
        let targets = random_ids(n, oc - 3, &mut rng);
        be.cross_entropy(
            &mut losses,
            &mut logits,
            &targets,
            n,
            oc - 3,
            oc,
            LossGrad::Uniform(0.01),
        )
        .unwrap();
        let norm = be.global_norm(&[&dmw, &dqkv, &dwte]).unwrap();
        vec![
            x,
            dwte,
            dwpe,
            dwpe_pos,
            ln,
            mean,
            rstd,
            dln,
            dlw,
            dlb,
            qkv,
            att,
            lse,
            dqkv,
            att_p,
            lse_p,
            dqkv_p,
            dmi,
            dmw,
            dmb,
            losses,
            logits,
            vec![norm],
        ]
    })
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let one = run_all_ops(1);
    let three = run_all_ops(3);
    for (i, (a, b)) in one.iter().zip(&three).enumerate() {
        let same = a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "output #{i} differs between 1 and 3 threads");
    }
}

// ---- shape errors --------------------------------------------------------------------------

#[test]
fn wrong_lengths_are_shape_errors() {
    let be = CpuBackend;
    let z = |len: usize| vec![0.1f32; len];
    let ids = vec![0i32; N];
    assert_shape_err(
        be.encoder_forward(
            &mut z(N * C - 1),
            &ids,
            None,
            &z(V * C),
            &z(TMAX * C),
            B,
            T,
            C,
        ),
        "out",
    );
    // wpe shorter than T rows.
    assert_shape_err(
        be.encoder_backward(
            &mut z(V * C),
            &mut z((T - 1) * C),
            &z(N * C),
            &ids,
            None,
            B,
            T,
            C,
        ),
        "dwpe",
    );
    assert_shape_err(
        be.layernorm_forward(
            &mut z(N * C),
            &mut z(N + 1),
            &mut z(N),
            &z(N * C),
            &z(C),
            &z(C),
            N,
            C,
        ),
        "mean",
    );
    assert_shape_err(
        be.layernorm_backward(
            &mut z(N * C),
            Some(&mut z(C)),
            Some(&mut z(C - 1)),
            &z(N * C),
            &z(N * C),
            &z(C),
            &z(N),
            &z(N),
            N,
            C,
        ),
        "dbias",
    );
    assert_shape_err(be.gelu_forward(&mut z(5), &z(4), 5), "inp");
    assert_shape_err(be.gelu_backward(&mut z(5), &z(5), &z(6), 5), "dout");
    assert_shape_err(be.residual_forward(&mut z(5), &z(5), &z(3), 5), "b");
    assert_shape_err(
        be.matmul_forward(&mut z(N * OC), &z(N * C), &z(OC * C + 1), None, N, C, OC),
        "weight",
    );
    assert_shape_err(
        be.matmul_forward(
            &mut z(N * OC),
            &z(N * C),
            &z(OC * C),
            Some(&z(OC - 1)),
            N,
            C,
            OC,
        ),
        "bias",
    );
    assert_shape_err(
        be.matmul_backward(
            &mut z(N * C),
            Some(&mut z(OC * C)),
            Some(&mut z(OC)),
            &z(N * C),
            &z(N * C),
            &z(OC * C),
            N,
            C,
            OC,
        ),
        "dout",
    );
    assert_shape_err(
        be.attention_forward(
            &mut z(N * C),
            &mut z(B * NH * T),
            &z(N * C),
            None,
            B,
            T,
            C,
            NH,
        ),
        "qkv",
    );
    assert_shape_err(
        be.attention_backward(
            &mut z(N * 3 * C),
            &z(N * C),
            &z(N * 3 * C),
            &z(N * C),
            &z(B * T),
            None,
            B,
            T,
            C,
            NH,
        ),
        "lse",
    );
    assert_shape_err(
        be.cross_entropy(
            &mut z(N),
            &mut z(N * V),
            &vec![0; N],
            N,
            V,
            VP,
            LossGrad::None,
        ),
        "logits",
    );
    assert_shape_err(
        be.cross_entropy(
            &mut z(N),
            &mut z(N * VP),
            &vec![0; N - 1],
            N,
            V,
            VP,
            LossGrad::None,
        ),
        "targets",
    );
    let hp = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
        step: 1,
        grad_scale: 1.0,
    };
    assert_shape_err(
        be.adamw(&mut z(10), &z(10), &mut z(9), &mut z(10), &hp),
        "m",
    );
    assert_shape_err(be.write(&mut z(3), &[1.0, 2.0]), "host");
    assert!(matches!(
        be.download_range(&z(3), 2, 2),
        Err(BackendError::Shape { .. })
    ));
}

#[test]
fn bad_ids_and_targets_are_invalid_errors_naming_the_row() {
    let be = CpuBackend;
    let mut targets = vec![0i32; N];
    targets[6] = V as i32; // first id past the real vocabulary
    let mut logits = vec![0.5f32; N * VP];
    let before = logits.clone();
    match be.cross_entropy(
        &mut vec![0.0; N],
        &mut logits,
        &targets,
        N,
        V,
        VP,
        LossGrad::Uniform(1.0),
    ) {
        Err(BackendError::Invalid { msg, .. }) => {
            assert!(
                msg.contains("row 6") && msg.contains(&V.to_string()),
                "{msg}"
            );
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert_eq!(logits, before, "nothing is written on error");

    let mut ids = vec![0i32; N];
    ids[2] = V as i32;
    let r = be.encoder_forward(
        &mut vec![0.0; N * C],
        &ids,
        None,
        &vec![0.0; V * C],
        &vec![0.0; T * C],
        B,
        T,
        C,
    );
    assert!(matches!(r, Err(BackendError::Invalid { .. })), "{r:?}");
    let r = be.attention_forward(
        &mut vec![0.0; N * C],
        &mut vec![0.0; B * 5 * T],
        &vec![0.0; N * 3 * C],
        None,
        B,
        T,
        C,
        5,
    );
    assert!(matches!(r, Err(BackendError::Invalid { .. })), "{r:?}");
}
