//! Round trips, the exact wire bytes, and hostile input.

use std::io::Cursor;

use proptest::prelude::*;

use crate::*;

fn spec() -> RunSpec {
    RunSpec {
        argv: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
        env: vec!["PATH=/usr/bin:/bin".into(), "EMPTY=".into()],
        cwd: Some("/sandbox".into()),
        identity: Identity {
            run_as: RunAs::Sandbox,
            uid: 10001,
            gid: 10001,
        },
        tty: true,
        terminal: Some(TerminalSize { rows: 24, cols: 80 }),
        task: None,
        openshell: None,
    }
}

fn header(kind: u8, session: u32, len: u32) -> Vec<u8> {
    let mut bytes = b"KILN".to_vec();
    bytes.extend([WIRE_VERSION, kind, 0, 0]);
    bytes.extend(session.to_be_bytes());
    bytes.extend(len.to_be_bytes());
    bytes
}

fn round_trip(frame: &Frame) -> Frame {
    let bytes = encode_frame(frame).unwrap();
    let (decoded, used) = decode_frame(&bytes).unwrap().unwrap();
    assert_eq!(used, bytes.len());
    let read = read_frame(&mut Cursor::new(&bytes)).unwrap().unwrap();
    assert_eq!(read, decoded);
    decoded
}

#[test]
fn header_layout_is_fixed() {
    let frame = Frame::new(
        7,
        Message::Data {
            stream: Stream::Stderr,
            bytes: b"oops".to_vec(),
        },
    );
    let mut expected = header(0x12, 7, 4);
    expected.extend(b"oops");
    assert_eq!(encode_frame(&frame).unwrap(), expected);

    let eof = Frame::new(
        MAIN_SESSION,
        Message::Eof {
            stream: Stream::Stdin,
        },
    );
    assert_eq!(encode_frame(&eof).unwrap(), header(0x18, 1, 0));
}

#[test]
fn control_payloads_are_the_documented_json() {
    let cases: Vec<(Message, &str)> = vec![
        (
            Message::Result(WorkloadResult::Exited { code: 3 }),
            r#"{"outcome":"exited","code":3}"#,
        ),
        (
            Message::Result(WorkloadResult::OomKilled),
            r#"{"outcome":"oom_killed"}"#,
        ),
        (
            Message::Result(WorkloadResult::StartFailed {
                reason: StartFailure::NotFound,
                message: "no /x".into(),
            }),
            r#"{"outcome":"start_failed","reason":"not_found","message":"no /x"}"#,
        ),
        (
            Message::BootError(BootError {
                step: BootStep::MountIdentity,
                message: "no disk".into(),
            }),
            r#"{"step":"mount_identity","message":"no disk"}"#,
        ),
        (
            Message::Phase(PhaseTime {
                phase: BootPhase::WorkloadStarted,
                boottime_ns: 5,
            }),
            r#"{"phase":"workload_started","boottime_ns":5}"#,
        ),
        (
            Message::Signal(SignalRequest { signal: 15 }),
            r#"{"signal":15}"#,
        ),
        (
            Message::Resize(TerminalSize { rows: 1, cols: 2 }),
            r#"{"rows":1,"cols":2}"#,
        ),
        (
            Message::Shutdown(ShutdownRequest { grace_ms: 10_000 }),
            r#"{"grace_ms":10000}"#,
        ),
        (
            Message::Credit(OutputCredit { bytes: 65552 }),
            r#"{"bytes":65552}"#,
        ),
        (
            Message::Clock(WallClock {
                unix_ns: 1_796_443_477_123_456_789,
            }),
            r#"{"unix_ns":1796443477123456789}"#,
        ),
    ];
    for (message, json) in cases {
        let bytes = encode_frame(&Frame::new(1, message.clone())).unwrap();
        assert_eq!(&bytes[HEADER_LEN..], json.as_bytes());
        assert_eq!(round_trip(&Frame::new(1, message.clone())).message, message);
    }
    let run = encode_frame(&Frame::new(1, Message::Run(spec()))).unwrap();
    let value: serde_json::Value = serde_json::from_slice(&run[HEADER_LEN..]).unwrap();
    assert_eq!(value["identity"]["run_as"], "sandbox");
    assert_eq!(value["terminal"]["cols"], 80);
}

