//! `kiln top`, `kiln stats` and `kiln cp`: kiln-init's own tasks
//! ([`kiln_protocol::GuestTask`]) in an exec session of a running sandbox, their output
//! bounded and checked, since everything a guest sends is hostile.
//!
//! A copy out of the guest is a tar archive unpacked on the host into a private staging
//! directory beside the destination and renamed into place: only files, directories and
//! symlinks are taken, no entry lands outside the staging directory (no `..`, no absolute
//! names, nothing through a symlink), set-id bits and owners are dropped, and the archive
//! may not pass [`MAX_COPY_BYTES`]. A copy into the guest runs as the sandbox user there.

use std::fs;
use std::io::{self, BufRead, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use kiln_protocol::{GuestStats, GuestTask, ProcessInfo, WorkloadResult};
use serde::Serialize;

use crate::client::{exec_task, ExecInput, ExecOutput, ExecSession};
use crate::error::{Error, ErrorKind};
use crate::state::{SandboxDir, SandboxRecord, StateError, RECORD_FILE};

/// The most a task's listing (`top`) may send: far above any real process table.
const MAX_LISTING_BYTES: usize = 16 << 20;

/// The longest line of a stats sample.
const MAX_SAMPLE_LINE: usize = 4096;

/// The most of a task's stderr kept for its error message.
const MAX_TASK_ERROR: usize = 4096;

/// What a task may send after the end of what it was read for (a tar archive's padding).
const MAX_TRAILING_BYTES: u64 = 1 << 20;

/// The largest archive `kiln cp` takes out of a guest.
pub const MAX_COPY_BYTES: u64 = 16 << 30;

/// The most entries `kiln cp` takes out of a guest.
pub const MAX_COPY_ENTRIES: u64 = 1_000_000;

/// Seconds between the stats samples of a sandbox.
const STATS_INTERVAL_MS: u32 = 1000;

/// A stream of stats lasts at most a day of samples; `kiln stats` is run again after that.
const STATS_STREAM_SAMPLES: u32 = 86_400;

/// A task that failed in the guest or sent what it may not.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("sandbox {id}: {what} failed in the guest: {message}")]
    Failed {
        id: String,
        what: &'static str,
        message: String,
    },
    #[error("sandbox {id}: the guest's {what} is not valid: {reason}")]
    Invalid {
        id: String,
        what: &'static str,
        reason: String,
    },
    #[error("invalid copy {value:?}: {reason}")]
    CopyArguments { value: String, reason: String },
    #[error("copying {what}: {source}")]
    Copy {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl From<TaskError> for Error {
    fn from(err: TaskError) -> Self {
        let kind = match err {
            TaskError::CopyArguments { .. } => ErrorKind::InvalidInput,
            TaskError::Failed { .. } | TaskError::Copy { .. } => ErrorKind::FailedPrecondition,
            TaskError::Invalid { .. } => ErrorKind::Internal,
        };
        Error::new(kind, err)
    }
}

/// The running sandbox `id_or_name` and a session running `task` in it.
fn start(
    root: &Path,
    id_or_name: &str,
    task: GuestTask,
) -> Result<(SandboxDir, SandboxRecord, ExecSession), Error> {
    let sandbox = SandboxDir::open(root, id_or_name)?;
    let record: SandboxRecord = sandbox.read_json(RECORD_FILE)?;
    if !sandbox.monitor_alive() {
        return Err(StateError::NotRunning(sandbox.id().to_owned()).into());
    }
    let session = exec_task(&sandbox, &record, task)?;
    Ok((sandbox, record, session))
}

/// A task session's stdout as a reader; stderr is kept (bounded) and the result noted.
struct TaskOutput {
    session: ExecSession,
    pending: Vec<u8>,
    at: usize,
    stderr: Vec<u8>,
    result: Option<WorkloadResult>,
}

impl TaskOutput {
    fn new(session: ExecSession) -> Self {
        TaskOutput {
            session,
            pending: Vec::new(),
            at: 0,
            stderr: Vec::new(),
            result: None,
        }
    }

    /// Reads to the session's end (dropping at most [`MAX_TRAILING_BYTES`] of further
    /// stdout) and checks its result.
    fn finish(mut self, id: &str, what: &'static str) -> Result<(), Error> {
        let trailing = io::copy(
            &mut (&mut self).take(MAX_TRAILING_BYTES + 1),
            &mut io::sink(),
        )
        .map_err(|source| TaskError::Copy {
            what: what.into(),
            source,
        })?;
        if trailing > MAX_TRAILING_BYTES {
            return Err(TaskError::Invalid {
                id: id.into(),
                what,
                reason: format!("more than {MAX_TRAILING_BYTES} bytes after its end"),
            }
            .into());
        }
        let message = String::from_utf8_lossy(&self.stderr).trim().to_owned();
        match self.result {
            Some(WorkloadResult::Exited { code: 0 }) => Ok(()),
            Some(result) => Err(TaskError::Failed {
                id: id.into(),
                what,
                message: if message.is_empty() {
                    format!("{result:?}")
                } else {
                    message
                },
            }
            .into()),
            None => Err(TaskError::Failed {
                id: id.into(),
                what,
                message: "no result".into(),
            }
            .into()),
        }
    }
}

impl Read for TaskOutput {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at == self.pending.len() {
            if self.result.is_some() {
                return Ok(0);
            }
            match self.session.next().map_err(io::Error::other)? {
                ExecOutput::Stdout(bytes) => {
                    self.pending = bytes;
                    self.at = 0;
                }
                ExecOutput::Stderr(bytes) => {
                    let room = MAX_TASK_ERROR.saturating_sub(self.stderr.len());
                    self.stderr.extend(&bytes[..bytes.len().min(room)]);
                }
                ExecOutput::Exited(result) => self.result = Some(result),
            }
        }
        let n = buf.len().min(self.pending.len() - self.at);
        buf[..n].copy_from_slice(&self.pending[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The processes of the running sandbox `id_or_name`, by pid (`kiln top`).
pub fn top(root: &Path, id_or_name: &str) -> Result<Vec<ProcessInfo>, Error> {
    let (sandbox, _, session) = start(root, id_or_name, GuestTask::Processes)?;
    let id = sandbox.id();
    let mut output = TaskOutput::new(session);
    let mut listing = Vec::new();
    (&mut output)
        .take(MAX_LISTING_BYTES as u64 + 1)
        .read_to_end(&mut listing)
        .map_err(|source| TaskError::Copy {
            what: "the process listing".into(),
            source,
        })?;
    if listing.len() > MAX_LISTING_BYTES {
        return Err(TaskError::Invalid {
            id: id.into(),
            what: "process listing",
            reason: format!("more than {MAX_LISTING_BYTES} bytes"),
        }
        .into());
    }
    output.finish(id, "listing the processes")?;
    let mut processes = listing
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .map(serde_json::from_slice::<ProcessInfo>)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TaskError::Invalid {
            id: id.into(),
            what: "process listing",
            reason: e.to_string(),
        })?;
    processes.sort_by_key(|p| p.pid);
    Ok(processes)
}

/// One sandbox's use of its VM, as `kiln stats` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SandboxStats {
    pub id: String,
    pub name: Option<String>,
    /// CPU time used over the last interval, in percent of one CPU (as docker: up to
    /// 100 times the CPUs).
    pub cpu_percent: f64,
    pub memory_used_bytes: u64,
    pub memory_limit_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub processes: u32,
}

impl SandboxStats {
    fn from_samples(id: &str, name: Option<String>, before: &GuestStats, now: &GuestStats) -> Self {
        let total = now.cpu_total_ticks.saturating_sub(before.cpu_total_ticks);
        let busy = now.cpu_busy_ticks.saturating_sub(before.cpu_busy_ticks);
        let cpu_percent = if total == 0 {
            0.0
        } else {
            busy as f64 / total as f64 * f64::from(now.online_cpus.max(1)) * 100.0
        };
        SandboxStats {
            id: id.into(),
            name,
            cpu_percent,
            memory_used_bytes: now.memory_used_bytes,
            memory_limit_bytes: now.memory_total_bytes,
            net_rx_bytes: now.net_rx_bytes,
            net_tx_bytes: now.net_tx_bytes,
            processes: now.processes,
        }
    }
}

/// What a sandbox's sampling thread hands over.
enum Sampled {
    Stats(usize, SandboxStats),
    Failed(Error),
}

/// Samples the running sandboxes `ids` (all running ones when empty) a second apart and
/// calls `report` with every sandbox's latest figures once each has a new one; with
/// `stream` false, once only. `report` returns false to stop.
pub fn stats(
    root: &Path,
    ids: &[String],
    stream: bool,
    report: &mut dyn FnMut(&[SandboxStats]) -> bool,
) -> Result<(), Error> {
    let ids: Vec<String> = if ids.is_empty() {
        crate::lifecycle::list(root)?
            .into_iter()
            .filter(|info| info.status == crate::state::Status::Running)
            .map(|info| info.id)
            .collect()
    } else {
        ids.to_vec()
    };
    // Two samples make the first CPU figure.
    let samples = if stream { STATS_STREAM_SAMPLES } else { 2 };
    let task = GuestTask::Stats {
        samples,
        interval_ms: STATS_INTERVAL_MS,
    };
    let mut sessions = Vec::new();
    for id in &ids {
        let (sandbox, record, session) = start(root, id, task.clone())?;
        sessions.push((sandbox.id().to_owned(), record.name, session));
    }
    if sessions.is_empty() {
        report(&[]);
        return Ok(());
    }
    let (tx, rx) = mpsc::channel();
    for (index, (id, name, session)) in sessions.into_iter().enumerate() {
        let tx = tx.clone();
        std::thread::spawn(move || sample_sandbox(index, &id, name, session, &tx));
    }
    drop(tx);
    let mut latest: Vec<Option<SandboxStats>> = vec![None; ids.len()];
    let mut fresh = vec![false; ids.len()];
    for sampled in rx {
        match sampled {
            Sampled::Failed(err) => return Err(err),
            Sampled::Stats(index, stats) => {
                latest[index] = Some(stats);
                fresh[index] = true;
            }
        }
        if fresh.iter().all(|f| *f) {
            let rows: Vec<SandboxStats> = latest.iter().flatten().cloned().collect();
            if !report(&rows) || !stream {
                return Ok(());
            }
            fresh.iter_mut().for_each(|f| *f = false);
        }
    }
    Ok(())
}

/// Reads one sandbox's samples and sends each figure after the first sample.
fn sample_sandbox(
    index: usize,
    id: &str,
    name: Option<String>,
    session: ExecSession,
    tx: &mpsc::Sender<Sampled>,
) {
    let mut output = io::BufReader::new(TaskOutput::new(session));
    let mut before: Option<GuestStats> = None;
    loop {
        let mut line = Vec::new();
        let read = (&mut output)
            .take(MAX_SAMPLE_LINE as u64)
            .read_until(b'\n', &mut line);
        let sample = match read {
            Ok(0) => return,
            Ok(_) => serde_json::from_slice::<GuestStats>(&line).map_err(|e| {
                Error::from(TaskError::Invalid {
                    id: id.into(),
                    what: "stats sample",
                    reason: e.to_string(),
                })
            }),
            Err(e) => Err(Error::from(TaskError::Copy {
                what: "stats".into(),
                source: e,
            })),
        };
        let sample = match sample {
            Ok(sample) => sample,
            Err(err) => {
                let _ = tx.send(Sampled::Failed(err));
                return;
            }
        };
        if let Some(before) = &before {
            let stats = SandboxStats::from_samples(id, name.clone(), before, &sample);
            if tx.send(Sampled::Stats(index, stats)).is_err() {
                return;
            }
        }
        before = Some(sample);
    }
}

/// One side of a `kiln cp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyEndpoint {
    Host(PathBuf),
    /// A sandbox (id or name) and an absolute path in it.
    Guest {
        sandbox: String,
        path: String,
    },
}

impl CopyEndpoint {
    /// `SANDBOX:/PATH` is in a sandbox (SANDBOX holds no `/`); anything else is a host
    /// path. A guest path must be absolute and hold no `..`.
    pub fn parse(text: &str) -> Result<CopyEndpoint, Error> {
        let bad = |reason: &str| TaskError::CopyArguments {
            value: text.into(),
            reason: reason.into(),
        };
        match text.split_once(':') {
            Some((sandbox, path)) if !sandbox.is_empty() && !sandbox.contains('/') => {
                let normal = path.starts_with('/')
                    && !path.contains('\0')
                    && Path::new(path)
                        .components()
                        .all(|c| !matches!(c, Component::ParentDir));
                if !normal {
                    return Err(
                        bad("expected SANDBOX:/PATH with PATH absolute and without '..'").into(),
                    );
                }
                Ok(CopyEndpoint::Guest {
                    sandbox: sandbox.into(),
                    path: path.into(),
                })
            }
            _ if text.is_empty() => Err(bad("the path is empty").into()),
            _ if text == "-" => Err(bad(
                "a tar stream on stdin or stdout is not supported; give a host path",
            )
            .into()),
            _ => Ok(CopyEndpoint::Host(PathBuf::from(text))),
        }
    }
}

/// `kiln cp SRC DEST`: exactly one side is in a sandbox. A directory destination that
/// exists receives the source under its own name; otherwise the copy becomes DEST.
pub fn copy(root: &Path, source: &CopyEndpoint, dest: &CopyEndpoint) -> Result<(), Error> {
    match (source, dest) {
        (CopyEndpoint::Guest { sandbox, path }, CopyEndpoint::Host(host)) => {
            copy_out(root, sandbox, path, host)
        }
        (CopyEndpoint::Host(host), CopyEndpoint::Guest { sandbox, path }) => {
            copy_in(root, host, sandbox, path)
        }
        _ => Err(TaskError::CopyArguments {
            value: format!("{source:?} -> {dest:?}"),
            reason: "exactly one of SRC and DEST must be SANDBOX:/PATH".into(),
        }
        .into()),
    }
}

fn copy_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| TaskError::Copy { what, source }.into()
}

/// Reads at most `limit` bytes, then fails (a reader that stops quietly would cut an
/// archive short without anyone noticing).
struct Bounded<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left = self.left.checked_sub(n as u64).ok_or_else(|| {
            io::Error::other(format!("the archive passes {MAX_COPY_BYTES} bytes"))
        })?;
        Ok(n)
    }
}

