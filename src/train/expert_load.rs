//! Expert load: the share of routed assignments each expert of each mixture-of-experts layer
//! takes, summed over batches, and the warning when one takes too much.
//!
//! A router that sends most tokens to one expert wastes the others (they get no gradient and
//! stop learning) and, in a capacity-limited layer, drops tokens. The balance loss works
//! against it; this makes it visible: logged at each evaluation, drawn by `lmforge plot`.

use serde_json::{json, Value};

use crate::nn::RouterReport;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExpertLoad {
    /// Per layer, per expert: assignments routed to it.
    chosen: Vec<Vec<u64>>,
    dropped: u64,
}

/// The heaviest expert: where it is and its share.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Heaviest {
    pub layer: usize,
    pub expert: usize,
    pub share: f64,
    /// The share every expert would have with perfect balance, 1/E.
    pub uniform: f64,
}

impl ExpertLoad {
    /// Add one batch's reports (one per mixture-of-experts layer).
    pub fn add(&mut self, reports: &[RouterReport]) {
        if self.chosen.is_empty() {
            self.chosen = reports.iter().map(|r| vec![0; r.chosen.len()]).collect();
        }
        for (total, report) in self.chosen.iter_mut().zip(reports) {
            total.iter_mut().zip(&report.chosen).for_each(|(t, c)| *t += c);
            self.dropped += report.dropped;
        }
    }

    /// True for a dense model (nothing routed).
    pub fn is_empty(&self) -> bool {
        self.chosen.is_empty()
    }

    /// Per layer, each expert's share of the layer's routed assignments (each row sums to 1).
    pub fn shares(&self) -> Vec<Vec<f64>> {
        self.chosen
            .iter()
            .map(|layer| {
                let total = layer.iter().sum::<u64>().max(1) as f64;
                layer.iter().map(|&c| c as f64 / total).collect()
            })
            .collect()
    }

    /// The share of all assignments that a capacity limit dropped.
    pub fn dropped_share(&self) -> f64 {
        let total: u64 = self.chosen.iter().flatten().sum();
        self.dropped as f64 / total.max(1) as f64
    }

    pub fn heaviest(&self) -> Option<Heaviest> {
        let shares = self.shares();
        let mut best: Option<Heaviest> = None;
        for (layer, row) in shares.iter().enumerate() {
            for (expert, &share) in row.iter().enumerate() {
                if best.is_none_or(|b| share > b.share) {
                    best = Some(Heaviest { layer, expert, share, uniform: 1.0 / row.len() as f64 });
                }
            }
        }
        best
    }

    /// A warning when the heaviest expert takes more than `limit` of its layer's assignments
    /// (unset: twice the uniform share).
    pub fn warning(&self, limit: Option<f64>) -> Option<String> {
        let h = self.heaviest()?;
        let limit = limit.unwrap_or(2.0 * h.uniform);
        (h.share > limit).then(|| {
            format!(
                "layer {} expert {} takes {:.2} of the routed tokens (uniform {:.2}, limit {limit:.2})",
                h.layer, h.expert, h.share, h.uniform
            )
        })
    }

    /// `[[share, …] per layer]`, rounded to 4 decimals for the log.
    pub fn to_json(&self) -> Value {
        let rounded: Vec<Vec<f64>> =
            self.shares().iter().map(|row| row.iter().map(|s| (s * 1e4).round() / 1e4).collect()).collect();
        json!(rounded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(chosen: &[u64], dropped: u64) -> RouterReport {
        RouterReport { chosen: chosen.to_vec(), dropped, losses: None }
    }

    #[test]
    fn shares_sum_over_batches_and_the_heaviest_is_warned_about() {
        let mut load = ExpertLoad::default();
        assert!(load.is_empty() && load.warning(None).is_none());
        load.add(&[report(&[2, 2, 2, 2], 0), report(&[6, 1, 1, 0], 2)]);
        load.add(&[report(&[2, 2, 2, 2], 0), report(&[6, 1, 1, 0], 0)]);
        assert_eq!(load.shares(), vec![vec![0.25; 4], vec![0.75, 0.125, 0.125, 0.0]]);
        assert_eq!(load.dropped_share(), 2.0 / 32.0);
        assert_eq!(load.heaviest(), Some(Heaviest { layer: 1, expert: 0, share: 0.75, uniform: 0.25 }));
        let warning = load.warning(None).unwrap();
        assert!(warning.contains("layer 1 expert 0 takes 0.75") && warning.contains("limit 0.50"), "{warning}");
        assert!(load.warning(Some(0.8)).is_none());
        assert_eq!(load.to_json(), json!([[0.25, 0.25, 0.25, 0.25], [0.75, 0.125, 0.125, 0.0]]));
    }
}
