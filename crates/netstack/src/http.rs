//! Following the requests of a plain HTTP/1.x connection from the guest, so that each
//! one (keep-alive and pipelining included) is decided before its bytes reach the host:
//! request heads are read with kiln-policy's parser, bodies are skipped by their
//! Content-Length or chunked framing, and an `Upgrade` ends the inspection (what follows
//! is no longer HTTP/1.x). Every length comes from the guest and is bounded.

use kiln_policy::peek::{http_request_head, BodyFraming, HttpPeek, RequestHead, MAX_PEEK_BYTES};

/// The longest chunk-size or trailer line accepted in a chunked body.
const MAX_CHUNK_LINE: usize = 4096;

/// Where the stream is between two reads.
#[derive(Debug)]
enum State {
    /// Collecting a request head (the bytes so far).
    Head(Vec<u8>),
    /// Inside a body of this many more bytes.
    Body(u64),
    /// A chunk-size line (the bytes so far).
    ChunkSize(Vec<u8>),
    /// Inside a chunk's data and its CRLF: this many more bytes.
    ChunkData(u64),
    /// The trailer section after the last chunk: the current line so far.
    Trailer(Vec<u8>),
    /// After an `Upgrade`: not HTTP/1.x any more.
    Opaque,
}

/// The requests of one connection, as they cross.
#[derive(Debug)]
pub struct RequestStream {
    state: State,
    /// The first request was decided before the host side was opened.
    first_decided: bool,
}

impl RequestStream {
    /// A stream whose first request head (in the first bytes fed) was already decided.
    pub fn after_first_decision() -> Self {
        RequestStream {
            state: State::Head(Vec::new()),
            first_decided: true,
        }
    }

    /// Feeds guest bytes. `decide` is asked about each request head, in order, and
    /// answers `Err(reason)` to refuse it. Returns the bytes that may go to the host:
    /// on a refusal (or a malformed request) `Err` carries those before the refused
    /// request and the reason; nothing from the refused request on is forwarded.
    pub fn feed(
        &mut self,
        bytes: &[u8],
        decide: &mut dyn FnMut(&RequestHead) -> Result<(), String>,
    ) -> Result<Vec<u8>, (Vec<u8>, String)> {
        let mut out = Vec::with_capacity(bytes.len());
        match self.feed_into(bytes, decide, &mut out) {
            Ok(()) => Ok(out),
            Err(reason) => Err((out, reason)),
        }
    }

