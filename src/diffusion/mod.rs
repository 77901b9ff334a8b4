//! Diffusion: the noise schedulers and (later) guidance and the denoising loop.
pub mod scheduler;
