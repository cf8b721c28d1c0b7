//! Every Backend op on the backend under test against the f32 CPU reference, forward and
//! backward (the Llama family's ops in `llama_ops.rs` and `gqa_attention.rs`), on fresh random
//! inputs at several shapes (including sizes that are not multiples of any block or tile size).
//! Forward outputs are poisoned with NaN first, gradient outputs pre-filled with random values
//! (parameter gradients and the norms' `dinp` accumulate, other activation gradients are
//! overwritten), so untouched or wrongly kept elements show. On the CPU backend these compare
//! the backend with itself (they still run every op); on CUDA they are the parity tests of
//! DESIGN.md convention 3.
//!
//! The CUDA backend opens with the [`CudaOptions`] that `TOPCOAT_ATTENTION` (`mma` or
//! `cuda-cores`) and `TOPCOAT_GELU_EPILOGUE` (`on` or `off`) name, the defaults when unset, so
//! one test binary checks every A/B alternative (scripts/gpu_check.sh).

#[path = "../common/mod.rs"]
mod common;

use common::{assert_close, bf16_round, down, randn, rel_err, rel_err_f64};
use topcoat::backend::cpu::{attention as cpu_attention, CpuBackend};
use topcoat::backend::cuda::{CudaBackend, CudaOptions};
use topcoat::backend::{AdamWStep, Backend, BackendError, LossGrad, Role};
use topcoat::rng::Rng;

/// bf16 storage: `||gpu - ref|| / ||ref||` for ops with short reductions.
const BF16_TOL: f64 = 1e-2;
/// fp32 buffers (gradients accumulated into random fp32 values, optimizer state).
const F32_TOL: f64 = 1e-3;
/// Cross-entropy losses stored in fp32 from bf16 logits: the logits are bf16-exact inputs, so
/// only the fp32 exp/log-sum error remains (far below bf16 rounding of the loss, 2^-9).
const CE_F32_LOSS_TOL: f64 = 1e-4;
/// Attention may be at most this many times as far from f64 as a naive bf16 implementation.
const ATTN_NAIVE_FACTOR: f64 = 2.0;

/// Writes a test body once and runs it on the CPU backend and on CUDA device 0 opened with
/// [`cuda_options`]; the CUDA variant prints `skipped: no CUDA device (<reason>)` and passes
/// when the backend does not open (DESIGN.md convention 4).
macro_rules! parity_tests {
    ($body:ident => $cpu:ident, $cuda:ident) => {
        #[test]
        fn $cpu() {
            $body(&topcoat::backend::cpu::CpuBackend::new());
        }

        #[test]
        fn $cuda() {
            match $crate::open_cuda() {
                Ok(be) => $body(&be),
                Err(e) => println!("skipped: no CUDA device ({e})"),
            }
        }
    };
}

/// The CUDA options the environment names (panics on a spelling it does not accept).
fn cuda_options() -> CudaOptions {
    let mut opts = CudaOptions::default();
    match std::env::var("TOPCOAT_ATTENTION").as_deref() {
        Err(_) | Ok("") => {}
        Ok(s) => {
            opts.attention = s
                .parse()
                .unwrap_or_else(|e| panic!("TOPCOAT_ATTENTION: {e}"))
        }
    }
    match std::env::var("TOPCOAT_GELU_EPILOGUE").as_deref() {
        Err(_) | Ok("") | Ok("on") => {}
        Ok("off") => opts.gelu_epilogue = false,
        Ok(other) => panic!("TOPCOAT_GELU_EPILOGUE={other}: expected on or off"),
    }
    opts
}

fn open_cuda() -> topcoat::backend::Result<CudaBackend> {
    CudaBackend::with_options(0, cuda_options())
}

fn nan(n: usize) -> Vec<f32> {
    vec![f32::NAN; n]
}

fn up<B: Backend>(be: &B, host: &[f32], role: Role) -> B::Buf {
    be.upload(host, role).expect("upload")
}

fn ids_for(rng: &mut Rng, n: usize, v: usize) -> Vec<i32> {
    (0..n).map(|_| rng.below(v as u64) as i32).collect()
}

/// Positions that restart at random example boundaries inside each row (a new example at each
/// token with probability `1 / one_in`), each in `[0, tmax)`.
fn packed_positions(rng: &mut Rng, b: usize, t: usize, tmax: usize, one_in: u64) -> Vec<i32> {
    let mut pos = Vec::with_capacity(b * t);
    for _ in 0..b {
        let mut p = 0;
        for _ in 0..t {
            if p == tmax || rng.below(one_in) == 0 {
                p = 0;
            }
            pos.push(p as i32);
            p += 1;
        }
    }
    pos
}

mod attention;
mod gqa_attention;
mod llama_ops;
mod lora_ops;
mod model;
mod ops;
mod sampling;
mod training;