    fn feed_into(
        &mut self,
        mut bytes: &[u8],
        decide: &mut dyn FnMut(&RequestHead) -> Result<(), String>,
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Opaque => {
                    out.extend_from_slice(bytes);
                    bytes = &[];
                }
                State::Body(left) | State::ChunkData(left) => {
                    let n = bytes
                        .len()
                        .min(usize::try_from(*left).unwrap_or(usize::MAX));
                    out.extend_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    *left -= n as u64;
                    if *left == 0 {
                        self.state = match self.state {
                            State::ChunkData(_) => State::ChunkSize(Vec::new()),
                            _ => State::Head(Vec::new()),
                        };
                    }
                }
                State::ChunkSize(line) | State::Trailer(line) => {
                    let end = bytes.iter().position(|&b| b == b'\n');
                    let take = end.map_or(bytes.len(), |i| i + 1);
                    line.extend_from_slice(&bytes[..take]);
                    out.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if line.len() > MAX_CHUNK_LINE {
                        return Err("a chunked body line longer than 4096 bytes".into());
                    }
                    if end.is_some() {
                        let line = std::mem::take(line);
                        self.state = match self.state {
                            State::ChunkSize(_) => match chunk_size(&line)? {
                                0 => State::Trailer(Vec::new()),
                                size => State::ChunkData(size + 2),
                            },
                            _ if line == b"\r\n" || line == b"\n" => State::Head(Vec::new()),
                            _ => State::Trailer(Vec::new()),
                        };
                    }
                }
                State::Head(head) => {
                    // Never more than the parser looks at: the rest waits in `bytes`.
                    let room = MAX_PEEK_BYTES.saturating_sub(head.len());
                    let take = bytes.len().min(room.max(1));
                    head.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    let parsed = match http_request_head(head) {
                        HttpPeek::NeedMore if head.len() < MAX_PEEK_BYTES => continue,
                        HttpPeek::NeedMore => {
                            return Err(format!("no whole request head in {MAX_PEEK_BYTES} bytes"))
                        }
                        HttpPeek::NotHttp => return Err("not an HTTP/1.x request".into()),
                        HttpPeek::Malformed(reason) => {
                            return Err(format!("malformed request: {reason}"))
                        }
                        HttpPeek::Request(parsed) => parsed,
                    };
                    if std::mem::take(&mut self.first_decided) {
                        // Decided before the connection was opened.
                    } else {
                        decide(&parsed)?;
                    }
                    // Bytes past the head go back to the input, behind the body framing.
                    let head = std::mem::take(head);
                    out.extend_from_slice(&head[..parsed.head_len]);
                    let rest = head[parsed.head_len..].to_vec();
                    self.state = if parsed.upgrade {
                        State::Opaque
                    } else {
                        match parsed.body {
                            BodyFraming::None | BodyFraming::ContentLength(0) => {
                                State::Head(Vec::new())
                            }
                            BodyFraming::ContentLength(n) => State::Body(n),
                            BodyFraming::Chunked => State::ChunkSize(Vec::new()),
                        }
                    };
                    if !rest.is_empty() {
                        self.feed_into(&rest, decide, out)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The size of a chunk-size line (`HEX[;ext]\r\n`).
fn chunk_size(line: &[u8]) -> Result<u64, String> {
    let text = std::str::from_utf8(line).map_err(|_| "a chunk size that is not text")?;
    let digits = text.trim_end_matches(['\r', '\n']);
    let digits = digits.split(';').next().unwrap_or("").trim();
    if digits.is_empty() || digits.len() > 15 {
        return Err(format!("a bad chunk size {digits:?}"));
    }
    u64::from_str_radix(digits, 16).map_err(|_| format!("a bad chunk size {digits:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; the request lines decided, and what
    /// reached the host.
    fn run(input: &[u8], step: usize, deny: &str) -> (Vec<String>, Vec<u8>, Option<String>) {
        let mut stream = RequestStream {
            state: State::Head(Vec::new()),
            first_decided: false,
        };
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for piece in input.chunks(step) {
            let mut decide = |head: &RequestHead| {
                let line = format!("{} {}", head.method, head.path);
                seen.push(line.clone());
                if line == deny {
                    Err(format!("{line} refused"))
                } else {
                    Ok(())
                }
            };
            match stream.feed(piece, &mut decide) {
                Ok(bytes) => out.extend(bytes),
                Err((bytes, reason)) => {
                    out.extend(bytes);
                    return (seen, out, Some(reason));
                }
            }
        }
        (seen, out, None)
    }

    const KEEP_ALIVE: &[u8] = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n\
        POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 22\r\n\r\nGET /hidden HTTP/1.1\r\n\
        PUT /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n\
        4;x=y\r\nGET \r\n10\r\n/smuggled HTTP/1\r\n0\r\nTrailer: t\r\n\r\n\
        DELETE /d HTTP/1.1\r\nHost: h\r\n\r\n";

    #[test]
    fn every_request_of_a_keep_alive_connection_is_decided_and_bodies_are_not() {
        for step in [1, 3, 7, 64, KEEP_ALIVE.len()] {
            let (seen, out, refused) = run(KEEP_ALIVE, step, "");
            assert_eq!(
                seen,
                ["GET /a", "POST /b", "PUT /c", "DELETE /d"],
                "step {step}"
            );
            assert_eq!(out, KEEP_ALIVE, "step {step}");
            assert_eq!(refused, None);
        }
    }

    #[test]
    fn a_refused_request_is_not_forwarded_nor_anything_after_it() {
        let (seen, out, refused) = run(KEEP_ALIVE, 5, "PUT /c");
        assert_eq!(seen, ["GET /a", "POST /b", "PUT /c"]);
        assert_eq!(refused.as_deref(), Some("PUT /c refused"));
        let put = KEEP_ALIVE.windows(6).position(|w| w == b"PUT /c").unwrap();
        // Everything before it is forwarded, nothing of it.
        assert_eq!(out, &KEEP_ALIVE[..put], "{}", String::from_utf8_lossy(&out));
    }

    #[test]
    fn an_upgrade_ends_the_inspection_and_garbage_is_refused() {
        let input = b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nGET /x HTTP/1.1\r\n\r\n";
        let (seen, out, refused) = run(input, 4, "");
        assert_eq!(seen, ["GET /ws"]);
        assert_eq!(out, input);
        assert_eq!(refused, None);
        let (_, _, refused) = run(b"\x00\x01 not http\r\n\r\n", 4, "");
        assert!(refused.is_some());
        let bad_chunk = b"PUT / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        let (_, _, refused) = run(bad_chunk, 100, "");
        assert!(refused.unwrap().contains("chunk size"));
    }

    #[test]
    fn the_first_request_decided_before_connecting_is_not_asked_again() {
        let mut stream = RequestStream::after_first_decision();
        let mut seen = Vec::new();
        let out = stream
            .feed(
                b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n",
                &mut |h| {
                    seen.push(h.path.clone());
                    Ok(())
                },
            )
            .unwrap();
        assert_eq!(seen, ["/b"]);
        assert_eq!(out.len(), 56);
    }
}
