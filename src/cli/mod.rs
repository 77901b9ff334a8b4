//! One module per `sgdm` command.
pub mod bench;
pub mod data;
pub mod demo;
pub mod eval;
pub mod forward;
pub mod info;
pub mod kernels;
pub mod profile;
pub mod reconstruct;
pub mod synth;
pub mod train;
