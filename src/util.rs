//! Small helpers shared across the crate.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes a file so that readers see either the old content or the complete new one, never a part:
/// the bytes go to a temporary file in the same folder, are flushed to disk, then renamed over `path`.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>) -> io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| io::Error::other(format!("{} names no file", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut w = BufWriter::new(File::create(&tmp)?);
        write(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// [`write_atomic_with`] for bytes already in memory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.bin");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let failed = write_atomic_with(&path, |w| {
            w.write_all(b"partial")?;
            Err(io::Error::other("interrupted"))
        });
        assert!(failed.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"second", "a failed write must leave the old file");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out.bin")]);
    }
}

/// `n` standard normal values (Box–Muller, the cosine branch), drawn from `rng`.
pub fn standard_normal(rng: &mut impl rand::Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let (u1, u2): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random());
            (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        })
        .collect()
}

/// When and how a progress line is drawn on stderr: redrawn in place on a terminal at most five times a
/// second; elsewhere (a log file, CI) a plain line every 10 seconds; always at the end.
pub struct LineDrawer {
    last: Option<std::time::Instant>,
    tty: bool,
}

impl LineDrawer {
    pub fn new() -> LineDrawer {
        use std::io::IsTerminal;
        LineDrawer { last: None, tty: io::stderr().is_terminal() }
    }

    /// Draws `line()` if it is due, or when `finished`.
    pub fn draw(&mut self, finished: bool, line: impl FnOnce() -> String) {
        let now = std::time::Instant::now();
        let every = std::time::Duration::from_millis(if self.tty { 200 } else { 10_000 });
        if !finished && self.last.is_some_and(|t| now.duration_since(t) < every) {
            return;
        }
        self.last = Some(now);
        let mut err = io::stderr().lock();
        let _ = if self.tty { write!(err, "\r\x1b[2K{}{}", line(), if finished { "\n" } else { "" }) } else { writeln!(err, "{}", line()) };
        let _ = err.flush();
    }
}

impl Default for LineDrawer {
    fn default() -> LineDrawer {
        LineDrawer::new()
    }
}

/// A progress line for counted work (`reconstruct: 48/200  3.1 images/s  ETA 49s`), drawn by a
/// [`LineDrawer`].
pub struct ItemProgress {
    label: String,
    unit: &'static str,
    start: std::time::Instant,
    drawer: LineDrawer,
}

impl ItemProgress {
    pub fn new(label: &str, unit: &'static str) -> ItemProgress {
        ItemProgress { label: label.to_string(), unit, start: std::time::Instant::now(), drawer: LineDrawer::new() }
    }

    pub fn line(&self, done: usize, total: usize) -> String {
        let elapsed = self.start.elapsed().as_secs_f64();
        let rate = if elapsed > 0.0 { done as f64 / elapsed } else { 0.0 };
        let eta = if rate > 0.0 { crate::train::log::format_duration(std::time::Duration::from_secs_f64((total - done.min(total)) as f64 / rate)) } else { "?".into() };
        format!("{}: {done}/{total}  {rate:.2} {}/s  ETA {eta}", self.label, self.unit)
    }

    pub fn update(&mut self, done: usize, total: usize) {
        let line = self.line(done, total);
        self.drawer.draw(done >= total, || line);
    }
}
