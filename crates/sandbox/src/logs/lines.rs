//! Lines with their arrival times: the writer puts a fixed-size UTC time in front of every
//! line of a log, and the reader takes it off again (or keeps it for `--timestamps`),
//! drops the lines before `--since` and all but the last `--tail` lines.
//!
//! The prefix is RFC 3339 with nanoseconds and a space, always [`STAMP_LEN`] bytes
//! (`2026-12-05T04:15:31.123456789Z `), so the reader recognises it without a delimiter
//! search. A line that does not start with one (logs of older kilns) is passed on as it is
//! and counts as having no time; `--since` keeps it.

use std::io::{self, Write};

use jiff::{SignedDuration, Timestamp};

/// Bytes of the time prefix, its space included.
pub const STAMP_LEN: usize = 31;

/// The time prefix of a line that starts at `time`.
fn stamp(time: Timestamp) -> String {
    // Nanosecond precision fixes the length; before 1970 or after 9999 cannot happen on a
    // host clock kiln runs on, and would only make the line unrecognised.
    format!("{time:.9} ")
}

fn parse_stamp(prefix: &[u8]) -> Option<Timestamp> {
    let (time, space) = prefix.split_at(STAMP_LEN - 1);
    if space != b" " {
        return None;
    }
    std::str::from_utf8(time).ok()?.parse().ok()
}

/// Writes through to `inner`, starting every line with the time its first byte arrived.
pub struct Timestamped<W> {
    inner: W,
    at_line_start: bool,
    clock: fn() -> Timestamp,
}

impl<W: Write> Timestamped<W> {
    pub fn new(inner: W) -> Self {
        Self::with_clock(inner, Timestamp::now)
    }

    fn with_clock(inner: W, clock: fn() -> Timestamp) -> Self {
        Timestamped {
            inner,
            at_line_start: true,
            clock,
        }
    }
}

impl<W: Write> Write for Timestamped<W> {
    /// Writes all of `buf` (a line's prefix and its bytes must not be torn apart).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rest = buf;
        while !rest.is_empty() {
            if self.at_line_start {
                self.inner.write_all(stamp((self.clock)()).as_bytes())?;
                self.at_line_start = false;
            }
            let end = rest
                .iter()
                .position(|&b| b == b'\n')
                .map_or(rest.len(), |i| i + 1);
            self.inner.write_all(&rest[..end])?;
            self.at_line_start = rest[end - 1] == b'\n';
            rest = &rest[end..];
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// What of a log to show.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LineSelection {
    /// Keep each line's time prefix.
    pub timestamps: bool,
    /// Drop lines that arrived before this time.
    pub since: Option<Timestamp>,
    /// Drop this many lines first (what `--tail` leaves out).
    pub skip: u64,
}

/// Where the reader is in the stream.
enum Position {
    /// At the start of a line, holding the bytes of what may be its time prefix.
    LineStart(Vec<u8>),
    /// Inside a line that is shown or not.
    InLine { show: bool },
}

/// Takes a timestamped log's bytes (in any pieces) and writes the selected lines to `out`.
pub struct LineReader<'a> {
    out: &'a mut dyn Write,
    selection: LineSelection,
    position: Position,
}

impl<'a> LineReader<'a> {
    pub fn new(out: &'a mut dyn Write, selection: LineSelection) -> Self {
        LineReader {
            out,
            selection,
            position: Position::LineStart(Vec::with_capacity(STAMP_LEN)),
        }
    }

    /// Decides about the line whose start (`head`, its prefix or the whole short line) was
    /// read, writes what of `head` is shown and returns whether the rest of it is.
    fn start_line(&mut self, head: &[u8]) -> io::Result<bool> {
        let time = (head.len() == STAMP_LEN)
            .then(|| parse_stamp(head))
            .flatten();
        let show = if self.selection.skip > 0 {
            self.selection.skip -= 1;
            false
        } else {
            match (self.selection.since, time) {
                (Some(since), Some(time)) => time >= since,
                _ => true,
            }
        };
        if show && (time.is_none() || self.selection.timestamps) {
            self.out.write_all(head)?;
        }
        Ok(show)
    }

    /// What is left of a line start at the end of the log: a line without its newline.
    pub fn finish(&mut self) -> io::Result<()> {
        if let Position::LineStart(head) = &mut self.position {
            if !head.is_empty() {
                let head = std::mem::take(head);
                self.start_line(&head)?;
            }
        }
        self.out.flush()
    }
}

