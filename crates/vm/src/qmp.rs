//! How the guest ended, from QEMU itself: its machine protocol (QMP) on a socket pair that
//! only kiln and this QEMU hold.
//!
//! Everything the guest writes to its console, the workload included, lands in the same
//! log as the kernel's messages, so no text there can say whether the guest kernel
//! panicked. QEMU's `SHUTDOWN` event can: its `reason` is `guest-shutdown` for a power-off
//! and `guest-reset` for a reset, which with `-no-reboot` also ends QEMU. QEMU starts
//! paused (`-S`) and runs the guest only after kiln has negotiated the protocol and asked
//! it to continue, so no event can be missed.
//!
//! A guest that KVM cannot run (a nested host's "KVM internal error") does not end QEMU:
//! QEMU prints the error and stops the VM in its `internal-error` state. Kiln never
//! pauses a VM it runs, so a `STOP` is asked about, and a VM stopped that way is quit at
//! once: the caller sees QEMU exit within milliseconds of its failure, with the error in
//! its log, instead of waiting out a deadline.

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Instant;

use serde_json::Value;

use crate::GuestEnd;

/// The longest QMP line kept; QEMU's replies and events here are a few hundred bytes, and
/// a longer line is skipped rather than buffered.
const MAX_LINE: u64 = 64 * 1024;

/// Why the handshake with QEMU's monitor failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("QEMU closed its monitor socket")]
    Closed,
    #[error("QEMU did not answer on its monitor socket in time")]
    Silent,
    #[error("QEMU refused {command}: {reply}")]
    Refused {
        command: &'static str,
        reply: String,
    },
    #[error("unexpected greeting {0:?}")]
    Greeting(String),
}

/// A socket pair for QEMU's monitor, before QEMU starts.
pub struct Monitor {
    host: UnixStream,
    vmm: OwnedFd,
}

impl Monitor {
    /// Both ends are close-on-exec: only the QEMU that [`Monitor::add_to`] prepares
    /// inherits its end, not another child spawned meanwhile.
    pub fn new() -> io::Result<Monitor> {
        let (host, vmm) = UnixStream::pair()?;
        Ok(Monitor {
            host,
            vmm: vmm.into(),
        })
    }

    /// The descriptor QEMU gets, which it must inherit.
    pub fn vmm_fd(&self) -> RawFd {
        self.vmm.as_raw_fd()
    }

    /// Makes `command` (a QEMU) start paused with its monitor on this pair's other end.
    pub fn add_to(&self, command: &mut Command) {
        let fd = self.vmm.as_raw_fd();
        command.args([
            "-S",
            "-chardev",
            &format!("socket,id=kiln-qmp,fd={fd}"),
            "-mon",
            "chardev=kiln-qmp,mode=control",
        ]);
        // SAFETY: the closure runs in the forked child before exec and only calls fcntl,
        // which is async-signal-safe; `fd` is open there (the parent holds it until after
        // the spawn).
        unsafe {
            command.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Once QEMU runs: negotiates the protocol, lets the guest run, and reports on the
    /// returned channel the guest's end when QEMU announces it. Fails when QEMU does not
    /// get that far by `deadline`.
    pub fn start(self, deadline: Instant) -> Result<Receiver<GuestEnd>, QmpError> {
        // Only QEMU may hold its end now, so the socket ends when QEMU does.
        drop(self.vmm);
        let mut writer = self.host.try_clone()?;
        let mut reader = Lines::new(self.host);
        let greeting = reader.next_before(deadline)?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Greeting(greeting.to_string()));
        }
        let mut early_end = None;
        for command in ["qmp_capabilities", "cont"] {
            writeln!(writer, "{{\"execute\":\"{command}\"}}")?;
            early_end = early_end.or(reader.reply_before(command, deadline)?);
        }
        let (reports, ends) = mpsc::channel();
        match early_end {
            Some(end) => {
                let _ = reports.send(end);
            }
            None => {
                std::thread::spawn(move || report_guest_end(reader, writer, reports));
            }
        }
        Ok(ends)
    }
}

/// Reads QEMU's events until it says how the guest ended or the socket ends, and quits a
/// QEMU whose VM stopped on an accelerator failure.
fn report_guest_end(mut reader: Lines, mut writer: UnixStream, reports: Sender<GuestEnd>) {
    loop {
        match reader.next() {
            Ok(Some(message)) => {
                if let Some(end) = guest_end(&message) {
                    let _ = reports.send(end);
                    return;
                }
                let request = if is_event(&message, "STOP") {
                    "query-status"
                } else if stopped_on_internal_error(&message) {
                    "quit"
                } else {
                    continue;
                };
                if writeln!(writer, "{{\"execute\":\"{request}\"}}").is_err() {
                    return;
                }
            }
            Ok(None) | Err(_) => return,
        }
    }
}

