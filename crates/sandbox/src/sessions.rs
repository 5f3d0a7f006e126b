//! The host's side of the sessions on the guest channel: what the guest may send on each
//! session, the output waiting for each session's reader, and the frames waiting to go to
//! the guest.
//!
//! Every path is bounded, so that nothing a reader or the guest does makes the host's
//! memory grow:
//! - Output: the guest sends at most [`SESSION_WINDOW`] bytes of a session's output ahead
//!   of the credit the host returns (kiln-protocol's flow control). The host returns a
//!   frame's credit when the session's reader asks for the next frame, that is once it has
//!   passed the last one on. A slow reader so holds back its own session in the guest and
//!   nothing else; at most [`MAX_SESSIONS`] sessions are open at once.
//! - Input: stdin frames wait in one queue of at most [`INPUT_QUEUE_BYTES`]; whoever adds
//!   to a full queue waits until the guest has read some.
//! - Control frames (hello, runs, signals, resizes, shutdown, credit) have a queue of their
//!   own, which the writer thread empties before it writes any input, so a stop never
//!   waits behind data. More than [`CONTROL_QUEUE_FRAMES`] of them unread means the guest
//!   stopped reading: an error, not a longer queue.
//!
//! Together that is at most [`MAX_QUEUED_BYTES`] (64 MiB) of queued data per sandbox.
//!
//! Once the sandbox is stopping, and for exec sessions once the main workload has ended
//! (they are being killed), output no longer waits for its reader: its credit goes back as
//! it arrives, and what would overflow a reader's window is dropped, so a reader that
//! stopped reading cannot hold up the workloads' end and the guest's power-off.
//!
//! Every frame from the guest is checked against the session rules before it is used: a
//! session must be open (the host opens them), output must fit its window, a stream ends
//! once, a result is last, and the control session carries only hello, boot errors and
//! each boot phase once. A violation is a typed [`ProtocolError`] that ends the run.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use kiln_protocol::{
    write_frame, BootPhase, Frame, Kind, Message, OutputCredit, ProtocolError, RunSpec, SessionId,
    SignalRequest, Stream, CONTROL_SESSION, MAIN_SESSION, SESSION_WINDOW,
};

/// The most sessions open at once on one sandbox's channel: the main one and 62 exec
/// sessions, so that their windows and the input queue make [`MAX_QUEUED_BYTES`].
pub const MAX_SESSIONS: usize = 63;

/// The most stdin data (frames with their headers) queued for the guest at once, the frame
/// being written included; a single larger frame (up to kiln-protocol's `MAX_PAYLOAD` and
/// its header) waits alone.
pub const INPUT_QUEUE_BYTES: usize = 1 << 20;

/// The most data the host queues for one sandbox: a full window for every session and a
/// full input queue (64 MiB).
pub const MAX_QUEUED_BYTES: usize = MAX_SESSIONS * SESSION_WINDOW as usize + INPUT_QUEUE_BYTES;

// docs/sandboxes.md states this bound.
const _: () = assert!(MAX_QUEUED_BYTES == 64 << 20);

/// The most control frames waiting for the guest to read them.
const CONTROL_QUEUE_FRAMES: usize = 1024;

/// Credit goes back in pieces of at least this much, or as soon as a session's reader has
/// taken everything, so small output is not held up and bulk output costs few frames.
const CREDIT_BATCH: u32 = SESSION_WINDOW / 4;

/// Why a frame could not be sent to the guest or a session not opened.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("the sandbox already runs {MAX_SESSIONS} sessions, the most it may run at once")]
    TooMany,
    #[error("the channel to the guest is closed")]
    Closed,
    #[error("the guest has left {CONTROL_QUEUE_FRAMES} control frames unread; it stopped reading the channel")]
    GuestNotReading,
    #[error("a session takes stdin data, the end of stdin, signals and resizes; not {0:?}")]
    NotForTheGuest(Kind),
}

/// Locks `mutex`, also after a panic on another thread: the updates under kiln-sandbox's
/// locks are complete before anything that can panic, so what a panicking thread left is
/// consistent.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// An output frame waiting for its reader, with the credit still owed for it (none once
/// the session is ending: that credit went back when it arrived).
struct Queued {
    frame: Frame,
    owed: u32,
}

