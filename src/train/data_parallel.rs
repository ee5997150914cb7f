//! What the training loop does differently as one rank of a data-parallel job, apart from
//! reducing each step's gradients and losses (in the loop, through [`Collectives`]).
//!
//! - **One global batch.** `batch_size` is the global batch; rank `r` of `N` trains on rows
//!   `r·B/N .. (r+1)·B/N` of it ([`Shard`]). The data position is the global batch's, the same
//!   on every rank, so the checkpoint's position is every rank's, and a run resumed with a
//!   different number of ranks continues with exactly the batches it would have seen (its sums
//!   then round in another order: equal to about 1e-6, not bit for bit).
//! - **Rank 0 owns the run directory.** It prepares the tokenizer and token shards alone while
//!   the others wait, writes every checkpoint and the metrics; the others only read.
//! - **Agreement before the first step.** Ranks given different flags, data or weights (a
//!   checkpoint directory that is not on shared storage) are refused with an error on every
//!   rank, rather than averaged into a model none of them meant.

use serde_json::Value;

use super::run_config::RunConfig;
use super::setup::Prepared;
use super::task::TrainData;
use crate::distributed::{fingerprint, weights_checksum, Collectives, Shard, Wait};
use crate::error::Result;
use candle_core::Var;

/// Run `prepare` (which creates or opens the run directory) on rank 0 first and then on the
/// others, once the config every rank was given is agreed on.
pub fn in_rank_order(
    config: &RunConfig,
    collectives: &dyn Collectives,
    prepare: impl FnOnce() -> Result<Prepared>,
) -> Result<Prepared> {
    if collectives.ranks() == 1 {
        return prepare();
    }
    let text = serde_json::to_string(config).expect("run config serialises");
    collectives.agree(
        "the run config\nHINT: start every rank with the same flags and config file (mpirun does, given one command line)",
        fingerprint(text.as_bytes()),
    )?;
    Shard::of(collectives).rows(config.train.batch_size)?;
    let prepared = if collectives.rank() == 0 {
        let prepared = prepare();
        collectives.barrier(Wait::Unbounded)?;
        prepared?
    } else {
        collectives.barrier(Wait::Unbounded)?;
        prepare()?
    };
    // No rank saves a checkpoint before every rank has opened the run directory (a new run
    // refuses a directory that already has one).
    collectives.barrier(Wait::Unbounded)?;
    collectives.agree(
        "the training data (the token dataset's manifest)\nHINT: every rank must read the same dataset: put the run directory and --dataset on storage every machine sees",
        data_fingerprint(&prepared.data),
    )?;
    Ok(prepared)
}

/// Check that every rank starts from the same step, data position and weights.
pub fn agree_on_start(collectives: &dyn Collectives, step: u64, position: &Value, vars: &[&Var]) -> Result<()> {
    if collectives.ranks() == 1 {
        return Ok(());
    }
    let mut bytes = step.to_le_bytes().to_vec();
    bytes.extend(position.to_string().as_bytes());
    bytes.extend(weights_checksum(vars)?.to_le_bytes());
    collectives.agree(
        "the starting step, data position and weights\nHINT: the run directory (its checkpoints) must be on storage every rank sees, at the same path",
        fingerprint(&bytes),
    )
}

/// Say so when a run continues with another number of ranks than its checkpoint was saved by.
pub fn note_world_size_change(saved: usize, now: usize) {
    if saved != now {
        eprintln!(
            "note: the checkpoint was saved by {saved} rank(s), this job has {now}: the global batch and data position carry over exactly; the losses agree with a run of {saved} to rounding, not bit for bit"
        );
    }
}

/// What identifies a run's data: a token dataset's manifest (its splits' sizes and checksums
/// and its tokenizer's), or the sizes of parallel data.
fn data_fingerprint(data: &TrainData) -> u64 {
    let text = match data {
        TrainData::Text(dataset) => {
            let manifest = dataset.manifest();
            serde_json::to_string(&(&manifest.tokenizer, &manifest.train, &manifest.val)).expect("manifest serialises")
        }
        TrainData::Pairs(pairs) => format!("{} {} {}", pairs.train.tokens(), pairs.val.tokens(), pairs.batch_tokens),
    };
    fingerprint(text.as_bytes())
}
