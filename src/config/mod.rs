//! The whole architecture as data.
//!
//! A [`ModelConfig`] is everything needed to build a model: no tensors, no file formats, no
//! family names that change behaviour. Each variation between published architectures is an
//! enum (not a boolean or a name check), so adding a family means choosing values, not writing a
//! new model. Derived quantities (head dim when unset, parameter counts, FLOPs) are computed from
//! these fields and never stored twice.

mod overrides;
mod params;
pub mod presets;
mod report;
mod rope_scaling;
mod router;

pub use overrides::{apply_overrides, parse_override};
pub use params::{ParamKind, ParamSpec};
pub use report::{ArchReport, LayerRow};
pub use rope_scaling::RopeScaling;
pub use router::{Gating, Router};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How the layers are arranged.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Layout {
    /// A stack of `layers` causal blocks (GPT, Llama, Mistral, ...).
    DecoderOnly,
    /// The original Transformer: `encoder_layers` bidirectional blocks read the source, then
    /// `layers` causal decoder blocks, each with cross-attention over the encoder's output,
    /// write the target. One token-embedding matrix serves both stacks (a shared vocabulary).
    EncoderDecoder {
        encoder_layers: usize,
        /// The decoder's first input for every target (Marian: its pad id; lmforge's
        /// translation runs: the tokenizer's start token). The model is trained to start
        /// there, so it belongs to the model rather than to a generation setting.
        #[serde(default)]
        decoder_start_token_id: u32,
        /// The token that ends a target: generation stops there and beam search finishes a
        /// hypothesis there. Unset: targets end only at the length limit.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        eos_token_id: Option<u32>,
    },
}

impl Layout {
    /// The original Transformer's layout with `encoder_layers` encoder blocks, decoding from
    /// token 0 with no end token.
    pub fn encoder_decoder(encoder_layers: usize) -> Self {
        Layout::EncoderDecoder { encoder_layers, decoder_start_token_id: 0, eos_token_id: None }
    }

    /// Encoder blocks (0 for a decoder-only model).
    pub fn encoder_layers(&self) -> usize {
        match self {
            Layout::DecoderOnly => 0,
            Layout::EncoderDecoder { encoder_layers, .. } => *encoder_layers,
        }
    }

    pub fn is_encoder_decoder(&self) -> bool {
        matches!(self, Layout::EncoderDecoder { .. })
    }
}

/// Normalisation layer. Whether LayerNorm has a bias follows [`ModelConfig::bias`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Norm {
    /// Mean-centred, variance-scaled, with a gain (and a bias when `bias = true`).
    LayerNorm,
    /// Root-mean-square only, with a gain (Llama, Mistral).
    RmsNorm,
}

/// Where the norm sits relative to the residual add.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Default)]
#[serde(rename_all = "snake_case")]
pub enum NormPlacement {
    /// `x + f(norm(x))`, with a final norm before the head: every modern LLM, stable to train.
    #[default]
    Pre,
    /// `norm(x + f(x))`: the original Transformer (Vaswani et al. 2017).
    Post,
}

/// How a token's position reaches the attention.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Positions {
    /// A trained table of `context_length` vectors added to the token embeddings (GPT-2).
    Learned,
    /// Fixed sine/cosine vectors added to the token embeddings (Vaswani et al. 2017).
    Sinusoidal {
        #[serde(default, skip_serializing_if = "SinusoidLayout::is_default")]
        layout: SinusoidLayout,
    },
    /// Rotary embeddings on queries and keys; `fraction` of each head's dims rotate (Phi-2: 0.4),
    /// optionally with their frequencies rescaled for a longer context (Llama 3.1: `llama3`).
    Rope {
        #[serde(default = "default_rope_theta")]
        theta: f64,
        #[serde(default = "default_rope_fraction")]
        fraction: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scaling: Option<RopeScaling>,
    },
    /// Linear biases on attention scores, one slope per head (MPT, BLOOM); extrapolates.
    Alibi {
        #[serde(default = "default_alibi_max_bias")]
        max_bias: f64,
    },
    /// No position information at all (causal masking alone still orders tokens).
    None,
}

