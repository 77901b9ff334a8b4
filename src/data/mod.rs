//! Data: EEG and image readers, validation, and the simulated default dataset.
pub mod image;
pub mod npy;
pub mod synth;
pub mod things;
