//! The host-guest channel: the kiln protocol over a virtio-serial port.
//!
//! Writes go through one lock so frames from several threads (stdout and stderr pumps,
//! the reaper's result) never interleave. The panic hook cannot take that lock (the
//! panicking thread may hold it), so it writes its last frame on the raw descriptor.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use kiln_protocol::{read_frame, write_frame, Frame, ProtocolError};

use crate::sys;

/// How long the host has to announce the channel's port after init starts.
const PORT_WAIT: Duration = Duration::from_secs(10);

/// The channel's descriptor for the panic hook; -1 before the channel is open.
static RAW_FD: AtomicI32 = AtomicI32::new(-1);

#[derive(Debug)]
pub struct Channel {
    writer: Mutex<File>,
    reader: Mutex<File>,
    /// How many `Shutdown`s the host sent; it sends one when it has the main result.
    host_shutdowns: Mutex<u64>,
    host_shutdown_seen: Condvar,
}

impl Channel {
    /// Opens the virtio-serial port named `port`, waiting for the host to announce it.
    pub fn open(port: &str) -> io::Result<Channel> {
        let node = sys::wait_for(PORT_WAIT, || {
            sys::find_port(port, Path::new("/sys"), Path::new("/dev"))
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no virtio-serial port named {port:?} after {} s",
                    PORT_WAIT.as_secs()
                ),
            )
        })?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&node)
            .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", node.display())))?;
        RAW_FD.store(file.as_raw_fd(), Ordering::SeqCst);
        Ok(Channel {
            reader: Mutex::new(file.try_clone()?),
            writer: Mutex::new(file),
            host_shutdowns: Mutex::new(0),
            host_shutdown_seen: Condvar::new(),
        })
    }

    /// Counts a `Shutdown` from the host (called by the thread reading frames).
    pub fn note_host_shutdown(&self) {
        *self
            .host_shutdowns
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) += 1;
        self.host_shutdown_seen.notify_all();
    }

    /// How many `Shutdown`s the host sent so far.
    pub fn host_shutdowns(&self) -> u64 {
        *self
            .host_shutdowns
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits at most `limit` for the host to send more than `seen` `Shutdown`s; whether
    /// it did.
    pub fn wait_for_host_shutdown(&self, seen: u64, limit: Duration) -> bool {
        let count = self
            .host_shutdowns
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (count, _) = self
            .host_shutdown_seen
            .wait_timeout_while(count, limit, |count| *count <= seen)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *count > seen
    }

    /// Sends one frame.
    pub fn send(&self, frame: &Frame) -> Result<(), ProtocolError> {
        let mut writer = self
            .writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        write_frame(&mut *writer, frame)
    }

    /// Receives the next frame; `Ok(None)` when the host closed the channel. With a
    /// `deadline`, waiting longer than it for the frame to start is an error.
    pub fn receive(&self, deadline: Option<Duration>) -> Result<Option<Frame>, ProtocolError> {
        let mut reader = self
            .reader
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match deadline {
            None => read_frame(&mut *reader),
            Some(limit) => read_frame(&mut DeadlineReader {
                file: &reader,
                until: Instant::now() + limit,
            }),
        }
    }
}

/// A reader whose every read first waits at most until `until` for data.
struct DeadlineReader<'a> {
    file: &'a File,
    until: Instant,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        let mut pollfd = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = left.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: one valid pollfd.
        match unsafe { libc::poll(&mut pollfd, 1, millis) } {
            -1 => Err(io::Error::last_os_error()),
            0 => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the host sent nothing before the deadline",
            )),
            _ => (&mut &*self.file).read(buf),
        }
    }
}

/// Writes `frame` on the channel without taking its lock: for the panic hook only.
pub fn send_from_panic(frame: &Frame) {
    let fd: RawFd = RAW_FD.load(Ordering::SeqCst);
    if fd < 0 {
        return;
    }
    // SAFETY: the descriptor stays open for init's whole life; ManuallyDrop keeps this
    // temporary File from closing it.
    let mut file = ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
    let _ = write_frame(&mut *file, frame);
}
