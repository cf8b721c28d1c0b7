//! Memory and step time of the LM head run in chunks of rows (model/head.rs) against the head
//! in one piece, on the CPU backend: one forward + backward step (`Gpt::forward_backward`) of a
//! named preset at `B x T`, with the logits held whole, in the default chunks of
//! `logit_chunk_rows`, or in chunks of a given number of rows.
//!
//! Prints the logit rows held, the activation elements of the pass, the step time (median of
//! `REPS` after a warm-up) and the process's peak resident memory (`VmHWM`: run one setting per
//! process, as the peak never goes down).
//!
//! Run: `cargo run --release --example chunked_ce -- PRESET VOCAB B T whole|default|ROWS`,
//! e.g. `-- llama-tiny 128256 8 256 default`.

use std::time::Instant;

use topcoat::backend::cpu::CpuBackend;
use topcoat::config::ModelConfig;
use topcoat::model::Gpt;
use topcoat::rng::Rng;

const REPS: usize = 3;

/// A `/proc/self/status` field in MiB (0 where there is none).
fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .map_or(0.0, |kb: f64| kb / 1024.0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [preset, vocab, b, t, chunk] = args.as_slice() else {
        eprintln!("usage: chunked_ce PRESET VOCAB B T whole|default|ROWS");
        std::process::exit(2);
    };
    let num = |s: &str| -> usize { s.parse().unwrap_or_else(|_| panic!("not a number: {s}")) };
    let (vocab, b, t) = (num(vocab), num(b), num(t));
    let n = b * t;
    let cfg = ModelConfig::preset(preset, vocab).expect("a preset");
    let be = CpuBackend::new();
    let mut model = Gpt::init(&be, &cfg, 1).expect("init");
    let rows = match chunk.as_str() {
        "whole" => Some(n),
        "default" => None,
        r => Some(num(r)),
    };
    model.set_logit_chunk_rows(rows).expect("chunk rows");
    let mut rng = Rng::new(2);
    let mut ids = || -> Vec<i32> {
        (0..n)
            .map(|_| rng.below(cfg.vocab_size as u64) as i32)
            .collect()
    };
    let (inputs, targets) = (ids(), ids());
    let rss0 = status_mib("VmRSS:");
    let mut step = || {
        model.zero_grad(&be).unwrap();
        let t0 = Instant::now();
        let loss = model
            .forward_backward(&be, &inputs, &targets, b, t, 1.0)
            .unwrap();
        (t0.elapsed().as_secs_f64() * 1e3, loss.mean)
    };
    let (_, loss) = step();
    let mut ms: Vec<f64> = (0..REPS).map(|_| step().0).collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    let elems = model.activation_elements(&be).unwrap();
    println!(
        "{preset} V={vocab} VP={} B={b} T={t} N={n} head={chunk}: logit rows {} of {n}, \
         activations {:.1} M elements ({:.0} MiB f32), step {:.0} ms (median of {REPS}), \
         loss {loss:.4}, RSS before {rss0:.0} MiB, peak {:.0} MiB",
        cfg.padded_vocab_size,
        model.loss_chunk_rows(n),
        elems as f64 / 1e6,
        elems as f64 * 4.0 / (1 << 20) as f64,
        ms[REPS / 2],
        status_mib("VmHWM:"),
    );
}