fn copy_out(root: &Path, sandbox: &str, path: &str, host: &Path) -> Result<(), Error> {
    let (target_dir, final_path) = destination(host)?;
    let (sandbox, _, session) = start(
        root,
        sandbox,
        GuestTask::ArchiveOut {
            path: path.to_owned(),
        },
    )?;
    let id = sandbox.id().to_owned();
    let staging = Staging::create(&target_dir)?;
    let mut output = TaskOutput::new(session);
    let unpacked = unpack_hostile(
        Bounded {
            inner: &mut output,
            left: MAX_COPY_BYTES,
        },
        &staging.0,
    );
    // The guest's own failure (no such file, say) says more than the archive's end;
    // otherwise a failed unpack ends the session (and the guest's task) unread.
    if unpacked.is_ok() || output.result.is_some() {
        output.finish(&id, "archiving")?;
    }
    let name = unpacked?;
    let final_path = final_path.unwrap_or_else(|| target_dir.join(&name));
    fs::rename(staging.0.join(&name), &final_path)
        .map_err(copy_error(format!("to {}", final_path.display())))
}

/// Where a copy to `host` unpacks (an existing directory, or the parent of a new name)
/// and, for a new name, the path it becomes.
fn destination(host: &Path) -> Result<(PathBuf, Option<PathBuf>), Error> {
    if fs::metadata(host).is_ok_and(|m| m.is_dir()) {
        return Ok((host.to_owned(), None));
    }
    let parent = match host.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    if !fs::metadata(&parent).is_ok_and(|m| m.is_dir()) {
        return Err(TaskError::CopyArguments {
            value: host.display().to_string(),
            reason: format!("{} is not a directory", parent.display()),
        }
        .into());
    }
    Ok((parent, Some(host.to_owned())))
}

