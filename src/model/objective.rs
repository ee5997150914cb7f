//! What a training step minimises, in parts: the language-model loss, which is all that
//! validation and `score` measure, and the routers' auxiliary losses, which only training adds.

use candle_core::Tensor;

use crate::config::Ffn;
use crate::error::{Error, Result};
use crate::nn::RouterReport;

/// One batch's training loss, from [`super::Model::training_loss`].
pub struct TrainingLoss {
    /// Mean next-token cross-entropy (scalar).
    pub lm: Tensor,
    /// The routers' auxiliary losses; `None` for a dense model.
    pub router: Option<RouterTerms>,
    /// Each mixture-of-experts layer's routing of the batch, in layer order.
    pub routing: Vec<RouterReport>,
}

/// The auxiliary losses, each averaged over the mixture-of-experts layers (scalars), and the
/// weights `ffn.router.*` gives them in the objective.
pub struct RouterTerms {
    pub balance: Tensor,
    pub z: Tensor,
    pub balance_coef: f64,
    pub z_coef: f64,
}

impl TrainingLoss {
    pub(super) fn new(lm: Tensor, ffn: &Ffn, routing: Vec<RouterReport>) -> Result<Self> {
        let Ffn::Moe { router, .. } = ffn else { return Ok(TrainingLoss { lm, router: None, routing }) };
        let losses: Vec<_> = routing.iter().filter_map(|r| r.losses.as_ref()).collect();
        if losses.len() != routing.len() || losses.is_empty() {
            return Err(Error::Input("training_loss: a mixture-of-experts layer reported no router losses".into()));
        }
        let mean = |terms: Vec<&Tensor>| -> Result<Tensor> { Ok(Tensor::stack(&terms, 0)?.mean_all()?) };
        let router = RouterTerms {
            balance: mean(losses.iter().map(|l| &l.balance).collect())?,
            z: mean(losses.iter().map(|l| &l.z).collect())?,
            balance_coef: router.balance_loss_coef,
            z_coef: router.z_loss_coef,
        };
        Ok(TrainingLoss { lm, router: Some(router), routing })
    }

    /// `lm + balance_coef · balance + z_coef · z`: the scalar whose gradients train the model.
    pub fn objective(&self) -> Result<Tensor> {
        let mut total = self.lm.clone();
        if let Some(r) = &self.router {
            for (term, coef) in [(&r.balance, r.balance_coef), (&r.z, r.z_coef)] {
                if coef != 0.0 {
                    total = (total + (term.to_dtype(self.lm.dtype())? * coef)?)?;
                }
            }
        }
        Ok(total)
    }
}
