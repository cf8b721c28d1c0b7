//! Per-op time profile of the CPU backend on the `tiny` pretraining shapes.
//!
//! Shapes: B=8, T=256 (N=2048 rows), C=128, NH=4, 4 layers, V=VP=4096 (the `tiny` preset with
//! the embedded corpus's BPE vocabulary). Every op of one training step is timed through the
//! [`Backend`] trait on random inputs (median of `REPS` runs after a warm-up), then weighted by
//! how often a step calls it (4 layers x each block op, plus the encoder, the final layernorm,
//! the head matmul, the cross-entropy, the zero fills, the global norm and AdamW over every
//! parameter tensor) to give each op's share of a step.
//!
//! Run: `cargo run --release --example cpu_op_profile` (add `-- --threads N` to pin the pool).

use std::time::Instant;

use topcoat::backend::cpu::CpuBackend;
use topcoat::backend::{AdamWStep, Backend, LossGrad};
use topcoat::rng::Rng;

const REPS: usize = 7;
const B: usize = 8;
const T: usize = 256;
const N: usize = B * T;
const C: usize = 128;
const NH: usize = 4;
const L: usize = 4;
const V: usize = 4096;
const VP: usize = 4096;

fn randn(len: usize, rng: &mut Rng) -> Vec<f32> {
    (0..len).map(|_| rng.normal()).collect()
}

/// On-CPU time of all this process's threads so far, in ms (Linux `schedstat`; 0 elsewhere).
/// On a shared machine it is a steadier measure of work than wall time, though it also counts
/// rayon workers spinning while they wait for work.
fn cpu_ms() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let ns: u64 = tasks
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e6
}

/// (median wall ms, mean on-CPU ms) of `f` over `REPS` runs, after one warm-up run.
fn time_ms(mut f: impl FnMut()) -> (f64, f64) {
    f();
    let cpu0 = cpu_ms();
    let mut ms: Vec<f64> = (0..REPS)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    let cpu = (cpu_ms() - cpu0) / REPS as f64;
    ms.sort_by(|a, b| a.total_cmp(b));
    (ms[REPS / 2], cpu)
}