fn is_event(message: &Value, name: &str) -> bool {
    message.get("event").and_then(Value::as_str) == Some(name)
}

/// Whether `message` is a `query-status` reply saying the VM stopped because the
/// accelerator could not run it (QEMU's `internal-error` run state).
fn stopped_on_internal_error(message: &Value) -> bool {
    message
        .get("return")
        .and_then(|r| r.get("status"))
        .and_then(Value::as_str)
        == Some("internal-error")
}

/// The guest's end a QMP message announces: a `SHUTDOWN` event whose reason is the guest's
/// own power-off or reset. Other reasons (a signal to QEMU, a host request) are not the
/// guest's doing.
fn guest_end(message: &Value) -> Option<GuestEnd> {
    if !is_event(message, "SHUTDOWN") {
        return None;
    }
    match message.get("data")?.get("reason")?.as_str()? {
        "guest-shutdown" => Some(GuestEnd::PowerOff),
        "guest-reset" => Some(GuestEnd::Reset),
        _ => None,
    }
}

/// QMP messages, one JSON object a line, read with a bounded buffer.
struct Lines {
    reader: BufReader<UnixStream>,
}

impl Lines {
    fn new(stream: UnixStream) -> Lines {
        Lines {
            reader: BufReader::new(stream),
        }
    }

    /// The next message; `None` at the end of the stream. Lines that are too long or not
    /// JSON objects are skipped.
    fn next(&mut self) -> io::Result<Option<Value>> {
        let mut line = Vec::new();
        loop {
            line.clear();
            let read = io::Read::take(&mut self.reader, MAX_LINE).read_until(b'\n', &mut line)?;
            if read == 0 {
                return Ok(None);
            }
            if !line.ends_with(b"\n") && read as u64 == MAX_LINE {
                self.skip_line()?;
                continue;
            }
            if let Ok(message @ Value::Object(_)) = serde_json::from_slice(&line) {
                return Ok(Some(message));
            }
        }
    }

    fn skip_line(&mut self) -> io::Result<()> {
        loop {
            let buffer = self.reader.fill_buf()?;
            if buffer.is_empty() {
                return Ok(());
            }
            match buffer.iter().position(|b| *b == b'\n') {
                Some(at) => {
                    self.reader.consume(at + 1);
                    return Ok(());
                }
                None => {
                    let all = buffer.len();
                    self.reader.consume(all);
                }
            }
        }
    }

