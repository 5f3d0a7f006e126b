//! Booting a sandbox: what a foreground `kiln run` and a detached sandbox's monitor share.
//! The host side (guest files, the VMM, the accelerator), the writable layer, the VM spec
//! and kernel arguments of a sandbox's boot, what `sandbox.json` records, and how a boot's
//! outcome becomes the sandbox's status.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use kiln_identity::SANDBOX_HOME;
use kiln_protocol::{
    BootConfig, BootConfigError, BootStep, DiskRef, Identity, NetConfig, OpenShellLaunch, RunAs,
    RunSpec, TerminalSize, VolumeMount, WorkloadResult, CHANNEL_PORT, IDENTITY_DISK_ID,
    OPENSHELL_DISK_ID, OPENSHELL_SUPERVISOR_PATH, ROOT_DISK_ID, UPPER_DISK_ID,
};
use kiln_vm::accel::{self, AccelRequest, AccelVerdict, ProbeOutcome};
use kiln_vm::qemu::Qemu;
use kiln_vm::{Accel, Channel, Disk, GuestImages, Network, Share, VmError, VmSpec};

use crate::error::{Error, ErrorKind};
use crate::launch::{launch, Control, Deadlines, HostIo, LaunchError, LaunchOutcome};
use crate::network::start_network;
use crate::options::{HostDirError, Volume};
use crate::prepare::PreparedImages;
use crate::request::{CreateRequest, OpenShellSupervisor};
use crate::spec::{build_run_spec, identity, ImageDefaults, SpecError};
use crate::state::{
    now_unix, run_dir, GuestSetup, SandboxDir, SandboxRecord, StateError, Status, SHORT_ID_LEN,
};

/// Size of a persistent sandbox's writable disk; sparse, so it costs what is written.
const UPPER_DISK_MIB: u64 = 8 * 1024;

/// The guest's address on kiln's network endpoint, its gateway (the host) and DNS: the
/// addresses QEMU's user-mode network used, so guests see the network they always saw.
pub(crate) const USER_NET: NetConfig = NetConfig {
    address: Ipv4Addr::new(10, 0, 2, 15),
    prefix_len: 24,
    gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
    dns: Some(Ipv4Addr::new(10, 0, 2, 3)),
};

