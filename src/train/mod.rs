//! Training machinery shared by the stages: the AdamW optimizer with clipping and accumulation, the
//! learning-rate schedule, checkpoints that resume exactly, the step log and progress line, the stages
//! that use them and their configuration file.

pub mod checkpoint;
pub mod config;
pub mod log;
pub mod optimizer;
pub mod schedule;
pub mod stages;

pub use checkpoint::{config_id, load_checkpoint, peek_checkpoint, save_checkpoint, CheckpointMeta, RngState};
pub use log::{Progress, StepLog, StepRecord};
pub use optimizer::{Optimizer, OptimizerConfig};
pub use schedule::LrSchedule;
