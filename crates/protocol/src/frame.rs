//! The frame layer: fixed header, bounded payload, encode and decode.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{
    Frame, GuestTask, Message, RunSpec, SessionId, Stream, WorkloadResult, MAX_SIGNAL,
    SESSION_WINDOW, STATS_INTERVAL_MS, STATS_SAMPLES,
};

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"KILN";
/// Version of the frame layout; a frame with another version is rejected.
pub const WIRE_VERSION: u8 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 16;
/// Largest payload of one frame (1 MiB); longer stream data is split over frames.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// The type of a frame's payload; the byte values are part of the wire format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Hello = 0x01,
    Run = 0x02,
    Resize = 0x03,
    Signal = 0x04,
    Result = 0x05,
    BootError = 0x06,
    Phase = 0x07,
    Shutdown = 0x08,
    Credit = 0x09,
    Clock = 0x0a,
    StdinData = 0x10,
    StdoutData = 0x11,
    StderrData = 0x12,
    StdinEof = 0x18,
    StdoutEof = 0x19,
    StderrEof = 0x1a,
}

impl Kind {
    const ALL: [Kind; 16] = [
        Kind::Hello,
        Kind::Run,
        Kind::Resize,
        Kind::Signal,
        Kind::Result,
        Kind::BootError,
        Kind::Phase,
        Kind::Shutdown,
        Kind::Credit,
        Kind::Clock,
        Kind::StdinData,
        Kind::StdoutData,
        Kind::StderrData,
        Kind::StdinEof,
        Kind::StdoutEof,
        Kind::StderrEof,
    ];

    /// The kind with this wire byte, if any.
    pub fn from_byte(byte: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| *kind as u8 == byte)
    }

    fn data(stream: Stream) -> Kind {
        match stream {
            Stream::Stdin => Kind::StdinData,
            Stream::Stdout => Kind::StdoutData,
            Stream::Stderr => Kind::StderrData,
        }
    }

    fn eof(stream: Stream) -> Kind {
        match stream {
            Stream::Stdin => Kind::StdinEof,
            Stream::Stdout => Kind::StdoutEof,
            Stream::Stderr => Kind::StderrEof,
        }
    }
}

/// The fixed 16-byte frame header (all integers big-endian):
/// magic (4) | version (1) | kind (1) | reserved, zero (2) | session (4) | payload length (4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub session: SessionId,
    pub payload_len: u32,
}

impl Header {
    /// Checks and parses a header; the payload length is checked against [`MAX_PAYLOAD`]
    /// here, before anyone allocates for it.
    pub fn parse(bytes: &[u8; HEADER_LEN]) -> Result<Header, ProtocolError> {
        let magic: [u8; 4] = bytes[0..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic { found: magic });
        }
        if bytes[4] != WIRE_VERSION {
            return Err(ProtocolError::UnsupportedVersion { found: bytes[4] });
        }
        let kind =
            Kind::from_byte(bytes[5]).ok_or(ProtocolError::UnknownKind { found: bytes[5] })?;
        let reserved = u16::from_be_bytes([bytes[6], bytes[7]]);
        if reserved != 0 {
            return Err(ProtocolError::ReservedNotZero { found: reserved });
        }
        let session = u32::from_be_bytes(bytes[8..12].try_into().expect("4 bytes"));
        let payload_len = u32::from_be_bytes(bytes[12..16].try_into().expect("4 bytes"));
        if payload_len as usize > MAX_PAYLOAD {
            return Err(ProtocolError::TooLarge {
                len: payload_len as usize,
            });
        }
        Ok(Header {
            kind,
            session,
            payload_len,
        })
    }

    fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut bytes = [0u8; HEADER_LEN];
        bytes[0..4].copy_from_slice(&MAGIC);
        bytes[4] = WIRE_VERSION;
        bytes[5] = self.kind as u8;
        bytes[8..12].copy_from_slice(&self.session.to_be_bytes());
        bytes[12..16].copy_from_slice(&self.payload_len.to_be_bytes());
        bytes
    }
}

