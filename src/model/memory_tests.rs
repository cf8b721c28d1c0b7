//! Tests of the memory plan (`memory.rs`): its rows by hand and against what the model
//! allocates on the CPU.

use super::PlanOptions;
use super::*;
use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::model::Activations;

fn cpu_bytes(_: Role) -> usize {
    4
}

/// The plan's activation count is the one `Activations::new` allocates (plus the scratch)
/// at every recompute level, and each level saves what the plan says.
#[test]
fn activations_match_the_allocation() {
    let cfg = ModelConfig::preset("tiny", 300).unwrap();
    let be = CpuBackend::new();
    let (b, t) = (3, 17);
    let (n, c) = (b * t, cfg.n_embd);
    let mut bytes = Vec::new();
    for level in 0..=2 {
        let acts = Activations::new(&be, &cfg, b, t, level).unwrap();
        let stats =
            be.len(&acts.losses) + acts.layers.iter().map(|l| be.len(&l.lse)).sum::<usize>();
        let scratch = 10 * n * c;
        let elems = acts.activation_elements(&be) + stats + scratch;
        let opts = PlanOptions {
            recompute: level,
            ..PlanOptions::default()
        };
        let plan = MemoryPlan::training_with(&cfg, b, t, opts, cpu_bytes);
        // At this size one logit chunk holds every row: the logits are N x VP.
        assert_eq!(plan.logits, 4 * (n * cfg.padded_vocab_size) as u128);
        assert_eq!(
            plan.activations + plan.logits,
            4 * elems as u128,
            "level {level}"
        );
        assert_eq!(plan.activations_at[level as usize], plan.activations);
        bytes.push(plan.activations);
    }
    // Level 1: 4 NC per layer, less one shared 4 NC; level 2: 2 NC more, less a shared NC.
    let (l, nc) = (cfg.n_layer as u128, (n * c) as u128);
    assert_eq!(bytes[0] - bytes[1], 4 * (4 * nc * (l - 1)));
    assert_eq!(bytes[1] - bytes[2], 4 * (2 * nc * l - nc));
    let plan = MemoryPlan::training(&cfg, b, t, cpu_bytes);
    assert_eq!(plan.weights, 4 * cfg.num_params() as u128);
    assert_eq!(plan.moments, 2 * plan.grads);
    assert_eq!(plan.master, 0);
}

/// The same for the Llama family (grouped KV heads, untied head, q/k/v biases), with the
/// fp32 statistics by role: each level drops what it says.
#[test]
fn llama_activations_match_the_allocation() {
    use crate::config::{Family, LlamaShape};
    let mut cfg = ModelConfig::preset("llama-tiny", 300).unwrap();
    cfg.family = Family::Llama(LlamaShape {
        qkv_bias: true,
        ..LlamaShape::new(2, 96)
    });
    let be = CpuBackend::new();
    let (b, t) = (3, 17);
    let (n, c, i) = (b * t, cfg.n_embd, 96);
    let stat_bytes = |r: Role| if r == Role::Stat { 8 } else { 4 };
    let mut acts_at = Vec::new();
    for level in 0..=2 {
        let acts = Activations::new(&be, &cfg, b, t, level).unwrap();
        let stats: usize = acts
            .llama
            .iter()
            .map(|l| be.len(&l.lse) + be.len(&l.ln1_rstd) + be.len(&l.ln2_rstd))
            .sum::<usize>()
            + be.len(&acts.lnf_rstd);
        let scratch = 3 * n * c + n * cfg.qkv_width() + 3 * n * i;
        let elems = acts.activation_elements(&be) + scratch;
        let opts = PlanOptions {
            recompute: level,
            ..PlanOptions::default()
        };
        let plan = MemoryPlan::training_with(&cfg, b, t, opts, stat_bytes);
        let want = 4 * (elems + be.len(&acts.losses)) + 8 * stats;
        assert_eq!(
            plan.activations + plan.logits,
            want as u128,
            "level {level}"
        );
        acts_at.push(plan.activations);
    }
    let (l, nc, ni) = (cfg.n_layer as u128, (n * c) as u128, (n * i) as u128);
    assert_eq!(acts_at[0] - acts_at[1], 4 * ni * (l - 1));
    assert_eq!(acts_at[1] - acts_at[2], 4 * (2 * nc * l - nc));
}

