//! The capped output logs of a sandbox (`stdout.log`, `stderr.log`), written by the
//! monitor of a detached sandbox and, beside the user's own streams, by a foreground run.
//!
//! A guest can write without end, so a log never grows past its maximum size: the write
//! that would pass it renames the log to `NAME.1` (replacing the one before) and goes on
//! in a new, empty `NAME`, as docker's json-file driver does with `max-size` and
//! `max-file=2`. A stream thus takes at most twice its maximum on disk, and the newest
//! output is always kept. [`LogReader`] reads a log across those renames.
//!
//! Every line is stored behind the time it arrived ([`lines`]), which `kiln logs` shows
//! with `--timestamps` and selects by with `--since`.
//!
//! Files are opened without following symlinks and created 0600, whatever the umask.

pub mod lines;

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The name a log is renamed to when it is full.
fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// A log file that is rotated before it passes its maximum size.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    max_bytes: u64,
    file: File,
    /// Bytes in `file`.
    len: u64,
}

impl RotatingLog {
    /// Opens `path` to append to it (its earlier contents count towards `max_bytes`),
    /// creating it when missing. `max_bytes` must be at least 1.
    pub fn open(path: &Path, max_bytes: u64) -> io::Result<RotatingLog> {
        // Created 0600, never through a symlink, refused when it is not kiln's own.
        let file = kiln_hostfs::open_log(path).map_err(io::Error::other)?;
        let len = file.metadata()?.len();
        Ok(RotatingLog {
            path: path.to_owned(),
            max_bytes: max_bytes.max(1),
            file,
            len,
        })
    }

    /// Renames the full log to `NAME.1` and continues in a new `NAME`.
    fn rotate(&mut self) -> io::Result<()> {
        match std::fs::rename(&self.path, rotated(&self.path)) {
            // Removed by someone else: a new one starts all the same.
            Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
        self.file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.path)?;
        self.len = 0;
        Ok(())
    }
}

/// A stream that goes to its destination and to a log: a foreground run's output, kept
/// for `kiln logs` with each line's time, as the monitor keeps a detached sandbox's. The
/// log comes first, so a destination that stopped taking output (`| head`) does not cut
/// the log short; a log that fails (a full disk) stops logging, not the run.
pub struct Tee<W> {
    out: W,
    log: Option<lines::Timestamped<RotatingLog>>,
    log_path: PathBuf,
}

impl<W: Write> Tee<W> {
    pub fn new(out: W, log: RotatingLog) -> Tee<W> {
        Tee {
            out,
            log_path: log.path.clone(),
            log: Some(lines::Timestamped::new(log)),
        }
    }
}

impl<W: Write> Write for Tee<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(log) = &mut self.log {
            if let Err(err) = log.write_all(buf) {
                tracing::warn!(
                    "{}: {err}; the rest of the output is not logged",
                    self.log_path.display()
                );
                self.log = None;
            }
        }
        self.out.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl Write for RotatingLog {
    /// Writes as much of `buf` as fits in the current file, rotating it first when it
    /// is full; `write_all` carries the rest over into the next file.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.len >= self.max_bytes {
            self.rotate()?;
        }
        let room = usize::try_from(self.max_bytes - self.len).unwrap_or(usize::MAX);
        let written = self.file.write(&buf[..buf.len().min(room)])?;
        self.len += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Reads a [`RotatingLog`] from its oldest kept byte on, and then what is written to it,
/// across rotations.
#[derive(Debug)]
pub struct LogReader {
    path: PathBuf,
    /// The file being read, once the log exists.
    file: Option<File>,
}

impl LogReader {
    pub fn new(path: &Path) -> LogReader {
        LogReader {
            path: path.to_owned(),
            file: None,
        }
    }

    /// A reader of only what is written to the log from now on (`kiln attach`).
    pub fn at_end(path: &Path) -> io::Result<LogReader> {
        let mut file = open_existing(path)?;
        if let Some(file) = &mut file {
            io::Seek::seek(file, io::SeekFrom::End(0))?;
        }
        Ok(LogReader {
            path: path.to_owned(),
            file,
        })
    }

    /// Copies to `out` everything written to the log since the last call (since the
    /// oldest kept byte on the first call). A reader that falls more than one rotation
    /// behind loses what the log no longer keeps.
    pub fn copy_new(&mut self, out: &mut dyn Write) -> io::Result<()> {
        let mut file = match self.file.take() {
            Some(file) => file,
            None => {
                let Some(current) = open_existing(&self.path)? else {
                    return Ok(());
                };
                // The older file first, unless `current` was rotated into it meanwhile.
                if let Some(mut older) = open_existing(&rotated(&self.path))? {
                    if !same_file(&older, &current)? {
                        io::copy(&mut older, out)?;
                    }
                }
                current
            }
        };
        loop {
            io::copy(&mut file, out)?;
            let current = match open_existing(&self.path)? {
                Some(current) if !same_file(&current, &file)? => current,
                // Not rotated (or the new file is not there yet): done for now.
                _ => break,
            };
            // Rotated: what was written before the rename, then (after two or more
            // rotations) the file between this one and the new one, then the new one.
            io::copy(&mut file, out)?;
            if let Some(mut between) = open_existing(&rotated(&self.path))? {
                if !same_file(&between, &file)? && !same_file(&between, &current)? {
                    io::copy(&mut between, out)?;
                }
            }
            file = current;
        }
        self.file = Some(file);
        Ok(())
    }
}

