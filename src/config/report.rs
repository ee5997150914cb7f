//! What an architecture costs: parameters per layer, FLOPs per token, memory.
//!
//! All figures derive from [`ModelConfig::param_specs`], so the report can never disagree with
//! the model that gets built.

use serde::Serialize;

use super::{Layout, ModelConfig, ParamSpec};

/// One row of the layer-by-layer table.
#[derive(Serialize, Debug, Clone)]
pub struct LayerRow {
    pub name: String,
    pub params: usize,
    pub active_params: usize,
}

/// The numbers `lmforge show` prints.
#[derive(Serialize, Debug, Clone)]
pub struct ArchReport {
    pub name: String,
    pub params_total: usize,
    pub params_active: usize,
    pub params_embedding: usize,
    pub rows: Vec<LayerRow>,
    /// Forward FLOPs per token at full context ([`ModelConfig::flops_forward_per_token`]).
    pub flops_forward_per_token: f64,
    /// Forward plus backward (the backward costs twice the forward).
    pub flops_train_per_token: f64,
    pub kv_cache_bytes_per_token_f32: usize,
    pub kv_cache_bytes_per_token_bf16: usize,
    /// The KV cache of one sequence at `context_length` in f32, where a layer with a sliding
    /// window keeps only its last W positions (the rolling buffer generation uses).
    pub kv_cache_bytes_full_context_f32: usize,
    /// Decoder layers whose cache the rolling buffer caps below `context_length`.
    pub kv_cache_capped_layers: usize,
    pub weights_bytes_f32: usize,
    pub weights_bytes_bf16: usize,
    /// Weights + gradients + AdamW's two moments, all in the named dtype (4 copies of the weights).
    pub training_bytes_f32: usize,
    pub training_bytes_bf16: usize,
}

impl ModelConfig {
    /// Parameter, FLOP and memory figures for this architecture.
    pub fn report(&self) -> ArchReport {
        let specs = self.param_specs();
        let expert_share = |p: &ParamSpec, n: usize| match p.expert {
            Some(_) => (n as f64 * self.expert_share()) as usize,
            None => n,
        };
        let mut rows: Vec<LayerRow> = Vec::new();
        for spec in &specs {
            let row_name = row_name(&spec.name);
            let n = spec.numel();
            match rows.last_mut() {
                Some(row) if row.name == row_name => {
                    row.params += n;
                    row.active_params += expert_share(spec, n);
                }
                _ => rows.push(LayerRow { name: row_name, params: n, active_params: expert_share(spec, n) }),
            }
        }
        let params_total = self.params_total();
        let params_active = self.params_active();
        let params_embedding: usize =
            specs.iter().filter(|p| p.name.contains("embeddings")).map(ParamSpec::numel).sum();
        let flops_forward = self.flops_forward_per_token(self.context_length);
        let kv_elems_per_token = 2 * self.layers * self.attention.kv_heads * self.head_dim();
        ArchReport {
            name: self.name.clone(),
            params_total,
            params_active,
            params_embedding,
            rows,
            flops_forward_per_token: flops_forward,
            flops_train_per_token: 3.0 * flops_forward,
            kv_cache_bytes_per_token_f32: 4 * kv_elems_per_token,
            kv_cache_bytes_per_token_bf16: 2 * kv_elems_per_token,
            kv_cache_bytes_full_context_f32: self.kv_cache_bytes(self.context_length, 4),
            kv_cache_capped_layers: (0..self.layers)
                .filter(|&l| self.window(l).is_some_and(|w| w < self.context_length))
                .count(),
            weights_bytes_f32: 4 * params_total,
            weights_bytes_bf16: 2 * params_total,
            training_bytes_f32: 16 * params_total,
            training_bytes_bf16: 8 * params_total,
        }
    }

    /// Forward FLOPs per token when each token attends to up to `positions` positions: 2 per
    /// active weight multiply-add (the head counts even when tied: it is a product, the
    /// embedding lookup is not), plus the attention scores and the weighted sum,
    /// `4 · heads · head_dim` per attended position and layer. A layer with a sliding window
    /// attends to at most W positions however long the sequence. Training costs three times
    /// this (the backward pass costs twice the forward; Kaplan et al. 2020, section 2.1).
    pub fn flops_forward_per_token(&self, positions: usize) -> f64 {
        let specs = self.param_specs();
        let params_embedding: usize =
            specs.iter().filter(|p| p.name.contains("embeddings")).map(ParamSpec::numel).sum();
        let matmul_params = self.params_active() - params_embedding + self.vocab_size * self.d_model;
        let attended = |window: Option<usize>| window.map_or(positions, |w| w.min(positions));
        let decoder: usize = (0..self.layers).map(|l| attended(self.window(l))).sum();
        let other = match self.layout {
            Layout::DecoderOnly => 0,
            // Encoder self-attention and the decoder's cross-attention see the whole source.
            Layout::EncoderDecoder { encoder_layers, .. } => (encoder_layers + self.layers) * positions,
        };
        let attention_width = self.attention.heads * self.head_dim();
        2.0 * matmul_params as f64 + 4.0 * ((decoder + other) * attention_width) as f64
    }

    /// Bytes of the KV cache of one sequence of `positions` tokens at `dtype_bytes` per value:
    /// a layer with a sliding window W keeps only the last W positions (the rolling buffer, see
    /// `nn::kv_cache`), every other layer keeps them all.
    pub fn kv_cache_bytes(&self, positions: usize, dtype_bytes: usize) -> usize {
        let per_position = 2 * self.attention.kv_heads * self.head_dim() * dtype_bytes;
        (0..self.layers).map(|l| self.window(l).map_or(positions, |w| w.min(positions)) * per_position).sum()
    }

    /// Share of the experts a token uses (1 for dense models).
    fn expert_share(&self) -> f64 {
        match &self.ffn {
            super::Ffn::Moe { experts, top_k, .. } => *top_k as f64 / *experts as f64,
            _ => 1.0,
        }
    }
}

/// Group parameters into table rows: one per block, one per top-level tensor group.
fn row_name(param: &str) -> String {
    let parts: Vec<&str> = param.split('.').collect();
    match parts.as_slice() {
        ["encoder", "layers", i, ..] => format!("encoder.layers.{i}"),
        ["layers", i, ..] => format!("layers.{i}"),
        [group, ..] => group.to_string(),
        [] => String::new(),
    }
}
