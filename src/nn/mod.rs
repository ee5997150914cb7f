//! Layers the model is composed of. Each is built from plain tensors (so the same code serves
//! inference on loaded weights and training on `Var`s) and uses only ops with a backward pass.

pub mod activation;
pub mod attention;
pub mod ffn;
pub mod kv_cache;
pub mod linear;
pub mod moe;
pub mod norm;
pub mod ops;
pub mod params;
pub mod pass;
pub mod positions;
pub mod router;
pub mod weight;

pub use attention::{Attention, CrossKv};
pub use ffn::FeedForward;
pub use kv_cache::{FullCache, KvCache, LayerKv, RollingCache};
pub use linear::Linear;
pub use norm::Norm;
pub use params::ParamSource;
pub use pass::Pass;
pub use router::{RouterLosses, RouterReport};
pub use weight::{QuantizedWeights, TokenEmbedding, Weight};
