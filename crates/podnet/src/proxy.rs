//! The transparent TCP proxy: each redirected connection's original destination comes
//! from the socket (SO_ORIGINAL_DST), kiln-policy decides it (with the first bytes when
//! it asks for them), a denied one is reset at once, an allowed one is opened to its
//! destination by the proxy itself (as the proxy uid, which the rules let through) and
//! relayed; plain HTTP under a policy is relayed request by request (see `http`).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiln_policy::peek::{self, HttpPeek, Peeked, TlsPeek, MAX_PEEK_BYTES};
use kiln_policy::{Connection, Decision, DecisionRecord, FirstBytes, FlowProtocol};

use crate::enforcer::{log, now, Shared};
use crate::limits::{CHUNK, CONNECT_TIMEOUT, MAX_FLOWS, PEEK_TIMEOUT};

/// Accepts redirected connections until the process ends.
pub(crate) fn serve(shared: &Arc<Shared>, listener: TcpListener) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        if shared.flows.fetch_add(1, Ordering::AcqRel) >= MAX_FLOWS {
            shared.flows.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("{MAX_FLOWS} connections relayed already: resetting a new one");
            reset(&stream);
            continue;
        }
        let shared = shared.clone();
        std::thread::spawn(move || {
            handle(&shared, stream);
            shared.flows.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// Where the workload sent the connection before the redirect.
fn original_dst(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt, SockaddrIn, SockaddrIn6};
    Ok(match stream.local_addr()? {
        SocketAddr::V4(_) => {
            let raw = getsockopt(stream, sockopt::OriginalDst)?;
            SocketAddr::V4(SockaddrIn::from(raw).into())
        }
        SocketAddr::V6(_) => {
            let raw = getsockopt(stream, sockopt::Ip6tOriginalDst)?;
            SocketAddr::V6(SockaddrIn6::from(raw).into())
        }
    })
}

/// Closes with a TCP reset: the workload sees ECONNREFUSED/ECONNRESET at once.
pub(crate) fn reset(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a valid linger struct of the size given.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Reads the first bytes until they show TLS, HTTP or neither, at most
/// [`MAX_PEEK_BYTES`] or [`PEEK_TIMEOUT`].
fn read_first_bytes(client: &mut TcpStream, buf: &mut Vec<u8>) -> Peeked {
    let deadline = Instant::now() + PEEK_TIMEOUT;
    let mut chunk = vec![0u8; MAX_PEEK_BYTES];
    loop {
        let seen = peek::peek(buf);
        if seen != Peeked::NeedMore || buf.len() >= MAX_PEEK_BYTES {
            return seen;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || client.set_read_timeout(Some(left)).is_err() {
            return Peeked::Other;
        }
        let room = MAX_PEEK_BYTES - buf.len();
        match client.read(&mut chunk[..room]) {
            Ok(0) | Err(_) => return Peeked::Other,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn handle(shared: &Shared, mut client: TcpStream) {
    let dst = match original_dst(&client) {
        Ok(dst) => dst,
        Err(err) => {
            tracing::warn!(%err, "a connection without an original destination: reset");
            reset(&client);
            return;
        }
    };
    let pinned = shared.pinned(dst.ip());
    let mut first = Vec::new();
    let mut conn = Connection {
        dst,
        pinned: &pinned,
        first_bytes: FirstBytes::NotSeen,
    };
    let mut decision = shared.decide_connection(&conn);
    let mut seen = Peeked::NeedMore;
    if decision == Decision::NeedPeek {
        seen = read_first_bytes(&mut client, &mut first);
        conn.first_bytes = match seen.first_bytes() {
            FirstBytes::NotSeen => FirstBytes::Other,
            other => other,
        };
        decision = shared.decide_connection(&conn);
    }
    let _ = client.set_read_timeout(None);
    let (protocol, sni, host) = match &seen {
        Peeked::Tls(TlsPeek::ClientHello { sni }) => (FlowProtocol::Tls, sni.clone(), None),
        Peeked::Http(HttpPeek::Request(head)) => (FlowProtocol::Http, None, head.host.clone()),
        _ => (FlowProtocol::Tcp, None, None),
    };
    let Some(mut record) = DecisionRecord::new(now(), &shared.sandbox, protocol, dst, &decision)
    else {
        tracing::warn!(%dst, "no decision after the first bytes: reset");
        reset(&client);
        return;
    };
    record.names = pinned.clone();
    record.sni = sni;
    record.host = host;
    // Plain HTTP under a policy: each request is decided and logged, the first too.
    let by_request = protocol == FlowProtocol::Http && shared.current().is_some();
    if !decision.lets_through() || !by_request {
        log(&record);
    }
    if !decision.lets_through() {
        reset(&client);
        return;
    }
    let upstream = match TcpStream::connect_timeout(&dst, CONNECT_TIMEOUT) {
        Ok(upstream) => upstream,
        Err(err) => {
            tracing::warn!(%dst, %err, "connecting to the original destination failed: reset");
            reset(&client);
            return;
        }
    };
    let (up, down) = relay(shared, client, upstream, first, by_request.then_some(dst));
    record.time = now();
    record.bytes_up = Some(up);
    record.bytes_down = Some(down);
    if !by_request {
        log(&record);
    }
}

/// What the upstream-to-workload direction is told by the other one.
#[derive(Default)]
pub(crate) struct Drain {
    /// A request was denied: the proxy answers the workload itself, after the responses
    /// already under way (so this direction must not close the workload's side).
    pub denied: AtomicBool,
    /// Until when responses may still come.
    pub deadline: Mutex<Option<Instant>>,
}

/// Relays both directions; with `requests` (the destination), the workload's side is
/// read request by request and each decided. Returns bytes up and down.
fn relay(
    shared: &Shared,
    mut client: TcpStream,
    mut upstream: TcpStream,
    first: Vec<u8>,
    requests: Option<SocketAddr>,
) -> (u64, u64) {
    let drain = Arc::new(Drain::default());
    let down = match (upstream.try_clone(), client.try_clone()) {
        (Ok(from), Ok(to)) => {
            let drain = drain.clone();
            std::thread::spawn(move || copy_down(from, to, &drain))
        }
        _ => {
            reset(&client);
            return (0, 0);
        }
    };
    let up = match requests {
        Some(dst) => crate::http::forward_requests(
            shared,
            dst,
            &mut client,
            &mut upstream,
            first,
            &drain,
            &down,
        ),
        None => copy_up(&mut client, &mut upstream, &first),
    };
    let down = down.join().unwrap_or(0);
    (up, down)
}

/// Workload to destination, as bytes; the destination's write side closes at the end.
fn copy_up(client: &mut TcpStream, upstream: &mut TcpStream, first: &[u8]) -> u64 {
    let mut sent = 0;
    if upstream.write_all(first).is_ok() {
        sent += first.len() as u64;
        let mut buf = vec![0u8; CHUNK];
        loop {
            match client.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if upstream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent += n as u64;
                }
            }
        }
    }
    let _ = upstream.shutdown(Shutdown::Write);
    sent
}

/// Destination to workload until the destination closes (or, once a request was denied,
/// until the drain deadline).
fn copy_down(mut upstream: TcpStream, mut client: TcpStream, drain: &Drain) -> u64 {
    // Short timeouts let this direction notice the drain deadline.
    let _ = upstream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = vec![0u8; CHUNK];
    let mut received = 0;
    loop {
        match upstream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if client.write_all(&buf[..n]).is_err() {
                    break;
                }
                received += n as u64;
            }
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                let deadline = drain.deadline.lock().ok().and_then(|d| *d);
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    if !drain.denied.load(Ordering::Acquire) {
        let _ = client.shutdown(Shutdown::Write);
    }
    received
}
