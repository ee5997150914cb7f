//! Named architectures with their published shapes.
//!
//! Each preset cites the configuration it reproduces; `lmforge show NAME` prints its parameter
//! count, which the tests pin to the published figure. Small `tiny-*` variants keep each family's
//! structure at a size that trains on a laptop CPU.

use super::{Activation, Attention, Ffn, Layout, ModelConfig, Norm, NormPlacement, Positions, Residual, Router};
use crate::error::{Error, Result};

/// A named, documented configuration.
pub struct Preset {
    pub name: &'static str,
    /// Where the numbers come from.
    pub source: &'static str,
    build: fn() -> ModelConfig,
}

impl Preset {
    pub fn config(&self) -> ModelConfig {
        let mut config = (self.build)();
        config.name = self.name.to_string();
        config
    }
}

/// Every preset, in display order.
pub fn all() -> &'static [Preset] {
    &PRESETS
}

/// Look a preset up by name.
pub fn get(name: &str) -> Result<ModelConfig> {
    PRESETS.iter().find(|p| p.name == name).map(Preset::config).ok_or_else(|| Error::UnknownPreset {
        name: name.to_string(),
        known: PRESETS.iter().map(|p| p.name).collect::<Vec<_>>().join(", "),
    })
}

static PRESETS: [Preset; 17] = [
    Preset {
        name: "gpt2",
        source: "openai-community/gpt2 config.json (GPT-2 small, 124M)",
        build: || gpt2(768, 12, 12),
    },
    Preset { name: "gpt2-medium", source: "openai-community/gpt2-medium config.json", build: || gpt2(1024, 24, 16) },
    Preset { name: "gpt2-large", source: "openai-community/gpt2-large config.json", build: || gpt2(1280, 36, 20) },
    Preset { name: "gpt2-xl", source: "openai-community/gpt2-xl config.json", build: || gpt2(1600, 48, 25) },
    Preset {
        name: "llama2-7b",
        source: "meta-llama/Llama-2-7b-hf config.json",
        build: || llama2(4096, 32, 32, 32, 11008),
    },
    Preset {
        name: "llama2-13b",
        source: "meta-llama/Llama-2-13b-hf config.json",
        build: || llama2(5120, 40, 40, 40, 13824),
    },
    Preset {
        name: "llama2-70b",
        source: "meta-llama/Llama-2-70b-hf config.json (GQA, 8 KV heads)",
        build: || llama2(8192, 80, 64, 8, 28672),
    },
    Preset {
        name: "mistral-7b",
        source: "mistralai/Mistral-7B-v0.1 config.json (sliding window 4096)",
        build: mistral_7b,
    },
    Preset {
        name: "phi-2",
        source: "microsoft/phi-2 config.json (partial rotary 0.4, parallel residual)",
        build: phi_2,
    },
    Preset { name: "mpt-7b", source: "mosaicml/mpt-7b config.json (ALiBi, no biases)", build: mpt_7b },
    Preset {
        name: "mixtral-8x7b",
        source: "mistralai/Mixtral-8x7B-v0.1 config.json (8 experts, top-2)",
        build: mixtral_8x7b,
    },
    Preset {
        name: "transformer-base",
        source: "Vaswani et al. 2017, Table 3 'base' (shared source/target BPE vocab of 37000)",
        build: transformer_base,
    },
    Preset {
        name: "tiny-llama",
        source: "Llama 2 structure (RMSNorm, RoPE, SwiGLU, GQA) at CPU scale; the default training model",
        build: tiny_llama,
    },
    Preset {
        name: "tiny-gpt2",
        source: "GPT-2 structure at CPU scale",
        build: || ModelConfig { context_length: 256, vocab_size: 2048, ..gpt2(192, 4, 6) },
    },
    Preset { name: "tiny-mistral", source: "Mistral structure (sliding window 64) at CPU scale", build: tiny_mistral },
    Preset { name: "tiny-mpt", source: "MPT structure (ALiBi, no biases) at CPU scale", build: tiny_mpt },
    Preset { name: "tiny-mixtral", source: "Mixtral structure (4 experts, top-2) at CPU scale", build: tiny_mixtral },
];

fn gpt2(d_model: usize, layers: usize, heads: usize) -> ModelConfig {
    ModelConfig {
        name: String::new(),
        layout: Layout::DecoderOnly,
        vocab_size: 50257,
        d_model,
        layers,
        context_length: 1024,
        norm: Norm::LayerNorm,
        norm_placement: NormPlacement::Pre,
        norm_eps: 1e-5,
        positions: Positions::Learned,
        attention: Attention::new(heads, heads),
        ffn: Ffn::Mlp { hidden: 4 * d_model, act: Activation::GeluTanh },
        residual: Residual::Sequential,
        bias: true,
        head_bias: false,
        tie_embeddings: true,
    }
}

