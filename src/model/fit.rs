//! What would make a run that does not fit fit, by the memory plan's own arithmetic
//! (`memory.rs`): tried in order, `--recompute 2` (where the run asks for less), the largest
//! micro-batch below the run's, and, for a full fine-tune of a command that offers it,
//! LoRA at rank 16 on every projection; the first that fits alone is named with its total.
//! When none does alone, all of them together; when even that does not fit, the advice says
//! so with what the smallest run would still need.

use super::memory::{available_bytes, MemoryPlan, OutOfMemory, PlanOptions};
use crate::backend::Role;
use crate::config::{LoraConfig, LoraTarget, ModelConfig};

/// The rank the advice proposes for a full fine-tune that does not fit (PEFT's examples and
/// the targets use 16). Its targets are every projection of the family: the most
/// memory any target list takes, so fewer targets fit too.
pub const ADVICE_LORA_RANK: usize = 16;

/// How a command counts its micro-batch on its command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchFlag {
    /// The flag (`--batch-size`).
    pub flag: &'static str,
    /// Rows the model sees per unit of the flag (DPO: a pair is 2 rows; RL: `--k` samples
    /// per prompt).
    pub rows_per_unit: usize,
    /// The flag's values are multiples of this (reward: rows, two per pair).
    pub step: usize,
    /// Whether the command takes `--lora-rank` (the fine-tuning stages and `bench`).
    pub lora: bool,
}

impl BatchFlag {
    /// `--batch-size` counting rows, with no LoRA flag (pretraining).
    pub const ROWS: BatchFlag = BatchFlag {
        flag: "--batch-size",
        rows_per_unit: 1,
        step: 1,
        lora: false,
    };

    /// `--batch-size` counting rows, on a command with `--lora-rank`.
    pub const ROWS_LORA: BatchFlag = BatchFlag {
        lora: true,
        ..Self::ROWS
    };
}

/// A run's shape as its command line gives it.
#[derive(Clone, Debug)]
pub struct FitQuery<'a> {
    pub cfg: &'a ModelConfig,
    /// The batch flag's value (pairs for DPO, prompts for RL).
    pub units: usize,
    pub seq_len: usize,
    pub opts: PlanOptions,
    pub batch: BatchFlag,
    /// Bytes of the models the stage holds beside the trained one ([`MemoryPlan::held`]):
    /// no flag of the advice changes them.
    pub held: u128,
}

/// The advice for a run that does not fit.
#[derive(Clone, Debug, PartialEq)]
pub enum Advice {
    /// These flags make it fit; the plan with them.
    Fits { flags: String, plan: MemoryPlan },
    /// Nothing does: even these flags leave a plan past the device.
    Nothing { flags: String, plan: MemoryPlan },
}

impl Advice {
    /// The sentence the refusal ends with.
    pub fn sentence(&self, batch: &BatchFlag) -> String {
        let need = |p: &MemoryPlan| super::memory::gib(p.total());
        match self {
            Self::Fits { flags, plan } if flags.starts_with(batch.flag) => format!(
                "lower {}: {flags} fits, needing about {} (use --total-batch-tokens to keep the \
                 tokens per step)",
                batch.flag,
                need(plan)
            ),
            Self::Fits { flags, plan } if flags.starts_with("--lora-rank") => format!(
                "train LoRA adapters instead of every weight: {flags} (all projections, the \
                 base frozen) fits, needing about {}",
                need(plan)
            ),
            Self::Fits { flags, plan } => format!("{flags} fits, needing about {}", need(plan)),
            Self::Nothing { flags, plan } => format!(
                "nothing fits: even {flags} needs about {}; lower --seq-len or use a device \
                 with more memory",
                need(plan)
            ),
        }
    }

    /// The flags and the plan with them.
    pub fn flags(&self) -> (&str, &MemoryPlan) {
        match self {
            Self::Fits { flags, plan } | Self::Nothing { flags, plan } => (flags, plan),
        }
    }
}

impl FitQuery<'_> {
    /// The plan of this run with `units`, `opts` and `cfg` swapped in.
    fn plan_of(
        &self,
        cfg: &ModelConfig,
        units: usize,
        opts: PlanOptions,
        bytes: &dyn Fn(Role) -> usize,
    ) -> MemoryPlan {
        let rows = units.saturating_mul(self.batch.rows_per_unit.max(1));
        MemoryPlan::training_with(cfg, rows, self.seq_len, opts, bytes).with_held(self.held)
    }

    /// The plan of the run as asked.
    pub fn plan(&self, bytes: &dyn Fn(Role) -> usize) -> MemoryPlan {
        self.plan_of(self.cfg, self.units, self.opts, bytes)
    }

    /// The plan against `available` bytes (`None`: the device cannot tell): the plan when it
    /// fits, else the refusal with [`advise`]'s sentence.
    pub fn check(
        &self,
        bytes: &dyn Fn(Role) -> usize,
        device: &str,
        available: Option<u64>,
    ) -> Result<MemoryPlan, Box<OutOfMemory>> {
        let plan = self.plan(bytes);
        let have = available_bytes(available);
        if plan.total() <= have {
            return Ok(plan);
        }
        let advice = advise(self, bytes, have).sentence(&self.batch);
        Err(Box::new(OutOfMemory {
            plan,
            device: device.to_string(),
            available: have,
            advice: Some(advice),
        }))
    }
}

