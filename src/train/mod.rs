//! Training building blocks that own state which must survive a restart exactly: the optimizer
//! (with its moments), the learning-rate schedule, the random numbers, and the checkpoint
//! directory that stores all of them.
//!
//! The loop itself lives above this module and owns no math; everything here is either pure
//! (the schedule) or has its whole state readable and restorable (optimizer, RNG), so that
//! "N steps + kill + resume N steps == 2N steps uninterrupted" holds bit for bit.

pub mod bench;
pub mod checkpoint;
pub mod corpus;
pub mod data_parallel;
pub mod expert_load;
pub mod guard;
pub mod inject;
mod manifest;
pub mod metrics;
pub mod optim;
pub mod rng;
pub mod run_config;
pub mod schedule;
pub mod seq2seq;
pub mod setup;
pub mod task;
pub mod timing;
pub mod trainer;

pub use checkpoint::{BestCheckpoint, Checkpoint, CheckpointData, CheckpointState, LatestValid, SkippedCheckpoint};
pub use optim::{clip_grad_norm, grad_norm, AdamW, AdamWConfig, AdamWMeta, AdamWState, Param, UpdateKernel};
pub use rng::{RngState, TrainRng};
pub use schedule::{vaswani_peak_lr, Decay, DecayShape, LrSchedule};
pub use timing::RunTime;
pub use trainer::{train, train_on, TrainSummary};
