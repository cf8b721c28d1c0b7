//! The LoRA settings of a training run (`--lora-rank --lora-alpha --lora-dropout
//! --lora-targets`, TOML keys `lora_rank lora_alpha lora_dropout lora_targets`) resolved into a
//! [`LoraConfig`] for a model, and the start-of-run line that describes it.

use super::{ConfigError, LoraConfig, LoraTarget, ModelConfig, RunConfig};

impl RunConfig {
    /// The adapters this run trains on `model` (the base's shape), or `None` without
    /// `lora_rank`. `lora_alpha` defaults to `2 * lora_rank`; `lora_targets` is parsed for the
    /// model's family. The other LoRA keys without `lora_rank` are an error (they would do
    /// nothing).
    pub fn lora(&self, model: &ModelConfig) -> Result<Option<LoraConfig>, ConfigError> {
        let Some(rank) = self.lora_rank else {
            let stray = [
                ("lora_alpha", "--lora-alpha", self.lora_alpha.is_some()),
                ("lora_dropout", "--lora-dropout", self.lora_dropout != 0.0),
                ("lora_targets", "--lora-targets", self.lora_targets != "all"),
            ];
            if let Some((key, flag, _)) = stray.iter().find(|s| s.2) {
                return Err(ConfigError::Invalid(format!(
                    "{key} ({flag}) is set but lora_rank (--lora-rank) is not: LoRA is on only \
                     with a rank"
                )));
            }
            return Ok(None);
        };
        let lora = LoraConfig {
            rank,
            alpha: self.lora_alpha.unwrap_or(2.0 * rank as f32),
            dropout: self.lora_dropout,
            targets: LoraTarget::parse_list(&self.lora_targets, model)?,
        };
        lora.validate(model)?;
        Ok(Some(lora))
    }
}

/// The adapters a resumed run trains, given those of the checkpoint it resumes (`saved`) and
/// those its settings ask for (`wanted`, from [`RunConfig::lora`]): none asked is the
/// checkpoint's; asked, they must be the checkpoint's. Else each setting that differs, as
/// `lora_rank (--lora-rank) is 8 in the checkpoint but 4 in this run`.
pub fn resume_lora(
    saved: Option<&LoraConfig>,
    wanted: Option<LoraConfig>,
) -> Result<Option<LoraConfig>, Vec<String>> {
    let (old, new) = match (saved, wanted) {
        (None, None) => return Ok(None),
        (Some(old), None) => return Ok(Some(old.clone())),
        (None, Some(new)) => {
            return Err(vec![format!(
                "lora_rank (--lora-rank) is unset in the checkpoint (every weight trained) but \
                 {} in this run",
                new.rank
            )])
        }
        (Some(old), Some(new)) => (old, new),
    };
    let names = |l: &LoraConfig| {
        let t: Vec<&str> = l.targets.iter().map(|t| t.name()).collect();
        t.join(",")
    };
    let settings = [
        (
            "lora_rank",
            "--lora-rank",
            old.rank.to_string(),
            new.rank.to_string(),
        ),
        (
            "lora_alpha",
            "--lora-alpha",
            old.alpha.to_string(),
            new.alpha.to_string(),
        ),
        (
            "lora_dropout",
            "--lora-dropout",
            old.dropout.to_string(),
            new.dropout.to_string(),
        ),
        ("lora_targets", "--lora-targets", names(old), names(&new)),
    ];
    let diffs: Vec<String> = settings
        .iter()
        .filter(|(_, _, a, b)| a != b)
        .map(|(key, flag, a, b)| {
            format!("{key} ({flag}) is {a} in the checkpoint but {b} in this run")
        })
        .collect();
    if diffs.is_empty() {
        Ok(Some(new))
    } else {
        Err(diffs)
    }
}

/// `LoRA r=16 alpha=32 on q,k,v,o,gate,up,down: 11.3M trained of 1.24B (0.91%)`: the adapters
/// of `lora`, `trained` elements of `total`.
pub fn lora_line(lora: &LoraConfig, trained: usize, total: usize) -> String {
    let targets: Vec<&str> = lora.targets.iter().map(|t| t.name()).collect();
    let dropout = if lora.dropout > 0.0 {
        format!(" dropout={}", lora.dropout)
    } else {
        String::new()
    };
    format!(
        "LoRA r={} alpha={}{dropout} on {}: {} trained of {} ({:.2}%)",
        lora.rank,
        lora.alpha,
        targets.join(","),
        count(trained),
        count(total),
        100.0 * trained as f64 / total.max(1) as f64
    )
}