/// One open session, from the host's Run until its reader took the guest's Result.
#[derive(Default)]
struct Session {
    queue: VecDeque<Queued>,
    /// Window charge of the frames in `queue`.
    queued: u32,
    /// Charge the guest has spent and the host not yet handed back: queued frames and the
    /// one the reader is passing on.
    owed: u32,
    /// Charge handed back but not yet sent to the guest (see [`CREDIT_BATCH`]).
    unsent: u32,
    /// Charge owed for the frame the reader took last.
    taken: u32,
    /// Stdout's and stderr's ends arrived.
    ended_streams: HashSet<Stream>,
    /// The guest's Result arrived: nothing may follow it.
    ended: bool,
    /// Nobody reads this session any more: its output is dropped as it arrives.
    abandoned: bool,
    /// The session is being ended: its output no longer waits for its reader.
    ending: bool,
    /// Output was dropped because the session was ending and its reader a window behind.
    dropped: bool,
}

impl Session {
    /// Hands back the charge of the frame the reader took last.
    fn delivered(&mut self) {
        self.owed -= self.taken;
        self.unsent += self.taken;
        self.taken = 0;
    }

    /// Hands back everything owed at once, without waiting for the reader.
    fn release(&mut self) {
        self.unsent += self.owed;
        self.owed = 0;
        self.taken = 0;
        for queued in &mut self.queue {
            queued.owed = 0;
        }
    }

    /// The credit frame to send now, if any.
    fn credit_due(&mut self, id: SessionId) -> Option<Frame> {
        if self.unsent == 0 || (self.unsent < CREDIT_BATCH && self.owed > 0) {
            return None;
        }
        let bytes = std::mem::take(&mut self.unsent);
        Some(Frame::new(id, Message::Credit(OutputCredit { bytes })))
    }
}

/// The sessions and what the guest said on the control session.
struct Table {
    sessions: HashMap<SessionId, Session>,
    /// The id of the next exec session; ids are not reused within a boot.
    next_exec: SessionId,
    phases: HashSet<BootPhase>,
    /// No more output comes: readers get what is queued, then the end.
    closed: bool,
}

/// Frames waiting for the writer thread.
#[derive(Default)]
struct Outbox {
    control: VecDeque<Frame>,
    input: VecDeque<Frame>,
    /// Size on the wire of `input` and of the input frame being written.
    input_bytes: usize,
    closed: bool,
}

struct Shared {
    table: Mutex<Table>,
    /// Signalled when output is queued, a session goes away or the channel closes.
    output: Condvar,
    outbox: Mutex<Outbox>,
    /// Signalled when the outbox gets a frame or closes.
    to_write: Condvar,
    /// Signalled when input leaves the outbox or it closes.
    input_space: Condvar,
}

impl Shared {
    /// Queues a control frame; credit for a session that already has credit queued is
    /// added to it, so credit frames never pile up.
    fn control(&self, frame: Frame) -> Result<(), SessionError> {
        let mut outbox = lock(&self.outbox);
        if outbox.closed {
            return Err(SessionError::Closed);
        }
        if let Message::Credit(more) = &frame.message {
            let queued = outbox
                .control
                .iter_mut()
                .find_map(|f| match &mut f.message {
                    Message::Credit(credit) if f.session == frame.session => Some(credit),
                    _ => None,
                });
            if let Some(credit) = queued {
                // Both parts are owed within one window, so the sum fits it.
                credit.bytes = credit.bytes.saturating_add(more.bytes).min(SESSION_WINDOW);
                return Ok(());
            }
        }
        if outbox.control.len() >= CONTROL_QUEUE_FRAMES {
            return Err(SessionError::GuestNotReading);
        }
        outbox.control.push_back(frame);
        self.to_write.notify_one();
        Ok(())
    }

