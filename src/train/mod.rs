//! Training machinery shared by the stages: the AdamW optimizer with clipping and accumulation, and the
//! learning-rate schedule.

pub mod optimizer;
pub mod schedule;

pub use optimizer::{Optimizer, OptimizerConfig};
pub use schedule::LrSchedule;
