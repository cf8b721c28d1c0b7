//! Benchmark of the CPU backend's GEMM crate (`gemm`) on this model's shapes.
//!
//! It was first written to compare `gemm` with `matrixmultiply` (results and the reasons for
//! the choice: docs/PERF.md "CPU GEMM crate choice"); only the chosen crate is linked now.
//!
//! For each shape `inp [N*C]`, `weight [OC*C]` it times the three products of a linear layer:
//! - `fwd`:   `out [N,OC]   = inp [N,C] @ weight^T`      (m=N,  n=OC, k=C)
//! - `dinp`:  `dinp [N,C]  += dout [N,OC] @ weight`      (m=N,  n=C,  k=OC)
//! - `dw`:    `dw [OC,C]   += dout^T [OC,N] @ inp`       (m=OC, n=C,  k=N)
//!
//! Napkin math: each product is `2 * m * n * k` FLOPs; GFLOP/s = that / best time.
//! Each measurement also runs twice on the same inputs and checks the outputs are
//! bit-identical (determinism with threads on).
//!
//! Run: `cargo run --release --example gemm_bench` (add `-- --quick` for the small shapes only).

use std::time::{Duration, Instant};

use topcoat::rng::Rng;

/// `dst (m x n) = [dst +] lhs (m x k) @ rhs (k x n)`, every matrix given by (row stride, col stride).
#[allow(clippy::too_many_arguments)]
fn run(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_s: (isize, isize),
    accumulate: bool,
    lhs: &[f32],
    lhs_s: (isize, isize),
    rhs: &[f32],
    rhs_s: (isize, isize),
) {
    // SAFETY: the strides describe matrices lying inside the given slices (the callers build
    // them from one set of shapes), and dst does not alias lhs or rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_s.1,
            dst_s.0,
            accumulate,
            lhs.as_ptr(),
            lhs_s.1,
            lhs_s.0,
            rhs.as_ptr(),
            rhs_s.1,
            rhs_s.0,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        )
    }
}

fn random(len: usize, rng: &mut Rng) -> Vec<f32> {
    (0..len).map(|_| rng.normal()).collect()
}

/// Times one product; returns (best GFLOP/s, deterministic?).
fn time_product(prod: &str, n: usize, c: usize, oc: usize) -> (f64, bool) {
    let mut rng = Rng::new(1234);
    let inp = random(n * c, &mut rng);
    let weight = random(oc * c, &mut rng);
    let dout = random(n * oc, &mut rng);
    let (c_i, oc_i) = (c as isize, oc as isize);
    let (m_, n_, k_, out_len) = match prod {
        "fwd" => (n, oc, c, n * oc),
        "dinp" => (n, c, oc, n * c),
        _ => (oc, c, n, oc * c),
    };
    let once = |dst: &mut [f32]| match prod {
        "fwd" => run(
            n,
            oc,
            c,
            dst,
            (oc_i, 1),
            false,
            &inp,
            (c_i, 1),
            &weight,
            (1, c_i),
        ),
        "dinp" => run(
            n,
            c,
            oc,
            dst,
            (c_i, 1),
            true,
            &dout,
            (oc_i, 1),
            &weight,
            (c_i, 1),
        ),
        _ => run(
            oc,
            c,
            n,
            dst,
            (c_i, 1),
            true,
            &dout,
            (1, oc_i),
            &inp,
            (c_i, 1),
        ),
    };
    let flops = 2.0 * m_ as f64 * n_ as f64 * k_ as f64;
    // Determinism: two runs from the same starting output must agree bit for bit.
    let mut a = vec![0.5f32; out_len];
    let mut b = vec![0.5f32; out_len];
    once(&mut a);
    once(&mut b);
    let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
    let mut best = f64::INFINITY;
    let start = Instant::now();
    let mut reps = 0;
    while reps < 3 || (start.elapsed() < Duration::from_millis(600) && reps < 50) {
        let t0 = Instant::now();
        once(&mut a);
        best = best.min(t0.elapsed().as_secs_f64());
        reps += 1;
    }
    (flops / best / 1e9, same)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // (label, N, C, OC)
    let mut shapes = vec![
        ("small qkv", 2048, 128, 384),
        ("small fc", 2048, 128, 512),
        ("small proj", 2048, 512, 128),
        ("small lm_head", 2048, 128, 4096),
    ];
    if !quick {
        shapes.extend([
            ("124m qkv", 1024, 768, 2304),
            ("124m qkv", 4096, 768, 2304),
            ("124m fc", 1024, 768, 3072),
            ("124m proj", 1024, 3072, 768),
            ("124m lm_head", 1024, 768, 50304),
        ]);
    }
    println!(
        "rayon threads: {}, available parallelism: {}",
        rayon::current_num_threads(),
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    println!("| shape | N | C | OC | product | gemm 0.18 GFLOP/s |");
    println!("|---|---|---|---|---|---|");
    let mut all_same = true;
    for &(label, n, c, oc) in &shapes {
        for prod in ["fwd", "dinp", "dw"] {
            let (g, same) = time_product(prod, n, c, oc);
            all_same &= same;
            let mark = if same { "" } else { " (NOT deterministic)" };
            println!("| {label} | {n} | {c} | {oc} | {prod} | {g:.1}{mark} |");
        }
    }
    println!(
        "determinism (same inputs twice -> bit-identical): {}",
        if all_same { "yes" } else { "NO (see marks)" }
    );
}
