//! `kiln serve` answers gRPC clients other than tonic on its unix socket.
//!
//! gRPC's C core (Python, C++, Ruby, PHP, C#) sends the percent-encoded socket path as
//! `:authority`, grpc-java and grpc-swift the literal path; the h2 crate refused both
//! until kiln-server put its HTTP/2 front before it (crates/server/src/front.rs).
//!
//! - A raw HTTP/2 client sends each of the three forms and gets a proper gRPC answer.
//! - The Python client in tests/clients/driver_client.py (grpcio, stubs generated from the
//!   .proto by protoc and grpc_python_plugin at test time) runs with its default options
//!   and with each authority form. CI installs grpcio from Debian (1.51, which still sends
//!   `localhost` by default), not from PyPI, which CI cannot reach; the forced forms are
//!   what newer grpcio and grpc-java send by default.
//! - As root, the Python client drives a whole sandbox life with a real VM boot.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kiln_e2e::{demo_image, require_root, workspace_root, KilnRoot, KilnServer};

/// The debian interpreter, where CI's python3-grpcio lives (a developer's PATH may hold
/// another Python).
const PYTHON: &str = "/usr/bin/python3";
const PROTO_DIR: &str = "crates/server/proto/kiln/driver/v1";
/// The three `:authority` values mainstream clients send on a unix socket.
fn authority_forms(socket: &Path) -> [String; 3] {
    let literal = socket.display().to_string();
    let percent_encoded = literal.trim_start_matches('/').replace('/', "%2F");
    [percent_encoded, literal, "localhost".to_owned()]
}

/// Generates the Python stubs for kiln's .proto into a new directory under `root`.
fn python_stubs(root: &KilnRoot) -> PathBuf {
    let out = root.temp_dir().join("stubs");
    std::fs::create_dir_all(&out).unwrap();
    let status = Command::new("protoc")
        .arg("-I")
        .arg(workspace_root().join(PROTO_DIR))
        .arg(format!("--python_out={}", out.display()))
        .arg(format!("--grpc_out={}", out.display()))
        .arg("--plugin=protoc-gen-grpc=/usr/bin/grpc_python_plugin")
        .arg("driver.proto")
        .status()
        .expect("protoc and grpc_python_plugin (scripts/install-deps installs them)");
    assert!(status.success(), "protoc failed: {status}");
    out
}

