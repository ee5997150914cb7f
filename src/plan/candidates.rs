//! What a plan starts from, and the three ways to use it.
//!
//! A candidate is a preset, a config file or a checkpoint. From each, plans are made:
//!
//! - **adopt**: the candidate as it is: a checkpoint continues pretraining on the corpus, a
//!   preset or config trains from scratch;
//! - **adapt**: a dense preset or config resized (`--set layers=… d_model=…`) to the parameter
//!   count the loss guide prefers for this budget and corpus, from scratch (a checkpoint cannot
//!   change shape and keep its weights, and shape-preserving settings do not change the cost);
//! - **invent**: a mixture of experts, from scratch (the dense model's FFN split into `experts`
//!   experts of `1/top_k` its width, so a token's compute stays that of the dense model), or
//!   upcycled from a dense checkpoint (every expert a copy of its FFN; Komatsuzaki et al. 2022).
//!
//! Every configuration is built through `--set` overrides on the candidate, so the command a
//! plan prints builds exactly the model the plan costed.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::{apply_overrides, Ffn, ModelConfig};
use crate::error::Result;
use crate::io::{self, TextTokenizer};
use crate::model::upcycle::upcycled_config;

/// Where a candidate comes from.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CandidateSource {
    Preset {
        name: String,
    },
    ConfigFile {
        path: PathBuf,
    },
    /// A Hugging Face directory, a `.gguf`, an lmforge model, checkpoint or run directory.
    Checkpoint {
        path: PathBuf,
    },
}

/// A resolved candidate.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// How the user named it (the `--arch` or `--init-from` value in commands).
    pub arg: String,
    /// A short name for the report.
    pub name: String,
    pub source: CandidateSource,
    pub config: ModelConfig,
}

impl Candidate {
    /// A preset name, a config file or a checkpoint path.
    pub fn resolve(arg: &str) -> Result<Self> {
        let path = Path::new(arg);
        let is_checkpoint = path.is_dir() || path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        let (source, config) = if is_checkpoint {
            (CandidateSource::Checkpoint { path: path.to_path_buf() }, io::read_config(path)?)
        } else if path.is_file() {
            (CandidateSource::ConfigFile { path: path.to_path_buf() }, ModelConfig::from_file(path)?)
        } else {
            (CandidateSource::Preset { name: arg.to_string() }, io::resolve_arch(arg, &[])?)
        };
        let stem = || path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| arg.to_string());
        // A checkpoint is named as its file or directory is (its metadata's name is often a
        // training-run label); a config file by its own name when it has one.
        let name = match &source {
            CandidateSource::Preset { name } => name.clone(),
            CandidateSource::ConfigFile { .. } if !config.name.is_empty() => config.name.clone(),
            _ => stem(),
        };
        Ok(Candidate { arg: arg.to_string(), name, source, config })
    }

    pub fn is_checkpoint(&self) -> bool {
        matches!(self.source, CandidateSource::Checkpoint { .. })
    }

    pub fn is_moe(&self) -> bool {
        matches!(self.config.ffn, Ffn::Moe { .. })
    }

    /// The tokenizer a continued run uses: the checkpoint's own.
    pub fn tokenizer(&self) -> Result<Option<TextTokenizer>> {
        match &self.source {
            CandidateSource::Checkpoint { path } => io::read_tokenizer(path),
            _ => Ok(None),
        }
    }
}

/// Adopt, adapt or invent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Approach {
    Adopt,
    Adapt,
    Invent,
}

impl Approach {
    pub fn as_str(self) -> &'static str {
        match self {
            Approach::Adopt => "adopt",
            Approach::Adapt => "adapt",
            Approach::Invent => "invent",
        }
    }
}

/// Where a plan's first weights come from.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Start {
    /// Random initialisation.
    Scratch,
    /// Continued pretraining from a checkpoint's weights.
    Continue { from: PathBuf },
    /// `lmforge upcycle` of a dense checkpoint, then continued pretraining.
    Upcycle { from: PathBuf, experts: usize, top_k: usize },
}

/// A plan before it is costed: what to train and from where.
#[derive(Clone, Debug, Serialize)]
pub struct PlanSpec {
    pub approach: Approach,
    /// E.g. `adopt SmolLM2-135M-Instruct + continue`.
    pub label: String,
    /// The `--arch` of a from-scratch plan (the candidate as named).
    pub arch: String,
    /// `--set` overrides on `arch`.
    pub settings: Vec<String>,
    pub start: Start,
    /// The model trained: `arch` with `settings` applied, or the upcycled checkpoint's.
    #[serde(skip)]
    pub config: ModelConfig,
    /// The tokenizer of a continued checkpoint; `None` trains a BPE on the corpus.
    #[serde(skip)]
    pub tokenizer_of: Option<PathBuf>,
}

