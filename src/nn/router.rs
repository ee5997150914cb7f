//! A mixture-of-experts router's decisions for one batch: which experts each token goes to,
//! with what weights, which assignments a capacity limit drops, and the auxiliary losses.
//!
//! ```text
//! logits  l = x_r·W_routerᵀ                  (N, E)   x_r: the tokens, jittered in training
//! chosen  top-k of l per token               (N, k)   ties to the lower index, as torch.topk
//! weights renormalized: softmax(l_chosen)    (N, k)   = softmax(l) on the chosen, renormalised
//!         softmax:      softmax(l)_chosen             (sums to less than one)
//! balance E · Σ_i f_i · P_i,  f_i = (assignments to i) / (N·k),  P_i = mean_n softmax(l)_ni
//! z-loss  mean_n (log Σ_i e^{l_ni})²
//! ```
//!
//! The choice of experts is discrete and made on the host; the weights and both losses are
//! tensors, so the router learns through them (f is a count and has no gradient, as in the
//! Switch Transformer: the balance loss pushes on P, which is differentiable).

use std::sync::Arc;

use candle_core::{DType, Result, Tensor, D};

use super::ops::Dispatch;
use crate::config::{Gating, Router};

/// What one MoE layer's router did with one batch (a forward pass's report, see
/// [`super::Pass`]).
#[derive(Debug, Clone)]
pub struct RouterReport {
    /// Assignments each expert was chosen for `(E)`, before any capacity drop; they sum to N·k.
    pub chosen: Vec<u64>,
    /// Assignments dropped because their expert was full (0 when dropless).
    pub dropped: u64,
    /// The auxiliary losses, computed in training passes only.
    pub losses: Option<RouterLosses>,
}

/// The two auxiliary losses of one layer, unweighted (scalars).
#[derive(Debug, Clone)]
pub struct RouterLosses {
    pub balance: Tensor,
    pub z: Tensor,
}

/// The routing of one batch.
pub struct Routing {
    /// The kept assignments, sorted by expert.
    pub dispatch: Arc<Dispatch>,
    /// The mixing weight of each slot of `dispatch` `(M)`, in slot order.
    pub slot_weights: Tensor,
    pub report: RouterReport,
}

/// Route `N` tokens given their router logits `(N, E)`. `training` turns on the capacity
/// limit (when configured) and the auxiliary losses.
pub fn route(logits: &Tensor, top_k: usize, config: &Router, training: bool) -> Result<Routing> {
    let (n, experts) = logits.dims2()?;
    if top_k == 0 || top_k > experts {
        candle_core::bail!("route: top_k = {top_k} of {experts} experts")
    }
    let chosen = top_k_per_row(&logits.to_dtype(DType::F32)?.to_vec2::<f32>()?, top_k);
    let mut counts = vec![0u64; experts];
    chosen.iter().flatten().for_each(|&e| counts[e as usize] += 1);

    let capacity = config.capacity_factor.filter(|_| training).map(|c| capacity(c, n, top_k, experts));
    let kept = keep_within_capacity(&chosen, experts, capacity);
    // Kept assignments in token-major order, so each expert's slots come in token order.
    let kept_flat: Vec<u32> = (0..n * top_k).filter(|&a| kept[a]).map(|a| a as u32).collect();
    let tokens_of: Vec<u32> = kept_flat.iter().map(|&a| a / top_k as u32).collect();
    let experts_of: Vec<u32> = kept_flat.iter().map(|&a| chosen[a as usize / top_k][a as usize % top_k]).collect();
    let dispatch = Arc::new(Dispatch::sort(n, experts, &tokens_of, &experts_of)?);

    let ids = Tensor::from_vec(chosen.concat(), (n, top_k), logits.device())?;
    let weights = match config.gating {
        Gating::Renormalized => candle_nn::ops::softmax(&logits.gather(&ids, 1)?, D::Minus1)?,
        Gating::Softmax => candle_nn::ops::softmax(logits, D::Minus1)?.gather(&ids, 1)?,
    }; // (N, k)
    let slots: Vec<u32> = dispatch.slot_source().iter().map(|&i| kept_flat[i as usize]).collect();
    let slot_weights = weights.flatten_all()?.index_select(&Tensor::new(slots, logits.device())?, 0)?; // (M)

    let losses = if training { Some(losses(logits, &counts, top_k)?) } else { None };
    let dropped = kept.iter().filter(|&&k| !k).count() as u64;
    Ok(Routing { dispatch, slot_weights, report: RouterReport { chosen: counts, dropped, losses } })
}