/// A private directory for an unpacking copy, removed with whatever is left in it.
struct Staging(PathBuf);

impl Staging {
    fn create(dir: &Path) -> Result<Staging, Error> {
        let mut random = [0u8; 6];
        fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut random))
            .map_err(copy_error("reading /dev/urandom"))?;
        let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let path = dir.join(format!(".kiln-cp-{hex}"));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(copy_error(format!("creating {}", path.display())))?;
        Ok(Staging(path))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // remove_dir_all does not follow symlinks.
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Unpacks a guest's archive into `into`, which must hold one top entry; returns its name.
fn unpack_hostile(input: impl Read, into: &Path) -> Result<String, Error> {
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(true);
    archive.set_preserve_mtime(true);
    archive.set_preserve_ownerships(false);
    archive.set_unpack_xattrs(false);
    // Set-id bits of guest content must never reach the host.
    archive.set_mask(0o6000);
    let mut top: Option<String> = None;
    let mut directories: Vec<(PathBuf, u64)> = Vec::new();
    let entries = archive
        .entries()
        .map_err(copy_error("reading the archive"))?;
    for (count, entry) in entries.enumerate() {
        let mut entry = entry.map_err(copy_error("reading the archive"))?;
        let entry_path = entry
            .path()
            .map_err(copy_error("an entry's name"))?
            .into_owned();
        let shown = entry_path.display().to_string();
        let refuse = |reason: &str| -> Error {
            TaskError::Copy {
                what: format!("entry {shown:?}"),
                source: io::Error::other(reason.to_owned()),
            }
            .into()
        };
        if count as u64 >= MAX_COPY_ENTRIES {
            return Err(refuse(&format!("more than {MAX_COPY_ENTRIES} entries")));
        }
        let mut components = entry_path.components();
        if entry_path
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(refuse("holds '..' or is absolute"));
        }
        let Some(Component::Normal(first)) = components.next() else {
            return Err(refuse("has no name"));
        };
        let first = first.to_string_lossy().into_owned();
        match &top {
            None => top = Some(first),
            Some(name) if *name == first => {}
            Some(_) => return Err(refuse("a second top entry; the copy is of one path")),
        }
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
            return Err(refuse("not a file, directory or symlink"));
        }
        if kind.is_dir() {
            let mtime = entry.header().mtime().unwrap_or(0);
            directories.push((into.join(&entry_path), mtime));
        }
        // unpack_in refuses a path through a symlink it unpacked and anything outside.
        let inside = entry
            .unpack_in(into)
            .map_err(copy_error(format!("unpacking {shown:?}")))?;
        if !inside {
            return Err(refuse("would land outside the destination"));
        }
    }
    // Entries unpacked into a directory changed its mtime: the archive's, last.
    for (dir, mtime) in directories.iter().rev() {
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(mtime.to_owned());
        fs::File::open(dir)
            .and_then(|d| d.set_modified(time))
            .map_err(copy_error(format!("the mtime of {}", dir.display())))?;
    }
    top.ok_or_else(|| {
        TaskError::Copy {
            what: "the archive".into(),
            source: io::Error::other("it is empty"),
        }
        .into()
    })
}

