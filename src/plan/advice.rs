//! What the report concludes: the recommendation, the error when nothing fits, and the
//! assumptions every figure rests on.

use super::commands::CONTINUE_LR;
use super::scaling::MUENNIGHOFF_2023;
use super::{gib, seconds, Budget, Excluded, PlanDevice, PlanRequest, PlanRow, Recommendation, Shortfall, Start};
use super::{EVAL_SHARE, GIB, PRETRAINED_TOKENS_PER_PARAM};
use crate::error::Error;

/// The plan with the lowest loss guide, and why.
pub fn recommend(rows: &[PlanRow], limit: u64) -> Option<Recommendation> {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by(|&a, &b| rows[a].loss_guide.total_cmp(&rows[b].loss_guide));
    let best = *order.first()?;
    let row = &rows[best];
    let mut why = format!("the lowest loss guide, {:.2}", row.loss_guide);
    if let Some(&next) = order.get(1) {
        why.push_str(&format!(" (next: {:.2}, {})", rows[next].loss_guide, rows[next].spec.label));
    }
    why.push_str(&format!(
        "; {:.2} epochs of the corpus in {}; peak memory {} of {}",
        row.epochs,
        seconds(row.time.total),
        gib(row.memory.peak),
        gib(limit)
    ));
    Some(Recommendation { row: best, why })
}

/// The error when no plan survives: the memory limit, the budget or the data, by what the
/// plans lacked.
pub fn nothing_fits(excluded: &[Excluded], request: &PlanRequest, limit: u64) -> Error {
    let memory: Vec<(&Excluded, u64)> = excluded
        .iter()
        .filter_map(|e| match e.kind {
            Shortfall::Memory { needs_bytes } => Some((e, needs_bytes)),
            _ => None,
        })
        .collect();
    let budget: Vec<(&Excluded, f64)> = excluded
        .iter()
        .filter_map(|e| match e.kind {
            Shortfall::Budget { needs } => Some((e, needs)),
            _ => None,
        })
        .collect();
    let all = excluded.iter().map(|e| format!("{}: {}", e.label, e.reason)).collect::<Vec<_>>();
    let list = crate::error::bullet_list(&all, 12);
    if memory.len() == excluded.len() {
        let (smallest, needs) = memory.iter().min_by_key(|(_, n)| *n).expect("at least one plan");
        return Error::Input(format!(
            "no plan fits in {} of memory; the smallest, {}, needs {}:{list}\nHINT: raise --memory to at least {:.2}, or shorten --seq-len",
            gib(limit),
            smallest.label,
            gib(*needs),
            *needs as f64 / GIB + 0.005
        ));
    }
    if budget.len() == excluded.len() {
        let (cheapest, needs) = budget.iter().min_by(|a, b| a.1.total_cmp(&b.1)).expect("at least one plan");
        let hint = match request.budget {
            Budget::Hours { .. } => format!("--hours {:.4} at least", needs / 3600.0 * 1.01),
            Budget::Flops { .. } => format!("--flops {:.2e} at least", needs * 1.01),
        };
        return Error::Input(format!(
            "the budget is too small for even one training step of any plan; the cheapest, {}, {}:{list}\nHINT: {hint}",
            cheapest.label, cheapest.reason
        ));
    }
    Error::Input(format!("no plan can run:{list}"))
}

/// What the figures rest on, for the end of the report.
pub fn assumptions(request: &PlanRequest, rows: &[PlanRow]) -> Vec<String> {
    let law = MUENNIGHOFF_2023;
    let mut out = vec![format!(
        "loss guide: the data-constrained Chinchilla law of Muennighoff et al. 2023 (their C4 fit: E {:.2}, A {:.1}, B {:.1}, alpha = beta {:.3}, R*_D {:.1}, R*_N {:.1}); a guide for comparing rows, not the loss a run will print, and tokens of different tokenizers are not the same unit",
        law.e, law.a, law.b, law.alpha, law.repeats_star_data, law.repeats_star_params
    )];
    if rows.iter().any(|r| r.spec.start != Start::Scratch) {
        out.push(format!(
            "continued and upcycled checkpoints are assumed to have seen {PRETRAINED_TOKENS_PER_PARAM} tokens per parameter before (Chinchilla-optimal; published models usually saw more, so the guide understates them); their commands use a peak learning rate of {CONTINUE_LR:e}"
        ));
    }
    if rows.iter().any(|r| matches!(r.spec.config.ffn, crate::config::Ffn::Moe { .. })) {
        out.push("mixtures of experts count their active parameters in the guide (conservative: routed models beat dense ones of equal active size, Clark et al. 2022)".into());
    }
    out.push(match &request.device {
        PlanDevice::ThisCpu => format!(
            "time: each plan's step, evaluation, checkpoint and sampling rehearsed on this machine (cached in {}); on a shared machine the speed swings with the other load (each plan's details show how much its steps varied while measured)",
            request.cache_dir.join("calibration").display()
        ),
        PlanDevice::Accelerator { .. } => "time: training FLOPs at the assumed utilisation of the device's peak; start-up, checkpoints and sampling are not counted; lmforge itself trains on the CPU, so the commands size a job for another trainer on that device".into(),
    });
    out.push(match &request.device {
        PlanDevice::ThisCpu => "memory: f32 weights, gradients and AdamW moments (16 bytes per parameter, as `lmforge show` counts them) plus activations and runtime measured from rehearsals at two batch sizes; the peak is the larger of a training step and of evaluating, checkpointing and sampling after it".into(),
        PlanDevice::Accelerator { .. } => "memory: 16 bytes per parameter for weights, gradients and AdamW moments plus activations counted from the tensors the backward pass keeps (not measured)".into(),
    });
    out.push(format!(
        "the commands train on the corpus as tokenized for each plan (--dataset, under {}), with lmforge train's default evaluation, checkpoint and sample intervals (fewer validation batches, --eval-batches, where evaluating would take more than {:.0}% of the time)",
        request.cache_dir.join("datasets").display(),
        EVAL_SHARE * 100.0
    ));
    if rows.iter().any(|r| matches!(r.spec.start, Start::Upcycle { .. })) {
        out.push("upcycled plans are costed as the mixture `lmforge upcycle` writes (every expert a copy of the dense FFN, a new router); the upcycle and reading its output are not timed, and the guide counts the dense model's parameters (it starts as exactly that model; Komatsuzaki et al. 2022)".into());
    }
    out
}
