//! Training machinery shared by the stages: the AdamW optimizer with clipping and accumulation, the
//! learning-rate schedule, and checkpoints that resume exactly.

pub mod checkpoint;
pub mod optimizer;
pub mod schedule;

pub use checkpoint::{config_id, load_checkpoint, save_checkpoint, CheckpointMeta, RngState};
pub use optimizer::{Optimizer, OptimizerConfig};
pub use schedule::LrSchedule;