    /// The next message, which must come by `deadline`.
    fn next_before(&mut self, deadline: Instant) -> Result<Value, QmpError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(QmpError::Silent);
        }
        self.reader.get_ref().set_read_timeout(Some(left))?;
        let message = self.next();
        self.reader.get_ref().set_read_timeout(None)?;
        match message {
            Ok(Some(message)) => Ok(message),
            Ok(None) => Err(QmpError::Closed),
            // A receive timeout is EAGAIN on Linux.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(QmpError::Silent)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Waits for the reply to `command`; returns the guest's end if QEMU announced one
    /// meanwhile.
    fn reply_before(
        &mut self,
        command: &'static str,
        deadline: Instant,
    ) -> Result<Option<GuestEnd>, QmpError> {
        let mut end = None;
        loop {
            let message = self.next_before(deadline)?;
            if message.get("return").is_some() {
                return Ok(end);
            }
            if message.get("error").is_some() {
                return Err(QmpError::Refused {
                    command,
                    reply: message.to_string(),
                });
            }
            end = end.or(guest_end(&message));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::VmProcess;

    fn message(line: &str) -> Value {
        serde_json::from_str(line).unwrap()
    }

    #[test]
    fn shutdown_events_say_how_the_guest_ended() {
        // As QEMU 7.2 writes them for a power-off, a panic's reset (-no-reboot), and a
        // signal to QEMU.
        let event = |data: &str| {
            message(&format!(
                r#"{{"timestamp": {{"seconds": 1, "microseconds": 2}}, "event": "SHUTDOWN", "data": {data}}}"#
            ))
        };
        assert_eq!(
            guest_end(&event(r#"{"guest": true, "reason": "guest-shutdown"}"#)),
            Some(GuestEnd::PowerOff)
        );
        assert_eq!(
            guest_end(&event(r#"{"guest": true, "reason": "guest-reset"}"#)),
            Some(GuestEnd::Reset)
        );
        assert_eq!(
            guest_end(&event(r#"{"guest": false, "reason": "host-signal"}"#)),
            None
        );
        assert_eq!(
            guest_end(&message(
                r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}"#
            )),
            None
        );
        assert_eq!(guest_end(&message(r#"{"return": {}}"#)), None);
    }

    #[test]
    fn overlong_and_malformed_lines_are_skipped() {
        let (mut peer, ours) = UnixStream::pair().unwrap();
        let mut lines = Lines::new(ours);
        let long = format!("{{\"pad\": \"{}\"}}\n", "x".repeat(MAX_LINE as usize * 2));
        let writer = std::thread::spawn(move || {
            peer.write_all(long.as_bytes()).unwrap();
            peer.write_all(b"not json\n[1]\n{\"return\": {}}\n")
                .unwrap();
        });
        assert_eq!(lines.next().unwrap(), Some(message(r#"{"return": {}}"#)));
        writer.join().unwrap();
        assert_eq!(lines.next().unwrap(), None);
    }

    /// The real QEMU takes the inherited socket, greets, negotiates and continues; a VMM
    /// killed by the host reports no end of the guest's own.
    #[test]
    fn real_qemu_takes_the_socket_and_a_kill_is_no_guest_end() {
        let monitor = Monitor::new().unwrap();
        let mut command = Command::new(crate::qemu::DEFAULT_BINARY);
        command.args([
            "-M",
            "microvm,x-option-roms=off,isa-serial=off,rtc=off",
            "-accel",
            "tcg",
            "-m",
            "64M",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ]);
        monitor.add_to(&mut command);
        let mut vm = VmProcess::spawn(command).unwrap();
        let ends = monitor
            .start(Instant::now() + Duration::from_secs(30))
            .unwrap();
        vm.report_guest_end(ends);
        assert!(vm.try_wait().unwrap().is_none(), "QEMU runs");
        assert_eq!(vm.guest_end(), None, "no end while running");
        vm.kill().unwrap();
        assert_eq!(vm.guest_end(), None);
    }

    /// A VM stopped on a KVM internal error is quit. QEMU on this host aborts on KVM
    /// before it gets that far, so the peer here plays QEMU's side of the exchange, with
    /// the messages QEMU 7.2 sends.
    #[test]
    fn a_vm_stopped_on_an_internal_error_is_quit() {
        let (peer, ours) = UnixStream::pair().unwrap();
        let (reports, ends) = mpsc::channel();
        let writer = ours.try_clone().unwrap();
        let reporter =
            std::thread::spawn(move || report_guest_end(Lines::new(ours), writer, reports));
        let mut qemu = Lines::new(peer.try_clone().unwrap());
        let mut say = peer;
        let mut expect = |command: &str| {
            let request = qemu.next().unwrap().unwrap();
            assert_eq!(request["execute"], command, "{request}");
        };
        writeln!(
            say,
            r#"{{"timestamp": {{"seconds": 1, "microseconds": 2}}, "event": "STOP"}}"#
        )
        .unwrap();
        expect("query-status");
        writeln!(
            say,
            r#"{{"return": {{"status": "running", "singlestep": false, "running": true}}}}"#
        )
        .unwrap();
        writeln!(
            say,
            r#"{{"timestamp": {{"seconds": 1, "microseconds": 3}}, "event": "STOP"}}"#
        )
        .unwrap();
        expect("query-status");
        writeln!(
            say,
            r#"{{"return": {{"status": "internal-error", "singlestep": false, "running": false}}}}"#
        )
        .unwrap();
        expect("quit");
        // QEMU then announces its own shutdown, which is no end of the guest's doing.
        writeln!(
            say,
            r#"{{"timestamp": {{"seconds": 1, "microseconds": 4}}, "event": "SHUTDOWN", "data": {{"guest": false, "reason": "host-qmp-quit"}}}}"#
        )
        .unwrap();
        say.shutdown(std::net::Shutdown::Both).unwrap();
        reporter.join().unwrap();
        assert!(ends.recv().is_err(), "no guest end reported");
    }

    #[test]
    fn a_vmm_that_never_greets_fails_the_handshake_in_time() {
        let monitor = Monitor::new().unwrap();
        // Holds the other end open and says nothing.
        let _silent = UnixStream::from(monitor.vmm.try_clone().unwrap());
        let err = monitor
            .start(Instant::now() + Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(err, QmpError::Silent), "{err:?}");
    }
}
