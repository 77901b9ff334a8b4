//! The SGDM training stages, on the CPU (f32) or CUDA (bf16 with f32 master weights), each a function of a small configuration: `base` (the embedded
//! default's AutoencoderKL and UNet, see [`BaseStageConfig`]), `vae` (stage 1, the StructuralVAE), `encoder`
//! (stage 2, the SpatiotemporalEEGEncoder aligned with the frozen StructuralVAE's mu by the symmetric InfoNCE
//! loss) and `controlnet` (stage 3, the ControlNet and the EEG-to-token projector, see
//! [`ControlNetStageConfig`]). Each reads a dataset in the layout of [`crate::data::dataset`] (`sgdm synth`'s
//! or `sgdm data import`'s), trains on its `train` split, validates on its `val` split and never opens the
//! `test` split.
//!
//! A stage writes into its output folder: `<stage>.jsonl` (the step log, validation losses as `val`),
//! `<stage>-step<NNNNNN>.safetensors` (checkpoints every `checkpoint_every` steps and at the end, kept so
//! the validation losses can pick one; `--resume` continues from any of them exactly) and
//! `<stage>.safetensors` (the final parameters under their PyTorch names); stage `base` runs two such loops,
//! `base_vae` and `base_unet`. The encoder stage also writes `eeg_standardization.json`, the per-channel
//! statistics its inputs were scaled with; `base` and `controlnet` also write their models as diffusers
//! components.
//!
//! Every stage takes a stop flag: once it is set (by Ctrl-C in `sgdm train`), the running loop ends after its
//! current step, writes a checkpoint there and returns a [`Stopped`] error naming it.

mod base;
mod common;
mod controlnet;
mod encoder;
mod vae;

pub use base::{train_base, BaseReport, BaseStageConfig};
pub use common::{LoopConfig, LoopMemory, On, StageReport, StepMemory, Stopped};
pub use controlnet::{check_pretrained_base, train_controlnet, ControlNetStageConfig};
pub use encoder::{train_encoder, EmbeddingTargets, EncoderStageConfig};
pub use vae::{train_vae, VaeStageConfig};