/// A count with three significant digits and a K/M/B suffix (`11.3M`, `1.24B`, `950`).
pub fn count(n: usize) -> String {
    let x = n as f64;
    let (v, unit) = match n {
        0..=999 => return n.to_string(),
        1_000..=999_999 => (x / 1e3, "K"),
        1_000_000..=999_999_999 => (x / 1e6, "M"),
        _ => (x / 1e9, "B"),
    };
    let digits = if v >= 100.0 {
        0
    } else if v >= 10.0 {
        1
    } else {
        2
    };
    format!("{v:.digits$}{unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_lora_resolves_with_defaults_and_names_stray_keys() {
        let llama = ModelConfig::preset("llama-tiny", 512).unwrap();
        let run = RunConfig {
            lora_rank: Some(16),
            ..RunConfig::default()
        };
        let lora = run.lora(&llama).unwrap().unwrap();
        assert_eq!((lora.rank, lora.alpha, lora.dropout), (16, 32.0, 0.0));
        assert_eq!(lora.targets, LoraTarget::all_for(&llama));
        assert_eq!(RunConfig::default().lora(&llama).unwrap(), None);
        let stray = RunConfig {
            lora_alpha: Some(8.0),
            ..RunConfig::default()
        };
        let err = stray.lora(&llama).unwrap_err().to_string();
        assert!(
            err.contains("lora_alpha (--lora-alpha) is set but lora_rank"),
            "{err}"
        );
        let bad = RunConfig {
            lora_rank: Some(4),
            lora_targets: "q,wq".into(),
            ..RunConfig::default()
        };
        let err = bad.lora(&llama).unwrap_err().to_string();
        assert!(err.contains("unknown target `wq`"), "{err}");
    }

    /// A resume keeps the checkpoint's adapters: none asked adopts them, the same asked is
    /// accepted, and each differing setting is named with both values.
    #[test]
    fn a_resume_names_each_lora_setting_that_differs() {
        let llama = ModelConfig::preset("llama-tiny", 512).unwrap();
        let run = |rank, alpha, dropout: f32, targets: &str| RunConfig {
            lora_rank: Some(rank),
            lora_alpha: alpha,
            lora_dropout: dropout,
            lora_targets: targets.into(),
            ..RunConfig::default()
        };
        let old = run(8, None, 0.1, "q,v").lora(&llama).unwrap().unwrap();
        assert_eq!(resume_lora(Some(&old), None), Ok(Some(old.clone())));
        assert_eq!(resume_lora(None, None), Ok(None));
        let same = run(8, Some(16.0), 0.1, "v,q").lora(&llama).unwrap();
        assert_eq!(resume_lora(Some(&old), same), Ok(Some(old.clone())));
        let diffs = resume_lora(
            Some(&old),
            run(4, Some(16.0), 0.0, "all").lora(&llama).unwrap(),
        )
        .unwrap_err();
        assert_eq!(
            diffs,
            vec![
                "lora_rank (--lora-rank) is 8 in the checkpoint but 4 in this run".to_string(),
                "lora_dropout (--lora-dropout) is 0.1 in the checkpoint but 0 in this run".into(),
                "lora_targets (--lora-targets) is q,v in the checkpoint but q,k,v,o,gate,up,down \
                 in this run"
                    .into(),
            ]
        );
        let alpha = resume_lora(
            Some(&old),
            run(8, Some(8.0), 0.1, "q,v").lora(&llama).unwrap(),
        );
        assert_eq!(
            alpha.unwrap_err(),
            vec!["lora_alpha (--lora-alpha) is 16 in the checkpoint but 8 in this run".to_string()]
        );
        let full = resume_lora(None, Some(old)).unwrap_err();
        assert!(full[0].contains("unset in the checkpoint"), "{full:?}");
    }

    #[test]
    fn the_line_reads_like_the_issue() {
        let lora = LoraConfig {
            rank: 16,
            alpha: 32.0,
            dropout: 0.0,
            targets: vec![
                LoraTarget::Q,
                LoraTarget::K,
                LoraTarget::V,
                LoraTarget::O,
                LoraTarget::Gate,
                LoraTarget::Up,
                LoraTarget::Down,
            ],
        };
        assert_eq!(
            lora_line(&lora, 11_272_192, 1_247_086_592),
            "LoRA r=16 alpha=32 on q,k,v,o,gate,up,down: 11.3M trained of 1.25B (0.90%)"
        );
        assert_eq!(count(950), "950");
        assert_eq!(count(1_500), "1.50K");
        assert_eq!(count(123_456_789), "123M");
    }
}
