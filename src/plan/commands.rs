//! The commands that carry out a costed plan: exactly the model, data and schedule it costed.

use super::{PlanRequest, PlanRow, Start};
use crate::train::run_config::TrainSpec;

/// Peak learning rate of printed continuation commands: a tenth of the from-scratch default.
/// Continued pretraining re-warms a converged model, and a large rate makes it forget what it
/// knew (Gupta et al. 2023, "Continual Pre-Training of Large Language Models: How to
/// (re)warm your model?").
pub const CONTINUE_LR: f64 = 3e-4;

/// The commands that carry out a costed plan.
pub fn commands(row: &PlanRow, request: &PlanRequest) -> Vec<String> {
    let spec = &row.spec;
    let name =
        super::corpus::slug(&spec.label.replace(" + continue", "").replace(" (from scratch)", "").replace(':', ""));
    let run = request.runs_dir.join(format!("plan-{}", name.to_ascii_lowercase()));
    let mut train = vec!["lmforge".to_string(), "train".into(), "--run".into(), quote(&run.display().to_string())];
    let mut out = Vec::new();
    match &spec.start {
        Start::Scratch => {
            train.extend(["--arch".into(), quote(&spec.arch)]);
            for setting in &spec.settings {
                train.extend(["--set".into(), quote(setting)]);
            }
        }
        Start::Continue { from } => train.extend(["--init-from".into(), quote(&from.display().to_string())]),
        Start::Upcycle { from, experts, top_k } => {
            let upcycled = format!("{}-upcycled", run.display());
            out.push(format!(
                "lmforge upcycle --model {} --experts {experts} --top-k {top_k} --out {}",
                quote(&from.display().to_string()),
                quote(&upcycled)
            ));
            train.extend(["--init-from".into(), quote(&upcycled)]);
        }
    }
    train.extend(["--dataset".into(), quote(&row.dataset.display().to_string())]);
    train.extend(["--steps".into(), row.steps.to_string(), "--batch-size".into(), row.batch_size.to_string()]);
    train.extend(["--seq-len".into(), row.seq_len.to_string()]);
    if row.grad_accum > 1 {
        train.extend(["--grad-accum".into(), row.grad_accum.to_string()]);
    }
    if row.intervals.eval_batches < TrainSpec::default().eval_batches {
        train.extend(["--eval-batches".into(), row.intervals.eval_batches.to_string()]);
    }
    if spec.start != Start::Scratch {
        train.extend(["--lr".into(), format!("{CONTINUE_LR:e}")]);
    }
    out.push(train.join(" "));
    out
}

/// `text` as one shell word.
fn quote(text: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./=:,+@%".contains(c);
    if !text.is_empty() && text.chars().all(plain) {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_quote_only_what_the_shell_would_split() {
        assert_eq!(quote("runs/plan-adopt-tiny-llama"), "runs/plan-adopt-tiny-llama");
        assert_eq!(quote(r#"ffn={"kind":"moe"}"#), r#"'ffn={"kind":"moe"}'"#);
        assert_eq!(quote("it's here"), r"'it'\''s here'");
    }
}