#[test]
fn an_openshell_launch_carries_its_token_and_tls_on_the_wire_but_never_in_debug() {
    let mut with_token = spec();
    with_token.openshell = Some(OpenShellLaunch {
        token: Some("eyJ.secret.token".into()),
        tls: Some(OpenShellTls {
            ca: "CA PEM".into(),
            cert: "CERT PEM".into(),
            key: "secret KEY PEM".into(),
        }),
    });
    let frame = Frame::new(MAIN_SESSION, Message::Run(with_token));
    assert_eq!(round_trip(&frame), frame);
    let bytes = encode_frame(&frame).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&bytes[HEADER_LEN..]).unwrap();
    assert_eq!(
        json["openshell"],
        serde_json::json!({
            "token": "eyJ.secret.token",
            "tls": {"ca": "CA PEM", "cert": "CERT PEM", "key": "secret KEY PEM"}
        })
    );
    let shown = format!("{frame:?}");
    assert!(!shown.contains("secret"), "{shown}");
    assert!(!shown.contains("PEM"), "{shown}");
    assert!(shown.contains("<redacted>"), "{shown}");
    // A spec without one reads as it always did.
    let plain = encode_frame(&Frame::new(MAIN_SESSION, Message::Run(spec()))).unwrap();
    assert!(!String::from_utf8_lossy(&plain).contains("openshell"));
}

#[test]
fn exit_codes_follow_shells_and_docker() {
    let code = |r: WorkloadResult| r.exit_code();
    assert_eq!(code(WorkloadResult::Exited { code: 0 }), 0);
    assert_eq!(code(WorkloadResult::Exited { code: 42 }), 42);
    assert_eq!(code(WorkloadResult::Killed { signal: 15 }), 143);
    assert_eq!(code(WorkloadResult::OomKilled), 137);
    let failed = |reason| WorkloadResult::StartFailed {
        reason,
        message: String::new(),
    };
    assert_eq!(code(failed(StartFailure::NotFound)), 127);
    assert_eq!(code(failed(StartFailure::NotExecutable)), 126);
    assert_eq!(code(failed(StartFailure::Other)), 126);
    // Decoding refuses such a signal; one made in code saturates instead of overflowing.
    assert_eq!(code(WorkloadResult::Killed { signal: i32::MAX }), i32::MAX);
}

