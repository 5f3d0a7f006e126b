//! Between the wire and kiln-sandbox: requests checked and turned into the lifecycle's
//! types (every bad field is INVALID_ARGUMENT naming it, by the same rules as the CLI's
//! flags), lifecycle results and errors turned into messages and status codes.

use std::path::PathBuf;

use kiln_image::{ImageRef, Platform, PullOptions, PullPolicy};
use kiln_protocol::{StartFailure, TerminalSize, WorkloadResult};
use kiln_sandbox::lifecycle::{self, ExecRequest, LifecycleError, SandboxInfo, Status};
use kiln_sandbox::options::{
    parse_env_assignment, parse_port_forward, parse_volumes, validate_name, Volume,
};
use kiln_sandbox::run::RunError;
use kiln_sandbox::spec::Overrides;
use kiln_vm::accel::AccelRequest;
use kiln_vm::Network;
use tonic::Status as GrpcStatus;

use crate::proto;
use crate::proto::workload_exit::Result as ResultKind;

/// Server-wide settings a Create request does not carry.
#[derive(Debug, Clone)]
pub struct Machine {
    pub accel: AccelRequest,
    pub qemu: PathBuf,
}

fn invalid(field: &str, value: impl std::fmt::Debug, reason: impl std::fmt::Display) -> GrpcStatus {
    GrpcStatus::invalid_argument(format!("{field} {value:?}: {reason}"))
}

/// A `sandbox` field: an id or name.
pub fn sandbox_ref(value: &str) -> Result<&str, GrpcStatus> {
    validate_name(value).map_err(|e| GrpcStatus::invalid_argument(format!("sandbox: {e}")))?;
    Ok(value)
}

/// KEY=VALUE entries; a bare KEY is refused (the server does not lend its own environment).
fn env_entries(field: &str, entries: &[String]) -> Result<Vec<(String, String)>, GrpcStatus> {
    entries
        .iter()
        .map(|entry| match parse_env_assignment(entry, |_| None) {
            Ok(Some(pair)) if entry.contains('=') => Ok(pair),
            Ok(_) => Err(invalid(field, entry, "expected KEY=VALUE")),
            Err(err) => Err(GrpcStatus::invalid_argument(format!("{field}: {err}"))),
        })
        .collect()
}

fn optional(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| text.to_owned())
}

fn sandbox_id(field: &str, value: u32, default: u32) -> Result<u32, GrpcStatus> {
    if value == 0 {
        return Ok(default);
    }
    kiln_identity::parse_sandbox_id(&value.to_string()).map_err(|e| invalid(field, value, e))
}

