//! `kiln serve --api openshell` end to end: the `kiln` binary serving OpenShell's
//! compute-driver contract, driven by the client generated from kiln's copy of it
//! (kiln_server::openshell_proto), with real VM boots under TCG. Covers the socket (owner
//! only, another uid refused), every RPC (capabilities, listener requirements,
//! validation errors, create with command, environment and resources, Watch's progress
//! events then Ready, Get and List, idempotent Stop and Start keeping the disk, Delete
//! removing everything, workspaces) and one process serving both of kiln's APIs: the
//! kiln driver API's Exec reads what the OpenShell sandbox wrote; and OpenShell's
//! supervisor in the guest, played by a stand-in that reports to a gRPC server here.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use kiln_e2e::{
    demo_image, kernel_with_fragment, openshell_standin, probe, require_root, runtime,
    workspace_root, KilnRoot, KilnServer, Probe, ReportServer, OTHER_UID,
};
use kiln_server::openshell_proto as os;
use kiln_server::openshell_proto::compute_driver_client::ComputeDriverClient;
use kiln_server::openshell_proto::watch_sandboxes_event::Payload;
use kiln_server::proto;
use prost_types::{value::Kind as ValueKind, Struct, Value};
use tonic::transport::Channel;
use tonic::Code;

/// A boot takes 3-15 s under TCG; the rest is slack for a loaded two-core machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A sandbox of `image` named `name` with id `id`, running `command`.
fn sandbox(id: &str, name: &str, image: &str, command: &[&str]) -> os::DriverSandbox {
    os::DriverSandbox {
        id: id.into(),
        name: name.into(),
        spec: Some(os::DriverSandboxSpec {
            environment: map(&[("GREETING", "from the sandbox")]),
            command: command.iter().map(|s| s.to_string()).collect(),
            sandbox_token: "not-a-real-token".into(),
            template: Some(os::DriverSandboxTemplate {
                image: image.into(),
                environment: map(&[("GREETING", "from the template"), ("KEPT", "template")]),
                labels: map(&[("team", "kiln")]),
                resources: Some(os::DriverResourceRequirements {
                    cpu_request: "500m".into(),
                    memory_limit: "256Mi".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The next Watch event, within the boot timeout.
async fn next_event(events: &mut tonic::Streaming<os::WatchSandboxesEvent>) -> Payload {
    tokio::time::timeout(BOOT_TIMEOUT, events.message())
        .await
        .expect("a watch event in time")
        .expect("the watch stream")
        .expect("the watch stream ended")
        .payload
        .expect("an event payload")
}

/// The sandbox's `Ready` condition as (status, reason), and whether it is `Suspended`.
fn readiness(sandbox: &os::DriverSandbox) -> (String, String, bool) {
    let status = sandbox.status.as_ref().expect("a status");
    let ready = status
        .conditions
        .iter()
        .find(|c| c.r#type == "Ready")
        .expect("a Ready condition");
    let suspended = status
        .conditions
        .iter()
        .any(|c| c.r#type == "Suspended" && c.status == "True");
    (ready.status.clone(), ready.reason.clone(), suspended)
}

/// Reads Watch events of `id` until a snapshot satisfies `done`; returns the platform
/// events' reasons and metadata seen on the way.
async fn watch_until(
    events: &mut tonic::Streaming<os::WatchSandboxesEvent>,
    id: &str,
    done: impl Fn(&os::DriverSandbox) -> bool,
) -> Vec<os::DriverPlatformEvent> {
    let mut progress = Vec::new();
    loop {
        match next_event(events).await {
            Payload::Sandbox(os::WatchSandboxesSandboxEvent {
                sandbox: Some(sandbox),
            }) if sandbox.id == id => {
                let (_, reason, _) = readiness(&sandbox);
                assert_ne!(reason, "VmFailed", "{sandbox:?}");
                if done(&sandbox) {
                    return progress;
                }
            }
            Payload::PlatformEvent(os::WatchSandboxesPlatformEvent {
                sandbox_id,
                event: Some(event),
            }) if sandbox_id == id => progress.push(event),
            _ => {}
        }
    }
}

async fn get(client: &mut ComputeDriverClient<Channel>, id: &str) -> os::DriverSandbox {
    let request = os::GetSandboxRequest {
        sandbox_id: id.into(),
        ..Default::default()
    };
    client
        .get_sandbox(request)
        .await
        .expect("get")
        .into_inner()
        .sandbox
        .expect("a sandbox")
}

/// Runs `script` under `sh -c` in kiln sandbox `sandbox` through kiln's own driver API.
/// A guest shell command printing `$HOME/boots` once it holds `lines` lines (at most 60 s
/// later): Ready says the VM runs its command, not that the command has written its line.
fn boots_after(lines: usize) -> String {
    format!(
        "i=0; while [ \"$(cat \"$HOME/boots\" 2>/dev/null | wc -l)\" -lt {lines} ] && [ $i -lt 600 ]; \
         do sleep 0.1; i=$((i+1)); done; cat \"$HOME/boots\""
    )
}

async fn kiln_exec(socket: &Path, sandbox: &str, script: &str) -> String {
    let mut client = kiln_server::client::connect(socket).await.unwrap();
    let start = proto::ExecStart {
        sandbox: sandbox.into(),
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..Default::default()
    };
    let inputs = vec![
        proto::ExecInput {
            kind: Some(proto::exec_input::Kind::Start(start)),
        },
        proto::ExecInput {
            kind: Some(proto::exec_input::Kind::StdinEof(proto::StdinEof {})),
        },
    ];
    let mut outputs = client
        .exec(tokio_stream::iter(inputs))
        .await
        .expect("exec")
        .into_inner();
    let mut stdout = Vec::new();
    while let Some(output) = tokio::time::timeout(BOOT_TIMEOUT, outputs.message())
        .await
        .expect("exec output in time")
        .expect("exec stream")
    {
        match output.kind {
            Some(proto::exec_output::Kind::Stdout(bytes)) => stdout.extend(bytes),
            Some(proto::exec_output::Kind::Exit(exit)) => {
                assert_eq!(exit.exit_code, 0, "{script}")
            }
            _ => {}
        }
    }
    String::from_utf8_lossy(&stdout).into_owned()
}

/// The kernel built with `--fragment openshell` keeps every option the fragment asks for
/// (build-kernel refuses to cache one that does not; this reads the result itself).
#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn the_openshell_kernel_keeps_every_option_of_its_fragment() {
    require_root();
    let built = kernel_with_fragment("openshell");
    let config = fs::read_to_string(built.join("config")).unwrap();
    let fragment =
        fs::read_to_string(workspace_root().join("kernels").join("openshell.config")).unwrap();
    let wanted: Vec<&str> = fragment
        .lines()
        .map(str::trim)
        .filter(|line| line.starts_with("CONFIG_"))
        .collect();
    assert!(wanted.len() > 10, "{wanted:?}");
    let missing: Vec<&&str> = wanted
        .iter()
        .filter(|line| !config.lines().any(|have| have == **line))
        .collect();
    assert!(missing.is_empty(), "options the build dropped: {missing:?}");
    for option in [
        "CONFIG_VETH=y",
        "CONFIG_NF_TABLES=y",
        "CONFIG_NF_CONNTRACK=y",
    ] {
        assert!(wanted.contains(&option), "the fragment asks for {option}");
    }
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn openshell_socket_is_owner_only_and_another_uid_is_refused() {
    require_root();
    // Nothing here boots: the guest files are not needed.
    let root = KilnRoot::without_guest();
    let mut server = KilnServer::start_with(
        &root,
        root.kiln(),
        &[OsStr::new("--api"), OsStr::new("openshell")],
    );
    let socket = KilnServer::socket_of(&root);
    let meta = fs::symlink_metadata(&socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "socket mode");
    assert_eq!(meta.uid(), 0, "socket owner");
    assert!(
        server.log().contains("OpenShell's compute-driver API"),
        "{}",
        server.log()
    );

    runtime().block_on(async {
        let mut client = KilnServer::openshell_client(&socket).await;
        let capabilities = client
            .get_capabilities(os::GetCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(capabilities.driver_name, "kiln");
    });

    // The socket opened up, as a careless chmod would: the peer check still refuses.
    fs::set_permissions(root.temp_dir(), fs::Permissions::from_mode(0o711)).unwrap();
    assert_eq!(probe(&socket, Some(OTHER_UID)), Probe::ConnectDenied);
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(
        probe(&socket, Some(OTHER_UID)),
        Probe::Closed,
        "uid {OTHER_UID} was served; log:\n{}",
        server.log()
    );
    assert_eq!(probe(&socket, None), Probe::Answered);
    let status = server.terminate();
    assert!(status.success(), "{status}: {}", server.log());
    assert!(!socket.exists());
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn every_compute_driver_rpc_with_real_boots() {
    require_root();
    let root = KilnRoot::with_guest();
    let image = demo_image();
    let openshell_socket = root.temp_dir().join("openshell.sock");
    let server = KilnServer::start_with(
        &root,
        root.kiln(),
        &[
            OsStr::new("--openshell-socket"),
            openshell_socket.as_os_str(),
            OsStr::new("--default-image"),
            OsStr::new(&image),
        ],
    );
    let kiln_socket = server.socket().to_path_buf();

    runtime().block_on(async {
        let mut client = KilnServer::openshell_client(&openshell_socket).await;

        let capabilities = client
            .get_capabilities(os::GetCapabilitiesRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(capabilities.driver_name, "kiln");
        assert_eq!(capabilities.driver_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(capabilities.default_image, image);
        assert!(capabilities.gateway_manages_lifecycle);

        let listeners = client
            .get_gateway_listener_requirements(os::GetGatewayListenerRequirementsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(matches!(
            listeners.requirements[..],
            [os::GatewayListenerRequirement {
                selector: Some(os::gateway_listener_requirement::Selector::LoopbackInterface(_)),
                ..
            }]
        ));

        // Validation: good, then each kind of bad input with its code and field.
        let script = "echo \"$GREETING/$KEPT\" >> \"$HOME/boots\"; exec sleep 3600";
        let good = sandbox("sb-1", "first", &image, &["sh", "-c", script]);
        let validate = |sandbox: os::DriverSandbox| os::ValidateSandboxCreateRequest {
            sandbox: Some(sandbox),
        };
        client
            .validate_sandbox_create(validate(good.clone()))
            .await
            .expect("a good spec validates");
        let mut bad_cpu = good.clone();
        bad_cpu
            .spec
            .as_mut()
            .unwrap()
            .template
            .as_mut()
            .unwrap()
            .resources = Some(os::DriverResourceRequirements {
            cpu_limit: "2 cores".into(),
            ..Default::default()
        });
        let mut gpu = good.clone();
        gpu.spec.as_mut().unwrap().resource_requirements = Some(os::ResourceRequirements {
            gpu: Some(os::GpuResourceRequirements { count: Some(1) }),
        });
        let mut driver_config = good.clone();
        driver_config
            .spec
            .as_mut()
            .unwrap()
            .template
            .as_mut()
            .unwrap()
            .driver_config = Some(Struct {
            fields: [(
                "vcpus".to_owned(),
                Value {
                    kind: Some(ValueKind::NumberValue(4.0)),
                },
            )]
            .into(),
        });
        let mut bad_image = good.clone();
        bad_image
            .spec
            .as_mut()
            .unwrap()
            .template
            .as_mut()
            .unwrap()
            .image = "Not An Image".into();
        for (bad, code, naming) in [
            (bad_cpu, Code::FailedPrecondition, "cpu_limit"),
            (gpu, Code::FailedPrecondition, "gpu"),
            (driver_config, Code::InvalidArgument, "\"vcpus\""),
            (bad_image, Code::InvalidArgument, "spec.template.image"),
        ] {
            let status = client
                .validate_sandbox_create(validate(bad.clone()))
                .await
                .expect_err(naming);
            assert_eq!(status.code(), code, "{status:?}");
            assert!(status.message().contains(naming), "{status:?}");
            let status = client
                .create_sandbox(os::CreateSandboxRequest { sandbox: Some(bad) })
                .await
                .expect_err(naming);
            assert_eq!(status.code(), code, "{status:?}");
        }

        // Create: Watch sees the provisioning steps with OpenShell's progress metadata,
        // then Ready.
        let mut events = client
            .watch_sandboxes(os::WatchSandboxesRequest {})
            .await
            .unwrap()
            .into_inner();
        client
            .create_sandbox(os::CreateSandboxRequest {
                sandbox: Some(good.clone()),
            })
            .await
            .expect("create");
        let progress = watch_until(&mut events, "sb-1", |s| readiness(s).0 == "True").await;
        let steps: Vec<_> = progress
            .iter()
            .map(|e| {
                e.metadata
                    .get("openshell.progress.active_step")
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(
            steps.first().map(String::as_str),
            Some("pulling_image"),
            "{progress:?}"
        );
        assert_eq!(
            steps.last().map(String::as_str),
            Some("starting_sandbox"),
            "{progress:?}"
        );
        assert!(progress.iter().all(|e| e.source == "kiln"), "{progress:?}");
        let duplicate = client
            .create_sandbox(os::CreateSandboxRequest {
                sandbox: Some(good.clone()),
            })
            .await
            .expect_err("a second create of the same id");
        assert_eq!(duplicate.code(), Code::AlreadyExists, "{duplicate:?}");

        let running = get(&mut client, "sb-1").await;
        assert_eq!(running.name, "first");
        let status = running.status.as_ref().unwrap();
        assert_eq!(status.sandbox_name, "first");
        assert!(!status.instance_id.is_empty());
        assert!(!status.deleting);
        assert_eq!(
            readiness(&running),
            ("True".into(), "Running".into(), false)
        );
        let by_name = client
            .get_sandbox(os::GetSandboxRequest {
                sandbox_name: "first".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(by_name.sandbox.unwrap().id, "sb-1");

        // kiln's own API in the same process sees the sandbox by the gateway's id; the
        // sandbox's environment won over the template's, the rest merged; the exact argv
        // ran; the resources are what the quantities say.
        let kiln_view = kiln_server::client::connect(&kiln_socket)
            .await
            .unwrap()
            .get(proto::GetRequest {
                sandbox: "sb-1".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(kiln_view.id, status.instance_id);
        let boots = kiln_exec(&kiln_socket, "sb-1", &format!("{}; nproc", boots_after(1))).await;
        assert_eq!(boots, "from the sandbox/template\n1\n");

        let listed = client
            .list_sandboxes(os::ListSandboxesRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            listed
                .sandboxes
                .iter()
                .map(|s| s.id.as_str())
                .collect::<Vec<_>>(),
            ["sb-1"]
        );

        // Stop twice, start twice: the disk is kept.
        let stop = || os::StopSandboxRequest {
            sandbox_id: "sb-1".into(),
            ..Default::default()
        };
        client.stop_sandbox(stop()).await.expect("stop");
        assert_eq!(
            readiness(&get(&mut client, "sb-1").await),
            ("False".into(), "ComputeStopped".into(), true)
        );
        client
            .stop_sandbox(stop())
            .await
            .expect("stopping a stopped sandbox");
        let start = || os::StartSandboxRequest {
            sandbox_id: "sb-1".into(),
            ..Default::default()
        };
        client.start_sandbox(start()).await.expect("start");
        client
            .start_sandbox(start())
            .await
            .expect("starting a running sandbox");
        assert_eq!(readiness(&get(&mut client, "sb-1").await).0, "True");
        let boots = kiln_exec(&kiln_socket, "sb-1", &boots_after(2)).await;
        assert_eq!(boots, "from the sandbox/template\n".repeat(2));

        // Workspaces: nothing kept per workspace, and repeating succeeds.
        for _ in 0..2 {
            client
                .ensure_workspace(os::EnsureWorkspaceRequest {
                    workspace: "w".into(),
                })
                .await
                .unwrap();
        }
        client
            .delete_workspace(os::DeleteWorkspaceRequest {
                workspace: "w".into(),
            })
            .await
            .unwrap();

        // Delete: gone from Get, List, Watch and kiln's state; a second delete removes
        // nothing.
        let delete = || os::DeleteSandboxRequest {
            sandbox_id: "sb-1".into(),
            ..Default::default()
        };
        let deleted = client.delete_sandbox(delete()).await.unwrap().into_inner();
        assert!(deleted.deleted);
        loop {
            if let Payload::Deleted(gone) = next_event(&mut events).await {
                assert_eq!(gone.sandbox_id, "sb-1");
                break;
            }
        }
        let missing = client
            .get_sandbox(os::GetSandboxRequest {
                sandbox_id: "sb-1".into(),
                ..Default::default()
            })
            .await
            .expect_err("a deleted sandbox");
        assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
        let listed = client
            .list_sandboxes(os::ListSandboxesRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(listed.sandboxes.is_empty(), "{listed:?}");
        let again = client.delete_sandbox(delete()).await.unwrap().into_inner();
        assert!(!again.deleted);
    });
    let sandboxes = root.path().join("sandboxes");
    let left: Vec<_> = fs::read_dir(&sandboxes)
        .map(|dir| dir.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.iter()
            .all(|name| name.to_string_lossy().starts_with('.')),
        "{left:?}"
    );
    let leftovers = root.leftovers_after(Duration::from_secs(10));
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The token is a secret: the server's log never shows it.
    assert!(
        !server.log().contains("not-a-real-token"),
        "{}",
        server.log()
    );
}

/// The stand-in's report of the TLS files: each at its path in the guest, root:root, the
/// certificates 0444 and the key 0400, holding what `kiln serve` was given.
fn assert_tls_files(files: &[kiln_openshell_standin::FileReport], given: &[(&str, String)]) {
    assert_eq!(files.len(), given.len(), "{files:?}");
    for (file, (name, content)) in files.iter().zip(given) {
        assert_eq!(file.error, "", "{name}");
        assert_eq!(file.path, format!("/opt/openshell/tls/{name}"));
        let mode = if *name == "tls.key" { 0o400 } else { 0o444 };
        assert_eq!(file.mode, mode, "{name}");
        assert_eq!((file.uid, file.gid), (0, 0), "{name}");
        assert_eq!(&file.content, content, "{name}");
    }
}

/// `kiln exec ID cat PATH` until it prints `expected` (the main process writes it after
/// the supervisor reported, so a while after Ready), within the boot timeout.
fn wait_for_file(root: &KilnRoot, id: &str, path: &str, expected: &str) {
    let deadline = std::time::Instant::now() + BOOT_TIMEOUT;
    loop {
        let output = root.run(&["exec", id, "cat", path]);
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        if output.status.success() && text == expected {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{path} in {id}: {text:?}, {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Every file under `dir` (recursively) of at most [`TEXT_MAX`] bytes, as text, for
/// searching it: the logs (rotated at 10 MiB) and records, not the sparse 8 GiB writable
/// disk (the token is never on it: kiln-init writes it to a tmpfs).
fn all_text_under(dir: &Path) -> Vec<(std::path::PathBuf, String)> {
    const TEXT_MAX: u64 = 32 << 20;
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(kind) if kind.is_dir() => found.extend(all_text_under(&path)),
            Ok(kind) if kind.is_file() && entry.metadata().unwrap().len() <= TEXT_MAX => {
                let bytes = fs::read(&path).unwrap_or_default();
                found.push((path, String::from_utf8_lossy(&bytes).into_owned()));
            }
            _ => {}
        }
    }
    found
}

/// OpenShell's supervisor in the guest, played by a stand-in (tests/standin; NOT
/// OpenShell's supervisor) given as `--openshell-supervisor`: it dials the test's gRPC
/// server through OPENSHELL_ENDPOINT (so the loopback rewrite and kiln-netstack's
/// allowance of the gateway's port are proven by the connection itself) and reports its
/// ids, argv, whole environment, the token file, the TLS files and the sandbox user of
/// /etc/passwd, then runs the main process as the sandbox user.
///
/// The endpoint is `https` because kiln takes TLS material only for an https gateway, as
/// OpenShell's VM driver does; the stand-in is no TLS client and dials that host and port
/// over plain http, and the material is PEM-shaped text, not a real certificate and key:
/// this test proves where kiln puts the files and what it tells the supervisor, not a TLS
/// handshake (scripts/e2e-openshell runs the real gateway with TLS off).
#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn the_supervisor_runs_in_the_guest_as_root_with_its_environment_token_and_tls() {
    require_root();
    let standin = openshell_standin();
    let root = KilnRoot::with_guest();
    let image = demo_image();
    let runtime = runtime();
    let mut reports = runtime.block_on(ReportServer::start());
    let port = reports.address.port();
    let endpoint = format!("https://127.0.0.1:{port}");
    let key_secret = format!("key-{}-secret", std::process::id());
    let pem = |label: &str, body: &str| {
        format!("-----BEGIN {label}-----\n{body}\n-----END {label}-----\n")
    };
    let tls_material = [
        ("ca.crt", pem("CERTIFICATE", "the-gateway-ca")),
        ("tls.crt", pem("CERTIFICATE", "the-client-cert")),
        ("tls.key", pem("PRIVATE KEY", &key_secret)),
    ];
    let tls_dir = root.temp_dir().join("tls");
    fs::create_dir(&tls_dir).unwrap();
    for (name, content) in &tls_material {
        fs::write(tls_dir.join(name), content).unwrap();
    }
    let (ca, cert, key) = (
        tls_dir.join("ca.crt"),
        tls_dir.join("tls.crt"),
        tls_dir.join("tls.key"),
    );
    let mut server = KilnServer::start_with(
        &root,
        root.kiln(),
        &[
            OsStr::new("--api"),
            OsStr::new("openshell"),
            OsStr::new("--openshell-supervisor"),
            standin.as_os_str(),
            OsStr::new("--openshell-endpoint"),
            OsStr::new(&endpoint),
            OsStr::new("--openshell-tls-ca"),
            ca.as_os_str(),
            OsStr::new("--openshell-tls-cert"),
            cert.as_os_str(),
            OsStr::new("--openshell-tls-key"),
            key.as_os_str(),
            OsStr::new("--sandbox-uid"),
            OsStr::new("500"),
            OsStr::new("--sandbox-gid"),
            OsStr::new("600"),
        ],
    );
    let socket = server.socket().to_path_buf();
    let token = format!("tok-{}-secret", std::process::id());
    let script = "echo \"$GREETING:$(id -u):$(id -g):$(pwd)\" >> /sandbox/boots; exec sleep 3600";
    let mut first = sandbox("sb-os", "supervised", &image, &["sh", "-c", script]);
    first.spec.as_mut().unwrap().sandbox_token = token.clone();
    let mut second = sandbox("sb-os2", "second", &image, &["sh", "-c", "exit 7"]);
    second.spec.as_mut().unwrap().sandbox_token = token.clone();
    let sandbox_dir = |id: &str| {
        let json = root.ok(&["--json", "inspect", id]);
        let value: serde_json::Value = serde_json::from_str(&json).expect("inspect's JSON");
        let value = if value.is_array() {
            value[0].clone()
        } else {
            value
        };
        let kiln_id = value["id"].as_str().expect("an id").to_owned();
        (root.path().join("sandboxes").join(kiln_id), json)
    };

    let mut seen_events = Vec::new();
    runtime.block_on(async {
        let mut client = KilnServer::openshell_client(&socket).await;
        let mut events = client
            .watch_sandboxes(os::WatchSandboxesRequest {})
            .await
            .unwrap()
            .into_inner();
        client
            .create_sandbox(os::CreateSandboxRequest {
                sandbox: Some(first.clone()),
            })
            .await
            .expect("create");
        let report = reports.next(BOOT_TIMEOUT).await;

        // As root, with the supervisor's argv and exactly the environment OpenShell's VM
        // driver gives it (computed here by kiln-server's own function).
        assert_eq!((report.uid, report.gid), (0, 0));
        assert_eq!(
            report.argv,
            [
                "/opt/openshell/bin/openshell-sandbox",
                "--workdir",
                "/sandbox"
            ]
        );
        let plan = kiln_server::openshell_spec::plan(&first, "").unwrap();
        let settings = kiln_server::openshell_env::SupervisorSettings {
            endpoint: endpoint.clone(),
            log_level: "info".into(),
            tls: true,
            uid: 500,
            gid: 600,
        };
        let expected: HashMap<String, String> =
            kiln_server::openshell_env::supervisor_environment(&plan, &settings, "", true)
                .into_iter()
                .collect();
        assert_eq!(report.environment, expected);
        assert_eq!(
            report.environment["OPENSHELL_ENDPOINT"],
            format!("https://10.0.2.2:{port}/")
        );
        for (name, path) in [
            ("OPENSHELL_TLS_CA", "/opt/openshell/tls/ca.crt"),
            ("OPENSHELL_TLS_CERT", "/opt/openshell/tls/tls.crt"),
            ("OPENSHELL_TLS_KEY", "/opt/openshell/tls/tls.key"),
        ] {
            assert_eq!(report.environment[name], path);
        }
        assert_eq!(report.environment["OPENSHELL_SANDBOX_ID"], "sb-os");
        assert_eq!(report.environment["OPENSHELL_SANDBOX"], "supervised");
        assert_eq!(
            report.environment["OPENSHELL_SANDBOX_TOKEN_FILE"],
            "/opt/openshell/auth/sandbox.jwt"
        );
        assert!(!report.environment.contains_key("OPENSHELL_SANDBOX_TOKEN"));
        // The token: root's only, as given.
        assert_eq!(report.token_error, "");
        assert_eq!(report.token_mode, 0o400);
        assert_eq!((report.token_uid, report.token_gid), (0, 0));
        assert_eq!(report.token, token);
        // The TLS files: root's, as given; the certificates world-readable, the key not.
        assert_tls_files(&report.tls_files, &tls_material);
        // The sandbox user kiln-identity wrote, read from /etc/passwd as text: ids outside
        // kiln's own bounds, inside OpenShell's.
        assert_eq!((report.passwd_uid, report.passwd_gid), (500, 600));

        watch_until(&mut events, "sb-os", |s| readiness(s).0 == "True").await;
    });
    // The main process ran as the sandbox user in the workdir the supervisor was given;
    // the sandbox user cannot read the token.
    wait_for_file(
        &root,
        "sb-os",
        "/sandbox/boots",
        "from the sandbox:500:600:/sandbox\n",
    );
    let refused = root.fails(
        &["exec", "sb-os", "cat", "/opt/openshell/auth/sandbox.jwt"],
        1,
    );
    assert!(refused.contains("Permission denied"), "{refused}");
    let refused = root.fails(&["exec", "sb-os", "cat", "/opt/openshell/tls/tls.key"], 1);
    assert!(refused.contains("Permission denied"), "{refused}");
    // On the host, the token and TLS material are kept owner-only in the sandbox's state.
    let (state, inspect) = sandbox_dir("sb-os");
    let kept = state.join("openshell-token");
    assert_eq!(fs::read_to_string(&kept).unwrap(), token);
    assert_eq!(fs::metadata(&kept).unwrap().mode() & 0o777, 0o600);
    assert!(!inspect.contains(&token), "{inspect}");
    let kept = state.join("openshell-tls");
    assert!(fs::read_to_string(&kept).unwrap().contains(&key_secret));
    assert_eq!(fs::metadata(&kept).unwrap().mode() & 0o777, 0o600);
    assert!(!inspect.contains(&key_secret), "{inspect}");

    runtime.block_on(async {
        let mut client = KilnServer::openshell_client(&socket).await;
        let mut events = client
            .watch_sandboxes(os::WatchSandboxesRequest {})
            .await
            .unwrap()
            .into_inner();
        // A second sandbox shares the first one's supervisor layer; its command's exit
        // status is the sandbox's.
        client
            .create_sandbox(os::CreateSandboxRequest {
                sandbox: Some(second.clone()),
            })
            .await
            .expect("create the second");
        let report = reports.next(BOOT_TIMEOUT).await;
        assert_eq!(report.environment["OPENSHELL_SANDBOX_ID"], "sb-os2");
        assert_eq!(report.token, token);
        seen_events.extend(
            watch_until(&mut events, "sb-os2", |s| readiness(s).2)
                .await
                .into_iter()
                .map(|e| format!("{e:?}")),
        );

        // Stop and start: the token is given again and /sandbox keeps what was written.
        let (stop, start) = (
            os::StopSandboxRequest {
                sandbox_id: "sb-os".into(),
                ..Default::default()
            },
            os::StartSandboxRequest {
                sandbox_id: "sb-os".into(),
                ..Default::default()
            },
        );
        client.stop_sandbox(stop).await.expect("stop");
        client.start_sandbox(start).await.expect("start");
        let report = reports.next(BOOT_TIMEOUT).await;
        assert_eq!(report.environment["OPENSHELL_SANDBOX_ID"], "sb-os");
        assert_eq!((report.token_mode, report.token), (0o400, token.clone()));
        assert_tls_files(&report.tls_files, &tls_material);
        seen_events.extend(
            watch_until(&mut events, "sb-os", |s| readiness(s).0 == "True")
                .await
                .into_iter()
                .map(|e| format!("{e:?}")),
        );
    });
    assert_eq!(root.ok(&["wait", "sb-os2"]).trim(), "7");
    let layers: Vec<_> = fs::read_dir(root.path().join("rootfs/v1/supervisors-2"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| !name.starts_with('.'))
        .collect();
    let standin_digest = kiln_e2e::sha256_digest(&fs::read(standin).unwrap());
    assert_eq!(
        layers,
        [format!("{}.erofs", standin_digest.replace(':', "-"))],
        "one layer, by the binary's digest, for both sandboxes"
    );
    wait_for_file(
        &root,
        "sb-os",
        "/sandbox/boots",
        &"from the sandbox:500:600:/sandbox\n".repeat(2),
    );

    // The token and the key are in no log, record or output of kiln's but their own files.
    let (state2, _) = sandbox_dir("sb-os2");
    for (path, text) in all_text_under(&state)
        .into_iter()
        .chain(all_text_under(&state2))
    {
        if path.file_name() != Some(OsStr::new("openshell-token")) {
            assert!(!text.contains(&token), "{} holds the token", path.display());
        }
        if path.file_name() != Some(OsStr::new("openshell-tls")) {
            assert!(
                !text.contains(&key_secret),
                "{} holds the key",
                path.display()
            );
        }
    }
    assert!(!seen_events
        .iter()
        .any(|e| e.contains(&token) || e.contains(&key_secret)));
    for id in ["sb-os", "sb-os2"] {
        let logs = root.ok(&["logs", id]);
        assert!(
            !logs.contains(&token) && !logs.contains(&key_secret),
            "{logs}"
        );
    }

    // Delete removes the sandbox's state, the token with it.
    runtime.block_on(async {
        let mut client = KilnServer::openshell_client(&socket).await;
        for id in ["sb-os", "sb-os2"] {
            let deleted = client
                .delete_sandbox(os::DeleteSandboxRequest {
                    sandbox_id: id.into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert!(deleted.deleted);
        }
    });
    assert!(!state.exists() && !state2.exists());
    let status = server.terminate();
    assert!(status.success(), "{status}: {}", server.log());
    assert!(!server.log().contains(&token), "{}", server.log());
    assert!(!server.log().contains(&key_secret), "{}", server.log());
    let leftovers = root.leftovers_after(Duration::from_secs(10));
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