/// Where the sines and cosines of a sinusoidal position vector sit. Both use the frequencies
/// `ω_i = 10000^(−2i/d)` for `i < d/2`; a model trained with one layout does not work with the
/// other.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum SinusoidLayout {
    /// Dim `2i` holds `sin(pos·ω_i)`, dim `2i + 1` the cosine: the paper's formula.
    #[default]
    Interleaved,
    /// Dims `0..d/2` hold the sines, `d/2..d` the cosines: Marian's table
    /// (`MarianSinusoidalPositionalEmbedding`).
    Halves,
}

impl SinusoidLayout {
    fn is_default(&self) -> bool {
        *self == SinusoidLayout::default()
    }
}

/// Dropout probabilities, applied only in training (a forward given a random stream); 0 is off.
/// Vaswani et al. (2017) use 0.1 on embeddings and residuals ("residual dropout");
/// tensor2tensor's `transformer_base` also on the attention probabilities.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Dropout {
    /// On the sum of token and position embeddings, before the first block.
    pub embeddings: f64,
    /// On each sub-layer's output (attention, cross-attention, feed-forward) before it is
    /// added to the residual stream.
    pub residual: f64,
    /// On the attention probabilities (self- and cross-attention).
    pub attention: f64,
}

impl Dropout {
    /// The same probability everywhere.
    pub fn all(p: f64) -> Self {
        Dropout { embeddings: p, residual: p, attention: p }
    }

    pub fn is_off(&self) -> bool {
        *self == Dropout::default()
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_rope_fraction() -> f64 {
    1.0
}
fn default_alibi_max_bias() -> f64 {
    8.0
}

/// Pointwise nonlinearity of a feed-forward block.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact GELU, `x Φ(x)` (MPT, BERT).
    Gelu,
    /// Tanh approximation of GELU, "gelu_new" (GPT-2, Phi-2).
    GeluTanh,
    /// `x σ(x)`, also called swish (Llama's SwiGLU gate).
    Silu,
    /// The original Transformer's choice.
    Relu,
}

/// Feed-forward block.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Ffn {
    /// `down(act(up(x)))`.
    Mlp { hidden: usize, act: Activation },
    /// `down(act(gate(x)) * up(x))`: SwiGLU when `act = silu` (Llama, Mistral).
    Gated { hidden: usize, act: Activation },
    /// Sparse mixture of experts (Mixtral): a linear router picks `top_k` of `experts` copies of
    /// `expert` per token and mixes their outputs with weights from its probabilities; `router`
    /// says how (see [`Router`]).
    Moe {
        experts: usize,
        top_k: usize,
        expert: Box<Ffn>,
        #[serde(default, skip_serializing_if = "Router::is_default")]
        router: Router,
    },
}

/// How attention and feed-forward combine with the residual stream.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Residual {
    /// `x += attn(norm1(x)); x += ffn(norm2(x))`.
    #[default]
    Sequential,
    /// `h = norm(x); x += attn(h) + ffn(h)`, one shared norm (GPT-J, Phi-2): both branches run
    /// from the same input, which shortens the critical path.
    Parallel,
}

/// Self-attention.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Attention {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads: `heads` = multi-head, 1 = multi-query, in between = grouped-query. Fewer
    /// KV heads shrink the KV cache by `heads / kv_heads`.
    pub kv_heads: usize,
    /// Per-head width; unset means `d_model / heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Sliding window W (Mistral): a token sees itself and the W-1 tokens before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<usize>,
    /// Per-layer windows overriding `window` (one entry per layer; `null` = full attention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_windows: Option<Vec<Option<usize>>>,
    /// How scores are computed; both give the same results.
    #[serde(default, skip_serializing_if = "AttentionImpl::is_default")]
    pub implementation: AttentionImpl,
}

impl Attention {
    /// `heads` query heads sharing `kv_heads` key/value heads; derived head dim, no window.
    pub fn new(heads: usize, kv_heads: usize) -> Self {
        Attention {
            heads,
            kv_heads,
            head_dim: None,
            window: None,
            layer_windows: None,
            implementation: AttentionImpl::Flash,
        }
    }
}