/// A frame that cannot be encoded or decoded, or the stream failed.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("channel I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("frame starts with {found:02x?}, not the magic \"KILN\"; the peer is not speaking the kiln protocol or the stream lost sync")]
    BadMagic { found: [u8; 4] },
    #[error("frame has wire version {found}; this build accepts version {WIRE_VERSION} only")]
    UnsupportedVersion { found: u8 },
    #[error("frame has unknown kind 0x{found:02x}; accepted kinds are listed in docs/protocol.md")]
    UnknownKind { found: u8 },
    #[error("frame has reserved header bits 0x{found:04x}; accepted: 0")]
    ReservedNotZero { found: u16 },
    #[error("frame payload of {len} bytes is over the limit of {MAX_PAYLOAD} bytes")]
    TooLarge { len: usize },
    #[error("stream ended inside a frame: {got} of {expected} bytes arrived")]
    Truncated { expected: usize, got: usize },
    #[error("bad {kind:?} payload: {reason}")]
    BadPayload { kind: Kind, reason: String },
    #[error("no common protocol version: we speak {ours:?}, {peer:?} speaks {theirs:?}")]
    NoCommonVersion {
        ours: (u16, u16),
        theirs: (u16, u16),
        peer: String,
    },
    #[error("the peer said hello a second time; it says hello once, first")]
    SecondHello,
    #[error("the peer sent a {kind:?} frame on session {session}, which is not open")]
    UnknownSession { session: SessionId, kind: Kind },
    #[error("the peer sent a {kind:?} frame on session {session}; {rule}")]
    NotAllowed {
        session: SessionId,
        kind: Kind,
        rule: &'static str,
    },
    #[error("the peer sent {sent} bytes of session {session}'s output beyond what was delivered; its window is {SESSION_WINDOW} bytes")]
    WindowExceeded { session: SessionId, sent: u64 },
}

impl Message {
    /// The frame kind that carries this message.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Run(_) => Kind::Run,
            Message::Resize(_) => Kind::Resize,
            Message::Signal(_) => Kind::Signal,
            Message::Result(_) => Kind::Result,
            Message::BootError(_) => Kind::BootError,
            Message::Phase(_) => Kind::Phase,
            Message::Shutdown(_) => Kind::Shutdown,
            Message::Credit(_) => Kind::Credit,
            Message::Clock(_) => Kind::Clock,
            Message::Data { stream, .. } => Kind::data(*stream),
            Message::Eof { stream } => Kind::eof(*stream),
        }
    }
}

/// Encodes one frame: header and payload in one buffer (so one `write_all` puts it on a
/// shared stream without interleaving). A message the decoder would refuse is refused.
pub fn encode_frame(frame: &Frame) -> Result<Vec<u8>, ProtocolError> {
    let kind = frame.message.kind();
    let payload = match &frame.message {
        Message::Hello(m) => json(m),
        Message::Run(m) => json(m),
        Message::Resize(m) => json(m),
        Message::Signal(m) => json(m),
        Message::Result(m) => json(m),
        Message::BootError(m) => json(m),
        Message::Phase(m) => json(m),
        Message::Shutdown(m) => json(m),
        Message::Credit(m) => json(m),
        Message::Clock(m) => json(m),
        Message::Data { bytes, .. } => {
            if bytes.is_empty() {
                return Err(bad(
                    kind,
                    "data frames are never empty; send Eof to close a stream",
                ));
            }
            bytes.clone()
        }
        Message::Eof { .. } => Vec::new(),
    };
    check_values(&frame.message)?;
    if payload.len() > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge { len: payload.len() });
    }
    let header = Header {
        kind,
        session: frame.session,
        payload_len: payload.len() as u32,
    };
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header.to_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes the first frame of `buf`: `Ok(None)` when `buf` does not hold a whole frame
/// yet, else the frame and how many bytes it took. A bad header is reported as soon as
/// its 16 bytes are there, without waiting for the payload.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(Frame, usize)>, ProtocolError> {
    let Some(header_bytes) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let header = Header::parse(header_bytes)?;
    let end = HEADER_LEN + header.payload_len as usize;
    let Some(payload) = buf.get(HEADER_LEN..end) else {
        return Ok(None);
    };
    Ok(Some((decode_payload(header, payload.to_vec())?, end)))
}