/// `cfg` with LoRA at [`ADVICE_LORA_RANK`] on every projection of its family.
pub fn with_advice_lora(cfg: &ModelConfig) -> ModelConfig {
    let mut cfg = cfg.clone();
    cfg.lora = Some(LoraConfig {
        rank: ADVICE_LORA_RANK,
        alpha: 2.0 * ADVICE_LORA_RANK as f32,
        dropout: 0.0,
        targets: LoraTarget::all_for(&cfg),
    });
    cfg
}

/// What would make `q` fit in `available` bytes (see the module header).
pub fn advise(q: &FitQuery, bytes: &dyn Fn(Role) -> usize, available: u128) -> Advice {
    let fits = |p: &MemoryPlan| p.total() <= available;
    let step = q.batch.step.max(1);
    let raise = q.opts.recompute < 2;
    let recompute2 = PlanOptions {
        recompute: 2,
        ..q.opts
    };
    if raise {
        let plan = q.plan_of(q.cfg, q.units, recompute2, bytes);
        if fits(&plan) {
            let flags = "--recompute 2".to_string();
            return Advice::Fits { flags, plan };
        }
    }
    let smaller = |cfg: &ModelConfig, opts| {
        largest_units(q.units, step, |u| fits(&q.plan_of(cfg, u, opts, bytes)))
    };
    if let Some(u) = smaller(q.cfg, q.opts) {
        let flags = format!("{} {u}", q.batch.flag);
        let plan = q.plan_of(q.cfg, u, q.opts, bytes);
        return Advice::Fits { flags, plan };
    }
    let lora = q.batch.lora && q.cfg.lora.is_none();
    let lora_cfg = with_advice_lora(q.cfg);
    let lora_flag = format!("--lora-rank {ADVICE_LORA_RANK}");
    if lora {
        let plan = q.plan_of(&lora_cfg, q.units, q.opts, bytes);
        if fits(&plan) {
            return Advice::Fits {
                flags: lora_flag,
                plan,
            };
        }
    }
    // All of them together.
    let cfg = if lora { &lora_cfg } else { q.cfg };
    let opts = if raise { recompute2 } else { q.opts };
    let together = |units: Option<usize>| {
        let mut flags = Vec::new();
        if raise {
            flags.push("--recompute 2".to_string());
        }
        if let Some(u) = units {
            flags.push(format!("{} {u}", q.batch.flag));
        }
        if lora {
            flags.push(lora_flag.clone());
        }
        flags.join(" ")
    };
    let whole = q.plan_of(cfg, q.units, opts, bytes);
    if (raise || lora) && fits(&whole) {
        return Advice::Fits {
            flags: together(None),
            plan: whole,
        };
    }
    if let Some(u) = smaller(cfg, opts) {
        return Advice::Fits {
            flags: together(Some(u)),
            plan: q.plan_of(cfg, u, opts, bytes),
        };
    }
    let least = step.min(q.units.max(1));
    let flags = together((least < q.units).then_some(least));
    // With no flag left to try, the run as asked is the smallest there is.
    let flags = if flags.is_empty() {
        format!("{} {least}", q.batch.flag)
    } else {
        flags
    };
    Advice::Nothing {
        flags,
        plan: q.plan_of(cfg, least, opts, bytes),
    }
}

