//! The decision log a sandbox keeps: one JSON line per decision (kiln-policy's
//! [`DecisionRecord`]) appended to a file, which is rotated to `FILE.1` once it reaches
//! its bound, so a chatty guest cannot fill the host's disk.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use kiln_policy::{DecisionRecord, Verdict};

use crate::egress::DecisionLog;

/// Called with each denial (a foreground `kiln run` prints them).
pub type DenialNotice = Box<dyn Fn(&DecisionRecord) + Send + Sync>;

/// Appends decisions to a file of at most `max_bytes` (then `FILE.1` holds the previous
/// `max_bytes`).
pub struct JsonLinesLog {
    path: PathBuf,
    max_bytes: u64,
    file: Mutex<(File, u64)>,
    on_denial: Option<DenialNotice>,
}

impl JsonLinesLog {
    /// Opens (or creates, owner-only) `path` for appending.
    pub fn open(
        path: &Path,
        max_bytes: u64,
        on_denial: Option<DenialNotice>,
    ) -> std::io::Result<Self> {
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(JsonLinesLog {
            path: path.to_owned(),
            max_bytes,
            file: Mutex::new((file, size)),
            on_denial,
        })
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc_nofollow())
        .open(path)
}

/// `O_NOFOLLOW`: the log is kiln's own file, never a link planted in its place.
fn libc_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

impl DecisionLog for JsonLinesLog {
    fn record(&self, record: &DecisionRecord) {
        if record.decision == Verdict::Deny && record.bytes_up.is_none() {
            if let Some(notice) = &self.on_denial {
                notice(record);
            }
        }
        let mut line = record.to_json_line();
        line.push('\n');
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if guard.1 + line.len() as u64 > self.max_bytes {
            let rotated = self.path.with_extension("log.1");
            let reopened =
                std::fs::rename(&self.path, rotated).and_then(|()| open_append(&self.path));
            match reopened {
                Ok(file) => *guard = (file, 0),
                Err(err) => {
                    tracing::warn!(path = %self.path.display(), %err, "rotating the network log")
                }
            }
        }
        match guard.0.write_all(line.as_bytes()) {
            Ok(()) => guard.1 += line.len() as u64,
            Err(err) => {
                tracing::warn!(path = %self.path.display(), %err, "writing the network log")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_policy::{Decision, DenyReason, FlowProtocol};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn records_are_lines_the_log_rotates_and_denials_are_told() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("network.log");
        let told = Arc::new(AtomicUsize::new(0));
        let counter = told.clone();
        let log = JsonLinesLog::open(
            &path,
            1000,
            Some(Box::new(move |_| {
                counter.fetch_add(1, Ordering::SeqCst);
            })),
        )
        .unwrap();
        let dst = "198.18.0.9:80".parse().unwrap();
        let deny = Decision::Deny(DenyReason::HostGateway { port: 80 });
        let record = DecisionRecord::new("t".into(), "sb", FlowProtocol::Tcp, dst, &deny).unwrap();
        for _ in 0..20 {
            log.record(&record);
        }
        assert_eq!(told.load(Ordering::SeqCst), 20);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() <= 1000, "{}", text.len());
        for line in text.lines() {
            let back: DecisionRecord = serde_json::from_str(line).unwrap();
            assert_eq!(back, record);
        }
        assert!(dir.path().join("network.log.1").exists());
    }
}
