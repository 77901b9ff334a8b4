//! Arbitrary bytes into the EEG reader (.npy header, restricted unpickler, dict validation): it must return
//! an error, never panic, hang or exhaust memory.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sgdm::data::eeg::{EegData, Repetitions};

fuzz_target!(|data: &[u8]| {
    if let Ok(eeg) = EegData::from_bytes(data, Path::new("fuzz.npy")) {
        let _ = (eeg.non_finite(), eeg.sfreq(), eeg.time_range(), eeg.expect(17, 100));
        let _ = eeg.with_repetitions(Repetitions::Average);
    }
});