/// Runs the Python client; returns its stdout, failing with its stderr.
fn python_client(stubs: &Path, socket: &Path, authority: Option<&str>, args: &[&str]) -> String {
    let mut command = Command::new(PYTHON);
    command.arg(workspace_root().join("tests/clients/driver_client.py"));
    if let Some(authority) = authority {
        command.args(["--authority", authority]);
    }
    let output = command
        .arg(stubs)
        .arg(socket)
        .args(args)
        .output()
        .expect("python3 (scripts/install-deps installs python3-grpcio)");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "python client ({authority:?}) failed: {}\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn python_client_with_default_options_and_every_authority_form() {
    let root = KilnRoot::without_guest();
    let server = KilnServer::start(&root);
    let stubs = python_stubs(&root);
    let forms = authority_forms(server.socket());
    let runs = std::iter::once(None).chain(forms.iter().map(|form| Some(form.as_str())));
    for authority in runs {
        let out = python_client(&stubs, server.socket(), authority, &["errors"]);
        assert!(out.contains("STEP list 0\n"), "{authority:?}: {out}");
        assert!(
            out.contains("STEP not_found no such sandbox: 0123456789ab\n"),
            "{authority:?}: {out}"
        );
        assert!(
            out.contains("STEP invalid_argument cpus: invalid CPU count \"1000\""),
            "{authority:?}: {out}"
        );
    }
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn python_client_drives_a_sandbox_life() {
    require_root();
    let root = KilnRoot::with_guest();
    let server = KilnServer::start(&root);
    let stubs = python_stubs(&root);
    let percent_encoded = &authority_forms(server.socket())[0];
    let out = python_client(
        &stubs,
        server.socket(),
        Some(percent_encoded),
        &["lifecycle", &demo_image()],
    );
    let steps: Vec<&str> = out.lines().collect();
    assert!(steps[0].starts_with("STEP create "), "{out}");
    assert_eq!(steps[1], "STEP start STATUS_RUNNING", "{out}");
    assert_eq!(steps[2], "STEP exec 'hello from python' 7", "{out}");
    assert_eq!(steps[3], "STEP stop STATUS_EXITED", "{out}");
    assert_eq!(steps[4], "STEP delete", "{out}");
    let events = steps[5].strip_prefix("STEP watch ").expect(&out);
    let events: Vec<&str> = events.split(' ').collect();
    let position = |kind: &str| {
        events
            .iter()
            .position(|e| *e == kind)
            .unwrap_or_else(|| panic!("no {kind} event in {events:?}"))
    };
    assert!(position("created") < position("booting"), "{events:?}");
    assert!(position("booting") < position("running"), "{events:?}");
    assert!(position("running") < position("exited"), "{events:?}");
    assert!(position("exited") < position("deleted"), "{events:?}");
    root.assert_nothing_left();
}

#[test]
fn raw_http2_client_gets_a_grpc_answer_for_every_authority_form() {
    let root = KilnRoot::without_guest();
    let server = KilnServer::start(&root);
    for authority in authority_forms(server.socket()) {
        let answer = raw_get(server.socket(), &authority);
        assert_eq!(
            answer.status.as_deref(),
            Some("200"),
            "{authority}: {answer:?}"
        );
        assert_eq!(
            answer.grpc_status.as_deref(),
            Some("5"),
            "{authority}: {answer:?}"
        );
        assert!(
            answer
                .grpc_message
                .as_deref()
                .is_some_and(|m| m.contains("no%20such%20sandbox")),
            "{authority}: {answer:?}"
        );
    }
}

/// What the server answered on stream 1.
#[derive(Debug, Default)]
struct Answer {
    status: Option<String>,
    grpc_status: Option<String>,
    grpc_message: Option<String>,
    reset: Option<u32>,
}

/// `Driver/Get` of a sandbox that does not exist, written frame by frame with `authority`
/// as the request's `:authority`, as a client library would send it.
fn raw_get(socket: &Path, authority: &str) -> Answer {
    let mut stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 0x4, 0, 0, &[]);
    let headers = loona_hpack::Encoder::new().encode([
        (&b":method"[..], &b"POST"[..]),
        (b":scheme", b"http"),
        (b":path", b"/kiln.driver.v1.Driver/Get"),
        (b":authority", authority.as_bytes()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]);
    frame(&mut out, 0x1, 0x4, 1, &headers);
    // GetRequest { sandbox: "0123456789ab" }, in gRPC's length-prefixed framing.
    let mut request = vec![0x0a, 12];
    request.extend_from_slice(b"0123456789ab");
    let mut message = vec![0];
    message.extend_from_slice(&(request.len() as u32).to_be_bytes());
    message.extend_from_slice(&request);
    frame(&mut out, 0x0, 0x1, 1, &message);
    stream.write_all(&out).unwrap();

    let mut decoder = loona_hpack::Decoder::new();
    let mut answer = Answer::default();
    loop {
        let mut head = [0u8; 9];
        stream
            .read_exact(&mut head)
            .expect("the server's next frame");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream_id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).unwrap();
        match kind {
            0x1 if stream_id == 1 => {
                for (name, value) in decoder.decode(&payload).expect("HPACK from the server") {
                    let value = String::from_utf8_lossy(&value).into_owned();
                    match &name[..] {
                        b":status" => answer.status = Some(value),
                        b"grpc-status" => answer.grpc_status = Some(value),
                        b"grpc-message" => answer.grpc_message = Some(value),
                        _ => {}
                    }
                }
                if flags & 0x1 != 0 {
                    return answer;
                }
            }
            0x3 if stream_id == 1 => {
                answer.reset = Some(u32::from_be_bytes(payload[..4].try_into().unwrap()));
                return answer;
            }
            0x7 => panic!("GOAWAY from the server: {answer:?} {payload:?}"),
            _ => {}
        }
    }
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}