/// The balance loss and z-loss of one layer (see the module doc).
fn losses(logits: &Tensor, counts: &[u64], top_k: usize) -> Result<RouterLosses> {
    let (n, experts) = logits.dims2()?;
    let assignments = (n * top_k).max(1) as f32;
    let f: Vec<f32> = counts.iter().map(|&c| c as f32 / assignments).collect();
    let f = Tensor::from_vec(f, experts, logits.device())?.to_dtype(logits.dtype())?; // (E)
    let p = candle_nn::ops::softmax(logits, D::Minus1)?.mean(0)?; // (E)
    let balance = ((p * f)?.sum_all()? * experts as f64)?;
    let z = logits.log_sum_exp(1)?.sqr()?.mean_all()?;
    Ok(RouterLosses { balance, z })
}

/// The `k` largest entries of each row, largest first; ties go to the lower index.
fn top_k_per_row(rows: &[Vec<f32>], k: usize) -> Vec<Vec<u32>> {
    rows.iter()
        .map(|row| {
            let mut order: Vec<u32> = (0..row.len() as u32).collect();
            // A stable sort keeps equal values in index order.
            order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
            order.truncate(k);
            order
        })
        .collect()
}

/// Assignments one expert may take: `⌈factor · N·k / E⌉`.
pub fn capacity(factor: f64, tokens: usize, top_k: usize, experts: usize) -> usize {
    (factor * (tokens * top_k) as f64 / experts as f64).ceil() as usize
}