/// A guest's numbers are checked where they are decoded: an exit code, a signal or a
/// credit out of range is a typed error naming what is accepted, never a value that
/// overflows the host's arithmetic (`128 + signal`). The encoder refuses the same.
#[test]
fn out_of_range_numbers_are_typed_errors() {
    let decoded = |kind: u8, json: &str| {
        let mut bytes = header(kind, MAIN_SESSION, json.len() as u32);
        bytes.extend(json.as_bytes());
        decode_frame(&bytes).map(|frame| frame.unwrap().0.message)
    };
    let refused = |kind: u8, json: &str, accepted: &str| {
        let err = decoded(kind, json).unwrap_err();
        assert!(
            matches!(err, ProtocolError::BadPayload { .. }) && err.to_string().contains(accepted),
            "{json}: {err}"
        );
    };
    refused(
        0x05,
        r#"{"outcome":"killed","signal":2147483647}"#,
        "1 to 64",
    );
    refused(0x05, r#"{"outcome":"killed","signal":0}"#, "1 to 64");
    refused(0x05, r#"{"outcome":"exited","code":-1}"#, "0 to 255");
    refused(0x05, r#"{"outcome":"exited","code":256}"#, "0 to 255");
    refused(0x04, r#"{"signal":65}"#, "1 to 64");
    refused(0x04, r#"{"signal":-9}"#, "1 to 64");
    refused(0x09, r#"{"bytes":0}"#, "1 to 1048576");
    refused(0x09, r#"{"bytes":1048577}"#, "1 to 1048576");
    assert_eq!(
        decoded(0x05, r#"{"outcome":"killed","signal":64}"#).unwrap(),
        Message::Result(WorkloadResult::Killed { signal: 64 })
    );
    assert_eq!(
        decoded(0x05, r#"{"outcome":"exited","code":255}"#).unwrap(),
        Message::Result(WorkloadResult::Exited { code: 255 })
    );
    let killed = Message::Result(WorkloadResult::Killed { signal: -1 });
    assert!(encode_frame(&Frame::new(MAIN_SESSION, killed)).is_err());
    let signal = Message::Signal(SignalRequest { signal: 99 });
    assert!(encode_frame(&Frame::new(MAIN_SESSION, signal)).is_err());
}

#[test]
fn data_frames_charge_their_wire_size_to_the_window() {
    let data = |len: usize| {
        Frame::new(
            MAIN_SESSION,
            Message::Data {
                stream: Stream::Stdout,
                bytes: vec![b'x'; len],
            },
        )
    };
    for len in [1, 4096, MAX_PAYLOAD] {
        let frame = data(len);
        assert_eq!(
            frame.window_charge() as usize,
            encode_frame(&frame).unwrap().len()
        );
    }
    let eof = Frame::new(
        MAIN_SESSION,
        Message::Eof {
            stream: Stream::Stdout,
        },
    );
    assert_eq!(eof.window_charge(), 0);
    // A whole frame of the largest payload fits one window.
    assert!(data(MAX_PAYLOAD - HEADER_LEN).window_charge() <= SESSION_WINDOW);
}

#[test]
fn negotiation_picks_the_newest_common_version() {
    let hello = |min, max| Hello {
        min_version: min,
        max_version: max,
        software: "peer".into(),
    };
    assert_eq!(negotiate(&hello(1, 3), &hello(2, 5)).unwrap(), 3);
    assert_eq!(negotiate(&Hello::ours("a"), &Hello::ours("b")).unwrap(), 2);
    // Version 1 had no flow control: a peer that speaks only it is refused.
    assert!(negotiate(&Hello::ours("a"), &hello(1, 1)).is_err());
    let err = negotiate(&hello(1, 1), &hello(2, 4)).unwrap_err();
    assert!(
        matches!(err, ProtocolError::NoCommonVersion { .. }),
        "{err}"
    );
    assert!(
        negotiate(&hello(1, 9), &hello(5, 2)).is_err(),
        "inverted range"
    );

    // A newer peer's hello with fields this build does not know still decodes.
    let json = br#"{"min_version":2,"max_version":4,"software":"kiln 9","features":["x"]}"#;
    let mut bytes = header(0x01, CONTROL_SESSION, json.len() as u32);
    bytes.extend(json);
    let Message::Hello(theirs) = decode_frame(&bytes).unwrap().unwrap().0.message else {
        panic!("not a hello");
    };
    assert_eq!(negotiate(&Hello::ours("kiln-init"), &theirs).unwrap(), 2);
    // Every other message refuses unknown fields.
    let json = br#"{"signal":15,"extra":1}"#;
    let mut bytes = header(0x04, MAIN_SESSION, json.len() as u32);
    bytes.extend(json);
    assert!(matches!(
        decode_frame(&bytes),
        Err(ProtocolError::BadPayload { .. })
    ));
}

#[test]
fn sessions_interleave_on_one_stream() {
    let frames = vec![
        Frame::new(CONTROL_SESSION, Message::Hello(Hello::ours("kiln-init"))),
        Frame::new(MAIN_SESSION, Message::Run(spec())),
        Frame::new(
            2,
            Message::Data {
                stream: Stream::Stdout,
                bytes: b"two".to_vec(),
            },
        ),
        Frame::new(
            MAIN_SESSION,
            Message::Data {
                stream: Stream::Stdout,
                bytes: b"one".to_vec(),
            },
        ),
        Frame::new(
            2,
            Message::Eof {
                stream: Stream::Stdout,
            },
        ),
        Frame::new(
            MAIN_SESSION,
            Message::Result(WorkloadResult::Killed { signal: 9 }),
        ),
    ];
    let mut stream = Vec::new();
    for frame in &frames {
        write_frame(&mut stream, frame).unwrap();
    }
    let mut reader = Cursor::new(stream);
    let mut read = Vec::new();
    while let Some(frame) = read_frame(&mut reader).unwrap() {
        read.push(frame);
    }
    assert_eq!(read, frames);
}

#[test]
fn concurrent_writers_share_a_unix_socket() {
    use std::os::unix::net::UnixStream;
    use std::sync::{Arc, Mutex};

    let (host, guest) = UnixStream::pair().unwrap();
    let guest = Arc::new(Mutex::new(guest));
    let writers: Vec<_> = (1..=4u32)
        .map(|session| {
            let guest = Arc::clone(&guest);
            std::thread::spawn(move || {
                for i in 0..200u32 {
                    let bytes = format!("{session}:{i};").repeat(100).into_bytes();
                    let frame = Frame::new(
                        session,
                        Message::Data {
                            stream: Stream::Stdout,
                            bytes,
                        },
                    );
                    write_frame(&mut *guest.lock().unwrap(), &frame).unwrap();
                }
                let end = Frame::new(session, Message::Result(WorkloadResult::Exited { code: 0 }));
                write_frame(&mut *guest.lock().unwrap(), &end).unwrap();
            })
        })
        .collect();
    let reader = std::thread::spawn(move || {
        let mut host = host;
        let mut next = [0u32; 5];
        let mut ended = 0;
        while ended < 4 {
            let frame = read_frame(&mut host).unwrap().unwrap();
            let session = frame.session as usize;
            match frame.message {
                Message::Data { bytes, .. } => {
                    let expected = format!("{session}:{};", next[session]).repeat(100);
                    assert_eq!(bytes, expected.as_bytes(), "frames never interleave");
                    next[session] += 1;
                }
                Message::Result(_) => ended += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        next
    });
    for writer in writers {
        writer.join().unwrap();
    }
    drop(guest);
    assert_eq!(reader.join().unwrap()[1..], [200; 4]);
}

#[test]
fn long_stream_data_is_split_at_the_limit() {
    let data: Vec<u8> = (0..MAX_PAYLOAD * 2 + 10).map(|i| i as u8).collect();
    let mut wire = Vec::new();
    write_stream(&mut wire, 3, Stream::Stdin, &data).unwrap();
    write_stream(&mut wire, 3, Stream::Stdin, &[]).unwrap();
    let mut reader = Cursor::new(wire);
    let mut sizes = Vec::new();
    let mut joined = Vec::new();
    while let Some(frame) = read_frame(&mut reader).unwrap() {
        let Message::Data {
            stream: Stream::Stdin,
            bytes,
        } = frame.message
        else {
            panic!("unexpected {frame:?}");
        };
        sizes.push(bytes.len());
        joined.extend(bytes);
    }
    assert_eq!(sizes, [MAX_PAYLOAD, MAX_PAYLOAD, 10]);
    assert_eq!(joined, data);
}

#[test]
fn malformed_frames_are_typed_errors() {
    let err = |bytes: &[u8]| decode_frame(bytes).unwrap_err();
    let mut bad_magic = header(1, 0, 0);
    bad_magic[0] = b'X';
    assert!(matches!(err(&bad_magic), ProtocolError::BadMagic { .. }));
    let mut bad_version = header(1, 0, 0);
    bad_version[4] = 2;
    assert!(matches!(
        err(&bad_version),
        ProtocolError::UnsupportedVersion { found: 2 }
    ));
    assert!(matches!(
        err(&header(0x7f, 0, 0)),
        ProtocolError::UnknownKind { found: 0x7f }
    ));
    let mut reserved = header(1, 0, 0);
    reserved[7] = 1;
    assert!(matches!(
        err(&reserved),
        ProtocolError::ReservedNotZero { found: 1 }
    ));
    // The length is refused from the header alone, before any payload arrives.
    assert!(matches!(
        err(&header(0x11, 0, u32::MAX)),
        ProtocolError::TooLarge { .. }
    ));
    let limit = header(0x11, 0, MAX_PAYLOAD as u32 + 1);
    assert!(matches!(err(&limit), ProtocolError::TooLarge { .. }));
    assert!(matches!(
        err(&header(0x11, 0, 0)),
        ProtocolError::BadPayload { .. }
    ));
    let mut eof_with_data = header(0x19, 0, 1);
    eof_with_data.push(b'x');
    assert!(matches!(
        err(&eof_with_data),
        ProtocolError::BadPayload { .. }
    ));
    let mut not_json = header(0x05, 1, 3);
    not_json.extend(b"{{{");
    let message = err(&not_json).to_string();
    assert!(message.starts_with("bad Result payload:"), "{message}");
    let mut unknown_outcome = header(0x05, 1, 22);
    unknown_outcome.extend(br#"{"outcome":"vanished"}"#);
    assert!(matches!(
        err(&unknown_outcome),
        ProtocolError::BadPayload { .. }
    ));
    let mut empty_argv = spec();
    empty_argv.argv.clear();
    let payload = serde_json::to_vec(&empty_argv).unwrap();
    let mut run = header(0x02, 1, payload.len() as u32);
    run.extend(&payload);
    assert!(err(&run).to_string().contains("argv is empty"));
    assert!(encode_frame(&Frame::new(1, Message::Run(empty_argv))).is_err());
    let mut bad_env = spec();
    bad_env.env.push("NOEQUALS".into());
    assert!(encode_frame(&Frame::new(1, Message::Run(bad_env))).is_err());
    let empty = Message::Data {
        stream: Stream::Stdout,
        bytes: vec![],
    };
    assert!(encode_frame(&Frame::new(1, empty)).is_err());
}

#[test]
fn partial_input_waits_and_truncation_is_an_error() {
    let bytes = encode_frame(&Frame::new(1, Message::Run(spec()))).unwrap();
    for cut in 0..bytes.len() {
        assert!(
            decode_frame(&bytes[..cut]).unwrap().is_none(),
            "cut at {cut}"
        );
        let read = read_frame(&mut Cursor::new(&bytes[..cut]));
        match cut {
            0 => assert!(read.unwrap().is_none()),
            _ => assert!(
                matches!(read, Err(ProtocolError::Truncated { .. })),
                "cut at {cut}"
            ),
        }
    }
}

fn stream() -> impl Strategy<Value = Stream> {
    prop_oneof![
        Just(Stream::Stdin),
        Just(Stream::Stdout),
        Just(Stream::Stderr)
    ]
}

fn text() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,12}"
}

fn run_spec() -> impl Strategy<Value = RunSpec> {
    (
        prop::collection::vec(text(), 1..4),
        prop::collection::vec(
            ("[A-Z_]{1,5}", text()).prop_map(|(k, v)| format!("{k}={v}")),
            0..4,
        ),
        prop::option::of(text()),
        (any::<bool>(), any::<u32>(), any::<u32>()),
        any::<bool>(),
        prop::option::of((any::<u16>(), any::<u16>())),
    )
        .prop_map(
            |(argv, env, cwd, (sandbox, uid, gid), tty, terminal)| RunSpec {
                argv,
                env,
                cwd,
                identity: Identity {
                    run_as: if sandbox { RunAs::Sandbox } else { RunAs::Uid },
                    uid,
                    gid,
                },
                tty,
                terminal: terminal.map(|(rows, cols)| TerminalSize { rows, cols }),
                task: None,
                openshell: None,
            },
        )
}

fn result() -> impl Strategy<Value = WorkloadResult> {
    let reason = prop_oneof![
        Just(StartFailure::NotFound),
        Just(StartFailure::NotExecutable),
        Just(StartFailure::Other)
    ];
    prop_oneof![
        (0..=255i32).prop_map(|code| WorkloadResult::Exited { code }),
        (1..=MAX_SIGNAL).prop_map(|signal| WorkloadResult::Killed { signal }),
        Just(WorkloadResult::OomKilled),
        (reason, text())
            .prop_map(|(reason, message)| WorkloadResult::StartFailed { reason, message }),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    let step = prop::sample::select(vec![
        BootStep::KernelFilesystems,
        BootStep::UserNamespaces,
        BootStep::MountRoot,
        BootStep::Overlay,
        BootStep::SwitchRoot,
        BootStep::Network,
        BootStep::SupervisorStart,
    ]);
    let phase = prop::sample::select(vec![
        BootPhase::InitStarted,
        BootPhase::SupervisorStarted,
        BootPhase::WorkloadStarted,
        BootPhase::WorkloadEnded,
        BootPhase::Shutdown,
    ]);
    prop_oneof![
        (any::<u16>(), any::<u16>(), text()).prop_map(|(min_version, max_version, software)| {
            Message::Hello(Hello {
                min_version,
                max_version,
                software,
            })
        }),
        run_spec().prop_map(Message::Run),
        (stream(), prop::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(stream, bytes)| Message::Data { stream, bytes }),
        stream().prop_map(|stream| Message::Eof { stream }),
        (any::<u16>(), any::<u16>())
            .prop_map(|(rows, cols)| Message::Resize(TerminalSize { rows, cols })),
        (1..=MAX_SIGNAL).prop_map(|signal| Message::Signal(SignalRequest { signal })),
        result().prop_map(Message::Result),
        (step, text()).prop_map(|(step, message)| Message::BootError(BootError { step, message })),
        (phase, any::<u64>())
            .prop_map(|(phase, boottime_ns)| Message::Phase(PhaseTime { phase, boottime_ns })),
        any::<u64>().prop_map(|grace_ms| Message::Shutdown(ShutdownRequest { grace_ms })),
        (1..=SESSION_WINDOW).prop_map(|bytes| Message::Credit(OutputCredit { bytes })),
        any::<u64>().prop_map(|unix_ns| Message::Clock(WallClock { unix_ns })),
    ]
}

proptest! {
    #[test]
    fn every_message_round_trips(frames in prop::collection::vec((any::<u32>(), message()), 1..6)) {
        let frames: Vec<Frame> = frames.into_iter().map(|(s, m)| Frame::new(s, m)).collect();
        let mut wire = Vec::new();
        for frame in &frames {
            prop_assert_eq!(&round_trip(frame), frame);
            write_frame(&mut wire, frame).unwrap();
        }
        // Decoding a concatenation frame by frame gives the frames back.
        let mut rest = &wire[..];
        for frame in &frames {
            let (decoded, used) = decode_frame(rest).unwrap().unwrap();
            prop_assert_eq!(&decoded, frame);
            rest = &rest[used..];
        }
        prop_assert!(rest.is_empty());
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_frame(&bytes);
        let mut reader = Cursor::new(&bytes);
        while let Ok(Some(_)) = read_frame(&mut reader) {}
    }

    #[test]
    fn random_payloads_behind_valid_headers_never_panic(
        kind in prop::sample::select(vec![1u8, 2, 3, 4, 5, 6, 7, 8, 9, 0x10, 0x11, 0x12, 0x18, 0x19, 0x1a]),
        session in any::<u32>(),
        payload in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut bytes = header(kind, session, payload.len() as u32);
        bytes.extend(&payload);
        if let Ok(Some((frame, used))) = decode_frame(&bytes) {
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(frame.session, session);
            // Whatever decodes encodes again and decodes to the same frame.
            let again = encode_frame(&frame).unwrap();
            prop_assert_eq!(decode_frame(&again).unwrap().unwrap().0, frame);
        }
    }

    #[test]
    fn mutated_frames_never_panic(
        message in message(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = encode_frame(&Frame::new(1, message)).unwrap();
        for (index, value) in flips {
            let i = index.index(bytes.len());
            bytes[i] = value;
        }
        let _ = decode_frame(&bytes);
        let _ = read_frame(&mut Cursor::new(&bytes));
    }
}