/// The stdin of a task session as a writer.
struct TaskInput(ExecInput);

impl Write for TaskInput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.stdin(buf).map_err(io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn copy_in(root: &Path, host: &Path, sandbox: &str, path: &str) -> Result<(), Error> {
    let meta = fs::symlink_metadata(host).map_err(copy_error(host.display().to_string()))?;
    let name = host
        .file_name()
        .filter(|n| *n != ".." && *n != ".")
        .ok_or_else(|| TaskError::CopyArguments {
            value: host.display().to_string(),
            reason: "expected a path that ends in a name".into(),
        })?
        .to_owned();
    let (sandbox, _, session) = start(
        root,
        sandbox,
        GuestTask::ArchiveIn {
            path: path.to_owned(),
        },
    )?;
    let input = session.input();
    let host = host.to_owned();
    let sender = std::thread::spawn(move || -> io::Result<()> {
        let mut archive = tar::Builder::new(io::BufWriter::new(TaskInput(input.clone())));
        archive.follow_symlinks(false);
        if meta.is_dir() {
            archive.append_dir_all(&name, &host)?;
        } else {
            archive.append_path_with_name(&host, &name)?;
        }
        archive.into_inner()?.flush()?;
        input.close_stdin().map_err(io::Error::other)
    });
    let id = sandbox.id().to_owned();
    let finished = TaskOutput::new(session).finish(&id, "unpacking");
    let sent = sender.join().expect("the archive sender does not panic");
    finished?;
    sent.map_err(copy_error("the archive"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        build(&mut builder);
        builder.into_inner().unwrap()
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        header.set_mtime(1_000_000_000);
        header
    }

    #[test]
    fn a_file_and_a_directory_keep_modes_and_mtimes_without_set_id_bits() {
        let bytes = archive(|b| {
            let mut dir = header(tar::EntryType::Directory, 0o750, 0);
            b.append_data(&mut dir, "d", io::empty()).unwrap();
            let mut file = header(tar::EntryType::Regular, 0o4755, 2);
            b.append_data(&mut file, "d/run", &b"hi"[..]).unwrap();
        });
        let into = tempfile::tempdir().unwrap();
        assert_eq!(unpack_hostile(&bytes[..], into.path()).unwrap(), "d");
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let file = fs::metadata(into.path().join("d/run")).unwrap();
        assert_eq!(file.permissions().mode() & 0o7777, 0o755);
        assert_eq!(file.mtime(), 1_000_000_000);
        let dir = fs::metadata(into.path().join("d")).unwrap();
        assert_eq!(dir.permissions().mode() & 0o7777, 0o750);
        assert_eq!(dir.mtime(), 1_000_000_000);
    }

    #[test]
    fn hostile_archives_are_refused() {
        let through_link = archive(|b| {
            let mut link = header(tar::EntryType::Symlink, 0o777, 0);
            b.append_link(&mut link, "d", "/etc").unwrap();
            let mut file = header(tar::EntryType::Regular, 0o644, 1);
            b.append_data(&mut file, "d/passwd", &b"x"[..]).unwrap();
        });
        let two_tops = archive(|b| {
            let mut file = header(tar::EntryType::Regular, 0o644, 1);
            b.append_data(&mut file, "a", &b"x"[..]).unwrap();
            let mut file = header(tar::EntryType::Regular, 0o644, 1);
            b.append_data(&mut file, "b", &b"x"[..]).unwrap();
        });
        let device = archive(|b| {
            let mut node = header(tar::EntryType::Char, 0o666, 0);
            b.append_data(&mut node, "null", io::empty()).unwrap();
        });
        for (bytes, says) in [
            (through_link, "outside of destination"),
            (two_tops, "a second top entry"),
            (device, "not a file, directory or symlink"),
        ] {
            let into = tempfile::tempdir().unwrap();
            let error = unpack_hostile(&bytes[..], into.path())
                .unwrap_err()
                .to_string();
            assert!(error.contains(says), "{error}");
        }
        // A name with '..' is refused before anything is written (tar's builder will not
        // write one, so the header is set by hand).
        let mut header = header(tar::EntryType::Regular, 0o644, 1);
        header.as_old_mut().name[..5].copy_from_slice(b"../x\0");
        header.set_cksum();
        let mut bytes = header.as_bytes().to_vec();
        bytes.extend([b'x'; 512]);
        bytes.extend([0; 1024]);
        let into = tempfile::tempdir().unwrap();
        let error = unpack_hostile(&bytes[..], into.path())
            .unwrap_err()
            .to_string();
        assert!(error.contains("'..'"), "{error}");
    }

    #[test]
    fn an_archive_past_the_bound_is_an_error_not_a_short_copy() {
        let mut bounded = Bounded {
            inner: &[7u8; 100][..],
            left: 60,
        };
        let mut read = Vec::new();
        let error = bounded.read_to_end(&mut read).unwrap_err();
        assert!(error.to_string().contains("passes"), "{error}");
    }

    #[test]
    fn copy_endpoints() {
        assert_eq!(
            CopyEndpoint::parse("web:/etc/hosts").unwrap(),
            CopyEndpoint::Guest {
                sandbox: "web".into(),
                path: "/etc/hosts".into()
            }
        );
        assert_eq!(
            CopyEndpoint::parse("./a:b").unwrap(),
            CopyEndpoint::Host("./a:b".into())
        );
        for bad in ["web:etc", "web:/a/../b", "", "-"] {
            assert!(CopyEndpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cpu_percent_is_of_one_cpu() {
        let sample = |busy, total| GuestStats {
            cpu_busy_ticks: busy,
            cpu_total_ticks: total,
            online_cpus: 2,
            memory_used_bytes: 1,
            memory_total_bytes: 2,
            net_rx_bytes: 3,
            net_tx_bytes: 4,
            processes: 5,
        };
        let stats = SandboxStats::from_samples("x", None, &sample(0, 0), &sample(50, 200));
        assert_eq!(stats.cpu_percent, 50.0);
    }
}