    /// Queues an input frame, waiting while the input queue is full.
    fn input(&self, frame: Frame) -> Result<(), SessionError> {
        let size = wire_size(&frame);
        let mut outbox = lock(&self.outbox);
        while !outbox.closed
            && outbox.input_bytes > 0
            && outbox.input_bytes + size > INPUT_QUEUE_BYTES
        {
            outbox = self
                .input_space
                .wait(outbox)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if outbox.closed {
            return Err(SessionError::Closed);
        }
        outbox.input_bytes += size;
        outbox.input.push_back(frame);
        self.to_write.notify_one();
        Ok(())
    }

    fn send_credit(&self, credit: Option<Frame>) {
        if let Some(frame) = credit {
            // A closed channel needs no credit.
            let _ = self.control(frame);
        }
    }

    /// Nobody reads session `id` any more: drops its output, hands back its credit, and
    /// kills its process so that it does not wait on a full window for ever.
    fn abandon(&self, id: SessionId) {
        let (credit, running) = {
            let mut table = lock(&self.table);
            let Some(session) = table.sessions.get_mut(&id) else {
                return;
            };
            session.abandoned = true;
            session.release();
            session.queue.clear();
            session.queued = 0;
            let credit = session.credit_due(id);
            let running = !session.ended;
            if !running {
                table.sessions.remove(&id);
                self.output.notify_all();
            }
            (credit, running)
        };
        self.send_credit(credit);
        if running {
            let kill = Message::Signal(SignalRequest {
                signal: libc::SIGKILL,
            });
            let _ = self.control(Frame::new(id, kill));
        }
    }
}

/// A frame's size on the wire, for the input queue's bound.
fn wire_size(frame: &Frame) -> usize {
    kiln_protocol::HEADER_LEN
        + match &frame.message {
            Message::Data { bytes, .. } => bytes.len(),
            _ => 0,
        }
}

/// The host's side of one boot's channel (see the module doc). Cheap to clone.
#[derive(Clone)]
pub(crate) struct GuestChannel {
    shared: Arc<Shared>,
    /// For shutting the socket down when the run ends.
    socket: Arc<UnixStream>,
}

impl GuestChannel {
    /// Takes over writing to `socket`: a thread writes the queued frames, control first.
    /// Reading stays with the caller, who hands each frame to [`Self::accept`].
    pub(crate) fn start(socket: &UnixStream) -> std::io::Result<GuestChannel> {
        let shared = Arc::new(Shared {
            table: Mutex::new(Table {
                sessions: HashMap::new(),
                next_exec: MAIN_SESSION + 1,
                phases: HashSet::new(),
                closed: false,
            }),
            output: Condvar::new(),
            outbox: Mutex::new(Outbox::default()),
            to_write: Condvar::new(),
            input_space: Condvar::new(),
        });
        let writer = socket.try_clone()?;
        let writing = Arc::clone(&shared);
        std::thread::spawn(move || write_to_guest(&writing, writer));
        Ok(GuestChannel {
            shared,
            socket: Arc::new(socket.try_clone()?),
        })
    }