/// The largest multiple of `step` below `units` for which `fits` holds (the plan grows with
/// the batch, so a bisection finds it), or `None` when even `step` does not fit.
fn largest_units(units: usize, step: usize, fits: impl Fn(usize) -> bool) -> Option<usize> {
    let most = units.saturating_sub(1) / step;
    if most == 0 || !fits(step) {
        return None;
    }
    let (mut lo, mut hi) = (1, most);
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fits(mid * step) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Some(lo * step)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cuda_bytes(r: Role) -> usize {
        match r {
            Role::Param | Role::Activation => 2,
            _ => 4,
        }
    }

    fn query(cfg: &ModelConfig, units: usize, t: usize, recompute: u8) -> FitQuery<'_> {
        FitQuery {
            cfg,
            units,
            seq_len: t,
            opts: PlanOptions {
                recompute,
                ..PlanOptions::default()
            },
            batch: BatchFlag::ROWS_LORA,
            held: 0,
        }
    }

    /// The bisection finds what a scan from the top finds, for every threshold and step.
    #[test]
    fn largest_units_is_the_largest_below() {
        for units in 1..40usize {
            for step in 1..4usize {
                for limit in 0..45usize {
                    let scan = (1..units)
                        .rev()
                        .filter(|u| u % step == 0)
                        .find(|&u| u <= limit);
                    assert_eq!(
                        largest_units(units, step, |u| u <= limit),
                        scan,
                        "units {units} step {step} limit {limit}"
                    );
                }
            }
        }
    }

    /// Between the plan at recompute 2 and at recompute 0, `--recompute 2` is named first,
    /// and it fits; with a little less room than recompute 2 needs, the largest batch is
    /// named, fits, and one more row would not.
    #[test]
    fn recompute_first_then_the_batch() {
        let cfg = ModelConfig::preset("gpt2-124m", 50257).unwrap();
        let q = query(&cfg, 16, 1024, 0);
        let at0 = q.plan(&cuda_bytes).total();
        let at2 = q.plan_of(
            &cfg,
            16,
            PlanOptions {
                recompute: 2,
                ..q.opts
            },
            &cuda_bytes,
        );
        let room = (at0 + at2.total()) / 2;
        let Advice::Fits { flags, plan } = advise(&q, &cuda_bytes, room) else {
            panic!("recompute 2 should fit")
        };
        assert_eq!(flags, "--recompute 2");
        assert_eq!(plan, at2);
        assert!(plan.total() <= room);
        let room = at2.total() - 1;
        let Advice::Fits { flags, plan } = advise(&q, &cuda_bytes, room) else {
            panic!("a smaller batch should fit")
        };
        let u: usize = flags
            .strip_prefix("--batch-size ")
            .unwrap()
            .parse()
            .unwrap();
        assert!(u < 16 && plan.total() <= room, "{flags}");
        assert_eq!(plan.batch_size, u);
        assert!(q.plan_of(&cfg, u + 1, q.opts, &cuda_bytes).total() > room);
        let e = q
            .check(&cuda_bytes, "a card", Some(room as u64))
            .unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("a card has")
                && e.contains(&format!("lower --batch-size: --batch-size {u} fits")),
            "{e}"
        );
    }

    /// A full fine-tune whose weights and optimizer alone overflow the device is told to
    /// train LoRA adapters; a LoRA run is never told so; where nothing fits, it says so.
    #[test]
    fn lora_when_the_weights_do_not_fit() {
        let cfg = ModelConfig::preset("llama-3.2-1b", 128256).unwrap();
        let q = query(&cfg, 1, 256, 2);
        let full = q.plan(&cuda_bytes);
        let lora = q.plan_of(&with_advice_lora(&cfg), 1, q.opts, &cuda_bytes);
        assert!(lora.total() < full.fixed());
        let room = full.fixed() - 1;
        let advice = advise(&q, &cuda_bytes, room);
        assert_eq!(
            advice,
            Advice::Fits {
                flags: format!("--lora-rank {ADVICE_LORA_RANK}"),
                plan: lora
            }
        );
        assert!(advice.sentence(&q.batch).contains("train LoRA adapters"));
        // The pretraining command has no --lora-rank: nothing fits.
        let pretrain = FitQuery {
            batch: BatchFlag::ROWS,
            ..q.clone()
        };
        let nothing = advise(&pretrain, &cuda_bytes, room);
        assert_eq!(
            nothing,
            Advice::Nothing {
                flags: "--batch-size 1".into(),
                plan: full
            }
        );
        let said = nothing.sentence(&pretrain.batch);
        assert!(
            said.starts_with("nothing fits: even --batch-size 1 needs about"),
            "{said}"
        );
        // Less room than the LoRA model's frozen base: nothing fits, even with everything.
        let tiny_room = lora.frozen / 2;
        let Advice::Nothing { flags, plan } = advise(&q, &cuda_bytes, tiny_room) else {
            panic!("nothing should fit")
        };
        assert_eq!(flags, "--lora-rank 16");
        assert_eq!(plan, lora);
    }

    /// When no flag fits alone, they are combined: recompute 2, LoRA and a smaller batch.
    #[test]
    fn flags_combine_when_none_fits_alone() {
        let cfg = ModelConfig::preset("llama-3.2-1b", 128256).unwrap();
        let q = query(&cfg, 8, 2048, 0);
        let lora_cfg = with_advice_lora(&cfg);
        let opts2 = PlanOptions {
            recompute: 2,
            ..q.opts
        };
        let together = q.plan_of(&lora_cfg, 4, opts2, &cuda_bytes);
        let room = together.total();
        // Neither alone fits in that room...
        assert!(q.plan_of(&cfg, 8, opts2, &cuda_bytes).total() > room);
        assert!(q.plan_of(&cfg, 1, q.opts, &cuda_bytes).total() > room);
        assert!(q.plan_of(&lora_cfg, 8, q.opts, &cuda_bytes).total() > room);
        let Advice::Fits { flags, plan } = advise(&q, &cuda_bytes, room) else {
            panic!("combined flags should fit")
        };
        assert_eq!(flags, "--recompute 2 --batch-size 4 --lora-rank 16");
        assert_eq!(plan, together);
    }
}