/// Reads one frame from a blocking stream. `Ok(None)` when the stream ends cleanly
/// between frames; a stream ending inside a frame is [`ProtocolError::Truncated`].
/// (Non-blocking streams go through [`decode_frame`] on a buffer instead.)
pub fn read_frame(reader: &mut impl Read) -> Result<Option<Frame>, ProtocolError> {
    let mut header_bytes = [0u8; HEADER_LEN];
    let got = read_full(reader, &mut header_bytes)?;
    if got == 0 {
        return Ok(None);
    }
    if got < HEADER_LEN {
        return Err(ProtocolError::Truncated {
            expected: HEADER_LEN,
            got,
        });
    }
    let header = Header::parse(&header_bytes)?;
    // Bounded by Header::parse.
    let mut payload = vec![0u8; header.payload_len as usize];
    let got = read_full(reader, &mut payload)?;
    if got < payload.len() {
        return Err(ProtocolError::Truncated {
            expected: HEADER_LEN + payload.len(),
            got: HEADER_LEN + got,
        });
    }
    decode_payload(header, payload).map(Some)
}

/// Writes one frame with a single `write_all`, then flushes.
pub fn write_frame(writer: &mut impl Write, frame: &Frame) -> Result<(), ProtocolError> {
    writer.write_all(&encode_frame(frame)?)?;
    writer.flush()?;
    Ok(())
}

/// Writes `bytes` of one stream as data frames of at most [`MAX_PAYLOAD`] bytes each;
/// nothing for empty `bytes` (closing a stream is an explicit `Eof`).
pub fn write_stream(
    writer: &mut impl Write,
    session: SessionId,
    stream: Stream,
    bytes: &[u8],
) -> Result<(), ProtocolError> {
    for chunk in bytes.chunks(MAX_PAYLOAD) {
        let message = Message::Data {
            stream,
            bytes: chunk.to_vec(),
        };
        write_frame(writer, &Frame::new(session, message))?;
    }
    Ok(())
}

/// Fills `buf` as far as the stream allows; returns how many bytes arrived.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> Result<usize, ProtocolError> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(filled)
}

fn decode_payload(header: Header, payload: Vec<u8>) -> Result<Frame, ProtocolError> {
    let kind = header.kind;
    let message = match kind {
        Kind::Hello => Message::Hello(from_json(kind, &payload)?),
        Kind::Run => Message::Run(from_json(kind, &payload)?),
        Kind::Resize => Message::Resize(from_json(kind, &payload)?),
        Kind::Signal => Message::Signal(from_json(kind, &payload)?),
        Kind::Result => Message::Result(from_json(kind, &payload)?),
        Kind::BootError => Message::BootError(from_json(kind, &payload)?),
        Kind::Phase => Message::Phase(from_json(kind, &payload)?),
        Kind::Shutdown => Message::Shutdown(from_json(kind, &payload)?),
        Kind::Credit => Message::Credit(from_json(kind, &payload)?),
        Kind::Clock => Message::Clock(from_json(kind, &payload)?),
        Kind::StdinData | Kind::StdoutData | Kind::StderrData => {
            if payload.is_empty() {
                return Err(bad(kind, "data frames are never empty"));
            }
            let stream = match kind {
                Kind::StdinData => Stream::Stdin,
                Kind::StdoutData => Stream::Stdout,
                _ => Stream::Stderr,
            };
            Message::Data {
                stream,
                bytes: payload,
            }
        }
        Kind::StdinEof | Kind::StdoutEof | Kind::StderrEof => {
            if !payload.is_empty() {
                return Err(bad(kind, "end-of-stream frames carry no payload"));
            }
            let stream = match kind {
                Kind::StdinEof => Stream::Stdin,
                Kind::StdoutEof => Stream::Stdout,
                _ => Stream::Stderr,
            };
            Message::Eof { stream }
        }
    };
    check_values(&message)?;
    Ok(Frame::new(header.session, message))
}