/// Attention kernel.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AttentionImpl {
    /// Tiled, online-softmax kernel (FlashAttention's algorithm) with a recomputing backward:
    /// memory linear in the sequence, masks and ALiBi computed from positions, never stored.
    #[default]
    Flash,
    /// Scores, mask and softmax materialised as `(B, H, T, S)` tensors from composed ops; the
    /// reference the flash kernel is tested against.
    Naive,
}

impl AttentionImpl {
    fn is_default(&self) -> bool {
        *self == AttentionImpl::default()
    }
}

/// The architecture. See the module doc for the principles.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// A label for humans (reports, file names). Never changes behaviour.
    #[serde(default)]
    pub name: String,
    #[serde(default = "default_layout")]
    pub layout: Layout,
    pub vocab_size: usize,
    /// Residual stream width.
    pub d_model: usize,
    /// Decoder blocks.
    pub layers: usize,
    /// Longest sequence the model is built for (size of a learned position table, default cap
    /// for generation).
    pub context_length: usize,
    pub norm: Norm,
    #[serde(default)]
    pub norm_placement: NormPlacement,
    pub norm_eps: f64,
    pub positions: Positions,
    pub attention: Attention,
    pub ffn: Ffn,
    #[serde(default)]
    pub residual: Residual,
    /// Bias terms in attention, feed-forward and LayerNorm (GPT-2, Phi-2: yes; Llama, MPT: no).
    pub bias: bool,
    /// Bias on the output head (Phi-2 has one even though GPT-2 does not).
    #[serde(default)]
    pub head_bias: bool,
    /// Output head shares the token-embedding matrix (GPT-2, MPT, small Llamas).
    pub tie_embeddings: bool,
    /// Token embeddings are multiplied by `√d_model` before positions are added (Vaswani et al.
    /// 2017 §3.4, Marian): with a tied head the embeddings are small, and the scale keeps them
    /// from being drowned by the unit-sized sinusoids.
    #[serde(default, skip_serializing_if = "is_false")]
    pub scale_embeddings: bool,
    /// Dropout in training.
    #[serde(default, skip_serializing_if = "Dropout::is_off")]
    pub dropout: Dropout,
}

fn default_layout() -> Layout {
    Layout::DecoderOnly
}

impl Ffn {
    /// The dense block inside (itself for dense FFNs, the expert for MoE).
    pub fn dense(&self) -> &Ffn {
        match self {
            Ffn::Moe { expert, .. } => expert.dense(),
            dense => dense,
        }
    }

    /// The hidden width of the dense block inside.
    pub fn hidden(&self) -> usize {
        match self {
            Ffn::Mlp { hidden, .. } | Ffn::Gated { hidden, .. } => *hidden,
            Ffn::Moe { expert, .. } => expert.hidden(),
        }
    }
}

impl ModelConfig {
    /// Per-head width, derived when not set.
    pub fn head_dim(&self) -> usize {
        self.attention.head_dim.unwrap_or(self.d_model / self.attention.heads.max(1))
    }

    /// Sliding window of layer `layer`, if any.
    pub fn window(&self, layer: usize) -> Option<usize> {
        match &self.attention.layer_windows {
            Some(per_layer) => per_layer.get(layer).copied().flatten(),
            None => self.attention.window,
        }
    }

    /// Number of rotated dims per head for RoPE (even, as the rotation pairs dims).
    pub fn rotary_dims(&self) -> usize {
        match self.positions {
            Positions::Rope { fraction, .. } => {
                let dims = (self.head_dim() as f64 * fraction) as usize;
                dims - dims % 2
            }
            _ => 0,
        }
    }

