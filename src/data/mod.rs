//! Data: EEG and image readers, validation, and the simulated default dataset.
pub mod eeg;
pub mod image;
pub mod npy;
pub mod pickle;
pub mod synth;
pub mod things;
