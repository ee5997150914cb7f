//! Feed-forward blocks: plain MLP, gated (SwiGLU), and a sparse mixture of experts.

use candle_core::{DType, Result, Tensor, D};

use super::{activation, ops, Linear, ParamSource};
use crate::config::{Activation, Ffn};

/// A dense feed-forward block: `down(act(up x))`, or `down(act(gate x) * up x)` when gated.
pub struct DenseFfn {
    gate: Option<Linear>,
    up: Linear,
    down: Linear,
    act: Activation,
}

impl DenseFfn {
    fn new(params: &ParamSource, gated: bool, act: Activation) -> Self {
        DenseFfn {
            gate: gated.then(|| Linear::load(params, "gate")),
            up: Linear::load(params, "up"),
            down: Linear::load(params, "down"),
            act,
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let hidden = match &self.gate {
            // One product for gate and up, and the activation inside the op: autograd sees one
            // node where it saw three (two projections and SwiGLU).
            Some(gate) if self.act == Activation::Silu => match Linear::stacked(&[gate, &self.up], x)? {
                Some(both) => both.forward_then(x, ops::Epilogue::SwiGlu)?,
                None => ops::swiglu(&gate.forward(x)?, &self.up.forward(x)?)?,
            },
            Some(gate) => (activation::apply(self.act, &gate.forward(x)?)? * self.up.forward(x)?)?,
            None => match self.act {
                Activation::Gelu => self.up.forward_then(x, ops::Epilogue::GeluErf)?,
                Activation::GeluTanh => self.up.forward_then(x, ops::Epilogue::GeluTanh)?,
                other => activation::apply(other, &self.up.forward(x)?)?,
            },
        };
        self.down.forward(&hidden)
    }
}

pub enum FeedForward {
    Dense(DenseFfn),
    /// Mixtral-style: softmax over the router logits, keep the `top_k` largest, renormalise
    /// them to sum to one, and mix those experts' outputs.
    Moe {
        router: Linear,
        experts: Vec<DenseFfn>,
        top_k: usize,
    },
}

impl FeedForward {
    pub fn new(config: &Ffn, params: &ParamSource) -> Self {
        match config {
            Ffn::Mlp { act, .. } => FeedForward::Dense(DenseFfn::new(params, false, *act)),
            Ffn::Gated { act, .. } => FeedForward::Dense(DenseFfn::new(params, true, *act)),
            Ffn::Moe { experts, top_k, expert } => {
                let (gated, act) = match **expert {
                    Ffn::Gated { act, .. } => (true, act),
                    Ffn::Mlp { act, .. } => (false, act),
                    Ffn::Moe { .. } => unreachable!("validate() rejects nested mixtures"),
                };
                FeedForward::Moe {
                    router: Linear::load(params, "router"),
                    experts: (0..*experts)
                        .map(|e| DenseFfn::new(&params.pp(format!("experts.{e}")), gated, act))
                        .collect(),
                    top_k: *top_k,
                }
            }
        }
    }

    /// `(B, T, D)` → `(B, T, D)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            FeedForward::Dense(ffn) => ffn.forward(x),
            FeedForward::Moe { router, experts, top_k } => moe_forward(x, router, experts, *top_k),
        }
    }
}

/// Route each token to its `top_k` experts. The choice of experts is discrete (made on the
/// host), but the mixing weights are gathered from the router's softmax as tensors, so the
/// router is trained through them.
fn moe_forward(x: &Tensor, router: &Linear, experts: &[DenseFfn], top_k: usize) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    let tokens = x.reshape((b * t, d))?; // (N, D)
    let probs = candle_nn::ops::softmax(&router.forward(&tokens)?.to_dtype(DType::F32)?, D::Minus1)?; // (N, E)
    let host_probs: Vec<Vec<f32>> = probs.to_vec2()?;
    let chosen: Vec<Vec<u32>> = host_probs
        .iter()
        .map(|row| {
            let mut order: Vec<u32> = (0..row.len() as u32).collect();
            // Stable sort, so ties go to the lower expert index as in torch.topk.
            order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
            order.truncate(top_k);
            order
        })
        .collect();
    let chosen_ids =
        Tensor::new(chosen.iter().flatten().copied().collect::<Vec<u32>>(), x.device())?.reshape((b * t, top_k))?;
    let weights = probs.gather(&chosen_ids, 1)?; // (N, k)
    let weights = weights.broadcast_div(&weights.sum_keepdim(1)?)?.flatten_all()?; // (N·k)

    let mut out = tokens.zeros_like()?;
    for (e, expert) in experts.iter().enumerate() {
        // Slots (token·k + rank) routed to this expert.
        let slots: Vec<u32> = chosen
            .iter()
            .enumerate()
            .flat_map(|(n, ids)| {
                ids.iter().enumerate().filter(|(_, id)| **id as usize == e).map(move |(r, _)| (n * top_k + r) as u32)
            })
            .collect();
        if slots.is_empty() {
            continue;
        }
        let token_ids = Tensor::new(slots.iter().map(|s| s / top_k as u32).collect::<Vec<u32>>(), x.device())?;
        let slot_ids = Tensor::new(slots, x.device())?;
        let y = expert.forward(&tokens.index_select(&token_ids, 0)?)?; // (n_e, D)
        let w = weights.index_select(&slot_ids, 0)?.to_dtype(y.dtype())?.unsqueeze(1)?; // (n_e, 1)
        out = out.index_add(&token_ids, &y.broadcast_mul(&w)?, 0)?;
    }
    out.reshape((b, t, d))
}
