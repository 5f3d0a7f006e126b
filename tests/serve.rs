//! `kiln serve` end to end: the `kiln` binary serving the driver API on a unix socket,
//! driven by the Rust client generated from crates/server/proto (kiln_server::proto).
//! Covers the socket's permissions, the refusal of another uid (SO_PEERCRED), the gRPC
//! error codes, a whole sandbox life with real VM boots under TCG (events in order; exec
//! with stdin, four at once, on a tty, a signal, an abandoned one; a volume; stop;
//! delete) and recovery when the server restarts (re-attached: get, exec, stop, watch) or
//! a monitor dies (failed, no QEMU left). Every test kills what it started: the server,
//! and any monitor or QEMU naming its root.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use kiln_e2e::{
    demo_image, fixtures, probe, require_root, runtime, KilnRoot, KilnServer, Probe, Registry,
    OTHER_UID,
};
use kiln_server::proto;
use kiln_server::proto::driver_client::DriverClient;
use kiln_server::proto::event::Kind;
use kiln_server::proto::exec_input;
use kiln_server::proto::exec_output;
use kiln_server::proto::{
    CreateRequest, DeleteRequest, Event, ExecInput, ExecStart, GetRequest, ListRequest, Network,
    Sandbox, StartRequest, Status, StdinEof, StopRequest, WatchRequest,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Code;

/// A boot takes 3-15 s under TCG; the rest is slack for a loaded two-core machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// A sandbox of the demo image whose workload stays up for an hour.
fn long_lived(image: &str, name: &str) -> CreateRequest {
    CreateRequest {
        image: image.to_owned(),
        name: name.to_owned(),
        command: vec!["sleep".into(), "3600".into()],
        network: Network::None as i32,
        ..CreateRequest::default()
    }
}

fn status(sandbox: &Sandbox) -> Status {
    Status::try_from(sandbox.status).unwrap_or(Status::Unspecified)
}

/// The Exec message that starts `argv` in `sandbox`.
fn exec_start(sandbox: &str, argv: &[&str]) -> ExecInput {
    let start = ExecStart {
        sandbox: sandbox.to_owned(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..ExecStart::default()
    };
    ExecInput {
        kind: Some(exec_input::Kind::Start(start)),
    }
}

/// What an Exec stream delivered: stdout, stderr and the exit code.
#[derive(Debug, Default)]
struct ExecResult {
    stdout: String,
    stderr: String,
    code: Option<i32>,
}

impl ExecResult {
    /// Takes the next message of `outputs`; false once the stream has ended.
    async fn read(&mut self, outputs: &mut tonic::Streaming<proto::ExecOutput>) -> bool {
        let output = tokio::time::timeout(BOOT_TIMEOUT, outputs.message())
            .await
            .expect("exec output in time")
            .expect("exec stream");
        let text = |bytes: Vec<u8>| String::from_utf8_lossy(&bytes).into_owned();
        match output.and_then(|o| o.kind) {
            Some(exec_output::Kind::Stdout(bytes)) => self.stdout.push_str(&text(bytes)),
            Some(exec_output::Kind::Stderr(bytes)) => self.stderr.push_str(&text(bytes)),
            Some(exec_output::Kind::Exit(exit)) => self.code = Some(exit.exit_code),
            None => return false,
        }
        true
    }

    /// Reads `outputs` to its end.
    async fn finish(
        mut self,
        outputs: &mut tonic::Streaming<proto::ExecOutput>,
    ) -> (String, String, i32) {
        while self.read(outputs).await {}
        let code = self.code.expect("the exec stream ended with an exit");
        (self.stdout, self.stderr, code)
    }
}

/// Starts `sh -c SCRIPT` on an interactive Exec stream and reads until it printed
/// "ready"; returns the input sender, the output stream and what was read so far.
async fn exec_until_ready(
    client: &mut DriverClient<Channel>,
    sandbox: &str,
    script: &str,
) -> (
    tokio::sync::mpsc::Sender<ExecInput>,
    tonic::Streaming<proto::ExecOutput>,
    ExecResult,
) {
    let (inputs, rx) = tokio::sync::mpsc::channel(4);
    let start = exec_start(sandbox, &["sh", "-c", script]);
    inputs.send(start).await.unwrap();
    let response = client.exec(ReceiverStream::new(rx)).await;
    let mut outputs = response.expect("exec").into_inner();
    let mut result = ExecResult::default();
    while !result.stdout.contains("ready") {
        assert!(result.read(&mut outputs).await, "{result:?}");
    }
    (inputs, outputs, result)
}

/// Runs `argv` in the sandbox with `stdin` and returns (stdout, stderr, exit code).
async fn exec(
    client: &mut DriverClient<Channel>,
    sandbox: &str,
    argv: &[&str],
    stdin: &[u8],
) -> (String, String, i32) {
    let inputs = vec![
        exec_start(sandbox, argv),
        ExecInput {
            kind: Some(exec_input::Kind::Stdin(stdin.to_vec())),
        },
        ExecInput {
            kind: Some(exec_input::Kind::StdinEof(StdinEof {})),
        },
    ];
    let response = client.exec(tokio_stream::iter(inputs)).await;
    let mut outputs = response.expect("exec").into_inner();
    ExecResult::default().finish(&mut outputs).await
}

/// The next event of `events`, within the boot timeout.
async fn next_event(events: &mut tonic::Streaming<Event>) -> Event {
    tokio::time::timeout(BOOT_TIMEOUT, events.message())
        .await
        .expect("an event in time")
        .expect("the watch stream")
        .expect("the watch stream ended")
}

/// Reads events until one of kind `want` (by name) arrives; returns the names seen.
async fn events_until(events: &mut tonic::Streaming<Event>, want: &str) -> Vec<(String, Event)> {
    let mut seen = Vec::new();
    loop {
        let event = next_event(events).await;
        let name = kind_name(&event);
        let done = name == want;
        seen.push((name, event));
        if done {
            return seen;
        }
    }
}

fn kind_name(event: &Event) -> String {
    match event.kind.as_ref().expect("event kind") {
        Kind::State(_) => "state",
        Kind::ResolvingImage(_) => "resolving_image",
        Kind::PullingLayer(_) => "pulling_layer",
        Kind::BuildingRootImage(_) => "building_root_image",
        Kind::BuildingIdentityLayer(_) => "building_identity_layer",
        Kind::Created(_) => "created",
        Kind::Booting(_) => "booting",
        Kind::Running(_) => "running",
        Kind::Exited(_) => "exited",
        Kind::Failed(_) => "failed",
        Kind::Deleted(_) => "deleted",
        Kind::NetworkDecision(_) => "network_decision",
    }
    .to_owned()
}

/// Starts `sandbox` through the API; it reads as running.
async fn start_running(client: &mut DriverClient<Channel>, sandbox: &str) -> Sandbox {
    let request = StartRequest {
        sandbox: sandbox.to_owned(),
    };
    let started = client.start(request).await.unwrap().into_inner();
    assert_eq!(status(&started), Status::Running, "{started:?}");
    started
}

/// Stops `sandbox` through the API: it reads as exited, Watch reports the same exit (and
/// nothing else), and no process of it is left.
async fn stop_and_see_exit(
    client: &mut DriverClient<Channel>,
    events: &mut tonic::Streaming<Event>,
    sandbox: &str,
    root: &KilnRoot,
) {
    let request = StopRequest {
        sandbox: sandbox.to_owned(),
        grace_seconds: 5,
    };
    let stopped = client.stop(request).await.unwrap().into_inner();
    assert_eq!(status(&stopped), Status::Exited, "{stopped:?}");
    let seen = events_until(events, "exited").await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    let Some(Kind::Exited(exit)) = &seen[0].1.kind else {
        unreachable!()
    };
    assert_eq!(Some(exit), stopped.exit.as_ref());
    let left = root.leftovers_after(Duration::from_secs(10));
    assert!(left.is_empty(), "{left:?}");
}

// ---------------------------------------------------------------------------------------
// The socket

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn socket_is_owner_only_and_another_uid_is_refused() {
    require_root();
    let root = KilnRoot::with_guest();
    let mut server = KilnServer::start(&root);
    let socket = KilnServer::socket_of(&root);
    let meta = fs::symlink_metadata(&socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "socket mode");
    assert_eq!(meta.uid(), 0, "socket owner");

    assert_eq!(probe(&socket, None), Probe::Answered, "the owner is served");
    // Let the other uid reach the socket file: first through the directory only, where
    // the socket's own mode stops it; then with the socket opened up too, as a careless
    // chmod would, where the server's peer-credential check must refuse it.
    fs::set_permissions(root.temp_dir(), fs::Permissions::from_mode(0o711)).unwrap();
    assert_eq!(probe(&socket, Some(OTHER_UID)), Probe::ConnectDenied);
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(
        probe(&socket, Some(OTHER_UID)),
        Probe::Closed,
        "uid {OTHER_UID} was served; log:\n{}",
        server.log()
    );
    assert_eq!(
        probe(&socket, None),
        Probe::Answered,
        "the owner is still served"
    );
    assert!(
        server
            .log()
            .contains("refused a connection from another user"),
        "{}",
        server.log()
    );

    // SIGTERM: the server ends cleanly and takes its socket with it.
    let status = server.terminate();
    assert!(status.success(), "{status}: {}", server.log());
    assert!(!socket.exists());
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn a_second_server_on_a_live_socket_and_a_non_socket_path_are_refused() {
    require_root();
    let root = KilnRoot::with_guest();
    let _server = KilnServer::start(&root);
    let second = root
        .kiln()
        .args(["serve", "--socket"])
        .arg(KilnServer::socket_of(&root))
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already listening"),
        "{second:?}"
    );

    let file = root.temp_dir().join("file");
    fs::write(&file, "keep").unwrap();
    let output = root
        .kiln()
        .args(["serve", "--socket"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("not a socket"),
        "{output:?}"
    );
    assert_eq!(fs::read_to_string(&file).unwrap(), "keep");
}

// ---------------------------------------------------------------------------------------
// Error codes

/// `result` is an error with `code` whose message contains `naming`.
fn assert_refused<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    naming: &str,
) {
    let err = result.expect_err("refused");
    assert_eq!(err.code(), code, "{err:?}");
    assert!(err.message().contains(naming), "{naming}: {err:?}");
}

fn get(sandbox: &str) -> GetRequest {
    GetRequest {
        sandbox: sandbox.to_owned(),
    }
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn error_codes_name_the_input() {
    require_root();
    let root = KilnRoot::with_guest();
    let server = KilnServer::start(&root);
    runtime().block_on(async {
        let mut client = server.client().await;
        let unknown = "0123456789ab";
        assert_refused(client.get(get(unknown)).await, Code::NotFound, unknown);
        let start = StartRequest {
            sandbox: "no-such-box".into(),
        };
        assert_refused(client.start(start).await, Code::NotFound, "no-such-box");
        let delete = DeleteRequest {
            sandbox: "no-such-box".into(),
            force: true,
        };
        assert_refused(client.delete(delete).await, Code::NotFound, "no-such-box");

        for bad in ["../etc", "", "a b"] {
            let naming = format!("{bad:?}");
            assert_refused(client.get(get(bad)).await, Code::InvalidArgument, &naming);
        }
        let bad_name = long_lived(&demo_image(), "bad/name");
        assert_refused(
            client.create(bad_name).await,
            Code::InvalidArgument,
            "bad/name",
        );
        let bad_env = CreateRequest {
            env: vec!["=x".into()],
            ..long_lived(&demo_image(), "")
        };
        assert_refused(client.create(bad_env).await, Code::InvalidArgument, "=x");
        let bad_image = long_lived("oci:", "");
        assert_refused(
            client.create(bad_image).await,
            Code::InvalidArgument,
            "oci:",
        );

        let first = client
            .create(long_lived(&demo_image(), "twin"))
            .await
            .unwrap();
        let first = first.into_inner();
        assert_eq!(
            (status(&first), first.name.as_str()),
            (Status::Created, "twin")
        );
        let twin = long_lived(&demo_image(), "twin");
        assert_refused(client.create(twin).await, Code::AlreadyExists, "twin");

        // Not running: stop and exec are refused.
        let stop = StopRequest {
            sandbox: "twin".into(),
            grace_seconds: 1,
        };
        assert_refused(client.stop(stop).await, Code::FailedPrecondition, "twin");
        let start = ExecStart {
            sandbox: "twin".into(),
            argv: vec!["true".into()],
            ..ExecStart::default()
        };
        let inputs = vec![ExecInput {
            kind: Some(exec_input::Kind::Start(start)),
        }];
        let exec = client.exec(tokio_stream::iter(inputs)).await;
        assert_refused(exec, Code::FailedPrecondition, &first.id);

        let list = client.list(ListRequest {}).await.unwrap().into_inner();
        assert_eq!(list.sandboxes.len(), 1, "{list:?}");
        let delete = DeleteRequest {
            sandbox: first.id.clone(),
            force: false,
        };
        client.delete(delete).await.unwrap();
        assert_refused(client.get(get(&first.id)).await, Code::NotFound, &first.id);

        // Volumes get the CLI's checks: a host directory another user could replace is
        // refused at create, one replaced since create at start (docs/volumes.md).
        let dir = tempfile::tempdir().unwrap();
        let volume = |host: &Path| proto::Volume {
            host_path: host.to_str().unwrap().to_owned(),
            guest_path: "/data".into(),
            read_only: false,
        };
        let theirs = dir.path().join("alice");
        fs::create_dir_all(theirs.join("work")).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let replaceable = CreateRequest {
            volumes: vec![volume(&theirs.join("work"))],
            ..long_lived(&demo_image(), "")
        };
        let naming = format!("{} is owned by uid 65534", theirs.display());
        assert_refused(
            client.create(replaceable).await,
            Code::InvalidArgument,
            &naming,
        );
        let work = dir.path().join("work");
        fs::create_dir(&work).unwrap();
        let pinned = CreateRequest {
            volumes: vec![volume(&work)],
            ..long_lived(&demo_image(), "pinned")
        };
        client.create(pinned).await.unwrap();
        fs::rename(&work, dir.path().join("moved")).unwrap();
        fs::create_dir(&work).unwrap();
        let start = StartRequest {
            sandbox: "pinned".into(),
        };
        let naming = format!("{} is no longer the directory", work.display());
        assert_refused(client.start(start).await, Code::FailedPrecondition, &naming);
        let delete = DeleteRequest {
            sandbox: "pinned".into(),
            force: false,
        };
        client.delete(delete).await.unwrap();
    });
}

// ---------------------------------------------------------------------------------------
// A whole life through gRPC, with real boots

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn create_watch_exec_stop_delete_through_grpc() {
    require_root();
    let registry = Registry::start(None);
    let demo = fixtures().demo();
    registry.push(&demo.oci_gzip, "demo:serve");
    let reference = format!("{}/demo:serve", registry.addr());

    let root = KilnRoot::with_guest();
    let server = KilnServer::start(&root);
    runtime().block_on(async {
        let mut client = server.client().await;
        let mut events = client
            .watch(WatchRequest {
                sandbox: String::new(),
                initial_state: true,
            })
            .await
            .unwrap()
            .into_inner();

        let shared = root.temp_dir().join("shared");
        fs::create_dir(&shared).unwrap();
        let volume = proto::Volume {
            host_path: shared.to_str().unwrap().to_owned(),
            guest_path: "/data".into(),
            read_only: false,
        };
        let request = CreateRequest {
            volumes: vec![volume],
            ..long_lived(&reference, "life")
        };
        let created = client.create(request).await.unwrap().into_inner();
        assert_eq!(status(&created), Status::Created);
        assert!(
            created.manifest_digest.starts_with("sha256:"),
            "{created:?}"
        );
        let seen = events_until(&mut events, "created").await;
        let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
        let mut phases = names.clone();
        phases.dedup();
        assert_eq!(
            phases,
            [
                "resolving_image",
                "pulling_layer",
                "building_root_image",
                "building_identity_layer",
                "created"
            ],
            "{names:?}"
        );
        for (_, event) in &seen {
            assert_eq!(event.name, "life", "{event:?}");
        }
        assert_eq!(seen.last().unwrap().1.sandbox_id, created.id);
        // Every layer is reported, each ending with all of its bytes.
        let layers: Vec<_> = seen
            .iter()
            .filter_map(|(_, e)| match &e.kind {
                Some(Kind::PullingLayer(p)) => Some(p.clone()),
                _ => None,
            })
            .collect();
        let count = demo.layer_count as u32;
        for index in 1..=count {
            let last = layers
                .iter()
                .rev()
                .find(|p| p.index == index)
                .unwrap_or_else(|| panic!("layer {index}: {layers:?}"));
            assert_eq!(last.count, count, "{last:?}");
            assert!(
                last.size_bytes > 0 && last.downloaded_bytes == last.size_bytes,
                "{last:?}"
            );
        }

        let running = start_running(&mut client, "life").await;
        assert!(running.started_unix > 0);
        let seen = events_until(&mut events, "running").await;
        let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
        // Start checks the pinned images first (cached, so at most the check is reported).
        let (checks, boot) = names.split_at(names.len().saturating_sub(2));
        assert_eq!(boot, ["booting", "running"], "{names:?}");
        assert!(
            checks.iter().all(|n| n.starts_with("building_")),
            "{names:?}"
        );

        let (stdout, stderr, code) = exec(
            &mut client,
            &created.id,
            &["sh", "-c", "cat; id -u; echo oops >&2; exit 3"],
            b"from stdin\n",
        )
        .await;
        assert_eq!(
            (stdout.as_str(), stderr.as_str(), code),
            ("from stdin\n10001\n", "oops\n", 3)
        );

        // The volume: written in the guest, owned on the host by the server's user.
        let script = ["sh", "-c", "echo from-guest > /data/made"];
        assert_eq!(exec(&mut client, "life", &script, b"").await.2, 0);
        let made = shared.join("made");
        assert_eq!(fs::read_to_string(&made).unwrap(), "from-guest\n");
        assert_eq!(fs::metadata(&made).unwrap().uid(), 0);

        // Four Exec streams at once, each with its own output and exit code.
        let runs: Vec<_> = (1..=4)
            .map(|n| {
                let (mut client, id) = (client.clone(), created.id.clone());
                tokio::spawn(async move {
                    let script = format!("sleep 1; echo out{n}; echo err{n} >&2; exit {n}");
                    exec(&mut client, &id, &["sh", "-c", &script], b"").await
                })
            })
            .collect();
        for (n, run) in (1..=4).zip(runs) {
            let expected = (format!("out{n}\n"), format!("err{n}\n"), n);
            assert_eq!(run.await.unwrap(), expected);
        }

        // On a terminal of the given size; stderr comes through the terminal too.
        let mut start = exec_start(
            "life",
            &["sh", "-c", "[ -t 1 ] && echo on-tty; echo err >&2"],
        );
        if let Some(exec_input::Kind::Start(start)) = &mut start.kind {
            start.tty = true;
            start.terminal = Some(proto::TerminalSize {
                rows: 30,
                cols: 100,
            });
        }
        let response = client.exec(tokio_stream::iter(vec![start])).await;
        let mut outputs = response.expect("exec").into_inner();
        let (stdout, stderr, code) = ExecResult::default().finish(&mut outputs).await;
        assert!(
            stdout.contains("on-tty") && stdout.contains("err"),
            "{stdout:?}"
        );
        assert_eq!((stderr.as_str(), code), ("", 0));

        // An interactive stream: a signal reaches the process once it is ready.
        let script = "echo ready; exec sleep 60";
        let (inputs, mut outputs, result) = exec_until_ready(&mut client, "life", script).await;
        let signal = ExecInput {
            kind: Some(exec_input::Kind::Signal(libc::SIGKILL)),
        };
        inputs.send(signal).await.unwrap();
        let (_, _, code) = result.finish(&mut outputs).await;
        assert_eq!(code, 128 + libc::SIGKILL);

        // A client that goes away takes its process with it.
        let script = "echo $$ > /tmp/abandoned; echo ready; exec sleep 600";
        let (inputs, outputs, _) = exec_until_ready(&mut client, "life", script).await;
        drop((inputs, outputs));
        let check = "p=$(cat /tmp/abandoned); i=0; while [ $i -lt 30 ]; do \
            kill -0 $p 2>/dev/null || exit 0; sleep 1; i=$((i+1)); done; exit 1";
        let (_, _, code) = exec(&mut client, "life", &["sh", "-c", check], b"").await;
        assert_eq!(code, 0, "the abandoned process still runs");

        stop_and_see_exit(&mut client, &mut events, "life", &root).await;

        let watch_one = WatchRequest {
            sandbox: "life".into(),
            initial_state: false,
        };
        let mut life_events = client.watch(watch_one).await.unwrap().into_inner();
        client
            .delete(DeleteRequest {
                sandbox: "life".into(),
                force: false,
            })
            .await
            .unwrap();
        let seen = events_until(&mut events, "deleted").await;
        assert_eq!(seen.len(), 1, "{seen:?}");
        // A watch of that one sandbox ends with its deletion.
        assert_eq!(kind_name(&next_event(&mut life_events).await), "deleted");
        let end = tokio::time::timeout(BOOT_TIMEOUT, life_events.message()).await;
        assert!(matches!(end, Ok(Ok(None))), "{end:?}");
        let list = client.list(ListRequest {}).await.unwrap().into_inner();
        assert!(list.sandboxes.is_empty(), "{list:?}");
        assert!(!root.path().join("sandboxes").join(&created.id).exists());
    });
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn a_restarted_server_reattaches_running_sandboxes_and_reports_dead_monitors() {
    require_root();
    let root = KilnRoot::with_guest();
    let mut server = KilnServer::start(&root);
    let rt = runtime();
    let (up, idle) = rt.block_on(async {
        let mut client = server.client().await;
        let up = client
            .create(long_lived(&demo_image(), "up"))
            .await
            .unwrap()
            .into_inner();
        let idle = client
            .create(long_lived(&demo_image(), "idle"))
            .await
            .unwrap()
            .into_inner();
        start_running(&mut client, &up.id).await;
        (up, idle)
    });

    // The server dies; the sandbox's monitor and VM live on.
    server.kill();
    root.monitor_pid(&up.id);
    let server = KilnServer::start(&root);
    rt.block_on(async {
        let mut client = server.client().await;
        let got = client.get(get("up")).await.unwrap().into_inner();
        assert_eq!(status(&got), Status::Running, "{got:?}");
        let got = client.get(get(&idle.id)).await.unwrap().into_inner();
        assert_eq!(status(&got), Status::Created, "{got:?}");
        let (stdout, _, code) =
            exec(&mut client, "up", &["sh", "-c", "echo still here"], b"").await;
        assert_eq!((stdout.as_str(), code), ("still here\n", 0));

        let mut events = client
            .watch(WatchRequest {
                sandbox: "up".into(),
                initial_state: true,
            })
            .await
            .unwrap()
            .into_inner();
        let first = next_event(&mut events).await;
        let Some(Kind::State(state)) = &first.kind else {
            panic!("{first:?}")
        };
        assert_eq!(status(state), Status::Running);

        // Stop works on the re-attached sandbox, and Watch reports its exit.
        stop_and_see_exit(&mut client, &mut events, "up", &root).await;

        // Booted again, then kill -9 of its monitor: the sandbox is failed, and its QEMU
        // goes with it.
        start_running(&mut client, "up").await;
        let seen = events_until(&mut events, "running").await;
        let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.last(), Some(&"running"));
        assert!(
            !names.contains(&"created"),
            "a start is not a create: {names:?}"
        );
        let monitor = root.monitor_pid(&up.id);
        // SAFETY: kill has no memory-safety preconditions; the pid was just found.
        unsafe { libc::kill(monitor as libc::pid_t, libc::SIGKILL) };
        let seen = events_until(&mut events, "failed").await;
        assert_eq!(seen.len(), 1, "{seen:?}");
        let got = client.get(get("up")).await.unwrap().into_inner();
        assert_eq!(status(&got), Status::Failed, "{got:?}");
        assert!(!got.failure.is_empty(), "{got:?}");
        assert!(
            root.leftovers_after(Duration::from_secs(10)).is_empty(),
            "{:?}",
            root.processes()
        );

        for id in [&up.id, &idle.id] {
            client
                .delete(DeleteRequest {
                    sandbox: id.clone(),
                    force: true,
                })
                .await
                .unwrap();
        }
    });
}
