//! Models that mirror the PyTorch/diffusers module trees, so weight names map one to one. The building blocks
//! have diffusers' file names: `resnet`, `attention`, `transformer_2d`, `unet_2d_blocks`; the VAE-only
//! blocks live in `autoencoder_kl`, and `layers` runs the parameterised layers of [`crate::nn`].
pub mod attention;
pub mod autoencoder_kl;
pub mod config;
pub mod layers;
pub mod resnet;
pub mod sgdm;
pub mod transformer_2d;
pub mod unet;
pub mod unet_2d_blocks;