/// Which assignments (flat index `token·k + rank`) fit: every token's first choice before any
/// second choice, and in token order within a rank (GShard's priority), each expert up to
/// `capacity`. All of them when there is no limit.
fn keep_within_capacity(chosen: &[Vec<u32>], experts: usize, capacity: Option<usize>) -> Vec<bool> {
    let k = chosen.first().map_or(0, Vec::len);
    let Some(capacity) = capacity else { return vec![true; chosen.len() * k] };
    let mut kept = vec![false; chosen.len() * k];
    let mut load = vec![0usize; experts];
    for rank in 0..k {
        for (token, ids) in chosen.iter().enumerate() {
            let e = ids[rank] as usize;
            if load[e] < capacity {
                load[e] += 1;
                kept[token * k + rank] = true;
            }
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::nn::ops::testing::{check_finite_differences, rand_tensor};

    fn logits() -> Tensor {
        // Six tokens, four experts; every row has distinct values (no ties near the top k).
        (rand_tensor(&[6, 4], 11, DType::F64) * 3.0).unwrap()
    }

    /// The mixing weight of each (token, expert) pair, zero where not chosen, from the slots.
    fn dense_weights(r: &Routing, n: usize, e: usize) -> Vec<Vec<f64>> {
        let mut w = vec![vec![0.0; e]; n];
        let slot_w: Vec<f64> = r.slot_weights.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
        let mut offset = 0;
        for (expert, &size) in r.dispatch.group_sizes().iter().enumerate() {
            for m in offset..offset + size {
                w[r.dispatch.slot_token()[m] as usize][expert] = slot_w[m];
            }
            offset += size;
        }
        w
    }

    #[test]
    fn renormalized_is_softmax_top_k_renormalise_and_top_k_softmax() {
        let l = logits();
        let r = route(&l, 2, &Router::default(), false).unwrap();
        let rows: Vec<Vec<f64>> = l.to_vec2().unwrap();
        let got = dense_weights(&r, 6, 4);
        for (row, got) in rows.iter().zip(&got) {
            let p: Vec<f64> = row.iter().map(|x| x.exp() / row.iter().map(|y| y.exp()).sum::<f64>()).collect();
            let mut order: Vec<usize> = (0..4).collect();
            order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
            let (i, j) = (order[0], order[1]);
            // softmax → top-2 → renormalise
            assert!((got[i] - p[i] / (p[i] + p[j])).abs() < 1e-6 && (got[j] - p[j] / (p[i] + p[j])).abs() < 1e-6);
            // top-2 of the logits → softmax over those two
            let s = row[i].exp() + row[j].exp();
            assert!((got[i] - row[i].exp() / s).abs() < 1e-6);
            assert_eq!(got.iter().filter(|&&w| w != 0.0).count(), 2);
        }
        assert_eq!(r.report.chosen.iter().sum::<u64>(), 12);
        assert!(r.report.losses.is_none(), "no losses outside training");
    }

    #[test]
    fn softmax_gating_keeps_the_probabilities_unrenormalised() {
        let l = logits();
        let config = Router { gating: Gating::Softmax, ..Router::default() };
        let r = route(&l, 2, &config, false).unwrap();
        let rows: Vec<Vec<f64>> = l.to_vec2().unwrap();
        for (row, got) in rows.iter().zip(dense_weights(&r, 6, 4)) {
            let total: f64 = row.iter().map(|x| x.exp()).sum();
            for (x, w) in row.iter().zip(&got) {
                assert!(*w == 0.0 || (w - x.exp() / total).abs() < 1e-6);
            }
            assert!(got.iter().sum::<f64>() < 1.0);
        }
    }

    #[test]
    fn capacity_drops_second_choices_first_then_later_tokens() {
        // Every token prefers expert 0, then expert 1: with capacity 2 of 4 experts, expert 0
        // keeps the first two tokens' first choices, expert 1 the first two second choices.
        let l = Tensor::new(&[[4f32, 3.0, 0.0, 0.0]; 4], &Device::Cpu).unwrap();
        let config = Router { capacity_factor: Some(1.0), ..Router::default() };
        assert_eq!(capacity(1.0, 4, 2, 4), 2);
        let r = route(&l, 2, &config, true).unwrap();
        assert_eq!(r.report.dropped, 4);
        assert_eq!(r.report.chosen, [4, 4, 0, 0]);
        assert_eq!(r.dispatch.group_sizes(), &[2, 2, 0, 0]);
        assert_eq!(r.dispatch.slot_token(), &[0, 1, 0, 1]);
        // Outside training the same batch is dropless.
        let r = route(&l, 2, &config, false).unwrap();
        assert_eq!((r.report.dropped, r.dispatch.slots()), (0, 8));
        // Ties go to the lower index.
        let r = route(&Tensor::zeros((3, 4), DType::F32, &Device::Cpu).unwrap(), 2, &Router::default(), false);
        assert_eq!(r.unwrap().report.chosen, [3, 3, 0, 0]);
    }

    #[test]
    fn balance_loss_is_one_when_uniform_and_e_when_collapsed() {
        // Uniform probabilities and a perfect spread of choices: E · Σ (1/E)(1/E) = 1.
        let counts = [3, 3, 3, 3];
        let uniform = Tensor::zeros((6, 4), DType::F32, &Device::Cpu).unwrap();
        let l = losses(&uniform, &counts, 2).unwrap();
        assert!((l.balance.to_scalar::<f32>().unwrap() - 1.0).abs() < 1e-6);
        // z-loss of zero logits: (log 4)².
        assert!((l.z.to_scalar::<f32>().unwrap() - 4f32.ln().powi(2)).abs() < 1e-5);
        // Everything on one expert, with all its probability: E · 1 · 1 = E.
        let collapsed = Tensor::new(&[[50f32, 0.0, 0.0, 0.0]; 6], &Device::Cpu).unwrap();
        let l = losses(&collapsed, &[12, 0, 0, 0], 2).unwrap();
        assert!((l.balance.to_scalar::<f32>().unwrap() - 4.0).abs() < 1e-4);
    }

    /// The weights and both losses against central differences of the logits, in f64.
    #[test]
    fn gradients_match_finite_differences() {
        for gating in [Gating::Renormalized, Gating::Softmax] {
            let config = Router { gating, ..Router::default() };
            let weights = |t: &[Tensor]| Ok(route(&t[0], 2, &config, true)?.slot_weights);
            check_finite_differences(&weights, &[logits()], &[0], 1e-6);
        }
        let l = logits();
        let counts = route(&l, 2, &Router::default(), true).unwrap().report.chosen;
        let balance = |t: &[Tensor]| losses(&t[0], &counts, 2).map(|l| l.balance);
        check_finite_differences(&balance, std::slice::from_ref(&l), &[0], 1e-6);
        let z = |t: &[Tensor]| losses(&t[0], &counts, 2).map(|l| l.z);
        check_finite_differences(&z, std::slice::from_ref(&l), &[0], 1e-6);
        // And they do reach the logits: no zero gradient hiding behind a detached op.
        let var = Var::from_tensor(&l).unwrap();
        let r = route(var.as_tensor(), 2, &Router::default(), true).unwrap().report.losses.unwrap();
        let grads = (r.balance + r.z).unwrap().backward().unwrap();
        let g: f64 = grads.get(var.as_tensor()).unwrap().abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(g > 1e-3, "{g}");
    }
}
