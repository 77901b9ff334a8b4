//! One module per `sgdm` command.
pub mod info;
pub mod kernels;
pub mod synth;
