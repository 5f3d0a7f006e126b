//! Plain HTTP under a policy: the workload's side of the connection is read one request
//! at a time (head, then the body by its framing), each request decided by kiln-policy
//! and logged before it is forwarded, keep-alive included. A denied request stops the
//! connection: the responses already under way are let through, then the workload gets
//! a 403 naming kiln, the policy and the reason, and the connection closes.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Instant;

use kiln_policy::peek::{http_request_head, BodyFraming, HttpPeek, RequestHead, MAX_PEEK_BYTES};
use kiln_policy::{DecisionRecord, FlowProtocol, Request};

use crate::enforcer::{log, now, Shared};
use crate::limits::{CHUNK, DRAIN_TIMEOUT, MAX_CHUNK_LINE};
use crate::proxy::Drain;

/// The workload's bytes not yet forwarded, and where more come from.
struct Input<'a> {
    client: &'a mut TcpStream,
    buf: Vec<u8>,
}

impl Input<'_> {
    /// Reads more; `false` at the end of the stream.
    fn fill(&mut self) -> bool {
        let mut chunk = vec![0u8; CHUNK];
        match self.client.read(&mut chunk) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }
}

/// Why the relay of requests stopped early.
enum Stop {
    /// The workload closed (or the destination did).
    End,
    /// An answer the proxy gives itself: status line and body.
    Answer(&'static str, String),
}

/// Forwards the workload's requests to `upstream`, deciding each. Returns bytes sent up.
pub(crate) fn forward_requests(
    shared: &Shared,
    dst: SocketAddr,
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    first: Vec<u8>,
    drain: &Drain,
    down: &JoinHandle<u64>,
) -> u64 {
    let mut input = Input { client, buf: first };
    let mut sent = 0u64;
    let stop = loop {
        match next_request(shared, dst, &mut input, upstream, &mut sent) {
            Ok(()) => continue,
            Err(stop) => break stop,
        }
    };
    if let Stop::Answer(..) = stop {
        // Before the destination sees the end of the requests: the other direction must
        // know not to close the workload's side when the destination closes.
        drain.denied.store(true, Ordering::Release);
        if let Ok(mut deadline) = drain.deadline.lock() {
            *deadline = Some(Instant::now() + DRAIN_TIMEOUT);
        }
    }
    let _ = upstream.shutdown(Shutdown::Write);
    if let Stop::Answer(status, body) = stop {
        // Responses to the requests already forwarded come first.
        while !down.is_finished() {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = input.client.write_all(response.as_bytes());
        let _ = input.client.shutdown(Shutdown::Both);
    }
    sent
}

/// Reads, decides and forwards one request with its body.
fn next_request(
    shared: &Shared,
    dst: SocketAddr,
    input: &mut Input<'_>,
    upstream: &mut TcpStream,
    sent: &mut u64,
) -> Result<(), Stop> {
    let head = loop {
        match http_request_head(&input.buf) {
            HttpPeek::Request(head) => break head,
            HttpPeek::NeedMore if input.buf.len() < MAX_PEEK_BYTES => {
                if !input.fill() {
                    return Err(Stop::End);
                }
            }
            HttpPeek::NeedMore => return Err(bad_request("a request head over 16 KiB")),
            HttpPeek::NotHttp => return Err(bad_request("not an HTTP/1.x request")),
            HttpPeek::Malformed(reason) => return Err(bad_request(&reason)),
        }
    };
    decide(shared, dst, &head)?;
    let mut forward = |bytes: &[u8]| -> Result<(), Stop> {
        upstream.write_all(bytes).map_err(|_| Stop::End)?;
        *sent += bytes.len() as u64;
        Ok(())
    };
    forward(&input.buf[..head.head_len])?;
    input.buf.drain(..head.head_len);
    match head.body {
        BodyFraming::None => {}
        BodyFraming::ContentLength(n) => forward_exact(input, n, &mut forward)?,
        BodyFraming::Chunked => forward_chunked(input, &mut forward)?,
    }
    if head.upgrade {
        // No more HTTP/1.x requests on this connection: the rest is relayed as it is.
        loop {
            let rest = std::mem::take(&mut input.buf);
            forward(&rest)?;
            if !input.fill() {
                return Err(Stop::End);
            }
        }
    }
    Ok(())
}

fn decide(shared: &Shared, dst: SocketAddr, head: &RequestHead) -> Result<(), Stop> {
    let pinned = shared.pinned(dst.ip());
    let request = Request {
        method: &head.method,
        path: &head.path,
        query: head.query.as_deref(),
        host: head.host.as_deref(),
    };
    let Some(decision) = shared.decide_request(dst, &pinned, &request) else {
        return Ok(());
    };
    let Some(mut record) =
        DecisionRecord::new(now(), &shared.sandbox, FlowProtocol::Http, dst, &decision)
    else {
        return Err(bad_request("no decision on the request"));
    };
    record.names = pinned;
    record.host = head.host.clone();
    record.method = Some(head.method.clone());
    record.path = Some(head.path.clone());
    log(&record);
    if decision.lets_through() {
        return Ok(());
    }
    let reason = record.reason.unwrap_or_default();
    Err(Stop::Answer(
        "403 Forbidden",
        format!(
            "kiln: {} {} denied by the sandbox network policy {}: {reason}\n",
            head.method,
            head.path,
            shared.rule_set()
        ),
    ))
}

fn bad_request(reason: &str) -> Stop {
    Stop::Answer(
        "400 Bad Request",
        format!("kiln: the sandbox network proxy cannot forward this request: {reason}\n"),
    )
}

fn forward_exact(
    input: &mut Input<'_>,
    mut left: u64,
    forward: &mut impl FnMut(&[u8]) -> Result<(), Stop>,
) -> Result<(), Stop> {
    while left > 0 {
        if input.buf.is_empty() && !input.fill() {
            return Err(Stop::End);
        }
        let n = input
            .buf
            .len()
            .min(usize::try_from(left).unwrap_or(usize::MAX));
        forward(&input.buf[..n])?;
        input.buf.drain(..n);
        left -= n as u64;
    }
    Ok(())
}

/// One line of chunked framing, CRLF included.
fn framing_line(input: &mut Input<'_>) -> Result<Vec<u8>, Stop> {
    loop {
        if let Some(end) = input.buf.windows(2).position(|w| w == b"\r\n") {
            return Ok(input.buf.drain(..end + 2).collect());
        }
        if input.buf.len() > MAX_CHUNK_LINE {
            return Err(bad_request("a chunk framing line over 4 KiB"));
        }
        if !input.fill() {
            return Err(Stop::End);
        }
    }
}

fn forward_chunked(
    input: &mut Input<'_>,
    forward: &mut impl FnMut(&[u8]) -> Result<(), Stop>,
) -> Result<(), Stop> {
    loop {
        let line = framing_line(input)?;
        let text = std::str::from_utf8(&line[..line.len() - 2]).unwrap_or("-");
        let digits = text.split(';').next().unwrap_or_default().trim();
        let size =
            u64::from_str_radix(digits, 16).map_err(|_| bad_request("a malformed chunk size"))?;
        forward(&line)?;
        if size == 0 {
            // Trailers, up to the empty line.
            loop {
                let trailer = framing_line(input)?;
                forward(&trailer)?;
                if trailer.len() == 2 {
                    return Ok(());
                }
            }
        }
        forward_exact(input, size, forward)?;
        let end = framing_line(input)?;
        if end.len() != 2 {
            return Err(bad_request("a chunk not followed by CRLF"));
        }
        forward(&end)?;
    }
}