/// The checks beyond a payload's shape: numbers in range, run specs a process can have.
fn check_values(message: &Message) -> Result<(), ProtocolError> {
    let signal_range = |kind, signal: i32| {
        if (1..=MAX_SIGNAL).contains(&signal) {
            Ok(())
        } else {
            Err(bad(
                kind,
                &format!("signal {signal} is out of range; accepted: 1 to {MAX_SIGNAL}"),
            ))
        }
    };
    match message {
        Message::Run(spec) => check_run_spec(spec),
        Message::Signal(request) => signal_range(Kind::Signal, request.signal),
        Message::Result(WorkloadResult::Killed { signal }) => signal_range(Kind::Result, *signal),
        Message::Result(WorkloadResult::Exited { code }) if !(0..=255).contains(code) => Err(bad(
            Kind::Result,
            &format!("exit code {code} is out of range; accepted: 0 to 255"),
        )),
        Message::Credit(credit) if !(1..=SESSION_WINDOW).contains(&credit.bytes) => Err(bad(
            Kind::Credit,
            &format!(
                "credit of {} bytes is out of range; accepted: 1 to {SESSION_WINDOW}",
                credit.bytes
            ),
        )),
        _ => Ok(()),
    }
}

fn check_run_spec(spec: &RunSpec) -> Result<(), ProtocolError> {
    if spec.argv.is_empty() {
        return Err(bad(
            Kind::Run,
            "argv is empty; accepted: at least the program",
        ));
    }
    match &spec.task {
        Some(GuestTask::Stats {
            samples,
            interval_ms,
        }) if !STATS_SAMPLES.contains(samples) || !STATS_INTERVAL_MS.contains(interval_ms) => {
            return Err(bad(
                Kind::Run,
                &format!(
                    "stats task of {samples} samples {interval_ms} ms apart; accepted: {} to {} \
                     samples, {} to {} ms apart",
                    STATS_SAMPLES.start(),
                    STATS_SAMPLES.end(),
                    STATS_INTERVAL_MS.start(),
                    STATS_INTERVAL_MS.end()
                ),
            ))
        }
        Some(GuestTask::ArchiveOut { path } | GuestTask::ArchiveIn { path })
            if !path.starts_with('/') || path.contains('\0') =>
        {
            return Err(bad(
                Kind::Run,
                &format!("task path {path:?}; accepted: an absolute path without NUL"),
            ))
        }
        _ => {}
    }
    if let Some(entry) = spec.env.iter().find(|e| !e.contains('=')) {
        return Err(bad(
            Kind::Run,
            &format!("env entry {entry:?} has no '='; accepted: KEY=VALUE"),
        ));
    }
    let nul = spec
        .argv
        .iter()
        .chain(&spec.env)
        .chain(&spec.cwd)
        .find(|s| s.contains('\0'));
    if let Some(value) = nul {
        return Err(bad(
            Kind::Run,
            &format!("{value:?} holds a NUL byte, which no argv, env or path can hold"),
        ));
    }
    Ok(())
}

fn json(value: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("protocol messages always serialize")
}

fn from_json<T: DeserializeOwned>(kind: Kind, payload: &[u8]) -> Result<T, ProtocolError> {
    serde_json::from_slice(payload).map_err(|e| bad(kind, &e.to_string()))
}

fn bad(kind: Kind, reason: &str) -> ProtocolError {
    ProtocolError::BadPayload {
        kind,
        reason: reason.to_owned(),
    }
}