/// Why a boot did not produce a workload result.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("volume {}:{guest}: {source}", .host.display())]
    Volume {
        host: PathBuf,
        guest: String,
        source: Box<HostDirError>,
    },
    #[error(transparent)]
    BootConfig(#[from] BootConfigError),
    #[error(transparent)]
    Network(#[from] kiln_netstack::Error),
    #[error("the host's own addresses (to keep the guest from them): {0}")]
    HostAddresses(std::io::Error),
    #[error("the sandbox's network record")]
    AllowHost(#[from] kiln_policy::AllowHostError),
    #[error("the sandbox's network policy: {0}")]
    Policy(String),
}

impl From<BootError> for Error {
    fn from(err: BootError) -> Self {
        let kind = match &err {
            BootError::State(state) => state.kind(),
            // The sandbox's volume is not what it was created with.
            BootError::Volume { .. } => ErrorKind::FailedPrecondition,
            // A forward's host port is taken.
            BootError::Network(kiln_netstack::Error::Forward { .. }) => {
                ErrorKind::FailedPrecondition
            }
            // The request's checks admit only what the guest accepts, so a boot
            // configuration the encoder refuses is kiln's own fault.
            BootError::Vm(_)
            | BootError::Launch(_)
            | BootError::BootConfig(_)
            | BootError::Network(_)
            | BootError::HostAddresses(_)
            | BootError::AllowHost(_)
            | BootError::Policy(_) => ErrorKind::Internal,
        };
        Error::new(kind, err)
    }
}

/// How a sandbox ended after a boot: its workload's result, or the boot's failure. A
/// workload that outlived the grace period of a stop was killed with the VM.
pub fn end_status(outcome: &Result<LaunchOutcome, BootError>) -> Status {
    match outcome {
        Ok(outcome) => Status::Exited {
            exit_code: outcome.result.exit_code(),
            result: outcome.result.clone(),
        },
        Err(BootError::Launch(LaunchError::Interrupted { .. })) => {
            let result = WorkloadResult::Killed { signal: 9 };
            Status::Exited {
                exit_code: result.exit_code(),
                result,
            }
        }
        Err(err) => Status::Failed {
            message: err.to_string(),
        },
    }
}

/// The main workload's run spec: the image's config with the request's overrides.
pub fn main_run_spec(
    request: &CreateRequest,
    prepared: &PreparedImages,
    terminal: Option<TerminalSize>,
) -> Result<RunSpec, SpecError> {
    let workload = identity(&request.run_as, request.sandbox_uid, request.sandbox_gid);
    build_run_spec(
        &ImageDefaults::from_config(&prepared.image.config),
        &request.overrides,
        workload,
        terminal,
    )
}

/// The run spec that starts OpenShell's supervisor in place of `workload`: the
/// supervisor's path and `--workdir /sandbox` (as OpenShell's own VM init runs it), its
/// exact environment, the workload's identity (validated and given /sandbox in the guest
/// before the supervisor starts). The token and TLS material are filled in at each boot,
/// from the state directory.
pub fn openshell_run_spec(workload: RunSpec, supervisor: &OpenShellSupervisor) -> RunSpec {
    RunSpec {
        argv: vec![
            OPENSHELL_SUPERVISOR_PATH.into(),
            "--workdir".into(),
            SANDBOX_HOME.into(),
        ],
        env: supervisor.env.clone(),
        cwd: Some(SANDBOX_HOME.into()),
        tty: false,
        terminal: None,
        openshell: Some(OpenShellLaunch::default()),
        ..workload
    }
}

/// What `sandbox.json` records about a new sandbox.
pub fn sandbox_record(
    sandbox: &SandboxDir,
    request: &CreateRequest,
    prepared: &PreparedImages,
    run: RunSpec,
) -> SandboxRecord {
    SandboxRecord {
        id: sandbox.id().to_owned(),
        name: sandbox.name().map(str::to_owned),
        image: prepared.image.record.clone(),
        created_unix: now_unix(),
        sandbox_uid: request.sandbox_uid,
        sandbox_gid: request.sandbox_gid,
        run,
        cpus: request.cpus,
        millicpus: Some(request.millicpus),
        memory_mib: request.memory_mib,
        network: request.network.clone(),
        labels: request.labels.clone(),
        accel: request.accel,
        volumes: request.volumes.clone(),
        log_max_size: request.log_max_size,
        allow_user_namespaces: request.allow_user_namespaces,
        auto_remove: request.auto_remove,
        restart: request.restart,
        guest: request.guest.clone(),
        openshell: None,
    }
}

/// The virtio-9p shares of `volumes`, each holding its host directory open as
/// [`Volume::reopen`] checked it (the VMM serves that open directory). A host directory
/// that is gone, replaced or reachable by others since the volume was given is an error
/// naming the volume.
pub fn volume_shares(volumes: &[Volume]) -> Result<Vec<Share>, BootError> {
    volumes
        .iter()
        .enumerate()
        .map(|(index, volume)| {
            let dir = volume.reopen().map_err(|source| BootError::Volume {
                host: volume.host.clone(),
                guest: volume.guest.clone(),
                source: Box::new(source),
            })?;
            Ok(Share {
                tag: volume_tag(index),
                dir,
                read_only: volume.read_only,
            })
        })
        .collect()
}

/// The 9p tag of the volume at `index`: `vol0`, `vol1`, ...
fn volume_tag(index: usize) -> String {
    format!("vol{index}")
}

/// The host side of a boot: guest files, the VMM and the accelerator to use.
pub struct Host {
    pub guest: GuestImages,
    pub qemu: Qemu,
    pub verdict: AccelVerdict,
}

impl Host {
    /// Resolves the accelerator (probing KVM once per host boot); `notice` hears of a
    /// fallback to TCG the user did not ask for.
    pub fn new(
        root: &Path,
        guest: GuestImages,
        accel: AccelRequest,
        qemu: &Path,
        notice: &dyn Fn(&str),
    ) -> Result<Host, VmError> {
        let qemu = Qemu::with_binary(qemu).keeping_state_in(root);
        let verdict = accel::resolve(accel, &accel::cache_dir(root), || probe_kvm(&qemu, &guest))?;
        if verdict.accel == Accel::Tcg {
            kiln_vm::tsc::measure_in_background();
        }
        if verdict.accel == Accel::Tcg && accel == AccelRequest::Auto && !verdict.cached {
            notice(&format!("note: {}", verdict.reason));
        }
        Ok(Host {
            guest,
            qemu,
            verdict,
        })
    }
}

/// The sandbox's writable layer.
pub enum Upper {
    /// In guest memory, gone with the VM (`kiln run --rm`).
    Tmpfs,
    /// The sparse ext4 disk in the state directory, kept across boots.
    Disk(PathBuf),
}

impl Upper {
    /// Makes a new sandbox's writable disk.
    pub fn create(sandbox: &SandboxDir) -> Result<Upper, VmError> {
        let path = kiln_vm::disk::upper_disk_path(sandbox.path());
        kiln_vm::disk::create_upper_disk(&path, UPPER_DISK_MIB)?;
        Ok(Upper::Disk(path))
    }

    /// The disk of a sandbox that already has one.
    pub fn existing(sandbox: &SandboxDir) -> Upper {
        Upper::Disk(kiln_vm::disk::upper_disk_path(sandbox.path()))
    }
}

/// The `kiln.*` kernel arguments that tell the guest's init what this boot has: its
/// disks, the channel port, hostname, network, volumes (shared as [`volume_shares`]
/// numbers them), whether the workload may create user namespaces, and the names and
/// mounts of `guest`.
fn kernel_args(
    upper: &Upper,
    openshell: bool,
    hostname: &str,
    network: &Network,
    volumes: &[Volume],
    user_namespaces: bool,
    guest: &GuestSetup,
) -> Result<Vec<String>, BootConfigError> {
    let upper = match upper {
        Upper::Tmpfs => kiln_protocol::Upper::Tmpfs,
        Upper::Disk(_) => kiln_protocol::Upper::Disk(DiskRef::Serial(UPPER_DISK_ID.into())),
    };
    BootConfig {
        root: Some(DiskRef::Serial(ROOT_DISK_ID.into())),
        ident: Some(DiskRef::Serial(IDENTITY_DISK_ID.into())),
        openshell: openshell.then(|| DiskRef::Serial(OPENSHELL_DISK_ID.into())),
        upper,
        port: CHANNEL_PORT.into(),
        hostname: hostname.into(),
        net: matches!(network, Network::Stream { .. }).then_some(USER_NET),
        volumes: volumes
            .iter()
            .enumerate()
            .map(|(index, volume)| VolumeMount {
                tag: volume_tag(index),
                path: volume.guest.clone(),
                read_only: volume.read_only,
            })
            .collect(),
        tmpfs: guest.tmpfs.clone(),
        hosts: guest.extra_hosts.clone(),
        dns: guest.dns.clone(),
        read_only: guest.read_only,
        user_namespaces,
    }
    .kernel_args()
}

/// Boots `sandbox` as `record` says on `upper` and drives its main workload to its end:
/// the one boot path of `kiln run` and of a detached sandbox's monitor.
#[allow(clippy::too_many_arguments)]
pub fn boot(
    sandbox: &SandboxDir,
    record: &SandboxRecord,
    prepared: &PreparedImages,
    host: &Host,
    upper: Upper,
    timeout: Option<Duration>,
    io: HostIo,
    control: Receiver<Control>,
) -> Result<LaunchOutcome, BootError> {
    // The endpoint lives as long as this call: past the VM's end, never past kiln's.
    let mut io = io;
    let denials = io.network_denials.take();
    let endpoint = start_network(sandbox, &record.network, record.log_max_size, denials)?;
    let network = match &endpoint {
        Some(endpoint) => Network::Stream {
            socket: endpoint.socket().to_owned(),
        },
        None => Network::None,
    };
    let short_id = sandbox.id().get(..SHORT_ID_LEN).unwrap_or(sandbox.id());
    let hostname = record.guest.hostname.as_deref().unwrap_or(short_id);
    let cmdline = kernel_args(
        &upper,
        prepared.supervisor_layer.is_some(),
        hostname,
        &network,
        &record.volumes,
        record.allow_user_namespaces,
        &record.guest,
    )?;
    let mut disks = vec![
        Disk {
            id: ROOT_DISK_ID.into(),
            path: prepared.root_image.clone(),
            read_only: true,
        },
        Disk {
            id: IDENTITY_DISK_ID.into(),
            path: prepared.identity_layer.clone(),
            read_only: true,
        },
    ];
    if let Some(path) = &prepared.supervisor_layer {
        disks.push(Disk {
            id: OPENSHELL_DISK_ID.into(),
            path: path.clone(),
            read_only: true,
        });
    }
    if let Upper::Disk(path) = upper {
        disks.push(Disk {
            id: UPPER_DISK_ID.into(),
            path,
            read_only: false,
        });
    }
    let shares = volume_shares(&record.volumes)?;

    let run_dir = run_dir()?;
    let spec = VmSpec {
        kernel: host.guest.kernel.clone(),
        initramfs: host.guest.initramfs.clone(),
        cmdline,
        disks,
        shares,
        cpus: record.cpus,
        // The exact `--cpus` share (records older than it: whole vCPUs).
        cpu_millis: record.millicpus.unwrap_or(record.cpus.saturating_mul(1000)),
        memory_mib: record.memory_mib,
        network,
        channel: Channel {
            socket: run_dir.path().join("channel.sock"),
            port_name: CHANNEL_PORT.into(),
        },
        console_log: sandbox.console_log(),
        accel: host.verdict.accel,
    };
    let mut run = record.run.clone();
    if let Some(openshell) = &mut run.openshell {
        openshell.token = sandbox.openshell_token()?;
        openshell.tls = sandbox.openshell_tls()?;
    }
    let mut deadlines = Deadlines::for_accel(host.verdict.accel);
    deadlines.workload = timeout;
    Ok(launch(&host.qemu, &spec, run, deadlines, io, control)?)
}

/// How long a KVM boot may take to reach init before KVM is judged unusable. A working
/// KVM gets there in well under a second, even on a loaded host. A broken one is known
/// from QEMU's own failure (it exits, or kiln-vm quits it when its VM stops on a KVM
/// internal error), so this deadline only bounds a guest that spins silently.
const PROBE_DEADLINE: Duration = Duration::from_secs(6);

/// Boots the guest once under KVM with no disks: reaching init (which then reports that
/// it has no root image) proves KVM runs our kernel.
fn probe_kvm(qemu: &Qemu, guest: &GuestImages) -> ProbeOutcome {
    let run_dir = match run_dir() {
        Ok(dir) => dir,
        Err(err) => return ProbeOutcome::Failed(format!("no run directory for the probe: {err}")),
    };
    let cmdline = match BootConfig::default().kernel_args() {
        Ok(args) => args,
        Err(err) => return ProbeOutcome::Failed(err.to_string()),
    };
    let spec = VmSpec {
        kernel: guest.kernel.clone(),
        initramfs: guest.initramfs.clone(),
        cmdline,
        disks: Vec::new(),
        shares: Vec::new(),
        cpus: 1,
        cpu_millis: 1000,
        memory_mib: 256,
        network: Network::None,
        channel: Channel {
            socket: run_dir.path().join("probe.sock"),
            port_name: CHANNEL_PORT.into(),
        },
        console_log: run_dir.path().join("probe-console.log"),
        accel: Accel::Kvm,
    };
    let deadlines = Deadlines {
        connect: PROBE_DEADLINE,
        boot: PROBE_DEADLINE,
        ..Deadlines::for_accel(Accel::Kvm)
    };
    let probe_spec = RunSpec {
        argv: vec!["/bin/true".into()],
        env: Vec::new(),
        cwd: None,
        identity: Identity {
            run_as: RunAs::Uid,
            uid: 10001,
            gid: 10001,
        },
        tty: false,
        terminal: None,
        task: None,
        openshell: None,
    };
    let io = HostIo {
        stdin: None,
        stdout: Box::new(std::io::sink()),
        stderr: Box::new(std::io::sink()),
        guest_events: None,
        network_denials: None,
    };
    let (_keep_open, control) = mpsc::channel();
    let started = Instant::now();
    match launch(qemu, &spec, probe_spec, deadlines, io, control) {
        Err(LaunchError::Boot { error, .. }) if error.step != BootStep::InitPanic => {
            ProbeOutcome::Booted
        }
        Ok(_) => ProbeOutcome::Booted,
        Err(err) => {
            let detail =
                kvm_failure_line(&spec.console_log).unwrap_or_else(|| first_line(&err.to_string()));
            tracing::debug!("KVM probe failed after {:?}: {err}", started.elapsed());
            ProbeOutcome::Failed(detail)
        }
    }
}

/// QEMU's own explanation of a KVM failure, e.g. "KVM internal error. Suberror: 1" or
/// "qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69".
fn kvm_failure_line(console_log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(console_log).ok()?;
    text.lines()
        .find(|l| l.contains("KVM") || l.contains(": error: "))
        .map(|l| l.trim().to_owned())
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::parse_volume;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn volumes_become_numbered_shares_and_kernel_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let volumes = [
            parse_volume(&format!("{}:/data", dir.path().display())).unwrap(),
            parse_volume(&format!("{}:/srv/in:ro", dir.path().display())).unwrap(),
        ];
        let args = kernel_args(
            &Upper::Tmpfs,
            false,
            "box",
            &Network::None,
            &volumes,
            false,
            &GuestSetup::default(),
        )
        .unwrap();
        assert_eq!(
            args,
            [
                "kiln.root=root",
                "kiln.ident=ident",
                "kiln.upper=tmpfs",
                "kiln.port=kiln.0",
                "kiln.hostname=box",
                "kiln.vol=vol0,/data",
                "kiln.vol=vol1,/srv/in,ro"
            ]
        );
        let shares = volume_shares(&volumes).unwrap();
        let described: Vec<(&str, bool)> = shares
            .iter()
            .map(|s| (s.tag.as_str(), s.read_only))
            .collect();
        assert_eq!(described, [("vol0", false), ("vol1", true)]);
        let held = std::fs::File::from(shares.into_iter().next().unwrap().dir);
        let expected = std::fs::metadata(dir.path()).unwrap().ino();
        assert_eq!(held.metadata().unwrap().ino(), expected);

        // A host directory removed since: refused, naming the volume.
        let gone = dir.path().join("gone");
        std::fs::create_dir(&gone).unwrap();
        let volume = parse_volume(&format!("{}:/x", gone.display())).unwrap();
        std::fs::remove_dir(&gone).unwrap();
        let err = volume_shares(&[volume]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("volume {}:/x: ", gone.display())),
            "{text}"
        );
        assert_eq!(Error::from(err).kind(), ErrorKind::FailedPrecondition);
    }

    #[test]
    fn a_disk_upper_and_the_user_network_have_their_arguments() {
        let network = Network::Stream {
            socket: PathBuf::from("/s/net.sock"),
        };
        let args = kernel_args(
            &Upper::Disk(PathBuf::from("/u")),
            true,
            "id",
            &network,
            &[],
            false,
            &GuestSetup::default(),
        )
        .unwrap();
        assert!(args.contains(&"kiln.upper=upper".to_owned()), "{args:?}");
        // OpenShell's supervisor layer, when the sandbox has one.
        let layer = "kiln.openshell=openshell".to_owned();
        assert!(args.contains(&layer), "{args:?}");
        let net = "kiln.net=10.0.2.15/24,10.0.2.2,10.0.2.3".to_owned();
        assert!(args.contains(&net), "{args:?}");
    }

    #[test]
    fn user_namespaces_reach_the_guest_only_when_allowed() {
        let userns = |allowed| {
            kernel_args(
                &Upper::Tmpfs,
                false,
                "box",
                &Network::None,
                &[],
                allowed,
                &GuestSetup::default(),
            )
            .unwrap()
            .into_iter()
            .filter(|arg| arg.starts_with("kiln.userns="))
            .collect::<Vec<_>>()
        };
        assert_eq!(userns(true), ["kiln.userns=on"]);
        assert_eq!(
            userns(false),
            Vec::<String>::new(),
            "off is the guest's default"
        );
    }
}