fn cuda_bytes(r: Role) -> usize {
    match r {
        Role::Param | Role::Activation => 2,
        _ => 4,
    }
}

fn with_lora(mut cfg: ModelConfig, rank: usize, targets: &str) -> ModelConfig {
    let targets = crate::config::LoraTarget::parse_list(targets, &cfg).unwrap();
    cfg.lora = Some(crate::config::LoraConfig {
        rank,
        alpha: 8.0,
        dropout: 0.1,
        targets,
    });
    cfg.validate().unwrap();
    cfg
}

/// A Llama model with adapters on q, v and down, rank 4, by hand: per layer q adds
/// `4 x 128 + 128 x 4`, v (two KV heads of 32) `4 x 128 + 64 x 4`, down `4 x 384 + 128 x 4`;
/// the base is frozen (one bf16 copy), and master, moments and gradients count the
/// adapters alone. LoRA's activations: `N x 4` kept per adapter; the forward's scratch one
/// buffer per distinct width among the outputs (128, 64) and, with dropout, the inputs
/// (128, 384): `N x 576`; the backward's `du` (`N x 4`) and `dxl` per distinct input
/// (`N x (128 + 384)`).
#[test]
fn lora_rows_by_hand_llama() {
    let base = ModelConfig::preset("llama-tiny", 300).unwrap();
    let cfg = with_lora(base.clone(), 4, "q,v,down");
    let (b, t) = (3usize, 17usize);
    let n = (b * t) as u128;
    let p = MemoryPlan::training_with(&cfg, b, t, PlanOptions::default(), cuda_bytes);
    let full = MemoryPlan::training_with(&base, b, t, PlanOptions::default(), cuda_bytes);
    let per_layer = (4 * 128 + 128 * 4) + (4 * 128 + 64 * 4) + (4 * 384 + 128 * 4);
    assert_eq!(per_layer, 3840);
    let trained = 4 * per_layer as u128;
    let base_params = base.num_params() as u128;
    assert_eq!(
        (p.trainable_params, p.frozen_params),
        (trained, base_params)
    );
    assert_eq!(p.frozen, 2 * base_params);
    assert_eq!(p.weights, 2 * trained);
    assert_eq!(p.master, 4 * trained);
    assert_eq!(p.moments, 8 * trained);
    assert_eq!(p.grads, 4 * trained);
    assert_eq!(p.lora_kept, 2 * (4 * 3) * n * 4);
    assert_eq!(p.lora_scratch, 2 * n * ((64 + 128 + 384) + (4 + 128 + 384)));
    // The base's activations and logits are the full model's.
    assert_eq!(p.activations_at, full.activations_at);
    assert_eq!(p.logits, full.logits);
    assert_eq!(
        p.total(),
        p.fixed() + p.activations + p.logits + p.lora_kept + p.lora_scratch
    );
    // A full fine-tune freezes nothing and has no LoRA rows.
    assert_eq!((full.frozen, full.frozen_params), (0, 0));
    assert_eq!((full.lora_kept, full.lora_scratch), (0, 0));
    assert_eq!(full.grads, 4 * base_params);
}