/// Experts and routing of invented mixtures.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct MoeShape {
    pub experts: usize,
    pub top_k: usize,
}

/// The adopt plan of a candidate.
pub fn adopt(candidate: &Candidate) -> PlanSpec {
    match &candidate.source {
        CandidateSource::Checkpoint { path } => PlanSpec {
            approach: Approach::Adopt,
            label: format!("adopt {} + continue", candidate.name),
            arch: candidate.arg.clone(),
            settings: vec![],
            start: Start::Continue { from: path.clone() },
            config: candidate.config.clone(),
            tokenizer_of: Some(path.clone()),
        },
        _ => PlanSpec {
            approach: Approach::Adopt,
            label: format!("adopt {} (from scratch)", candidate.name),
            arch: candidate.arg.clone(),
            settings: vec![],
            start: Start::Scratch,
            config: candidate.config.clone(),
            tokenizer_of: None,
        },
    }
}

/// The dense `candidate` resized to about `target_params`, keeping its proportions (width per
/// layer, head width, query heads per KV head, FFN width per model width); `None` when the
/// nearest shape is within 25% of the candidate itself.
pub fn adapt_resized(candidate: &Candidate, target_params: f64) -> Result<Option<PlanSpec>> {
    let base = &candidate.config;
    let Some(hidden) = dense_hidden(&base.ffn) else { return Ok(None) };
    let head_dim = base.head_dim();
    let group = base.attention.heads / base.attention.kv_heads.max(1);
    let unit = head_dim * group; // d_model steps that keep whole heads and whole KV groups
    let aspect = base.d_model as f64 / base.layers as f64;
    let ffn_ratio = hidden as f64 / base.d_model as f64;
    let shape = |layers: usize, d_model: usize| {
        let mut config = base.clone();
        let heads = d_model / head_dim;
        config.layers = layers;
        config.d_model = d_model;
        config.attention.heads = heads;
        config.attention.kv_heads = heads / group;
        if config.attention.layer_windows.is_some() {
            config.attention.layer_windows = Some(vec![base.window(0); layers]);
        }
        let hidden = ((ffn_ratio * d_model as f64 / 32.0).round() as usize).max(1) * 32;
        set_dense_hidden(&mut config.ffn, hidden);
        config
    };
    let mut best: Option<(f64, usize, usize)> = None;
    for layers in 1..=64 {
        for d_model in (1..=(8192 / unit).max(1)).map(|i| i * unit) {
            let params = shape(layers, d_model).params_total() as f64;
            let miss =
                (params / target_params).ln().abs() + 0.25 * ((d_model as f64 / layers as f64) / aspect).ln().abs();
            if best.is_none_or(|(m, _, _)| miss < m) {
                best = Some((miss, layers, d_model));
            }
        }
    }
    let Some((_, layers, d_model)) = best else { return Ok(None) };
    let resized = shape(layers, d_model);
    let ratio = resized.params_total() as f64 / base.params_total() as f64;
    if (0.8..1.25).contains(&ratio) {
        return Ok(None);
    }
    let mut settings = vec![
        format!("layers={layers}"),
        format!("d_model={d_model}"),
        format!("attention.heads={}", resized.attention.heads),
        format!("attention.kv_heads={}", resized.attention.kv_heads),
        format!("ffn.hidden={}", dense_hidden(&resized.ffn).unwrap_or(0)),
    ];
    if let Some(windows) = &resized.attention.layer_windows {
        settings.push(format!("attention.layer_windows={}", serde_json::to_string(windows).unwrap_or_default()));
    }
    let config = apply_overrides(&candidate.config, &settings)?;
    Ok(Some(PlanSpec {
        approach: Approach::Adapt,
        label: format!("adapt {} to {} (from scratch)", candidate.name, short_count(config.params_total() as f64)),
        arch: candidate.arg.clone(),
        settings,
        start: Start::Scratch,
        config,
        tokenizer_of: None,
    }))
}