fn llama2(d_model: usize, layers: usize, heads: usize, kv_heads: usize, hidden: usize) -> ModelConfig {
    ModelConfig {
        name: String::new(),
        layout: Layout::DecoderOnly,
        vocab_size: 32000,
        d_model,
        layers,
        context_length: 4096,
        norm: Norm::RmsNorm,
        norm_placement: NormPlacement::Pre,
        norm_eps: 1e-5,
        positions: Positions::Rope { theta: 10_000.0, fraction: 1.0, scaling: None },
        attention: Attention::new(heads, kv_heads),
        ffn: Ffn::Gated { hidden, act: Activation::Silu },
        residual: Residual::Sequential,
        bias: false,
        head_bias: false,
        tie_embeddings: false,
    }
}

fn mistral_7b() -> ModelConfig {
    let mut config = llama2(4096, 32, 32, 8, 14336);
    config.context_length = 32768;
    config.attention.window = Some(4096);
    config
}

fn mixtral_8x7b() -> ModelConfig {
    let mut config = llama2(4096, 32, 32, 8, 14336);
    config.context_length = 32768;
    config.positions = Positions::Rope { theta: 1_000_000.0, fraction: 1.0, scaling: None };
    config.ffn = Ffn::Moe {
        experts: 8,
        top_k: 2,
        expert: Box::new(Ffn::Gated { hidden: 14336, act: Activation::Silu }),
        // `router_aux_loss_coef: 0.02`, which weighs a loss k = 2 times lmforge's (see Router).
        router: Router { balance_loss_coef: 0.04, ..Router::default() },
    };
    config
}

fn phi_2() -> ModelConfig {
    ModelConfig {
        vocab_size: 51200,
        context_length: 2048,
        norm: Norm::LayerNorm,
        positions: Positions::Rope { theta: 10_000.0, fraction: 0.4, scaling: None },
        ffn: Ffn::Mlp { hidden: 10240, act: Activation::GeluTanh },
        residual: Residual::Parallel,
        bias: true,
        head_bias: true,
        ..llama2(2560, 32, 32, 32, 0)
    }
}

fn mpt_7b() -> ModelConfig {
    ModelConfig {
        vocab_size: 50432,
        context_length: 2048,
        norm: Norm::LayerNorm,
        positions: Positions::Alibi { max_bias: 8.0 },
        ffn: Ffn::Mlp { hidden: 16384, act: Activation::Gelu },
        tie_embeddings: true,
        ..llama2(4096, 32, 32, 32, 0)
    }
}

fn transformer_base() -> ModelConfig {
    ModelConfig {
        layout: Layout::EncoderDecoder { encoder_layers: 6 },
        vocab_size: 37000,
        context_length: 512,
        norm: Norm::LayerNorm,
        norm_placement: NormPlacement::Post,
        norm_eps: 1e-6,
        positions: Positions::Sinusoidal,
        ffn: Ffn::Mlp { hidden: 2048, act: Activation::Relu },
        bias: true,
        tie_embeddings: true,
        ..llama2(512, 6, 8, 8, 0)
    }
}

fn tiny_llama() -> ModelConfig {
    ModelConfig { vocab_size: 2048, context_length: 256, ..llama2(192, 4, 6, 2, 512) }
}

fn tiny_mistral() -> ModelConfig {
    let mut config = tiny_llama();
    config.attention.window = Some(64);
    config
}

fn tiny_mpt() -> ModelConfig {
    ModelConfig {
        vocab_size: 2048,
        context_length: 256,
        ffn: Ffn::Mlp { hidden: 768, act: Activation::Gelu },
        ..mpt_7b_shape(192, 4, 6)
    }
}

fn mpt_7b_shape(d_model: usize, layers: usize, heads: usize) -> ModelConfig {
    ModelConfig { d_model, layers, attention: Attention::new(heads, heads), ..mpt_7b() }
}

fn tiny_mixtral() -> ModelConfig {
    let mut config = tiny_llama();
    config.ffn = Ffn::Moe {
        experts: 4,
        top_k: 2,
        expert: Box::new(Ffn::Gated { hidden: 256, act: Activation::Silu }),
        router: Router::default(),
    };
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published parameter counts (from the checkpoints' own tensors).
    #[test]
    fn preset_parameter_counts_match_published_models() {
        let expect = [
            ("gpt2", 124_439_808),
            ("llama2-7b", 6_738_415_616),
            ("mistral-7b", 7_241_732_096),
            ("phi-2", 2_779_683_840),
            ("mpt-7b", 6_649_286_656),
            ("mixtral-8x7b", 46_702_792_704),
        ];
        for (name, total) in expect {
            assert_eq!(get(name).unwrap().params_total(), total, "{name}");
        }
        assert_eq!(get("mixtral-8x7b").unwrap().params_active(), 12_879_925_248);
        assert_eq!(get("llama2-7b").unwrap().params_active(), 6_738_415_616);
    }

    #[test]
    fn every_preset_is_valid() {
        for preset in all() {
            let config = preset.config();
            assert_eq!(config.problems(), Vec::<String>::new(), "{}", preset.name);
        }
    }

    #[test]
    fn unknown_preset_lists_known_ones() {
        let err = get("gpt5").unwrap_err().to_string();
        assert!(err.contains("gpt5") && err.contains("llama2-7b"), "{err}");
    }
}