    /// Checks a frame from the guest against the session rules and queues session output
    /// for its reader. Returns the frames the run itself handles: hello, boot errors,
    /// phases and the main session's result.
    pub(crate) fn accept(&self, frame: Frame) -> Result<Option<Frame>, ProtocolError> {
        let id = frame.session;
        let kind = frame.message.kind();
        let mut table = lock(&self.shared.table);
        if id == CONTROL_SESSION {
            return match &frame.message {
                Message::Hello(_) | Message::BootError(_) => Ok(Some(frame)),
                Message::Phase(time) if table.phases.insert(time.phase) => Ok(Some(frame)),
                Message::Phase(_) => Err(ProtocolError::NotAllowed {
                    session: id,
                    kind,
                    rule: "each boot phase is reported once",
                }),
                _ => Err(ProtocolError::NotAllowed {
                    session: id,
                    kind,
                    rule: "from the guest, the control session carries hello, boot errors and phases only",
                }),
            };
        }
        let Some(session) = table.sessions.get_mut(&id).filter(|s| !s.ended) else {
            return Err(ProtocolError::UnknownSession { session: id, kind });
        };
        let mut for_run = None;
        match &frame.message {
            Message::Data { stream, .. } if *stream != Stream::Stdin => {
                if session.ended_streams.contains(stream) {
                    return Err(ProtocolError::NotAllowed {
                        session: id,
                        kind,
                        rule: "no data follows the end of its stream",
                    });
                }
                let charge = frame.window_charge();
                let spent = u64::from(session.owed) + u64::from(session.unsent);
                if spent + u64::from(charge) > u64::from(SESSION_WINDOW) {
                    return Err(ProtocolError::WindowExceeded {
                        session: id,
                        sent: spent + u64::from(charge),
                    });
                }
                if session.abandoned {
                    session.unsent += charge;
                } else if session.ending {
                    session.unsent += charge;
                    if session.queued + charge <= SESSION_WINDOW {
                        session.queued += charge;
                        session.queue.push_back(Queued { frame, owed: 0 });
                    } else {
                        session.dropped = true;
                    }
                } else {
                    session.owed += charge;
                    session.queued += charge;
                    session.queue.push_back(Queued {
                        frame,
                        owed: charge,
                    });
                }
            }
            Message::Eof { stream } if *stream != Stream::Stdin => {
                if !session.ended_streams.insert(*stream) {
                    return Err(ProtocolError::NotAllowed {
                        session: id,
                        kind,
                        rule: "a stream ends once",
                    });
                }
                if !session.abandoned {
                    session.queue.push_back(Queued { frame, owed: 0 });
                }
            }
            Message::Result(_) => {
                session.ended = true;
                if id == MAIN_SESSION {
                    for_run = Some(frame.clone());
                }
                if !session.abandoned {
                    session.queue.push_back(Queued { frame, owed: 0 });
                }
            }
            _ => {
                return Err(ProtocolError::NotAllowed {
                    session: id,
                    kind,
                    rule: "from the guest, a session carries stdout and stderr data, their ends and one result only",
                })
            }
        }
        let credit = session.credit_due(id);
        if session.ended && session.abandoned {
            table.sessions.remove(&id);
        }
        drop(table);
        self.shared.output.notify_all();
        self.shared.send_credit(credit);
        Ok(for_run)
    }

    /// Opens the main session (sending its run spec) and returns its output.
    pub(crate) fn open_main(&self, spec: RunSpec) -> Result<SessionOutput, SessionError> {
        lock(&self.shared.table)
            .sessions
            .insert(MAIN_SESSION, Session::default());
        self.shared
            .control(Frame::new(MAIN_SESSION, Message::Run(spec)))?;
        Ok(SessionOutput::new(&self.shared, MAIN_SESSION))
    }

    /// Queues a control frame: hello, signal, resize, shutdown.
    pub(crate) fn control(&self, frame: Frame) -> Result<(), SessionError> {
        self.shared.control(frame)
    }

    /// Queues an input frame (stdin data or its end), waiting while the queue is full.
    pub(crate) fn input(&self, frame: Frame) -> Result<(), SessionError> {
        self.shared.input(frame)
    }

    /// The sandbox is stopping: from now on no session's output waits for its reader.
    pub(crate) fn stop(&self) {
        self.end_sessions(|_| true);
    }

    /// The main workload ended, so the guest is killing the exec sessions: their output
    /// no longer waits for its readers (the main session's still does).
    pub(crate) fn end_exec_sessions(&self) {
        self.end_sessions(|id| id != MAIN_SESSION);
    }

    fn end_sessions(&self, which: impl Fn(SessionId) -> bool) {
        let credits: Vec<Frame> = {
            let mut table = lock(&self.shared.table);
            table
                .sessions
                .iter_mut()
                .filter(|(id, _)| which(**id))
                .filter_map(|(id, session)| {
                    session.ending = true;
                    session.release();
                    session.credit_due(*id)
                })
                .collect()
        };
        for credit in credits {
            self.shared.send_credit(Some(credit));
        }
    }

    /// Whether output of session `id` was dropped because it was ending and its reader
    /// had fallen a window behind.
    pub(crate) fn dropped_output(&self, id: SessionId) -> bool {
        lock(&self.shared.table)
            .sessions
            .get(&id)
            .is_some_and(|session| session.dropped)
    }

    /// No more output comes from the guest: readers get what is queued, then the end.
    pub(crate) fn end_of_output(&self) {
        lock(&self.shared.table).closed = true;
        self.shared.output.notify_all();
    }

