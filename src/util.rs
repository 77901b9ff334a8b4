//! Small helpers shared across the crate.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// Opens a file for reading. A directory is refused here, by name: opening one succeeds on Unix and the
/// read or memory map after it fails with an unhelpful "No such device".
pub fn open_file(path: &Path) -> io::Result<File> {
    let file = File::open(path)?;
    if file.metadata()?.is_dir() {
        return Err(io::Error::new(io::ErrorKind::IsADirectory, "is a directory, expected a file"));
    }
    Ok(file)
}

/// [`std::fs::read_to_string`] through [`open_file`].
pub fn read_to_string(path: &Path) -> io::Result<String> {
    io::read_to_string(open_file(path)?)
}

/// Files up to this size are hashed whole by [`content_checksum`]; larger ones by samples.
const WHOLE_FILE_HASH_LIMIT: u64 = 64 << 20;
/// Blocks a larger file's checksum samples, and their size.
const CHECKSUM_SAMPLES: u64 = 64;
const CHECKSUM_BLOCK: u64 = 1 << 20;

/// A checksum of a file's content, cheap enough for every run: SHA-256 (hex) of the file's length and
/// of its bytes, all of them up to 64 MiB, else 64 blocks of 1 MiB at evenly spaced offsets from the
/// first byte to the last. Another recording saved at the same path differs in every block; two files
/// differing only between the samples of a file over 64 MiB would collide.
pub fn content_checksum(path: &Path) -> io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Seek, SeekFrom};
    let mut file = open_file(path)?;
    let len = file.metadata()?.len();
    let mut hash = Sha256::new();
    hash.update(len.to_le_bytes());
    if len <= WHOLE_FILE_HASH_LIMIT {
        io::copy(&mut file, &mut hash)?;
    } else {
        let mut block = vec![0u8; CHECKSUM_BLOCK as usize];
        for k in 0..CHECKSUM_SAMPLES {
            let offset = (len - CHECKSUM_BLOCK) / (CHECKSUM_SAMPLES - 1) * k;
            file.seek(SeekFrom::Start(offset))?;
            file.read_exact(&mut block)?;
            hash.update(&block);
        }
    }
    Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// This machine's host name as it appears in temporary file names: letters, digits, dots and underscores
/// only, so a name parses back (`-` separates its fields).
fn host_name() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        let mut buf = [0u8; 256];
        // SAFETY: the buffer outlives the call and its length is passed.
        let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
        let len = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        let name: String =
            String::from_utf8_lossy(&buf[..len]).chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' { c } else { '_' }).collect();
        if ok && !name.is_empty() {
            name
        } else {
            "unknown_host".into()
        }
    })
}

/// The temporary file through which [`write_atomic_with`] writes `path`: `.<name>.tmp-<host>-<pid>-<n>`
/// beside it. The host and process id tell a later run whether the writer can still be alive
/// ([`remove_stale_temporaries`]); `n` separates one process's concurrent writes.
pub fn temporary_path(path: &Path, pid: u32, n: u64) -> PathBuf {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dir.join(format!(".{name}.tmp-{}-{pid}-{n}", host_name()))
}

/// A fresh [`temporary_path`] of this process for `path`, which must name a file.
pub fn next_temporary_path(path: &Path) -> io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    if path.file_name().is_none() {
        return Err(io::Error::other(format!("{} names no file", path.display())));
    }
    Ok(temporary_path(path, std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)))
}

/// A temporary file whose host is unknown (another machine on a shared folder, or a name from before the
/// host was recorded) is left alone for this long: no atomic write takes an hour.
const FOREIGN_TEMPORARY_AGE: Duration = Duration::from_secs(3600);

/// Whether a process with this id runs on this machine.
fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
    // SAFETY: signal 0 only checks that the process exists and may be signalled.
    unsafe { libc::kill(pid, 0) == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) }
}

/// Whether a file name in `dir` is a temporary of [`write_atomic_with`] that no running writer will
/// finish: its process on this machine is gone, or it is from elsewhere and older than an hour.
fn is_stale_temporary(dir: &Path, name: &str) -> bool {
    let Some((_, fields)) = name.strip_prefix('.').and_then(|n| n.rsplit_once(".tmp-")) else { return false };
    let mut parts = fields.rsplitn(3, '-');
    let (Some(counter), Some(pid), host) = (parts.next(), parts.next(), parts.next()) else { return false };
    let (Ok(_), Ok(pid)) = (counter.parse::<u64>(), pid.parse::<u32>()) else { return false };
    if host == Some(host_name()) {
        return !process_alive(pid);
    }
    let age = std::fs::symlink_metadata(dir.join(name)).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
    age.is_some_and(|a| a > FOREIGN_TEMPORARY_AGE)
}

/// Removes the temporaries that writers killed mid-write (`kill -9`, a crash, a lost node) left in `dir`,
/// and returns how many; a missing `dir` has none. Called by every command that resumes in a folder.
pub fn remove_stale_temporaries(dir: &Path) -> io::Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if is_stale_temporary(dir, name) {
            let path = dir.join(name);
            // A folder is a killed unpacking of the built-in weights (`default_weights`).
            let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
            match if is_dir { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) } {
                Ok(()) => removed += 1,
                // Another resuming process removed it first.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

/// Writes a file so that readers see either the old content or the complete new one, never a part:
/// the bytes go to a temporary file in the same folder ([`temporary_path`]), are flushed to disk, then
/// renamed over `path`.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&mut BufWriter<File>) -> io::Result<()>) -> io::Result<()> {
    let tmp = next_temporary_path(path)?;
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

/// `4m35s`, `2h03m`, `12s`.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
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
        let eta = if rate > 0.0 { format_duration(Duration::from_secs_f64((total - done.min(total)) as f64 / rate)) } else { "?".into() };
        format!("{}: {done}/{total}  {rate:.2} {}/s  ETA {eta}", self.label, self.unit)
    }

    pub fn update(&mut self, done: usize, total: usize) {
        let line = self.line(done, total);
        self.drawer.draw(done >= total, || line);
    }
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

    #[test]
    fn stale_temporaries_are_those_of_dead_writers_here_or_old_ones_from_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a.png");
        let mine = temporary_path(&target, std::process::id(), 0);
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let orphan = temporary_path(&target, dead, 1);
        let elsewhere = dir.path().join(".a.png.tmp-other.host-1-0");
        let unrelated = dir.path().join(".a.png.tmp-notes");
        for p in [&mine, &orphan, &elsewhere, &unrelated] {
            std::fs::write(p, b"x").unwrap();
        }
        assert_eq!(remove_stale_temporaries(dir.path()).unwrap(), 1);
        assert!(mine.exists() && !orphan.exists() && elsewhere.exists() && unrelated.exists());
        let old = std::time::SystemTime::now() - FOREIGN_TEMPORARY_AGE - Duration::from_secs(60);
        std::fs::File::options().write(true).open(&elsewhere).unwrap().set_modified(old).unwrap();
        assert_eq!(remove_stale_temporaries(dir.path()).unwrap(), 1);
        assert!(!elsewhere.exists() && mine.exists());
        assert_eq!(remove_stale_temporaries(&dir.path().join("absent")).unwrap(), 0);
    }
}
