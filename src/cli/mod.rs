//! One module per `sgdm` command.
pub mod info;
pub mod kernels;
