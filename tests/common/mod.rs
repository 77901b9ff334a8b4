//! Helpers shared by the integration tests.

use std::io::Write;

/// Reports a test that cannot run here. Written straight to stderr, past libtest's output capture, so a
/// skip is always visible in the test log and never passes silently.
pub fn skipped(what: &str, reason: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr(), "SKIPPED: {what}: {reason}");
}
