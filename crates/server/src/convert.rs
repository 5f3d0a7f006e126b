//! Between the wire and kiln-sandbox: requests decoded into the fields kiln-sandbox
//! checks (which names a bad field as the proto does: INVALID_ARGUMENT), results turned
//! into messages, and errors into status codes by their kind.

use std::path::PathBuf;

use kiln_image::{Platform, PullOptions, PullPolicy};
use kiln_protocol::{StartFailure, TerminalSize, WorkloadResult};
use kiln_sandbox::{
    CreateFields, CreateRequest, ErrorKind, ExecFields, ExecRequest, Field, FieldNames,
    NetworkMode, PolicyText, ProvisionEvent, SandboxInfo, Status,
};
use kiln_vm::accel::AccelRequest;
use tonic::{Code, Status as GrpcStatus};

use crate::proto;
use crate::proto::workload_exit::Result as ResultKind;

/// Server-wide settings a Create request does not carry.
#[derive(Debug, Clone)]
pub struct Machine {
    pub accel: AccelRequest,
    pub qemu: PathBuf,
    pub rootfs_cache_max: Option<u64>,
}

/// How the driver API names request fields in errors: as the proto does.
pub struct ProtoNames;

impl FieldNames for ProtoNames {
    fn field(&self, field: Field) -> &'static str {
        match field {
            Field::Image => "image",
            Field::Name => "name",
            Field::User => "user",
            Field::Uid => "uid",
            Field::Gid => "gid",
            Field::Cpus => "cpus",
            Field::Memory => "memory_mib",
            Field::Env => "env",
            Field::Workdir => "workdir",
            Field::Publish => "publish",
            Field::AllowHost => "network_allow_host",
            Field::NetworkPolicy => "network_policy",
            Field::Volumes => "volumes",
            Field::Command => "argv",
            // The CLI's alone; a request here never has them.
            Field::EnvFile => "env_file",
            Field::Timeout => "timeout",
            Field::LogMaxSize => "log_max_size",
            Field::Restart => "restart",
            Field::Labels => "labels",
            Field::Hostname => "hostname",
            Field::AddHost => "add_host",
            Field::Dns => "dns",
            Field::Tmpfs => "tmpfs",
            Field::Mount => "mount",
        }
    }

    fn network(&self, mode: NetworkMode) -> &'static str {
        match mode {
            NetworkMode::User => "NETWORK_USER",
            NetworkMode::None => "NETWORK_NONE",
        }
    }
}

/// The status code of a kiln-sandbox error's kind.
fn code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidInput => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::Internal => Code::Internal,
    }
}

/// The status of a kiln-sandbox error: the code its kind says, and its own message, which
/// names the sandbox or input at fault.
pub fn status(err: kiln_sandbox::Error) -> GrpcStatus {
    GrpcStatus::new(code(err.kind()), err.to_string())
}

fn invalid(field: &str, value: impl std::fmt::Debug, reason: impl std::fmt::Display) -> GrpcStatus {
    GrpcStatus::invalid_argument(format!("{field} {value:?}: {reason}"))
}

/// An empty text field means "not set".
fn optional(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| text.to_owned())
}

/// A zero number field means "not set".
fn nonzero(value: u32) -> Option<u32> {
    (value != 0).then_some(value)
}

fn pull_options(pull: Option<proto::Pull>) -> Result<PullOptions, GrpcStatus> {
    let pull = pull.unwrap_or_default();
    let policy = match proto::PullPolicy::try_from(pull.policy) {
        Ok(proto::PullPolicy::Unspecified | proto::PullPolicy::Missing) => PullPolicy::Missing,
        Ok(proto::PullPolicy::Always) => PullPolicy::Always,
        Ok(proto::PullPolicy::Never) => PullPolicy::Never,
        Err(_) => return Err(invalid("pull.policy", pull.policy, "unknown value")),
    };
    let platform = match pull.platform.as_str() {
        "" => None,
        text => Some(Platform::parse(text).map_err(|e| invalid("pull.platform", text, e))?),
    };
    Ok(PullOptions {
        platform,
        creds: optional(&pull.credentials),
        insecure_registries: pull.insecure_registries,
        policy,
        ..PullOptions::default()
    })
}