/// A mixture of experts from scratch made from the dense plan `dense`: its FFN becomes
/// `experts` experts of `1/top_k` its width, routed `top_k` per token.
pub fn invent_moe(dense: &PlanSpec, candidate: &Candidate, moe: MoeShape) -> Result<Option<PlanSpec>> {
    let Some(hidden) = dense_hidden(&dense.config.ffn) else { return Ok(None) };
    let mut expert = dense.config.ffn.clone();
    set_dense_hidden(&mut expert, (hidden / moe.top_k).max(1));
    let ffn = serde_json::json!({"kind": "moe", "experts": moe.experts, "top_k": moe.top_k, "expert": expert});
    let mut settings = dense.settings.clone();
    settings.push(format!("ffn={ffn}"));
    let config = apply_overrides(&candidate.config, &settings)?;
    Ok(Some(PlanSpec {
        approach: Approach::Invent,
        label: format!(
            "invent: {}, {} experts top-{} (from scratch)",
            if dense.settings.is_empty() {
                candidate.name.clone()
            } else {
                format!("{} at {}", candidate.name, short_count(dense.config.params_total() as f64))
            },
            moe.experts,
            moe.top_k
        ),
        arch: candidate.arg.clone(),
        settings,
        start: Start::Scratch,
        config,
        tokenizer_of: None,
    }))
}

/// The dense checkpoint `candidate` upcycled to a mixture: every expert a full copy of its FFN
/// and a new router (what `lmforge upcycle` writes), then continued.
pub fn invent_upcycled(candidate: &Candidate, moe: MoeShape) -> Result<Option<PlanSpec>> {
    let CandidateSource::Checkpoint { path } = &candidate.source else { return Ok(None) };
    if dense_hidden(&candidate.config.ffn).is_none() {
        return Ok(None);
    }
    let config = upcycled_config(&candidate.config, moe.experts, moe.top_k)?;
    Ok(Some(PlanSpec {
        approach: Approach::Invent,
        label: format!("invent: upcycle {} to {} experts top-{} + continue", candidate.name, moe.experts, moe.top_k),
        arch: candidate.arg.clone(),
        settings: vec![],
        start: Start::Upcycle { from: path.clone(), experts: moe.experts, top_k: moe.top_k },
        config,
        tokenizer_of: Some(path.clone()),
    }))
}

fn dense_hidden(ffn: &Ffn) -> Option<usize> {
    match ffn {
        Ffn::Mlp { hidden, .. } | Ffn::Gated { hidden, .. } => Some(*hidden),
        Ffn::Moe { .. } => None,
    }
}

fn set_dense_hidden(ffn: &mut Ffn, width: usize) {
    if let Ffn::Mlp { hidden, .. } | Ffn::Gated { hidden, .. } = ffn {
        *hidden = width;
    }
}

/// `2360000.0` → `2.36M`.
pub fn short_count(n: f64) -> String {
    let (value, unit) = match n {
        n if n >= 1e12 => (n / 1e12, "T"),
        n if n >= 1e9 => (n / 1e9, "B"),
        n if n >= 1e6 => (n / 1e6, "M"),
        n if n >= 1e3 => (n / 1e3, "k"),
        n => (n, ""),
    };
    let digits = if value >= 100.0 {
        0
    } else if value >= 10.0 {
        1
    } else {
        2
    };
    format!("{value:.digits$}{unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_llama() -> Candidate {
        Candidate::resolve("tiny-llama").unwrap()
    }

    #[test]
    fn resizing_hits_the_target_and_the_command_builds_it() {
        let candidate = tiny_llama();
        let target = 4.0 * candidate.config.params_total() as f64;
        let spec = adapt_resized(&candidate, target).unwrap().expect("4x is worth a row");
        let params = spec.config.params_total() as f64;
        assert!((params / target - 1.0).abs() < 0.35, "{params} vs {target}");
        // The printed overrides rebuild exactly the costed model.
        let rebuilt = io::resolve_arch(&spec.arch, &spec.settings).unwrap();
        assert_eq!(rebuilt.param_specs(), spec.config.param_specs());
        assert_eq!(spec.config.head_dim(), candidate.config.head_dim());
        // Close to the candidate already: no adapt row.
        assert!(adapt_resized(&candidate, candidate.config.params_total() as f64).unwrap().is_none());
    }

    #[test]
    fn an_invented_mixture_keeps_the_dense_compute_per_token() {
        let candidate = tiny_llama();
        let dense = adopt(&candidate);
        let moe = invent_moe(&dense, &candidate, MoeShape { experts: 4, top_k: 2 }).unwrap().unwrap();
        let (d, m) = (&dense.config, &moe.config);
        assert!(m.params_total() > d.params_total());
        // Two experts of half the width: the same FFN weights per token, plus a tiny router.
        let router = d.layers * 4 * d.d_model;
        assert_eq!(m.params_active(), d.params_active() + router);
        assert_eq!(io::resolve_arch(&moe.arch, &moe.settings).unwrap(), *m);
    }

    #[test]
    fn counts_read_short() {
        assert_eq!(short_count(2_360_000.0), "2.36M");
        assert_eq!(short_count(134_515_008.0), "135M");
        assert_eq!(short_count(7.2e9), "7.20B");
    }
}