/// GPT-2's fused `c_attn` is one adapter of width 3C; `c_fc`'s input is C, `c_proj`'s 4C.
/// With f32 storage (the CPU) there is no master copy, and the frozen base still has no
/// gradients or moments. LoRA's scratch: the forward's distinct widths {C, 3C, 4C} (inputs
/// C and 4C among them), the backward's `du`, `dxl` per distinct input {C, 4C}, and the
/// `down` adapter's GELU output gradient (4C).
#[test]
fn lora_rows_by_hand_gpt2() {
    let base = ModelConfig::preset("tiny", 300).unwrap();
    let cfg = with_lora(base.clone(), 8, "all");
    let c = 128u128;
    let (b, t) = (2usize, 9usize);
    let n = (b * t) as u128;
    let p = MemoryPlan::training(&cfg, b, t, cpu_bytes);
    // qkv (C -> 3C), o (C -> C), up (C -> 4C), down (4C -> C): A r x in, B width x r.
    let per_layer = 8 * (c + 3 * c) + 8 * (c + c) + 8 * (c + 4 * c) + 8 * (4 * c + c);
    let trained = 4 * per_layer;
    assert_eq!(p.trainable_params, trained);
    assert_eq!(p.frozen, 4 * base.num_params() as u128);
    assert_eq!((p.weights, p.master), (4 * trained, 0));
    assert_eq!((p.grads, p.moments), (4 * trained, 8 * trained));
    assert_eq!(p.lora_kept, 4 * (4 * 4) * n * 8);
    assert_eq!(
        p.lora_scratch,
        4 * n * ((c + 3 * c + 4 * c) + (8 + c + 4 * c) + 4 * c)
    );
}

/// The logits buffer is one chunk of the chunked classifier: all rows while they fit in
/// `LOGIT_CHUNK_ELEMENTS`, then as many rows as fit, with the chunk's staging (its rows of
/// `lnf` and `dlnf`, and its fp32 losses).
#[test]
fn logits_are_one_chunk() {
    let cfg = ModelConfig::preset("llama-3.2-1b", 128256).unwrap();
    let vp = cfg.padded_vocab_size as u128;
    let small = MemoryPlan::training(&cfg, 1, 64, cuda_bytes);
    assert_eq!(small.logits, 2 * 64 * vp);
    let big = MemoryPlan::training(&cfg, 8, 2048, cuda_bytes);
    let rows = (crate::model::head::LOGIT_CHUNK_ELEMENTS as u128) / vp;
    assert!(rows < 8 * 2048);
    let n = 8 * 2048u128;
    let rows = n.div_ceil(n.div_ceil(rows)); // balanced chunks
    let staging = crate::model::head::logit_staging_elements(8 * 2048, 2048, vp as usize);
    assert_eq!(staging as u128, 2 * rows * 2048);
    assert_eq!(big.logits, 2 * rows * vp + 2 * staging as u128 + 4 * rows);
}

/// Every buffer a training pass allocates, counted from the model after a
/// forward_backward on the CPU (4 bytes each): the activations (logits, a chunked head's
/// staging and LoRA's included), the fp32 statistics and losses, and the backward's scratch.
fn allocated_bytes(m: &crate::model::Gpt<CpuBackend>, be: &CpuBackend) -> u128 {
    let acts = m.acts.as_ref().expect("a pass ran");
    let mut stats = be.len(&acts.losses)
        + acts.layers.iter().map(|l| be.len(&l.lse)).sum::<usize>()
        + acts.head.stage.as_ref().map_or(0, |s| be.len(&s.losses));
    for l in &acts.llama {
        stats += be.len(&l.lse) + be.len(&l.ln1_rstd) + be.len(&l.ln2_rstd);
    }
    if !acts.llama.is_empty() {
        stats += be.len(&acts.lnf_rstd);
    }
    let elems = m.activation_elements(be).unwrap() + m.scratch_elements(be).unwrap() + stats;
    4 * elems as u128
}