/// Volumes as `-v HOSTDIR:GUESTDIR[:ro]` texts; the host path must be absolute (the
/// server's working directory means nothing to its clients).
fn volumes(volumes: &[proto::Volume]) -> Result<Vec<String>, GrpcStatus> {
    volumes
        .iter()
        .map(|volume| {
            if !volume.host_path.starts_with('/') {
                let reason = "expected an absolute path";
                return Err(invalid("volumes.host_path", &volume.host_path, reason));
            }
            let mode = if volume.read_only { ":ro" } else { "" };
            Ok(format!("{}:{}{mode}", volume.host_path, volume.guest_path))
        })
        .collect()
}

/// A Create request's fields as kiln-sandbox takes them.
fn create_fields(
    request: proto::CreateRequest,
    machine: &Machine,
) -> Result<CreateFields, GrpcStatus> {
    let network = match proto::Network::try_from(request.network) {
        Ok(proto::Network::Unspecified | proto::Network::User) => NetworkMode::User,
        Ok(proto::Network::None) => NetworkMode::None,
        Err(_) => return Err(invalid("network", request.network, "unknown value")),
    };
    Ok(CreateFields {
        pull: pull_options(request.pull)?,
        volumes: volumes(&request.volumes)?,
        publish: request
            .publish
            .iter()
            .map(|p| format!("{}:{}", p.host_port, p.guest_port))
            .collect(),
        network,
        allow_host: request.network_allow_host,
        network_policy: (!request.network_policy.is_empty()).then(|| PolicyText {
            file: "network_policy".into(),
            text: request.network_policy,
        }),
        name: optional(&request.name),
        entrypoint: request.entrypoint,
        command: request.command,
        env_files: Vec::new(),
        env: request.env,
        // The server does not lend its own environment: a bare KEY is refused.
        lend_environment: false,
        workdir: optional(&request.workdir),
        user: optional(&request.user),
        uid: nonzero(request.uid).map(|id| id.to_string()),
        gid: nonzero(request.gid).map(|id| id.to_string()),
        cpus: nonzero(request.cpus).map(|n| n.to_string()),
        memory: nonzero(request.memory_mib).map(|mib| format!("{mib}m")),
        image: request.image,
        accel: machine.accel,
        // Not in the proto yet: the default cap.
        log_max_size: None,
        // Not in the proto yet: none.
        labels: Vec::new(),
        rootfs_cache_max: machine.rootfs_cache_max,
        allow_user_namespaces: request.allow_user_namespaces,
        // A driver API sandbox is removed by its Delete call.
        auto_remove: false,
        // Not in the proto: a driver API client restarts a sandbox itself.
        restart: None,
        // Not in the proto: docker's guest names and mounts keep their defaults.
        ..CreateFields::default()
    })
}

/// A Create request, checked.
pub fn create_request(
    request: proto::CreateRequest,
    machine: &Machine,
) -> Result<CreateRequest, GrpcStatus> {
    create_fields(request, machine)?
        .validate(&ProtoNames)
        .map_err(status)
}

/// An ExecStart's fields as kiln-sandbox takes them, and the sandbox reference.
fn exec_fields(start: proto::ExecStart) -> Result<(String, ExecFields), GrpcStatus> {
    let terminal = match (start.tty, start.terminal) {
        (false, _) => None,
        (true, None) => Some(TerminalSize { rows: 24, cols: 80 }),
        (true, Some(size)) => Some(terminal_size(size)?),
    };
    let fields = ExecFields {
        command: start.argv,
        env: start.env,
        lend_environment: false,
        workdir: optional(&start.workdir),
        terminal,
    };
    Ok((start.sandbox, fields))
}

/// An ExecStart, checked; returns the sandbox reference too.
pub fn exec_request(start: proto::ExecStart) -> Result<(String, ExecRequest), GrpcStatus> {
    let (sandbox, fields) = exec_fields(start)?;
    Ok((sandbox, fields.validate(&ProtoNames).map_err(status)?))
}