struct Row {
    name: String,
    ms: f64,
    cpu_ms: f64,
    per_step: usize,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--threads") {
        let n: usize = args[i + 1].parse().expect("--threads N");
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .expect("thread pool");
    }
    let be = CpuBackend;
    let mut rng = Rng::new(7);
    let ids: Vec<i32> = (0..N).map(|_| rng.below(V as u64) as i32).collect();
    let r = |len: usize, rng: &mut Rng| randn(len, rng);
    let mut rows: Vec<Row> = Vec::new();
    let mut add = |name: &str, per_step: usize, (ms, cpu_ms): (f64, f64)| {
        rows.push(Row {
            name: name.to_string(),
            ms,
            cpu_ms,
            per_step,
        })
    };

    // ---- encoder ----
    let (wte, wpe) = (r(V * C, &mut rng), r(T * C, &mut rng));
    let mut x = vec![0.0; N * C];
    add(
        "encoder_forward",
        1,
        time_ms(|| {
            be.encoder_forward(&mut x, &ids, None, &wte, &wpe, B, T, C)
                .unwrap()
        }),
    );
    let (mut dwte, mut dwpe) = (vec![0.0; V * C], vec![0.0; T * C]);
    let dx = r(N * C, &mut rng);
    add(
        "encoder_backward",
        1,
        time_ms(|| {
            be.encoder_backward(&mut dwte, &mut dwpe, &dx, &ids, None, B, T, C)
                .unwrap()
        }),
    );

    // ---- layernorm (1 plain + 2 fused residual per layer; the last one is ln_f) ----
    let (lw, lb) = (r(C, &mut rng), r(C, &mut rng));
    let (mut ln, mut mean, mut rstd) = (vec![0.0; N * C], vec![0.0; N], vec![0.0; N]);
    add(
        "layernorm_forward",
        1,
        time_ms(|| {
            be.layernorm_forward(&mut ln, &mut mean, &mut rstd, &x, &lw, &lb, N, C)
                .unwrap()
        }),
    );
    let mut resid = vec![0.0; N * C];
    let y = r(N * C, &mut rng);
    add(
        "residual_layernorm_forward",
        2 * L,
        time_ms(|| {
            be.residual_layernorm_forward(
                &mut resid, &mut ln, &mut mean, &mut rstd, &x, &y, &lw, &lb, N, C,
            )
            .unwrap()
        }),
    );
    let (mut dln, mut dlw, mut dlb) = (vec![0.0; N * C], vec![0.0; C], vec![0.0; C]);
    add(
        "layernorm_backward",
        2 * L + 1,
        time_ms(|| {
            be.layernorm_backward(
                &mut dln,
                Some(&mut dlw),
                Some(&mut dlb),
                &dx,
                &x,
                &lw,
                &mean,
                &rstd,
                N,
                C,
            )
            .unwrap()
        }),
    );

    // ---- matmuls: (name, in, out, bias, calls per step) ----
    let shapes = [
        ("qkv", C, 3 * C, true, L),
        ("attn_proj", C, C, true, L),
        ("fc", C, 4 * C, true, L),
        ("fc_proj", 4 * C, C, true, L),
        ("head", C, VP, false, 1),
    ];
    for (name, ic, oc, has_bias, calls) in shapes {
        let inp = r(N * ic, &mut rng);
        let w = r(oc * ic, &mut rng);
        let bias = r(oc, &mut rng);
        let mut out = vec![0.0; N * oc];
        let bias_opt = if has_bias { Some(&bias) } else { None };
        add(
            &format!("matmul_forward {name} ({ic}->{oc})"),
            calls,
            time_ms(|| {
                be.matmul_forward(&mut out, &inp, &w, bias_opt, N, ic, oc)
                    .unwrap()
            }),
        );
        let (mut dinp, mut dw, mut db) = (vec![0.0; N * ic], vec![0.0; oc * ic], vec![0.0; oc]);
        let dout = r(N * oc, &mut rng);
        add(
            &format!("matmul_backward {name} ({ic}->{oc})"),
            calls,
            time_ms(|| {
                let db_opt = if has_bias { Some(&mut db) } else { None };
                be.matmul_backward(&mut dinp, Some(&mut dw), db_opt, &dout, &inp, &w, N, ic, oc)
                    .unwrap()
            }),
        );
    }

    // ---- attention ----
    let qkv = r(N * 3 * C, &mut rng);
    let (mut att, mut lse) = (vec![0.0; N * C], vec![0.0; B * NH * T]);
    add(
        "attention_forward",
        L,
        time_ms(|| {
            be.attention_forward(&mut att, &mut lse, &qkv, None, B, T, C, NH)
                .unwrap()
        }),
    );
    let mut dqkv = vec![0.0; N * 3 * C];
    add(
        "attention_backward",
        L,
        time_ms(|| {
            be.attention_backward(&mut dqkv, &dx, &qkv, &att, &lse, None, B, T, C, NH)
                .unwrap()
        }),
    );

    // ---- elementwise ----
    let h = r(N * 4 * C, &mut rng);
    let mut hg = vec![0.0; N * 4 * C];
    add(
        "gelu_forward",
        L,
        time_ms(|| be.gelu_forward(&mut hg, &h, N * 4 * C).unwrap()),
    );
    let dh = r(N * 4 * C, &mut rng);
    let mut dhg = vec![0.0; N * 4 * C];
    add(
        "gelu_backward",
        L,
        time_ms(|| be.gelu_backward(&mut dhg, &h, &dh, N * 4 * C).unwrap()),
    );
    // Zero fills before each accumulating backward op: per layer 2 x [N*4C] (dfch_gelu, dfch),
    // [N*3C] (dqkv) and 3 x [N*C] (dln twice, datty), plus dln and dresidual for the head.
    let mut z = vec![1.0; N * C];
    add(
        "fill_zero [N*C]",
        3 * L + 2,
        time_ms(|| be.fill_zero(&mut z).unwrap()),
    );
    let mut z4 = vec![1.0; N * 4 * C];
    add(
        "fill_zero [N*4C] (x2 per layer)",
        2 * L,
        time_ms(|| be.fill_zero(&mut z4).unwrap()),
    );
    let mut z3 = vec![1.0; N * 3 * C];
    add(
        "fill_zero [N*3C]",
        L,
        time_ms(|| be.fill_zero(&mut z3).unwrap()),
    );

    // ---- head: cross-entropy with the gradient written in place ----
    let logits0 = r(N * VP, &mut rng);
    let mut logits = logits0.clone();
    let mut losses = vec![0.0; N];
    let targets: Vec<i32> = (0..N).map(|_| rng.below(V as u64) as i32).collect();
    let (ms, cpu) = time_ms(|| {
        logits.copy_from_slice(&logits0);
        let dloss = LossGrad::Uniform(1.0 / N as f32);
        be.cross_entropy(&mut losses, &mut logits, &targets, N, V, VP, dloss)
            .unwrap()
    });
    let (copy_ms, copy_cpu) = time_ms(|| logits.copy_from_slice(&logits0));
    add(
        "cross_entropy (with grad)",
        1,
        (ms - copy_ms, cpu - copy_cpu),
    );

    // ---- optimizer: every parameter tensor of the model ----
    let mut sizes = vec![V * C, T * C];
    for _ in 0..L {
        sizes.extend([
            C,
            C,
            3 * C * C,
            3 * C,
            C * C,
            C,
            C,
            C,
            4 * C * C,
            4 * C,
            4 * C * C,
            C,
        ]);
    }
    sizes.extend([C, C]);
    let mut params: Vec<Vec<f32>> = sizes.iter().map(|&s| r(s, &mut rng)).collect();
    let grads: Vec<Vec<f32>> = sizes.iter().map(|&s| r(s, &mut rng)).collect();
    let mut ms: Vec<Vec<f32>> = sizes.iter().map(|&s| vec![0.0; s]).collect();
    let mut vs: Vec<Vec<f32>> = sizes.iter().map(|&s| vec![0.0; s]).collect();
    add(
        "global_norm (all params)",
        1,
        time_ms(|| {
            let refs: Vec<&Vec<f32>> = grads.iter().collect();
            be.global_norm(&refs).unwrap();
        }),
    );
    let hp = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 1,
        grad_scale: 1.0,
    };
    add(
        &format!("adamw (all {} tensors)", sizes.len()),
        1,
        time_ms(|| {
            for i in 0..sizes.len() {
                be.adamw(&mut params[i], &grads[i], &mut ms[i], &mut vs[i], &hp)
                    .unwrap();
            }
        }),
    );

    // ---- report ----
    let step_ms: f64 = rows.iter().map(|r| r.ms * r.per_step as f64).sum();
    let step_cpu: f64 = rows.iter().map(|r| r.cpu_ms * r.per_step as f64).sum();
    println!(
        "CPU backend op profile: {}, B={B} T={T} C={C} NH={NH} L={L} V=VP={V}, median of {REPS}",
        be.name()
    );
    println!(
        "{:<40} {:>9} {:>6} {:>10} {:>6} {:>12}",
        "op", "ms/call", "calls", "ms/step", "share", "cpu ms/step"
    );
    for r in &rows {
        let total = r.ms * r.per_step as f64;
        println!(
            "{:<40} {:>9.3} {:>6} {:>10.2} {:>5.1}% {:>12.2}",
            r.name,
            r.ms,
            r.per_step,
            total,
            100.0 * total / step_ms,
            r.cpu_ms * r.per_step as f64
        );
    }
    println!(
        "sum over a step: {step_ms:.1} ms wall -> {:.0} tokens/s; {step_cpu:.1} ms on-CPU (all threads)",
        N as f64 / (step_ms / 1e3)
    );
}
