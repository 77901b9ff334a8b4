//! Diffusion: the noise schedulers (DDIM, Euler, DPM-Solver++(2M)). Guidance and the denoising loop are the
//! pipeline's (`crate::pipeline`, `ops::sampling::guided_step`).
pub mod scheduler;