pub fn terminal_size(size: proto::TerminalSize) -> Result<TerminalSize, GrpcStatus> {
    let dimension = |field: &str, v: u32| {
        u16::try_from(v)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| invalid(field, v, "expected 1 to 65535"))
    };
    Ok(TerminalSize {
        rows: dimension("terminal.rows", size.rows)?,
        cols: dimension("terminal.cols", size.cols)?,
    })
}

pub fn workload_exit(result: &WorkloadResult) -> proto::WorkloadExit {
    let (kind, signal, message) = match result {
        WorkloadResult::Exited { .. } => (ResultKind::Exited, 0, String::new()),
        WorkloadResult::Killed { signal } => (ResultKind::Killed, *signal, String::new()),
        WorkloadResult::OomKilled => (ResultKind::OomKilled, 0, String::new()),
        WorkloadResult::StartFailed {
            reason: StartFailure::NotFound,
            message,
        } => (ResultKind::NotFound, 0, message.clone()),
        WorkloadResult::StartFailed { message, .. } => {
            (ResultKind::StartFailed, 0, message.clone())
        }
    };
    proto::WorkloadExit {
        result: kind as i32,
        exit_code: result.exit_code(),
        signal,
        message,
    }
}

pub fn sandbox(info: &SandboxInfo) -> proto::Sandbox {
    let (status, exit, failure) = match &info.status {
        Status::Created => (proto::Status::Created, None, String::new()),
        Status::Running => (proto::Status::Running, None, String::new()),
        Status::Exited { result, .. } => (
            proto::Status::Exited,
            Some(workload_exit(result)),
            String::new(),
        ),
        Status::Failed { message } => (proto::Status::Failed, None, message.clone()),
    };
    proto::Sandbox {
        id: info.id.clone(),
        name: info.name.clone().unwrap_or_default(),
        status: status as i32,
        exit,
        failure,
        reference: info.reference.clone(),
        manifest_digest: info.manifest_digest.clone(),
        created_unix: info.created_unix,
        started_unix: info.started_unix.unwrap_or(0),
    }
}

/// The event that reports `info`'s status.
pub fn status_event(info: &SandboxInfo) -> proto::event::Kind {
    use proto::event::Kind;
    match &info.status {
        Status::Created => Kind::Created(sandbox(info)),
        Status::Running => Kind::Running(proto::Running {}),
        Status::Exited { result, .. } => Kind::Exited(workload_exit(result)),
        Status::Failed { message } => Kind::Failed(proto::Failed {
            message: message.clone(),
        }),
    }
}

pub fn provision_event(event: ProvisionEvent) -> proto::event::Kind {
    use proto::event::Kind;
    use ProvisionEvent as P;
    match event {
        P::ResolvingImage { reference } => {
            Kind::ResolvingImage(proto::ResolvingImage { reference })
        }
        P::PullingLayer {
            index,
            count,
            digest,
            downloaded,
            size,
        } => Kind::PullingLayer(proto::PullingLayer {
            index: u32::try_from(index).unwrap_or(u32::MAX),
            count: u32::try_from(count).unwrap_or(u32::MAX),
            digest,
            downloaded_bytes: downloaded,
            size_bytes: size,
        }),
        P::BuildingRootImage => Kind::BuildingRootImage(proto::BuildingRootImage {}),
        P::BuildingIdentityLayer => Kind::BuildingIdentityLayer(proto::BuildingIdentityLayer {}),
        P::Booting => Kind::Booting(proto::Booting {}),
        P::Running => Kind::Running(proto::Running {}),
        P::Exited { result, .. } => Kind::Exited(workload_exit(&result)),
    }
}

