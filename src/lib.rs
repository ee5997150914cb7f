//! lmforge: define an LLM architecture as data, load real checkpoints into one model
//! implementation, train it, and run it.
//!
//! Layers, from the bottom: [`config`] (pure data) → [`nn`] (layers and fused ops) →
//! [`model`] (blocks composed from a config) → [`generate`] / training loops / [`eval`] →
//! [`plan`] (which run to make for a budget); [`io`] is the one place that knows file formats
//! and checkpoint tensor names.

pub mod config;
pub mod data;
pub mod device;
pub mod distributed;
pub mod error;
pub mod eval;
pub mod generate;
pub mod host_memory;
pub mod io;
pub mod model;
pub mod nn;
pub mod plan;
pub mod plot;
pub mod train;

#[cfg(test)]
mod test_util;

pub use config::ModelConfig;
pub use error::{Error, Result};
