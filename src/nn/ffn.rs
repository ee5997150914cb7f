//! Feed-forward blocks: plain MLP, gated (SwiGLU), and a sparse mixture of them ([`super::moe`]).

use candle_core::{Result, Tensor};

use super::moe::MoeFfn;
use super::{activation, ops, Linear, ParamSource, Pass};
use crate::config::{Activation, Ffn};

/// A dense feed-forward block: `down(act(up x))`, or `down(act(gate x) * up x)` when gated.
pub struct DenseFfn {
    gate: Option<Linear>,
    up: Linear,
    down: Linear,
    act: Activation,
}

impl DenseFfn {
    pub(super) fn new(params: &ParamSource, gated: bool, act: Activation) -> Self {
        DenseFfn {
            gate: gated.then(|| Linear::load(params, "gate")),
            up: Linear::load(params, "up"),
            down: Linear::load(params, "down"),
            act,
        }
    }

    /// `(…, D)` → `(…, D)`.
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down.forward(&self.hidden(x)?)
    }

    /// The activation `(…, H)`, before the down projection.
    fn hidden(&self, x: &Tensor) -> Result<Tensor> {
        match &self.gate {
            // One product for gate and up, and the activation inside the op: autograd sees one
            // node where it saw three (two projections and SwiGLU).
            Some(gate) if self.act == Activation::Silu => match Linear::stacked(&[gate, &self.up], x)? {
                Some(both) => both.forward_then(x, ops::Epilogue::SwiGlu),
                None => {
                    let [gate, up]: [Tensor; 2] =
                        Linear::forward_each(&[gate, &self.up], x)?.try_into().expect("one output per layer");
                    ops::swiglu(&gate, &up)
                }
            },
            Some(gate) => activation::apply(self.act, &gate.forward(x)?)? * self.up.forward(x)?,
            None => match epilogue(self.act) {
                Some(e) => self.up.forward_then(x, e),
                None => activation::apply(self.act, &self.up.forward(x)?),
            },
        }
    }

    /// The projections from the input, in the order their weights stack for one product:
    /// `[gate, up]` when gated, else `[up]`.
    pub(super) fn input_projections(&self) -> Vec<&Linear> {
        self.gate.iter().chain([&self.up]).collect()
    }

    pub(super) fn down(&self) -> &Linear {
        &self.down
    }

    pub(super) fn act(&self) -> Activation {
        self.act
    }

    pub(super) fn gated(&self) -> bool {
        self.gate.is_some()
    }
}

/// The activation a linear layer can apply inside its own op, when there is one (GELU).
pub(super) fn epilogue(act: Activation) -> Option<ops::Epilogue> {
    match act {
        Activation::Gelu => Some(ops::Epilogue::GeluErf),
        Activation::GeluTanh => Some(ops::Epilogue::GeluTanh),
        Activation::Silu | Activation::Relu => None,
    }
}

pub enum FeedForward {
    Dense(DenseFfn),
    Moe(MoeFfn),
}

impl FeedForward {
    pub fn new(config: &Ffn, params: &ParamSource) -> Self {
        match config {
            Ffn::Mlp { act, .. } => FeedForward::Dense(DenseFfn::new(params, false, *act)),
            Ffn::Gated { act, .. } => FeedForward::Dense(DenseFfn::new(params, true, *act)),
            Ffn::Moe { experts, top_k, expert, router } => {
                FeedForward::Moe(MoeFfn::new(params, *experts, *top_k, expert, router.clone()))
            }
        }
    }

    /// `(B, T, D)` → `(B, T, D)`. A mixture reports its routing to `pass`.
    pub fn forward(&self, x: &Tensor, pass: &mut Pass) -> Result<Tensor> {
        match self {
            FeedForward::Dense(ffn) => ffn.forward(x),
            FeedForward::Moe(moe) => moe.forward(x, pass),
        }
    }
}