/// A network decision as a Watch event: its verdict and the record as kiln logs it.
pub fn network_event(record: &kiln_policy::DecisionRecord) -> proto::event::Kind {
    let decision = match record.decision {
        kiln_policy::Verdict::Allow => "allow",
        kiln_policy::Verdict::Deny => "deny",
        kiln_policy::Verdict::Audit => "audit",
    };
    proto::event::Kind::NetworkDecision(proto::NetworkDecision {
        decision: decision.into(),
        record: record.to_json_line(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Machine {
        Machine {
            accel: AccelRequest::Auto,
            qemu: PathBuf::from("qemu-system-x86_64"),
            rootfs_cache_max: None,
        }
    }

    fn request() -> proto::CreateRequest {
        proto::CreateRequest {
            image: "docker.io/library/alpine:3".into(),
            ..Default::default()
        }
    }

    fn refused(request: proto::CreateRequest, naming: &str) {
        let err = create_request(request, &machine()).err().expect("refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(naming), "{naming}: {err:?}");
    }

    #[test]
    fn zero_and_empty_fields_are_unset() {
        let fields = create_fields(request(), &machine()).unwrap();
        assert_eq!((fields.cpus, fields.memory), (None, None));
        assert_eq!((fields.uid, fields.gid), (None, None));
        assert_eq!(
            (fields.user, fields.name, fields.workdir),
            (None, None, None)
        );
        assert_eq!(fields.network, NetworkMode::User);
        assert_eq!(fields.pull.policy, PullPolicy::Missing);
        assert!(!fields.lend_environment);
        assert!(!fields.allow_user_namespaces);
        assert!(create_request(request(), &machine()).is_ok());

        let set = proto::CreateRequest {
            uid: 20000,
            cpus: 2,
            publish: vec![proto::PortForward {
                host_port: 8080,
                guest_port: 80,
            }],
            network: proto::Network::None as i32,
            allow_user_namespaces: true,
            network_allow_host: vec!["host.kiln.internal:5432".into()],
            ..request()
        };
        let fields = create_fields(set, &machine()).unwrap();
        assert_eq!(
            (fields.uid.as_deref(), fields.cpus.as_deref()),
            (Some("20000"), Some("2"))
        );
        assert_eq!(fields.publish, ["8080:80"]);
        assert_eq!(fields.network, NetworkMode::None);
        assert_eq!(fields.allow_host, ["host.kiln.internal:5432"]);
        assert!(fields.allow_user_namespaces);
    }

    #[test]
    fn bad_fields_are_invalid_arguments_naming_them() {
        refused(
            proto::CreateRequest {
                image: "oci:".into(),
                ..request()
            },
            "image",
        );
        refused(
            proto::CreateRequest {
                name: "a/b".into(),
                ..request()
            },
            "a/b",
        );
        refused(
            proto::CreateRequest {
                env: vec!["A=1".into(), "B".into()],
                ..request()
            },
            "\"B\"",
        );
        refused(
            proto::CreateRequest {
                env: vec!["=1".into()],
                ..request()
            },
            "=1",
        );
        refused(
            proto::CreateRequest {
                uid: 999,
                ..request()
            },
            "999",
        );
        refused(
            proto::CreateRequest {
                cpus: 65,
                ..request()
            },
            "cpus",
        );
        refused(
            proto::CreateRequest {
                memory_mib: 1,
                ..request()
            },
            "memory_mib",
        );
        refused(
            proto::CreateRequest {
                workdir: "rel".into(),
                ..request()
            },
            "rel",
        );
        refused(
            proto::CreateRequest {
                user: "root".into(),
                ..request()
            },
            "root",
        );
        refused(
            proto::CreateRequest {
                network: 9,
                ..request()
            },
            "network",
        );
        let forward = proto::PortForward {
            host_port: 0,
            guest_port: 80,
        };
        refused(
            proto::CreateRequest {
                publish: vec![forward],
                ..request()
            },
            "0:80",
        );
        let forward = proto::PortForward {
            host_port: 8080,
            guest_port: 80,
        };
        refused(
            proto::CreateRequest {
                publish: vec![forward],
                network: proto::Network::None as i32,
                ..request()
            },
            "NETWORK_USER",
        );
        let pull = proto::Pull {
            platform: "nonsense".into(),
            ..Default::default()
        };
        refused(
            proto::CreateRequest {
                pull: Some(pull),
                ..request()
            },
            "nonsense",
        );
    }

    #[test]
    fn volumes_follow_the_cli_rules() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().to_str().unwrap().to_owned();
        let volume = |host_path: &str, guest_path: &str| proto::Volume {
            host_path: host_path.into(),
            guest_path: guest_path.into(),
            read_only: true,
        };
        let create = proto::CreateRequest {
            volumes: vec![volume(&host, "/data/")],
            ..request()
        };
        let fields = create_fields(create.clone(), &machine()).unwrap();
        assert_eq!(fields.volumes, [format!("{host}:/data/:ro")]);
        assert!(create_request(create, &machine()).is_ok());

        let missing = format!("{host}/missing");
        for (bad, naming) in [
            (volume("relative", "/data"), "relative"),
            (volume(&missing, "/data"), missing.as_str()),
            (volume(&host, "/proc/x"), "/proc"),
            (volume(&host, "data"), "\"data\""),
        ] {
            let create = proto::CreateRequest {
                volumes: vec![bad],
                ..request()
            };
            refused(create, naming);
        }
    }

    #[test]
    fn exec_requests() {
        let start = proto::ExecStart {
            sandbox: "box".into(),
            argv: vec!["sh".into()],
            env: vec!["A=1".into()],
            tty: true,
            ..Default::default()
        };
        let (sandbox, fields) = exec_fields(start.clone()).unwrap();
        assert_eq!(sandbox, "box");
        assert_eq!(fields.env, ["A=1"]);
        assert!(!fields.lend_environment);
        assert_eq!(fields.terminal, Some(TerminalSize { rows: 24, cols: 80 }));
        assert!(exec_request(start.clone()).is_ok());
        for (bad, naming) in [
            (
                proto::ExecStart {
                    argv: Vec::new(),
                    ..start.clone()
                },
                "argv",
            ),
            (
                proto::ExecStart {
                    workdir: "tmp".into(),
                    ..start.clone()
                },
                "workdir \"tmp\"",
            ),
            (
                proto::ExecStart {
                    env: vec!["B".into()],
                    ..start.clone()
                },
                "env \"B\"",
            ),
            (
                proto::ExecStart {
                    terminal: Some(proto::TerminalSize { rows: 0, cols: 80 }),
                    ..start.clone()
                },
                "terminal.rows",
            ),
        ] {
            let err = exec_request(bad).unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
            assert!(err.message().contains(naming), "{naming}: {err:?}");
        }
    }

    #[test]
    fn error_kinds_map_to_codes() {
        let cases = [
            (ErrorKind::InvalidInput, Code::InvalidArgument),
            (ErrorKind::NotFound, Code::NotFound),
            (ErrorKind::AlreadyExists, Code::AlreadyExists),
            (ErrorKind::FailedPrecondition, Code::FailedPrecondition),
            (ErrorKind::Internal, Code::Internal),
        ];
        for (kind, expected) in cases {
            assert_eq!(code(kind), expected);
        }
        let root = tempfile::tempdir().unwrap();
        let missing = kiln_sandbox::get(root.path(), "nosuch").unwrap_err();
        let status = status(missing);
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().contains("nosuch"), "{status:?}");
        let bad = kiln_sandbox::get(root.path(), "../x").unwrap_err();
        assert_eq!(super::status(bad).code(), Code::InvalidArgument);
    }

    #[test]
    fn results_keep_their_exit_codes() {
        let exit = workload_exit(&WorkloadResult::Killed { signal: 9 });
        assert_eq!(
            (exit.result, exit.exit_code, exit.signal),
            (ResultKind::Killed as i32, 137, 9)
        );
        let exit = workload_exit(&WorkloadResult::StartFailed {
            reason: StartFailure::NotFound,
            message: "x".into(),
        });
        assert_eq!(
            (exit.result, exit.exit_code),
            (ResultKind::NotFound as i32, 127)
        );
    }

    #[test]
    fn a_network_decision_event_carries_its_verdict_and_record() {
        let dst = "198.18.0.9:80".parse().unwrap();
        let deny = kiln_policy::Decision::Deny(kiln_policy::DenyReason::HostGateway { port: 80 });
        let record = kiln_policy::DecisionRecord::new(
            "T".into(),
            "sb",
            kiln_policy::FlowProtocol::Tcp,
            dst,
            &deny,
        )
        .unwrap();
        let proto::event::Kind::NetworkDecision(event) = network_event(&record) else {
            panic!("not a network decision");
        };
        assert_eq!(event.decision, "deny");
        let back: kiln_policy::DecisionRecord = serde_json::from_str(&event.record).unwrap();
        assert_eq!(back, record);
    }
}
