//! Data: EEG and image readers, validation, and the simulated default dataset.
pub mod contract;
pub mod dataset;
pub mod eeg;
pub mod image;
pub mod npy;
pub mod pickle;
pub mod structure;
pub mod synth;
pub mod things;
pub mod things_eeg2;
