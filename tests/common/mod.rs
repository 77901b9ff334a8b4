//! Helpers shared by the integration tests.

use std::io::Write;

/// Reports a test that cannot run here. Written straight to stderr, past libtest's output capture, so a
/// skip is always visible in the test log and never passes silently.
#[allow(dead_code)] // not every test binary skips
pub fn skipped(what: &str, reason: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr(), "SKIPPED: {what}: {reason}");
}

/// The `sgdm` binary under test: `$SGDM_BIN` when set (the GPU bundle runs test binaries away from the build
/// tree), else the one cargo built for this test run.
#[allow(dead_code)] // not every test binary runs the CLI
pub fn sgdm_bin() -> std::path::PathBuf {
    std::env::var_os("SGDM_BIN").map(Into::into).unwrap_or_else(|| env!("CARGO_BIN_EXE_sgdm").into())
}