/// The plan's activation bytes are what the model allocates, for both families, with and
/// without LoRA (targets with shared and distinct widths, with and without dropout), the
/// head in one chunk or several, at every recompute level.
#[test]
fn plan_equals_the_allocation_after_a_training_pass() {
    use crate::model::Gpt;
    use crate::rng::Rng;
    let gpt2 = ModelConfig::preset("tiny", 300).unwrap();
    let llama = ModelConfig::preset("llama-tiny", 300).unwrap();
    let lora = |cfg: &ModelConfig, targets: &str, dropout: f32| {
        let mut cfg = with_lora(cfg.clone(), 4, targets);
        cfg.lora.as_mut().unwrap().dropout = dropout;
        cfg
    };
    let cfgs = [
        gpt2.clone(),
        lora(&gpt2, "all", 0.1),
        lora(&gpt2, "q,k,v,o", 0.0),
        lora(&gpt2, "down", 0.0),
        llama.clone(),
        lora(&llama, "all", 0.0),
        lora(&llama, "q,v,down", 0.1),
    ];
    let be = CpuBackend::new();
    let (b, t) = (3, 9);
    let mut rng = Rng::new(15);
    let mut tokens = || -> Vec<i32> { (0..b * t).map(|_| rng.below(300) as i32).collect() };
    for cfg in &cfgs {
        for level in 0..=2u8 {
            for rows in [None, Some(7)] {
                let mut m = Gpt::init(&be, cfg, 7).unwrap();
                m.set_recompute(level).unwrap();
                m.set_logit_chunk_rows(rows).unwrap();
                let (x, y) = (tokens(), tokens());
                m.forward_backward(&be, &x, &y, b, t, 1.0).unwrap();
                let opts = PlanOptions {
                    recompute: level,
                    logit_rows: rows,
                    ..PlanOptions::default()
                };
                let plan = MemoryPlan::training_with(cfg, b, t, opts, cpu_bytes);
                let what = format!(
                    "{} lora {:?} recompute {level} rows {rows:?}",
                    cfg.family_name(),
                    cfg.lora
                );
                assert_eq!(plan.activation_total(), allocated_bytes(&m, &be), "{what}");
            }
        }
    }
}

/// RL's held models: a frozen working copy and a forward pass's buffers (no scratch, no
/// gradients), counted against a model frozen and run forward on the CPU.
#[test]
fn a_held_model_is_its_weights_and_forward_buffers() {
    use crate::model::Gpt;
    let be = CpuBackend::new();
    let (b, t) = (2, 11);
    for cfg in [
        ModelConfig::preset("tiny", 300).unwrap(),
        ModelConfig::preset("llama-tiny", 300).unwrap(),
    ] {
        let mut m = Gpt::init(&be, &cfg, 3).unwrap();
        m.freeze(&be).unwrap();
        assert!(m.grads.iter().all(Option::is_none));
        let ids: Vec<i32> = (0..b * t).map(|i| (i * 37 % 300) as i32).collect();
        m.token_logps(&be, &ids, &ids, b, t).unwrap();
        assert_eq!(
            m.scratch_elements(&be),
            None,
            "a forward pass allocates no scratch"
        );
        let acts = m.acts.as_ref().unwrap();
        let mut stats =
            be.len(&acts.losses) + acts.layers.iter().map(|l| be.len(&l.lse)).sum::<usize>();
        for l in &acts.llama {
            stats += be.len(&l.lse) + be.len(&l.ln1_rstd) + be.len(&l.ln2_rstd);
        }
        if !acts.llama.is_empty() {
            stats += be.len(&acts.lnf_rstd);
        }
        let elems = m.activation_elements(&be).unwrap() + stats;
        let weights = 4 * cfg.num_params() as u128;
        assert_eq!(
            MemoryPlan::held_model(&cfg, b, t, cpu_bytes),
            weights + 4 * elems as u128
        );
    }
}

/// A batch no machine holds is refused with the sizes named, without overflowing.
#[test]
fn a_huge_batch_is_refused() {
    let cfg = ModelConfig::preset("gpt2-124m", 50257).unwrap();
    let plan = MemoryPlan::training(&cfg, usize::MAX, usize::MAX, cpu_bytes);
    assert!(plan.check("cpu", None).is_err());
    let plan = MemoryPlan::training(&cfg, 100_000_000, 256, cpu_bytes);
    let e = plan.check("cpu", Some(16 << 30)).unwrap_err().to_string();
    assert!(
        e.contains("batch_size 100000000 x seq_len 256")
            && e.contains("cpu has 16.0 GiB available")
            && e.contains("lower --batch-size"),
        "{e}"
    );
    MemoryPlan::training(&cfg, 4, 64, cpu_bytes)
        .check("cpu", Some(16 << 30))
        .unwrap();
}