    /// The run is over: nothing more is read or written.
    pub(crate) fn close(&self) {
        self.end_of_output();
        lock(&self.shared.outbox).closed = true;
        self.shared.to_write.notify_all();
        self.shared.input_space.notify_all();
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }

    /// The side of the channel a sandbox's monitor opens exec sessions with.
    pub(crate) fn exec(&self) -> ExecChannel {
        ExecChannel {
            shared: Arc::clone(&self.shared),
        }
    }
}

/// Writes the outbox's frames to the guest, control frames first, until the outbox
/// closes or a write fails.
fn write_to_guest(shared: &Shared, mut socket: UnixStream) {
    loop {
        let (frame, input) = {
            let mut outbox = lock(&shared.outbox);
            loop {
                if outbox.closed {
                    return;
                }
                if let Some(frame) = outbox.control.pop_front() {
                    break (frame, false);
                }
                if let Some(frame) = outbox.input.pop_front() {
                    break (frame, true);
                }
                outbox = shared
                    .to_write
                    .wait(outbox)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        let written = write_frame(&mut socket, &frame);
        let mut outbox = lock(&shared.outbox);
        if input {
            outbox.input_bytes -= wire_size(&frame);
            shared.input_space.notify_all();
        }
        if let Err(err) = written {
            tracing::debug!("writing to the guest: {err}");
            outbox.closed = true;
            shared.input_space.notify_all();
            return;
        }
    }
}

/// Exec sessions on a running sandbox's channel, for its monitor. Cheap to clone.
#[derive(Clone)]
pub struct ExecChannel {
    shared: Arc<Shared>,
}

impl ExecChannel {
    /// Starts `spec` in a new session of the guest; its output comes through the result.
    pub fn open(&self, spec: RunSpec) -> Result<SessionOutput, SessionError> {
        let id = {
            let mut table = lock(&self.shared.table);
            if table.closed {
                return Err(SessionError::Closed);
            }
            if table.sessions.len() >= MAX_SESSIONS {
                return Err(SessionError::TooMany);
            }
            let id = table.next_exec;
            table.next_exec = id.checked_add(1).ok_or(SessionError::TooMany)?;
            table.sessions.insert(id, Session::default());
            id
        };
        if let Err(err) = self.shared.control(Frame::new(id, Message::Run(spec))) {
            lock(&self.shared.table).sessions.remove(&id);
            return Err(err);
        }
        Ok(SessionOutput::new(&self.shared, id))
    }

    /// Sends a client's stdin data or its end (waiting while the input queue is full), a
    /// signal or a resize to session `id`; dropped when the session has ended.
    pub fn send(&self, id: SessionId, message: Message) -> Result<(), SessionError> {
        if !lock(&self.shared.table).sessions.contains_key(&id) {
            return Ok(());
        }
        let frame = Frame::new(id, message);
        match &frame.message {
            Message::Data {
                stream: Stream::Stdin,
                ..
            }
            | Message::Eof {
                stream: Stream::Stdin,
            } => self.shared.input(frame),
            Message::Signal(_) | Message::Resize(_) => self.shared.control(frame),
            other => Err(SessionError::NotForTheGuest(other.kind())),
        }
    }

    /// Nobody will read session `id` any more (its client left): its output is dropped
    /// and its process killed.
    pub fn abandon(&self, id: SessionId) {
        self.shared.abandon(id);
    }
}

/// The output of one session, in the order the guest sent it: data, the streams' ends and
/// last its result. Dropping it before the result abandons the session (see
/// [`ExecChannel::abandon`]).
pub struct SessionOutput {
    shared: Arc<Shared>,
    id: SessionId,
    /// The result was taken, or the channel ended.
    finished: bool,
}

impl SessionOutput {
    fn new(shared: &Arc<Shared>, id: SessionId) -> SessionOutput {
        SessionOutput {
            shared: Arc::clone(shared),
            id,
            finished: false,
        }
    }

    /// The session's id in the guest.
    pub fn session(&self) -> SessionId {
        self.id
    }

    /// The next frame, waiting for it; `None` after the result or when the channel ended.
    /// Asking for it says the frame taken before is delivered: its credit goes back.
    pub fn next(&mut self) -> Option<Frame> {
        let credit = lock(&self.shared.table)
            .sessions
            .get_mut(&self.id)
            .and_then(|session| {
                session.delivered();
                session.credit_due(self.id)
            });
        self.shared.send_credit(credit);
        let mut table = lock(&self.shared.table);
        loop {
            let closed = table.closed;
            let Some(session) = table.sessions.get_mut(&self.id) else {
                self.finished = true;
                return None;
            };
            if let Some(queued) = session.queue.pop_front() {
                session.queued -= queued.frame.window_charge();
                session.taken = queued.owed;
                if matches!(queued.frame.message, Message::Result(_)) {
                    table.sessions.remove(&self.id);
                    self.finished = true;
                }
                return Some(queued.frame);
            }
            if closed {
                table.sessions.remove(&self.id);
                self.finished = true;
                return None;
            }
            table = self
                .shared
                .output
                .wait(table)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl Drop for SessionOutput {
    fn drop(&mut self) {
        if !self.finished {
            self.shared.abandon(self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::sync::mpsc;
    use std::time::Duration;

    use kiln_protocol::{
        read_frame, Identity, RunAs, ShutdownRequest, WorkloadResult, MAX_PAYLOAD,
    };

    use super::*;

    /// A channel whose guest end the test holds: what the host writes arrives there, and
    /// frames "from the guest" go straight to `accept`.
    fn channel() -> (GuestChannel, UnixStream) {
        let (host, guest) = UnixStream::pair().unwrap();
        (GuestChannel::start(&host).unwrap(), guest)
    }

    fn spec() -> RunSpec {
        RunSpec {
            argv: vec!["cat".into()],
            env: Vec::new(),
            cwd: None,
            identity: Identity {
                run_as: RunAs::Uid,
                uid: 1000,
                gid: 1000,
            },
            tty: false,
            terminal: None,
            task: None,
            openshell: None,
        }
    }

    fn data(session: SessionId, len: usize) -> Frame {
        let bytes = vec![b'x'; len];
        let stream = Stream::Stdout;
        Frame::new(session, Message::Data { stream, bytes })
    }

    /// A data frame whose charge is `charge`.
    fn charging(session: SessionId, charge: u32) -> Frame {
        data(session, charge as usize - kiln_protocol::HEADER_LEN)
    }

    /// The next frame the host sent to the guest.
    fn sent(guest: &mut UnixStream) -> Frame {
        guest
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        read_frame(guest).unwrap().expect("a frame from the host")
    }

    /// Credit frames the host sent for `session` until `bytes` came back in all.
    fn credit_of(guest: &mut UnixStream, session: SessionId, bytes: u32) {
        let mut got = 0;
        while got < bytes {
            match sent(guest) {
                Frame {
                    session: s,
                    message: Message::Credit(credit),
                } if s == session => got += credit.bytes,
                other => panic!("expected credit for session {session}, got {other:?}"),
            }
        }
        assert_eq!(got, bytes);
    }

    #[test]
    fn a_reader_that_stops_gets_one_window_and_the_guest_no_more_credit() {
        let (channel, mut guest) = channel();
        let mut output = channel.open_main(spec()).unwrap();
        assert!(matches!(sent(&mut guest).message, Message::Run(_)));
        let frame = SESSION_WINDOW / 16;
        for _ in 0..16 {
            assert!(channel
                .accept(charging(MAIN_SESSION, frame))
                .unwrap()
                .is_none());
        }
        // The reader has taken nothing: a byte more than the window is the guest's fault.
        let err = channel.accept(data(MAIN_SESSION, 1)).unwrap_err();
        assert!(
            matches!(
                err,
                ProtocolError::WindowExceeded {
                    session: MAIN_SESSION,
                    ..
                }
            ),
            "{err}"
        );
        guest
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut byte = [0u8];
        assert!(
            guest.read(&mut byte).is_err(),
            "no credit while the reader takes nothing"
        );

        // Taking frames hands their credit back once the next one is asked for: in
        // batches of a quarter window, then the rest when all is taken.
        for _ in 0..16 {
            assert_eq!(output.next().unwrap().window_charge(), frame);
        }
        credit_of(&mut guest, MAIN_SESSION, 12 * frame);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(output.next()).unwrap());
        credit_of(&mut guest, MAIN_SESSION, 4 * frame);
        channel.accept(data(MAIN_SESSION, 5)).unwrap();
        let next = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        assert_eq!(next, data(MAIN_SESSION, 5));
    }

    #[test]
    fn the_guest_may_only_send_on_sessions_the_host_opened() {
        let (channel, _guest) = channel();
        let unknown = channel.accept(data(7, 10)).unwrap_err();
        assert!(
            matches!(unknown, ProtocolError::UnknownSession { session: 7, .. }),
            "{unknown}"
        );
        let mut output = channel.open_main(spec()).unwrap();
        let result = Frame::new(
            MAIN_SESSION,
            Message::Result(WorkloadResult::Exited { code: 0 }),
        );
        // The main session's result goes to the run and, last, to its reader.
        assert_eq!(
            channel.accept(result.clone()).unwrap(),
            Some(result.clone())
        );
        let after = channel.accept(data(MAIN_SESSION, 1)).unwrap_err();
        assert!(
            matches!(after, ProtocolError::UnknownSession { .. }),
            "nothing follows a result: {after}"
        );
        assert_eq!(output.next(), Some(result));
        assert_eq!(output.next(), None);

        let stdin = Frame::new(
            MAIN_SESSION,
            Message::Data {
                stream: Stream::Stdin,
                bytes: b"x".to_vec(),
            },
        );
        let exec = channel.exec();
        let session = exec.open(spec()).unwrap();
        let id = session.session();
        for (frame, what) in [
            (Frame::new(id, stdin.message.clone()), "stdin data"),
            (Frame::new(id, Message::Run(spec())), "a run"),
            (
                Frame::new(
                    CONTROL_SESSION,
                    Message::Shutdown(ShutdownRequest { grace_ms: 0 }),
                ),
                "a shutdown",
            ),
        ] {
            let err = channel.accept(frame).unwrap_err();
            assert!(
                matches!(err, ProtocolError::NotAllowed { .. }),
                "{what}: {err}"
            );
        }
        let eof = Frame::new(
            id,
            Message::Eof {
                stream: Stream::Stderr,
            },
        );
        channel.accept(eof.clone()).unwrap();
        assert!(channel.accept(eof).is_err(), "a stream ends once");
        let phase = Frame::new(
            CONTROL_SESSION,
            Message::Phase(kiln_protocol::PhaseTime {
                phase: BootPhase::WorkloadStarted,
                boottime_ns: 1,
            }),
        );
        assert!(channel.accept(phase.clone()).unwrap().is_some());
        assert!(
            channel.accept(phase).is_err(),
            "each phase is reported once"
        );
    }

    #[test]
    fn control_frames_overtake_queued_input() {
        let (channel, mut guest) = channel();
        let _output = channel.open_main(spec()).unwrap();
        let stdin = |n: u8| {
            Frame::new(
                MAIN_SESSION,
                Message::Data {
                    stream: Stream::Stdin,
                    bytes: vec![n; MAX_PAYLOAD / 4],
                },
            )
        };
        // The guest reads nothing: the socket's buffer fills, then the input queue.
        let (tx, rx) = mpsc::channel();
        let writer = channel.clone();
        std::thread::spawn(move || {
            for n in 0..64 {
                writer.input(stdin(n)).unwrap();
                tx.send(n).unwrap();
            }
        });
        let mut queued = 0;
        while let Ok(n) = rx.recv_timeout(Duration::from_millis(500)) {
            queued = n;
        }
        assert!(
            queued < 63,
            "the input queue is bounded: all 64 frames were taken"
        );
        let stop = Frame::new(
            CONTROL_SESSION,
            Message::Shutdown(ShutdownRequest { grace_ms: 0 }),
        );
        channel.control(stop.clone()).unwrap();
        let mut order = Vec::new();
        while order.len() < 65 {
            let frame = sent(&mut guest);
            match frame.message {
                Message::Run(_) => {}
                Message::Shutdown(_) => order.push(None),
                Message::Data { bytes, .. } => order.push(Some(bytes[0])),
                other => panic!("unexpected {other:?}"),
            }
        }
        let stop_at = order.iter().position(Option::is_none).unwrap();
        assert!(
            stop_at <= queued as usize + 2,
            "the shutdown went out after {stop_at} input frames, behind the queue: {order:?}"
        );
        let inputs: Vec<u8> = order.into_iter().flatten().collect();
        assert_eq!(
            inputs,
            (0..64).collect::<Vec<u8>>(),
            "input keeps its order"
        );
    }

    #[test]
    fn a_stop_stops_waiting_for_a_reader_that_fell_behind() {
        let (channel, mut guest) = channel();
        let mut output = channel.open_main(spec()).unwrap();
        sent(&mut guest);
        let frame = SESSION_WINDOW / 4;
        for _ in 0..4 {
            channel.accept(charging(MAIN_SESSION, frame)).unwrap();
        }
        channel.stop();
        credit_of(&mut guest, MAIN_SESSION, SESSION_WINDOW);
        // The queue is full: what comes now is dropped, and its credit goes back at once.
        channel.accept(charging(MAIN_SESSION, frame)).unwrap();
        credit_of(&mut guest, MAIN_SESSION, frame);
        assert!(channel.dropped_output(MAIN_SESSION));
        for _ in 0..4 {
            assert_eq!(output.next().unwrap().window_charge(), frame);
        }
        // Nothing taken was owed any more: no credit is handed back twice.
        channel.accept(data(MAIN_SESSION, 3)).unwrap();
        credit_of(
            &mut guest,
            MAIN_SESSION,
            data(MAIN_SESSION, 3).window_charge(),
        );
        assert_eq!(output.next(), Some(data(MAIN_SESSION, 3)));
    }

    #[test]
    fn once_the_main_workload_ended_exec_output_stops_waiting_but_the_main_output_does_not() {
        let (channel, mut guest) = channel();
        let _main = channel.open_main(spec()).unwrap();
        let _exec = channel.exec().open(spec()).unwrap();
        for _ in 0..2 {
            assert!(matches!(sent(&mut guest).message, Message::Run(_)));
        }
        let exec = MAIN_SESSION + 1;
        channel
            .accept(charging(MAIN_SESSION, SESSION_WINDOW))
            .unwrap();
        channel.accept(charging(exec, SESSION_WINDOW)).unwrap();
        channel.end_exec_sessions();
        // Only the exec session's credit comes back; its next frame is dropped.
        credit_of(&mut guest, exec, SESSION_WINDOW);
        channel.accept(charging(exec, 100)).unwrap();
        credit_of(&mut guest, exec, 100);
        assert!(channel.dropped_output(exec));
        assert!(
            channel.accept(data(MAIN_SESSION, 1)).is_err(),
            "main still waits"
        );
    }

    #[test]
    fn an_abandoned_session_is_killed_and_its_output_dropped() {
        let (channel, mut guest) = channel();
        let exec = channel.exec();
        let output = exec.open(spec()).unwrap();
        let id = output.session();
        assert!(matches!(sent(&mut guest).message, Message::Run(_)));
        channel.accept(data(id, 100)).unwrap();
        drop(output);
        let mut kill = None;
        let mut credit = 0;
        while kill.is_none() || credit < data(id, 100).window_charge() {
            match sent(&mut guest).message {
                Message::Signal(request) => kill = Some(request.signal),
                Message::Credit(more) => credit += more.bytes,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(kill, Some(libc::SIGKILL));
        // What it still sends is dropped and handed back; its result closes it.
        channel.accept(data(id, 10)).unwrap();
        credit_of(&mut guest, id, data(id, 10).window_charge());
        let result = Frame::new(id, Message::Result(WorkloadResult::Killed { signal: 9 }));
        assert_eq!(channel.accept(result).unwrap(), None);
        assert!(
            channel.accept(data(id, 1)).is_err(),
            "the session is closed"
        );
    }

    #[test]
    fn sessions_are_limited() {
        let (channel, _guest) = channel();
        let exec = channel.exec();
        let open: Vec<SessionOutput> = (0..MAX_SESSIONS)
            .map(|_| exec.open(spec()).unwrap())
            .collect();
        assert!(matches!(exec.open(spec()), Err(SessionError::TooMany)));
        drop(open);
    }
}
