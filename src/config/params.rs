//! The one list of a model's parameters: canonical name, shape and role.
//!
//! Everything that needs to know which tensors a config has reads this list: the model builder
//! (it fetches exactly these names), the importers (missing, extra or mis-shaped tensors are
//! reported against it), the exporters, initialisation, weight-decay grouping and the
//! parameter/FLOP report. Linear weights are `[out, in]`, as in PyTorch.

use super::{Ffn, Layout, ModelConfig, Norm, NormPlacement, Positions, Residual};

/// What a parameter is for; drives initialisation, weight decay and reporting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// Token or position table.
    Embedding,
    /// A projection matrix.
    Weight,
    /// An additive bias.
    Bias,
    /// A norm's gain.
    NormGain,
    /// A norm's bias.
    NormBias,
}

/// One parameter tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: ParamKind,
    /// Decoder block index, if the tensor belongs to one.
    pub layer: Option<usize>,
    /// Expert index inside a mixture-of-experts block: such a tensor is active for only
    /// `top_k / experts` of the tokens.
    pub expert: Option<usize>,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Collects specs under a name prefix, the way `VarBuilder::pp` nests names.
struct Specs<'a> {
    out: &'a mut Vec<ParamSpec>,
    prefix: String,
    layer: Option<usize>,
    expert: Option<usize>,
}

impl Specs<'_> {
    fn push(&mut self, name: &str, shape: Vec<usize>, kind: ParamKind) {
        self.out.push(ParamSpec {
            name: format!("{}{name}", self.prefix),
            shape,
            kind,
            layer: self.layer,
            expert: self.expert,
        });
    }

    fn sub(&mut self, name: &str) -> Specs<'_> {
        Specs { out: self.out, prefix: format!("{}{name}.", self.prefix), layer: self.layer, expert: self.expert }
    }

    fn linear(&mut self, name: &str, out_dim: usize, in_dim: usize, bias: bool) {
        self.push(&format!("{name}.weight"), vec![out_dim, in_dim], ParamKind::Weight);
        if bias {
            self.push(&format!("{name}.bias"), vec![out_dim], ParamKind::Bias);
        }
    }

    fn norm(&mut self, name: &str, cfg: &ModelConfig) {
        self.push(&format!("{name}.weight"), vec![cfg.d_model], ParamKind::NormGain);
        if cfg.norm == Norm::LayerNorm && cfg.bias {
            self.push(&format!("{name}.bias"), vec![cfg.d_model], ParamKind::NormBias);
        }
    }

    fn attention(&mut self, cfg: &ModelConfig) {
        let (d, hd) = (cfg.d_model, cfg.head_dim());
        let (q, kv) = (cfg.attention.heads * hd, cfg.attention.kv_heads * hd);
        self.linear("q", q, d, cfg.bias);
        self.linear("k", kv, d, cfg.bias);
        self.linear("v", kv, d, cfg.bias);
        self.linear("o", d, q, cfg.bias);
    }

    fn ffn(&mut self, ffn: &Ffn, cfg: &ModelConfig) {
        let d = cfg.d_model;
        match ffn {
            Ffn::Mlp { hidden, .. } => {
                self.linear("up", *hidden, d, cfg.bias);
                self.linear("down", d, *hidden, cfg.bias);
            }
            Ffn::Gated { hidden, .. } => {
                self.linear("gate", *hidden, d, cfg.bias);
                self.linear("up", *hidden, d, cfg.bias);
                self.linear("down", d, *hidden, cfg.bias);
            }
            Ffn::Moe { experts, expert, .. } => {
                self.linear("router", *experts, d, false);
                for e in 0..*experts {
                    let mut sub = self.sub(&format!("experts.{e}"));
                    sub.expert = Some(e);
                    sub.ffn(expert, cfg);
                }
            }
        }
    }

    /// One block: self-attention, optional cross-attention (decoder of an encoder–decoder), FFN.
    fn block(&mut self, cfg: &ModelConfig, cross_attention: bool) {
        self.norm("attn_norm", cfg);
        self.sub("attn").attention(cfg);
        if cross_attention {
            self.norm("cross_attn_norm", cfg);
            self.sub("cross_attn").attention(cfg);
        }
        if cfg.residual == Residual::Sequential {
            self.norm("ffn_norm", cfg);
        }
        self.sub("ffn").ffn(&cfg.ffn, cfg);
    }
}

impl ModelConfig {
    /// Every parameter of the model, in a stable order (embeddings, encoder, decoder blocks,
    /// final norm, head).
    ///
    /// The encoder of an encoder–decoder model shares the token embeddings and has its own
    /// blocks (`encoder.layers.N`), its own learned position table if positions are learned,
    /// and its own final norm. Final norms exist only with pre-norm blocks: post-norm blocks
    /// end in a norm already (the original Transformer and Marian have none).
    pub fn param_specs(&self) -> Vec<ParamSpec> {
        let mut out = Vec::new();
        let mut root = Specs { out: &mut out, prefix: String::new(), layer: None, expert: None };
        let final_norm = self.norm_placement == NormPlacement::Pre;
        let learned_positions = self.positions == Positions::Learned;
        root.push("tok_embeddings.weight", vec![self.vocab_size, self.d_model], ParamKind::Embedding);
        if learned_positions {
            root.push("pos_embeddings.weight", vec![self.context_length, self.d_model], ParamKind::Embedding);
        }
        let cross_attention = match self.layout {
            Layout::DecoderOnly => false,
            Layout::EncoderDecoder { encoder_layers, .. } => {
                let mut encoder = root.sub("encoder");
                if learned_positions {
                    encoder.push(
                        "pos_embeddings.weight",
                        vec![self.context_length, self.d_model],
                        ParamKind::Embedding,
                    );
                }
                for i in 0..encoder_layers {
                    let mut block = encoder.sub(&format!("layers.{i}"));
                    block.layer = Some(i);
                    block.block(self, false);
                }
                if final_norm {
                    encoder.norm("final_norm", self);
                }
                true
            }
        };
        for i in 0..self.layers {
            let mut block = root.sub(&format!("layers.{i}"));
            block.layer = Some(i);
            block.block(self, cross_attention);
        }
        if final_norm {
            root.norm("final_norm", self);
        }
        if !self.tie_embeddings {
            root.push("lm_head.weight", vec![self.vocab_size, self.d_model], ParamKind::Weight);
        }
        if self.head_bias {
            root.push("lm_head.bias", vec![self.vocab_size], ParamKind::Bias);
        }
        out
    }

    /// Total parameter count.
    pub fn params_total(&self) -> usize {
        self.param_specs().iter().map(ParamSpec::numel).sum()
    }

    /// Parameters used per token: all but the experts a token is not routed to.
    pub fn params_active(&self) -> usize {
        let expert_share = match &self.ffn {
            Ffn::Moe { experts, top_k, .. } => (*top_k, *experts),
            _ => (1, 1),
        };
        self.param_specs()
            .iter()
            .map(|p| match p.expert {
                Some(_) => p.numel() * expert_share.0 / expert_share.1,
                None => p.numel(),
            })
            .sum()
    }
}
