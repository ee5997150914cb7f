//! What one forward pass is for, and what its layers report back.
//!
//! A model is shared (`&self`) and a KV cache is per sequence; a [`Pass`] is per forward call.
//! It tells the layers whether they are training, and so may draw noise (a router's jitter)
//! from the run's random stream, and it collects what they report: each mixture-of-experts
//! layer's routing, from which the model builds the auxiliary losses and the trainer the expert
//! load. Inference passes draw nothing, so scoring, generation and validation are deterministic
//! functions of the weights.

use rand::RngCore;

use super::router::RouterReport;

pub struct Pass<'r> {
    /// The run's random stream while training; `None` for inference.
    noise: Option<&'r mut dyn RngCore>,
    routing: Vec<RouterReport>,
}

impl<'r> Pass<'r> {
    /// A pass for scoring, generation and validation: no noise, no auxiliary losses.
    pub fn inference() -> Self {
        Pass { noise: None, routing: Vec::new() }
    }

    /// A training pass drawing its noise from `rng` (whose state a checkpoint stores, so a
    /// resumed run draws the same numbers).
    pub fn training(rng: &'r mut dyn RngCore) -> Self {
        Pass { noise: Some(rng), routing: Vec::new() }
    }

    pub fn is_training(&self) -> bool {
        self.noise.is_some()
    }

    /// The random stream, in a training pass.
    pub fn noise(&mut self) -> Option<&mut dyn RngCore> {
        match &mut self.noise {
            Some(rng) => Some(&mut **rng),
            None => None,
        }
    }

    /// Called by each mixture-of-experts layer, in layer order.
    pub fn report_routing(&mut self, report: RouterReport) {
        self.routing.push(report);
    }

    /// The routing reports, one per mixture-of-experts layer in layer order.
    pub fn into_routing(self) -> Vec<RouterReport> {
        self.routing
    }
}
