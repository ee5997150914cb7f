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
    /// Forward FLOPs per token at full context: 2 per active weight multiply-add, plus the
    /// attention scores and the weighted sum over the context (`4 · layers · ctx · heads · head_dim`).
    pub flops_forward_per_token: f64,
    /// Forward plus backward (the backward costs twice the forward).
    pub flops_train_per_token: f64,
    pub kv_cache_bytes_per_token_f32: usize,
    pub kv_cache_bytes_per_token_bf16: usize,
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
        // The head is a matmul even when tied; the embedding lookups are not.
        let head_matmul = self.vocab_size * self.d_model;
        let matmul_params = params_active - params_embedding + head_matmul;
        // Decoder self-attention, plus encoder self-attention and decoder cross-attention.
        let attn_layers = self.layers
            + match self.layout {
                Layout::DecoderOnly => 0,
                Layout::EncoderDecoder { encoder_layers, .. } => encoder_layers + self.layers,
            };
        let attention_width = self.attention.heads * self.head_dim();
        let flops_forward =
            2.0 * matmul_params as f64 + 4.0 * (attn_layers * self.context_length * attention_width) as f64;
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
            weights_bytes_f32: 4 * params_total,
            weights_bytes_bf16: 2 * params_total,
            training_bytes_f32: 16 * params_total,
            training_bytes_bf16: 8 * params_total,
        }
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