fn in_range(
    field: &str,
    value: u32,
    default: u32,
    range: std::ops::RangeInclusive<u32>,
) -> Result<u32, GrpcStatus> {
    match value {
        0 => Ok(default),
        v if range.contains(&v) => Ok(v),
        v => Err(invalid(
            field,
            v,
            format!("expected {} to {}", range.start(), range.end()),
        )),
    }
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

fn network(request: &proto::CreateRequest) -> Result<Network, GrpcStatus> {
    let forwards = request
        .publish
        .iter()
        .map(|p| {
            let text = format!("{}:{}", p.host_port, p.guest_port);
            parse_port_forward(&text)
                .map_err(|e| GrpcStatus::invalid_argument(format!("publish: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    match proto::Network::try_from(request.network) {
        Ok(proto::Network::Unspecified | proto::Network::User) => Ok(Network::User { forwards }),
        Ok(proto::Network::None) if forwards.is_empty() => Ok(Network::None),
        Ok(proto::Network::None) => Err(invalid(
            "publish",
            &request.publish,
            "port forwards need NETWORK_USER",
        )),
        Err(_) => Err(invalid("network", request.network, "unknown value")),
    }
}

/// Volumes by the rules of `-v HOSTDIR:GUESTDIR[:ro]`; the host path must be absolute
/// (the server's working directory means nothing to its clients).
fn volumes(volumes: &[proto::Volume]) -> Result<Vec<Volume>, GrpcStatus> {
    let mut texts = Vec::new();
    for volume in volumes {
        if !volume.host_path.starts_with('/') {
            let reason = "expected an absolute path";
            return Err(invalid("volumes.host_path", &volume.host_path, reason));
        }
        let mode = if volume.read_only { ":ro" } else { "" };
        texts.push(format!("{}:{}{mode}", volume.host_path, volume.guest_path));
    }
    parse_volumes(&texts).map_err(|e| GrpcStatus::invalid_argument(format!("volumes: {e}")))
}

/// A Create request as the lifecycle wants it.
pub fn create_request(
    request: proto::CreateRequest,
    machine: &Machine,
) -> Result<lifecycle::CreateRequest, GrpcStatus> {
    let reference =
        ImageRef::parse(&request.image).map_err(|e| invalid("image", &request.image, e))?;
    let name = optional(&request.name);
    if let Some(name) = &name {
        validate_name(name).map_err(|e| GrpcStatus::invalid_argument(format!("name: {e}")))?;
    }
    let user = if request.user.is_empty() {
        kiln_identity::SANDBOX_USER
    } else {
        &request.user
    };
    let run_as =
        kiln_identity::RunAs::parse(user.as_bytes()).map_err(|e| invalid("user", user, e))?;
    if let Some(dir) = optional(&request.workdir).filter(|d| !d.starts_with('/')) {
        return Err(invalid("workdir", dir, "expected an absolute path"));
    }
    Ok(lifecycle::CreateRequest {
        network: network(&request)?,
        sandbox_uid: sandbox_id("uid", request.uid, kiln_identity::DEFAULT_SANDBOX_UID)?,
        sandbox_gid: sandbox_id("gid", request.gid, kiln_identity::DEFAULT_SANDBOX_GID)?,
        cpus: in_range("cpus", request.cpus, 1, 1..=64)?,
        memory_mib: in_range("memory_mib", request.memory_mib, 512, 64..=1_048_576)?,
        overrides: Overrides {
            entrypoint: request.entrypoint,
            cmd: request.command,
            env: env_entries("env", &request.env)?,
            working_dir: optional(&request.workdir),
        },
        pull: pull_options(request.pull)?,
        reference,
        run_as,
        name,
        volumes: volumes(&request.volumes)?,
        accel: machine.accel,
        qemu: machine.qemu.clone(),
    })
}

/// An ExecStart as the lifecycle wants it; returns the sandbox reference too.
pub fn exec_request(start: proto::ExecStart) -> Result<(String, ExecRequest), GrpcStatus> {
    sandbox_ref(&start.sandbox)?;
    if start.argv.is_empty() || start.argv[0].is_empty() {
        return Err(invalid(
            "argv",
            &start.argv,
            "expected a program and its arguments",
        ));
    }
    if let Some(dir) = optional(&start.workdir).filter(|d| !d.starts_with('/')) {
        return Err(invalid("workdir", dir, "expected an absolute path"));
    }
    let terminal = match (start.tty, start.terminal) {
        (false, _) => None,
        (true, None) => Some(TerminalSize { rows: 24, cols: 80 }),
        (true, Some(size)) => Some(terminal_size(size)?),
    };
    let request = ExecRequest {
        env: env_entries("env", &start.env)?,
        workdir: optional(&start.workdir),
        argv: start.argv,
        terminal,
    };
    Ok((start.sandbox, request))
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

pub fn provision_event(event: lifecycle::ProvisionEvent) -> proto::event::Kind {
    use lifecycle::ProvisionEvent as P;
    use proto::event::Kind;
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

/// The status code of a lifecycle error; the message is the error's own, which names
/// the sandbox or input at fault.
pub fn lifecycle_status(err: LifecycleError) -> GrpcStatus {
    let message = err.to_string();
    match err {
        LifecycleError::NotFound(_) => GrpcStatus::not_found(message),
        LifecycleError::BadId(_) => GrpcStatus::invalid_argument(message),
        LifecycleError::DuplicateName { .. } => GrpcStatus::already_exists(message),
        LifecycleError::NotRunning(_)
        | LifecycleError::Running(_)
        | LifecycleError::ImageGone { .. } => GrpcStatus::failed_precondition(message),
        LifecycleError::Run(RunError::Spec(_)) => GrpcStatus::invalid_argument(message),
        LifecycleError::Run(RunError::Prepare(kiln_sandbox::prepare::PrepareError::Image(
            image,
        ))) if image.is_usage() => GrpcStatus::invalid_argument(message),
        _ => GrpcStatus::internal(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Machine {
        Machine {
            accel: AccelRequest::Auto,
            qemu: PathBuf::from("qemu-system-x86_64"),
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
    fn defaults_fill_zero_fields() {
        let create = create_request(request(), &machine()).unwrap();
        assert_eq!((create.cpus, create.memory_mib), (1, 512));
        assert_eq!((create.sandbox_uid, create.sandbox_gid), (10001, 10001));
        assert!(matches!(create.network, Network::User { ref forwards } if forwards.is_empty()));
        assert_eq!(create.pull.policy, PullPolicy::Missing);
        assert_eq!(create.run_as, kiln_identity::RunAs::Sandbox);
        assert_eq!(create.name, None);
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
        let create = create_request(create, &machine()).unwrap();
        assert_eq!(create.volumes.len(), 1);
        assert_eq!(
            (
                create.volumes[0].guest.as_str(),
                create.volumes[0].read_only
            ),
            ("/data", true)
        );

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
        let (sandbox, exec) = exec_request(start.clone()).unwrap();
        assert_eq!(sandbox, "box");
        assert_eq!(exec.env, [("A".to_owned(), "1".to_owned())]);
        assert_eq!(exec.terminal, Some(TerminalSize { rows: 24, cols: 80 }));
        for bad in [
            proto::ExecStart {
                argv: Vec::new(),
                ..start.clone()
            },
            proto::ExecStart {
                sandbox: "../x".into(),
                ..start.clone()
            },
            proto::ExecStart {
                terminal: Some(proto::TerminalSize { rows: 0, cols: 80 }),
                ..start.clone()
            },
        ] {
            assert_eq!(
                exec_request(bad).unwrap_err().code(),
                tonic::Code::InvalidArgument
            );
        }
    }

    #[test]
    fn lifecycle_errors_map_to_codes() {
        use tonic::Code;
        let cases = [
            (LifecycleError::NotFound("abc".into()), Code::NotFound),
            (
                LifecycleError::DuplicateName {
                    name: "n".into(),
                    id: "i".into(),
                },
                Code::AlreadyExists,
            ),
            (
                LifecycleError::NotRunning("abc".into()),
                Code::FailedPrecondition,
            ),
            (
                LifecycleError::Running("abc".into()),
                Code::FailedPrecondition,
            ),
            (
                LifecycleError::Monitor {
                    id: "abc".into(),
                    message: "x".into(),
                },
                Code::Internal,
            ),
        ];
        for (err, code) in cases {
            let status = lifecycle_status(err);
            assert_eq!(status.code(), code, "{status:?}");
        }
        let bad = validate_name("..").unwrap_err();
        assert_eq!(
            lifecycle_status(LifecycleError::BadId(bad)).code(),
            Code::InvalidArgument
        );
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
}
