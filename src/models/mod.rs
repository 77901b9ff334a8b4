//! Models that mirror the PyTorch/diffusers module trees, so weight names map one to one.
pub mod autoencoder_kl;
pub mod blocks;
pub mod config;
pub mod sgdm;
pub mod unet;