/// Opens `path` for reading without following a symlink; `None` when it does not exist.
fn open_existing(path: &Path) -> io::Result<Option<File>> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(file) => Ok(Some(file)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

fn same_file(a: &File, b: &File) -> io::Result<bool> {
    let (a, b) = (a.metadata()?, b.metadata()?);
    Ok(a.dev() == b.dev() && a.ino() == b.ino())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Distinct numbered lines, so that a loss or a repeat shows.
    fn lines(from: usize, count: usize) -> Vec<u8> {
        (from..from + count)
            .flat_map(|i| format!("line {i:06}\n").into_bytes())
            .collect()
    }

    #[test]
    fn a_log_never_passes_its_size_and_keeps_the_newest_output() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout.log");
        let mut log = RotatingLog::open(&path, 1000).unwrap();
        // 12 bytes a line: 5000 lines are 60 times the maximum.
        let written = lines(0, 5000);
        for chunk in written.chunks(700) {
            log.write_all(chunk).unwrap();
        }
        let current = std::fs::read(&path).unwrap();
        let older = std::fs::read(rotated(&path)).unwrap();
        assert_eq!(older.len(), 1000);
        assert!(current.len() <= 1000);
        let mut kept = older;
        kept.extend(current);
        assert!(written.ends_with(&kept), "the newest bytes, in order");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 2, "one rotated file only");
        for file in [&path, &rotated(&path)] {
            let mode = std::fs::metadata(file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", file.display());
        }
    }

    /// A destination that took nothing (a closed pipe).
    struct Closed;

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_tee_logs_what_its_destination_takes_and_what_it_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout.log");
        let mut shown = Vec::new();
        let mut tee = Tee::new(&mut shown, RotatingLog::open(&path, 1000).unwrap());
        tee.write_all(b"seen and kept\n").unwrap();
        drop(tee);
        assert_eq!(shown, b"seen and kept\n");
        let mut tee = Tee::new(Closed, RotatingLog::open(&path, 1000).unwrap());
        assert!(tee.write_all(b"kept only\n").is_err());
        // Each line behind its time, as the monitor writes them.
        let logged = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = logged.lines().map(|l| &l[lines::STAMP_LEN..]).collect();
        assert_eq!(lines, ["seen and kept", "kept only"], "{logged}");
        assert!(logged.starts_with("20"), "{logged}");
    }

    #[test]
    fn a_reader_at_the_end_sees_only_new_output() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout.log");
        let mut log = RotatingLog::open(&path, 1000).unwrap();
        log.write_all(b"before\n").unwrap();
        let mut reader = LogReader::at_end(&path).unwrap();
        log.write_all(b"after\n").unwrap();
        let mut seen = Vec::new();
        reader.copy_new(&mut seen).unwrap();
        assert_eq!(seen, b"after\n");
    }

    #[test]
    fn a_reopened_log_counts_what_it_holds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stderr.log");
        RotatingLog::open(&path, 10)
            .unwrap()
            .write_all(b"12345678")
            .unwrap();
        RotatingLog::open(&path, 10)
            .unwrap()
            .write_all(b"abcd")
            .unwrap();
        assert_eq!(std::fs::read(rotated(&path)).unwrap(), b"12345678ab");
        assert_eq!(std::fs::read(&path).unwrap(), b"cd");
    }

    #[test]
    fn a_symlink_in_place_of_a_log_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let path = dir.path().join("stdout.log");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        assert!(RotatingLog::open(&path, 100).is_err());
        assert!(LogReader::new(&path).copy_new(&mut Vec::new()).is_err());

        // Nor when rotating: the symlink is renamed, not written through, and the new
        // log is a file of its own.
        let other = dir.path().join("stderr.log");
        let mut log = RotatingLog::open(&other, 4).unwrap();
        log.write_all(b"1234").unwrap();
        std::fs::rename(&other, dir.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(&victim, &other).unwrap();
        log.write_all(b"5").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert_eq!(std::fs::read(&other).unwrap(), b"5");
    }

    #[test]
    fn a_reader_follows_rotations_without_loss_or_repeat() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout.log");
        let mut reader = LogReader::new(&path);
        let mut read = Vec::new();
        reader.copy_new(&mut read).unwrap();
        assert!(read.is_empty(), "no log yet");

        let mut log = RotatingLog::open(&path, 120).unwrap();
        let mut written = Vec::new();
        // Rounds of 0 to 2 rotations between reads (10 lines are one rotation).
        for (round, count) in [3, 8, 10, 15, 20, 1, 0, 19].into_iter().enumerate() {
            let chunk = lines(round * 100, count);
            log.write_all(&chunk).unwrap();
            written.extend(chunk);
            reader.copy_new(&mut read).unwrap();
            assert_eq!(read, written, "after round {round}");
        }

        // A new reader starts at the oldest kept byte.
        let mut fresh = Vec::new();
        LogReader::new(&path).copy_new(&mut fresh).unwrap();
        assert!(fresh.len() > 120 && written.ends_with(&fresh));
    }
}
