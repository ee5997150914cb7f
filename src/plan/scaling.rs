//! A loss guide: the data-constrained scaling law of Muennighoff et al. 2023.
//!
//! Hoffmann et al. 2022 ("Chinchilla") fit the final loss of a model of `N` parameters trained
//! on `D` tokens as `L = E + A / N^α + B / D^β`, assuming every token is new. Muennighoff et
//! al. 2023 ("Scaling Data-Constrained Language Models", NeurIPS) replace `D` by the *effective*
//! data of `U` unique tokens seen `1 + R` times,
//!
//! ```text
//! D' = U + U · R*_D · (1 − exp(−R_D / R*_D)),   R_D = D / U − 1 (repeats beyond the first epoch)
//! ```
//!
//! so a repeat is worth a little less than a new token each time (4 epochs are almost as good
//! as new data, and beyond ~16 little is gained), and `N` by the effective parameters
//! `N' = U_N + U_N · R*_N · (1 − exp(−R_N / R*_N))`, where `U_N` is the compute-optimal size for
//! `U` tokens and `R_N = N / U_N − 1` counts parameters beyond it, which are worth less too.
//!
//! The constants are the paper's fit on C4 with GPT-2's tokenizer (huggingface/datablations,
//! README, "Parametric Fit"). Their own caveat applies here doubly: absolute values do not
//! transfer to another corpus or tokenizer, and lmforge's tiny models are far below the sizes
//! fitted. The guide is for *comparing plans*, not for predicting the loss a run will print.

/// `E`, `A`, `B`, `α`, `β`, `R*_D`, `R*_N` of Muennighoff et al. 2023 (`A = exp(6.255414)`,
/// `B = exp(7.3049974)`, `E = exp(0.6254804)`, `α = β = 0.3526596`).
pub const MUENNIGHOFF_2023: ScalingLaw = ScalingLaw {
    e: 1.869_143_7,
    a: 520.824_95,
    b: 1_487.716_1,
    alpha: 0.352_659_6,
    beta: 0.352_659_6,
    repeats_star_data: 15.387_756,
    repeats_star_params: 5.309_743,
};

/// A Chinchilla-form law with data-constrained repeats.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScalingLaw {
    pub e: f64,
    pub a: f64,
    pub b: f64,
    pub alpha: f64,
    pub beta: f64,
    /// `R*_D`: how many repeats the value of repeated data decays over.
    pub repeats_star_data: f64,
    /// `R*_N`: the same for parameters beyond the compute-optimal size.
    pub repeats_star_params: f64,
}

impl ScalingLaw {
    /// The loss guide for `params` parameters trained on `tokens` tokens of which `unique` are
    /// distinct (`unique` is capped at `tokens`: a run that sees part of its corpus has
    /// repeated nothing).
    pub fn loss(&self, params: f64, tokens: f64, unique: f64) -> f64 {
        let unique = unique.min(tokens).max(1.0);
        let repeats = (tokens / unique - 1.0).max(0.0);
        let effective_tokens = self.effective(unique, repeats, self.repeats_star_data);
        let useful_params = params.min(self.optimal_params_for_tokens(unique));
        let excess = (params / useful_params - 1.0).max(0.0);
        let effective_params = self.effective(useful_params, excess, self.repeats_star_params);
        self.e + self.a / effective_params.powf(self.alpha) + self.b / effective_tokens.powf(self.beta)
    }

    /// `U + U · R* · (1 − exp(−R / R*))`.
    fn effective(&self, unique: f64, repeats: f64, star: f64) -> f64 {
        unique + unique * star * (1.0 - (-repeats / star).exp())
    }

    /// The effective tokens `D'` of `tokens` seen over `unique` distinct ones.
    pub fn effective_tokens(&self, tokens: f64, unique: f64) -> f64 {
        let unique = unique.min(tokens).max(1.0);
        self.effective(unique, (tokens / unique - 1.0).max(0.0), self.repeats_star_data)
    }

    /// The compute-optimal parameter count for `tokens` new tokens: where the marginal gains of
    /// parameters and data balance, `N = G · (D · G)^(β/α)` with `G = (αA / βB)^(1/(α+β))`.
    pub fn optimal_params_for_tokens(&self, tokens: f64) -> f64 {
        let g = ((self.alpha * self.a) / (self.beta * self.b)).powf(1.0 / (self.alpha + self.beta));
        (tokens * g).powf(self.beta / self.alpha) * g
    }

    /// The parameter count with the lowest loss guide for `flops` of training (`6 N D`) on a
    /// corpus of `unique` tokens: a search over a log grid from 10^4 to 10^12 parameters, since
    /// the data-constrained law has no closed form.
    pub fn optimal_params(&self, flops: f64, unique: f64) -> f64 {
        let grid = (0..=800).map(|i| 10f64.powf(4.0 + 8.0 * i as f64 / 800.0));
        grid.min_by(|&n1, &n2| {
            let loss = |n: f64| self.loss(n, flops / (6.0 * n), unique);
            loss(n1).total_cmp(&loss(n2))
        })
        .unwrap_or(1e4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The paper's own worked example (datablations README, models of its Figure 1, right):
    /// 6.34B parameters on 242B tokens of 25B unique → 2.2256; 8.67B on 178B → 2.2270.
    #[test]
    fn reproduces_the_papers_worked_example() {
        let law = MUENNIGHOFF_2023;
        assert!((law.loss(6.34e9, 242e9, 25e9) - 2.225_644).abs() < 2e-4, "{}", law.loss(6.34e9, 242e9, 25e9));
        assert!((law.loss(8.67e9, 178e9, 25e9) - 2.226_963).abs() < 2e-4, "{}", law.loss(8.67e9, 178e9, 25e9));
    }

    #[test]
    fn repeats_are_worth_less_than_new_tokens_and_saturate() {
        let law = MUENNIGHOFF_2023;
        let u = 1e9;
        // One epoch: every token counts.
        assert_eq!(law.effective_tokens(u, u), u);
        // Four epochs: close to 4U (the paper: "negligible" loss from up to 4 epochs).
        let four = law.effective_tokens(4.0 * u, u);
        assert!(four < 4.0 * u && four > 3.6 * u, "{four}");
        // Forever: at most U (1 + R*_D).
        let many = law.effective_tokens(1e6 * u, u);
        assert!((many - u * (1.0 + law.repeats_star_data)).abs() < 1e-6 * many);
        // More data never hurts in the guide, even repeated.
        assert!(law.loss(1e8, 8e9, u) < law.loss(1e8, 4e9, u));
    }

    #[test]
    fn the_optimum_grows_with_compute_and_shrinks_with_scarce_data() {
        let law = MUENNIGHOFF_2023;
        let plenty = law.optimal_params(1e20, 1e13);
        assert!(law.optimal_params(1e21, 1e13) > plenty);
        // With little data, extra compute goes into parameters more than into repeats.
        let scarce = law.optimal_params(1e20, 1e8);
        assert!(scarce > 0.0 && scarce != plenty);
        // Unconstrained, it lands near Chinchilla's ~20 tokens per parameter.
        let tokens_per_param = 1e20 / (6.0 * plenty) / plenty;
        assert!((5.0..80.0).contains(&tokens_per_param), "{tokens_per_param}");
    }
}
