//! The router of a mixture-of-experts block (`ffn.router.*`): how a token's experts and mixing
//! weights come from the router's logits, how tokens are dispatched, and the two auxiliary
//! losses that keep every expert in use.
//!
//! Every field has a default taken from the paper or the published config it cites, so a
//! config written before the router was configurable parses unchanged, and a `--set
//! ffn.router.FIELD=VALUE` changes one thing.

use serde::{Deserialize, Serialize};

/// How a token's mixing weights come from the router's logits.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Gating {
    /// softmax over all experts → keep the top k → renormalise them to sum to one (Mixtral).
    ///
    /// This is the same function as top-k of the logits → softmax over those k
    /// (`p_i / Σ_top p_j = e^{l_i} / Σ_top e^{l_j}`), so `topk_softmax` names it too. With k = 1
    /// its one weight is always 1: the router then learns from the auxiliary losses alone.
    #[default]
    #[serde(alias = "topk_softmax")]
    Renormalized,
    /// softmax over all experts → keep the top k, as they are: the weights sum to less than one
    /// (Switch Transformer, Qwen-MoE's `norm_topk_prob = false`). The language-model loss then
    /// reaches the router even with k = 1.
    Softmax,
}

/// The router's settings. See the module doc.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Router {
    /// Weight of the load-balancing loss `E · Σ_i f_i · P_i` (f_i: share of the routed
    /// assignments that went to expert i; P_i: its mean router probability), averaged over the
    /// MoE layers. It is 1 when routing is uniform, whatever k. 0.01 is the Switch Transformer's
    /// α (Fedus et al. 2021, §2.2: "sufficiently large to ensure load balancing while small
    /// enough to not overwhelm the primary cross-entropy objective") and ST-MoE's. Hugging Face's
    /// `router_aux_loss_coef` weighs a loss whose f counts all k choices (k times this one), so
    /// Mixtral's 0.02 is 0.04 here at k = 2; import and export convert.
    #[serde(default = "default_balance_loss_coef")]
    pub balance_loss_coef: f64,
    /// Weight of the router z-loss `mean_tokens (log Σ_i e^{logit_i})²`, which keeps the logits
    /// small so the router's softmax stays out of float round-off. 0.001 is ST-MoE's c_z (Zoph
    /// et al. 2022, §3.1: stabilised training "without quality degradation").
    #[serde(default = "default_z_loss_coef")]
    pub z_loss_coef: f64,
    #[serde(default)]
    pub gating: Gating,
    /// Multiplicative noise on the router's input while training: `x · U(1 − ε, 1 + ε)`, drawn
    /// from the run's random stream (so a resumed run draws the same noise). The Switch
    /// Transformer used ε = 0.01; 0 (off) is Mixtral's `router_jitter_noise`.
    #[serde(default)]
    pub jitter: f64,
    /// Unset (the default): dropless dispatch, every token reaches its k experts (Mixtral,
    /// MegaBlocks). Set to c: while training, each expert takes at most `⌈c · N·k / E⌉` of a
    /// batch's N·k assignments (first choices before second ones, then in token order, as in
    /// GShard) and the overflow is dropped (that expert adds nothing; the residual carries the
    /// token on). The Switch Transformer trained with 1.0–1.25. Evaluation and generation are
    /// always dropless, so a token's output never depends on the rest of its batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_factor: Option<f64>,
}

fn default_balance_loss_coef() -> f64 {
    0.01
}
fn default_z_loss_coef() -> f64 {
    0.001
}

impl Default for Router {
    fn default() -> Self {
        Router {
            balance_loss_coef: default_balance_loss_coef(),
            z_loss_coef: default_z_loss_coef(),
            gating: Gating::default(),
            jitter: 0.0,
            capacity_factor: None,
        }
    }
}

impl Router {
    pub fn is_default(&self) -> bool {
        *self == Router::default()
    }

    /// Every problem, each starting with its field path under `path` (e.g. `ffn.router`).
    pub fn problems(&self, path: &str) -> Vec<String> {
        let mut problems = Vec::new();
        for (field, value) in [("balance_loss_coef", self.balance_loss_coef), ("z_loss_coef", self.z_loss_coef)] {
            if !(value >= 0.0 && value.is_finite()) {
                problems.push(format!("{path}.{field} = {value}, expected a number >= 0 (0 turns the loss off)"));
            }
        }
        if !(0.0..1.0).contains(&self.jitter) {
            problems.push(format!("{path}.jitter = {}, expected 0 <= jitter < 1", self.jitter));
        }
        if let Some(c) = self.capacity_factor {
            if !(c > 0.0 && c.is_finite()) {
                problems.push(format!(
                    "{path}.capacity_factor = {c}, expected a number > 0 (1.0–1.25 is usual), or unset for dropless dispatch"
                ));
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_missing_fields_and_aliases_parse() {
        let router: Router = serde_json::from_str(r#"{"gating": "topk_softmax"}"#).unwrap();
        assert_eq!(router, Router::default());
        let router: Router = serde_json::from_str(r#"{"gating": "softmax", "capacity_factor": 1.25}"#).unwrap();
        assert_eq!((router.gating, router.capacity_factor), (Gating::Softmax, Some(1.25)));
        assert!(serde_json::from_str::<Router>(r#"{"capacity": 1}"#).is_err());
    }

    #[test]
    fn problems_name_the_field() {
        let bad = Router { capacity_factor: Some(0.0), jitter: 1.5, z_loss_coef: -1.0, ..Router::default() };
        let problems = bad.problems("ffn.router");
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].starts_with("ffn.router.z_loss_coef = -1"), "{problems:?}");
        assert!(problems[1].starts_with("ffn.router.jitter = 1.5"), "{problems:?}");
        assert!(problems[2].starts_with("ffn.router.capacity_factor = 0"), "{problems:?}");
        assert!(Router::default().problems("ffn.router").is_empty());
    }
}