impl Write for LineReader<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rest = buf;
        while !rest.is_empty() {
            match &mut self.position {
                Position::LineStart(head) => {
                    let want = STAMP_LEN - head.len();
                    let newline = rest[..want.min(rest.len())]
                        .iter()
                        .position(|&b| b == b'\n');
                    let take = newline.map_or(want.min(rest.len()), |i| i + 1);
                    head.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    if newline.is_some() {
                        // A line shorter than a prefix: no time.
                        let head = std::mem::take(head);
                        self.start_line(&head)?;
                    } else if head.len() == STAMP_LEN {
                        let head = std::mem::take(head);
                        let show = self.start_line(&head)?;
                        self.position = Position::InLine { show };
                    }
                }
                Position::InLine { show } => {
                    let end = rest
                        .iter()
                        .position(|&b| b == b'\n')
                        .map_or(rest.len(), |i| i + 1);
                    if *show {
                        self.out.write_all(&rest[..end])?;
                    }
                    if rest[end - 1] == b'\n' {
                        self.position = Position::LineStart(Vec::with_capacity(STAMP_LEN));
                    }
                    rest = &rest[end..];
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Counts the lines written to it (a last line without its newline counts too).
#[derive(Default)]
pub struct LineCounter {
    newlines: u64,
    open_line: bool,
}

impl LineCounter {
    pub fn lines(&self) -> u64 {
        self.newlines + u64::from(self.open_line)
    }
}

impl Write for LineCounter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(&last) = buf.last() {
            self.newlines += buf.iter().filter(|&&b| b == b'\n').count() as u64;
            self.open_line = last != b'\n';
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A `--since` value as docker takes it: an RFC 3339 time (`2026-12-05T04:00:00Z`, any
/// offset), Unix seconds (`1764907200`, a fraction allowed), or a duration before `now`
/// (`90s`, `10m`, `1h30m`).
pub fn parse_since(text: &str, now: Timestamp) -> Result<Timestamp, SinceError> {
    let invalid = || SinceError(text.to_owned());
    if let Ok(time) = text.parse::<Timestamp>() {
        return Ok(time);
    }
    if let Ok(seconds) = text.parse::<f64>() {
        let duration = SignedDuration::try_from_secs_f64(seconds).map_err(|_| invalid())?;
        return Timestamp::from_duration(duration).map_err(|_| invalid());
    }
    let ago: SignedDuration = text.parse().map_err(|_| invalid())?;
    if ago.is_negative() {
        return Err(invalid());
    }
    now.checked_sub(ago).map_err(|_| invalid())
}

/// A `--since` value [`parse_since`] does not read.
#[derive(Debug, thiserror::Error)]
#[error("invalid time {0:?}: expected an RFC 3339 time (2026-12-05T04:00:00Z), Unix seconds, or a duration ago (90s, 10m, 1h30m)")]
pub struct SinceError(String);

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).unwrap()
    }

    /// Writes `pieces` to a log whose clock says 1000 s, then 2000 s, ...
    fn log(pieces: &[&[u8]]) -> Vec<u8> {
        thread_local!(static TICK: std::cell::Cell<i64> = const { std::cell::Cell::new(0) });
        fn clock() -> Timestamp {
            TICK.with(|t| {
                t.set(t.get() + 1);
                at(t.get() * 1000)
            })
        }
        TICK.with(|t| t.set(0));
        let mut log = Timestamped::with_clock(Vec::new(), clock);
        for piece in pieces {
            log.write_all(piece).unwrap();
        }
        log.inner
    }

    fn read(log: &[u8], selection: LineSelection, piece: usize) -> String {
        let mut out = Vec::new();
        let mut reader = LineReader::new(&mut out, selection);
        for chunk in log.chunks(piece) {
            reader.write_all(chunk).unwrap();
        }
        reader.finish().unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn lines_get_the_time_their_first_byte_arrived() {
        let log = log(&[b"one\ntw", b"o\nthree\n", b"four"]);
        let text = String::from_utf8(log).unwrap();
        assert_eq!(
            text,
            "1970-01-01T00:16:40.000000000Z one\n\
             1970-01-01T00:33:20.000000000Z two\n\
             1970-01-01T00:50:00.000000000Z three\n\
             1970-01-01T01:06:40.000000000Z four"
        );
    }

    #[test]
    fn the_reader_strips_keeps_filters_and_skips_in_any_pieces() {
        let log = log(&[b"one\n", b"\n", b"three\n", b"four"]);
        for piece in [1, 7, 31, 32, 1000] {
            let plain = LineSelection::default();
            assert_eq!(read(&log, plain, piece), "one\n\nthree\nfour");
            let stamped = LineSelection {
                timestamps: true,
                ..plain
            };
            assert!(read(&log, stamped, piece)
                .starts_with("1970-01-01T00:16:40.000000000Z one\n1970-01-01T00:33:20"));
            let since = LineSelection {
                since: Some(at(3000)),
                ..plain
            };
            assert_eq!(read(&log, since, piece), "three\nfour");
            let tail = LineSelection { skip: 3, ..plain };
            assert_eq!(read(&log, tail, piece), "four");
        }
        let mut counter = LineCounter::default();
        counter.write_all(&log).unwrap();
        assert_eq!(counter.lines(), 4);
    }

    #[test]
    fn lines_of_older_logs_pass_as_they_are() {
        let old = b"plain line\nshort\n";
        let since = LineSelection {
            since: Some(at(5)),
            ..LineSelection::default()
        };
        assert_eq!(read(old, since, 3), "plain line\nshort\n");
    }

    #[test]
    fn since_takes_times_seconds_and_durations() {
        let now = at(10_000);
        assert_eq!(parse_since("1970-01-01T01:00:00Z", now).unwrap(), at(3600));
        assert_eq!(
            parse_since("1970-01-01T02:00:00+01:00", now).unwrap(),
            at(3600)
        );
        assert_eq!(parse_since("3600", now).unwrap(), at(3600));
        assert_eq!(parse_since("10m", now).unwrap(), at(9400));
        assert_eq!(parse_since("1h30m", now).unwrap(), at(4600));
        let error = parse_since("yesterday", now).unwrap_err().to_string();
        assert!(
            error.starts_with("invalid time \"yesterday\": expected"),
            "{error}"
        );
        assert!(parse_since("-10m", now).is_err());
    }
}