    /// Parse TOML or JSON (chosen by the first non-blank character), rejecting unknown keys.
    pub fn from_text(text: &str, origin: &str) -> Result<Self> {
        let parsed: std::result::Result<Self, String> = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(|e| e.to_string())
        } else {
            toml::from_str(text).map_err(|e| e.to_string())
        };
        let config = parsed
            .map_err(|reason| Error::Config { origin: format!("model config ({origin})"), problems: vec![reason] })?;
        config.validate_as(origin)?;
        Ok(config)
    }

    /// Read a config file (TOML or JSON).
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_text(&text, &path.display().to_string())
    }

    /// Every problem with this config, each starting with the field path.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut need_positive = |path: &str, value: usize| {
            if value == 0 {
                problems.push(format!("{path} = 0, expected a positive number"));
            }
        };
        need_positive("vocab_size", self.vocab_size);
        need_positive("d_model", self.d_model);
        need_positive("layers", self.layers);
        need_positive("context_length", self.context_length);
        need_positive("attention.heads", self.attention.heads);
        need_positive("attention.kv_heads", self.attention.kv_heads);
        if let Layout::EncoderDecoder { encoder_layers, .. } = self.layout {
            need_positive("layout.encoder_layers", encoder_layers);
        }
        // Far above any published model, low enough that every parameter count fits in 64 bits
        // and listing the parameters stays cheap.
        let mut limit = |path: &str, value: usize, max: usize| {
            if value > max {
                problems.push(format!("{path} = {value} is beyond lmforge's limit of {max}"));
            }
        };
        limit("vocab_size", self.vocab_size, 1 << 22);
        limit("d_model", self.d_model, 1 << 18);
        limit("layers", self.layers, 1 << 12);
        limit("context_length", self.context_length, 1 << 24);
        limit("attention.heads", self.attention.heads, 1 << 14);
        limit("attention.kv_heads", self.attention.kv_heads, 1 << 14);
        limit("attention.head_dim", self.attention.head_dim.unwrap_or(0), 1 << 14);
        if let Layout::EncoderDecoder { encoder_layers, .. } = self.layout {
            limit("layout.encoder_layers", encoder_layers, 1 << 12);
        }
        let (hidden, experts) = match &self.ffn {
            Ffn::Moe { experts, expert, .. } => (expert.hidden(), *experts),
            dense => (dense.hidden(), 1),
        };
        limit("ffn.hidden", hidden, 1 << 22);
        limit("ffn.experts", experts, 1 << 10);
        if !problems.is_empty() {
            return problems;
        }

        let att = &self.attention;
        if att.heads > 0 && att.kv_heads > 0 && !att.heads.is_multiple_of(att.kv_heads) {
            problems
                .push(format!("attention.kv_heads = {} does not divide attention.heads = {}", att.kv_heads, att.heads));
        }
        match att.head_dim {
            Some(0) => problems.push("attention.head_dim = 0, expected a positive number".into()),
            None if att.heads > 0 && !self.d_model.is_multiple_of(att.heads) => problems.push(format!(
                "attention.heads = {} does not divide d_model = {} (set attention.head_dim explicitly)",
                att.heads, self.d_model
            )),
            _ => {}
        }
        if att.window == Some(0) {
            problems.push("attention.window = 0, expected at least 1 (a token sees itself)".into());
        }
        if let Some(per_layer) = &att.layer_windows {
            if per_layer.len() != self.layers {
                problems.push(format!(
                    "attention.layer_windows has {} entries, expected one per layer ({})",
                    per_layer.len(),
                    self.layers
                ));
            }
            for (i, w) in per_layer.iter().enumerate() {
                if *w == Some(0) {
                    problems.push(format!("attention.layer_windows[{i}] = 0, expected at least 1"));
                }
            }
        }
        if !(self.norm_eps > 0.0 && self.norm_eps.is_finite()) {
            problems.push(format!("norm_eps = {}, expected a small positive number", self.norm_eps));
        }
        match self.positions {
            Positions::Rope { theta, fraction, scaling } => {
                if let Some(scaling) = scaling {
                    problems.extend(scaling.problems("positions.scaling"));
                }
                if !(theta > 1.0 && theta.is_finite()) {
                    problems.push(format!("positions.theta = {theta}, expected a number > 1"));
                }
                if !(fraction > 0.0 && fraction <= 1.0) {
                    problems.push(format!("positions.fraction = {fraction}, expected 0 < fraction <= 1"));
                } else if att.heads > 0 && self.head_dim() > 0 && self.rotary_dims() == 0 {
                    problems.push(format!(
                        "positions.fraction = {fraction} rotates no dims of head_dim = {}",
                        self.head_dim()
                    ));
                }
            }
            Positions::Alibi { max_bias } if !(max_bias > 0.0 && max_bias.is_finite()) => {
                problems.push(format!("positions.max_bias = {max_bias}, expected a positive number"));
            }
            Positions::Sinusoidal { .. } if !self.d_model.is_multiple_of(2) => {
                problems.push(format!("positions = sinusoidal needs an even d_model, found {}", self.d_model));
            }
            _ => {}
        }
        check_ffn(&self.ffn, "ffn", &mut problems);
        if self.residual == Residual::Parallel && self.norm_placement == NormPlacement::Post {
            problems.push("residual = parallel needs norm_placement = pre".into());
        }
        for (path, p) in [
            ("embeddings", self.dropout.embeddings),
            ("residual", self.dropout.residual),
            ("attention", self.dropout.attention),
        ] {
            if !(0.0..1.0).contains(&p) {
                problems.push(format!("dropout.{path} = {p}, expected a probability 0 <= p < 1"));
            }
        }
        if let Layout::EncoderDecoder { decoder_start_token_id, eos_token_id, .. } = self.layout {
            self.encoder_decoder_problems(decoder_start_token_id, eos_token_id, &mut problems);
        }
        problems
    }

    /// What an encoder–decoder model cannot combine with: position schemes without meaning
    /// across two sequences, windows, a parallel residual; special tokens outside the vocabulary.
    fn encoder_decoder_problems(&self, start: u32, eos: Option<u32>, problems: &mut Vec<String>) {
        let vocab = self.vocab_size;
        if start as usize >= vocab {
            problems.push(format!("layout.decoder_start_token_id = {start} is outside the vocabulary (0..{vocab})"));
        }
        if let Some(eos) = eos.filter(|&e| e as usize >= vocab) {
            problems.push(format!("layout.eos_token_id = {eos} is outside the vocabulary (0..{vocab})"));
        }
        if matches!(self.positions, Positions::Rope { .. } | Positions::Alibi { .. }) {
            problems.push(
                "positions: rope and alibi are not supported with layout = encoder_decoder (cross-attention relates two sequences without shared positions); use sinusoidal, learned or none".into(),
            );
        }
        if self.attention.window.is_some() || self.attention.layer_windows.is_some() {
            problems.push("attention.window: sliding windows are not supported with layout = encoder_decoder".into());
        }
        if self.residual == Residual::Parallel {
            problems.push("residual = parallel is not supported with layout = encoder_decoder".into());
        }
    }

    /// `Ok` when [`problems`](Self::problems) is empty; otherwise one error listing them all.
    pub fn validate(&self) -> Result<()> {
        self.validate_as(if self.name.is_empty() { "config" } else { &self.name })
    }

    fn validate_as(&self, origin: &str) -> Result<()> {
        Error::check_problems(format!("model config ({origin})"), self.problems())
    }
}

fn check_ffn(ffn: &Ffn, path: &str, problems: &mut Vec<String>) {
    match ffn {
        Ffn::Mlp { hidden, .. } | Ffn::Gated { hidden, .. } => {
            if *hidden == 0 {
                problems.push(format!("{path}.hidden = 0, expected a positive number"));
            }
        }
        Ffn::Moe { experts, top_k, expert, router } => {
            if *experts == 0 {
                problems.push(format!("{path}.experts = 0, expected a positive number"));
            } else if *top_k == 0 || top_k > experts {
                problems.push(format!("{path}.top_k = {top_k}, expected 1..={experts} (the number of experts)"));
            }
            problems.extend(router.problems(&format!("{path}.router")));
            if matches!(**expert, Ffn::Moe { .. }) {
                problems.push(format!("{path}.expert is itself a mixture; nested mixtures are not supported"));
            }
            check_ffn(expert, &format!("{path}.expert"), problems);
        }
    }
}
