//! `kiln run`: one sandbox from image reference to workload result.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_image::{ImageRef, PullOptions};
use kiln_protocol::{BootStep, Identity, RunAs, RunSpec, TerminalSize, WorkloadResult};
use kiln_vm::accel::{self, AccelRequest, AccelVerdict, ProbeOutcome};
use kiln_vm::qemu::Qemu;
use kiln_vm::{Accel, Channel, Disk, GuestImages, Network, VmError, VmSpec};
use serde::Serialize;

use crate::launch::{launch, Control, Deadlines, HostIo, LaunchError, VmTimings};
use crate::prepare::{prepare_images, PrepareError, PreparedImages};
use crate::spec::{build_run_spec, identity, ImageDefaults, Overrides, SpecError};
use crate::state::{run_dir, SandboxDir, StateError};

/// Size of a persistent sandbox's writable disk; sparse, so it costs what is written.
pub const UPPER_DISK_MIB: u64 = 8 * 1024;

/// The guest's address on QEMU's user-mode network, its gateway (the host) and DNS.
const USER_NET: &str = "10.0.2.15/24,10.0.2.2,10.0.2.3";

/// Name of the host-guest virtio-serial port.
const CHANNEL_PORT: &str = "kiln.0";

/// Everything `kiln run` needs.
pub struct RunRequest {
    pub reference: ImageRef,
    pub pull: PullOptions,
    pub overrides: Overrides,
    /// Whom the workload runs as.
    pub run_as: kiln_identity::RunAs,
    /// Ids of the `sandbox` user written into the image.
    pub sandbox_uid: u32,
    pub sandbox_gid: u32,
    pub cpus: u32,
    pub memory_mib: u32,
    pub network: Network,
    pub timeout: Option<Duration>,
    pub name: Option<String>,
    /// Throw the writable layer and the state directory away afterwards.
    pub remove: bool,
    /// A terminal of this size for the workload (`-t`).
    pub terminal: Option<TerminalSize>,
    pub accel: AccelRequest,
    pub qemu: PathBuf,
}

/// Durations of every phase of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunTimings {
    /// Resolving the reference and pulling what is missing.
    pub pull: Duration,
    /// Building or finding the root image and identity layer.
    pub build: Duration,
    #[serde(flatten)]
    pub vm: VmTimings,
}

/// A finished run.
#[derive(Debug)]
pub struct RunReport {
    pub sandbox_id: String,
    /// True when this run built the root image (false: another run had built it).
    pub root_image_built: bool,
    pub result: WorkloadResult,
    pub accel: AccelVerdict,
    pub timings: RunTimings,
}

/// Why a run failed before the workload produced a result.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Prepare(#[from] PrepareError),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

/// What a persistent sandbox's state directory records about its launch.
#[derive(Serialize)]
struct LaunchRecord<'a> {
    id: &'a str,
    name: Option<&'a str>,
    reference: &'a str,
    manifest_digest: String,
    created_unix: u64,
    sandbox_uid: u32,
    sandbox_gid: u32,
    run: &'a RunSpec,
}

/// Runs one sandbox. `notice` receives one-line messages for the user (the acceleration
/// fallback, build warnings); `control` forwards kiln's signals and terminal resizes.
pub fn run(
    root: &Path,
    request: RunRequest,
    io: HostIo,
    control: Receiver<Control>,
    notice: &dyn Fn(&str),
) -> Result<RunReport, RunError> {
    let guest = GuestImages::locate(root);
    guest.check()?;
    let qemu = Qemu::with_binary(&request.qemu);
    let prepared = prepare_images(root, &request.reference, &request.pull, request.sandbox_uid, request.sandbox_gid)?;
    for warning in &prepared.warnings {
        notice(&format!("warning: {warning}"));
    }
    let workload = identity(&request.run_as, request.sandbox_uid, request.sandbox_gid);
    let run_spec = build_run_spec(&ImageDefaults::from_config(&prepared.image.config), &request.overrides, workload, request.terminal)?;

    let verdict = accel::resolve(request.accel, &accel::cache_dir(root), || probe_kvm(&qemu, &guest))?;
    if verdict.accel == Accel::Tcg && request.accel == AccelRequest::Auto && !verdict.cached {
        notice(&format!("note: {}", verdict.reason));
    }

    let sandbox = SandboxDir::create(root, request.name.as_deref())?;
    let outcome = boot_sandbox(&sandbox, &request, &prepared, &guest, &qemu, &verdict, run_spec, io, control);
    if request.remove {
        sandbox.remove()?;
    }
    let (result, vm_timings, id) = outcome?;
    Ok(RunReport {
        sandbox_id: id,
        root_image_built: prepared.root_built,
        result,
        accel: verdict,
        timings: RunTimings { pull: prepared.pull_time, build: prepared.build_time, vm: vm_timings },
    })
}

#[allow(clippy::too_many_arguments)]
fn boot_sandbox(
    sandbox: &SandboxDir,
    request: &RunRequest,
    prepared: &PreparedImages,
    guest: &GuestImages,
    qemu: &Qemu,
    verdict: &AccelVerdict,
    run_spec: RunSpec,
    io: HostIo,
    control: Receiver<Control>,
) -> Result<(WorkloadResult, VmTimings, String), RunError> {
    let io_err = |context: String| move |source| RunError::Io { context, source };
    let record = LaunchRecord {
        id: sandbox.id(),
        name: sandbox.name(),
        reference: &prepared.image.record.reference,
        manifest_digest: prepared.image.record.manifest_digest.to_string(),
        created_unix: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        sandbox_uid: request.sandbox_uid,
        sandbox_gid: request.sandbox_gid,
        run: &run_spec,
    };
    let record_path = sandbox.path().join("sandbox.json");
    let json = serde_json::to_vec_pretty(&record).expect("launch record serialises");
    std::fs::File::create(&record_path)
        .and_then(|mut f| f.write_all(&json))
        .map_err(io_err(record_path.display().to_string()))?;

    let mut disks = vec![
        Disk { id: "root".into(), path: prepared.root_image.clone(), read_only: true },
        Disk { id: "ident".into(), path: prepared.identity_layer.clone(), read_only: true },
    ];
    let upper = if request.remove {
        "kiln.upper=tmpfs".to_owned()
    } else {
        let path = kiln_vm::disk::upper_disk_path(sandbox.path());
        kiln_vm::disk::create_upper_disk(&path, UPPER_DISK_MIB)?;
        disks.push(Disk { id: "upper".into(), path, read_only: false });
        "kiln.upper=upper".to_owned()
    };
    let hostname = sandbox.name().unwrap_or(sandbox.id());
    let mut cmdline = vec![
        "kiln.root=root".to_owned(),
        "kiln.ident=ident".to_owned(),
        upper,
        format!("kiln.port={CHANNEL_PORT}"),
        format!("kiln.hostname={hostname}"),
    ];
    if matches!(request.network, Network::User { .. }) {
        cmdline.push(format!("kiln.net={USER_NET}"));
    }

    let run_dir = run_dir()?;
    let spec = VmSpec {
        kernel: guest.kernel.clone(),
        initramfs: guest.initramfs.clone(),
        cmdline,
        disks,
        shares: Vec::new(),
        cpus: request.cpus,
        memory_mib: request.memory_mib,
        network: request.network.clone(),
        channel: Channel { socket: run_dir.path().join("channel.sock"), port_name: CHANNEL_PORT.into() },
        console_log: sandbox.console_log(),
        accel: verdict.accel,
    };
    let mut deadlines = Deadlines::for_accel(verdict.accel);
    deadlines.workload = request.timeout;
    let outcome = launch(qemu, &spec, run_spec, deadlines, io, control)?;
    Ok((outcome.result, outcome.timings, sandbox.id().to_owned()))
}

/// How long a KVM boot may take to reach init before KVM is judged unusable. A working
/// KVM gets there in well under a second, even on a loaded host; a broken one fails at
/// once or spins silently (as nested PVM hosts do), so the probe's cost is this deadline.
const PROBE_DEADLINE: Duration = Duration::from_secs(6);

/// Boots the guest once under KVM with no disks: reaching init (which then reports that
/// it has no root image) proves KVM runs our kernel.
fn probe_kvm(qemu: &Qemu, guest: &GuestImages) -> ProbeOutcome {
    let run_dir = match run_dir() {
        Ok(dir) => dir,
        Err(err) => return ProbeOutcome::Failed(format!("no run directory for the probe: {err}")),
    };
    let spec = VmSpec {
        kernel: guest.kernel.clone(),
        initramfs: guest.initramfs.clone(),
        cmdline: vec![format!("kiln.port={CHANNEL_PORT}")],
        disks: Vec::new(),
        shares: Vec::new(),
        cpus: 1,
        memory_mib: 256,
        network: Network::None,
        channel: Channel { socket: run_dir.path().join("probe.sock"), port_name: CHANNEL_PORT.into() },
        console_log: run_dir.path().join("probe-console.log"),
        accel: Accel::Kvm,
    };
    let deadlines = Deadlines { connect: PROBE_DEADLINE, boot: PROBE_DEADLINE, ..Deadlines::for_accel(Accel::Kvm) };
    let probe_spec = RunSpec {
        argv: vec!["/bin/true".into()],
        env: Vec::new(),
        cwd: None,
        identity: Identity { run_as: RunAs::Uid, uid: 10001, gid: 10001 },
        tty: false,
        terminal: None,
    };
    let io = HostIo { stdin: None, stdout: Box::new(std::io::sink()), stderr: Box::new(std::io::sink()) };
    let (_keep_open, control) = mpsc::channel();
    let started = Instant::now();
    match launch(qemu, &spec, probe_spec, deadlines, io, control) {
        Err(LaunchError::Boot { error, .. }) if error.step != BootStep::InitPanic => ProbeOutcome::Booted,
        Ok(_) => ProbeOutcome::Booted,
        Err(err) => {
            let detail = kvm_failure_line(&spec.console_log).unwrap_or_else(|| first_line(&err.to_string()));
            tracing::debug!("KVM probe failed after {:?}: {err}", started.elapsed());
            ProbeOutcome::Failed(detail)
        }
    }
}

/// QEMU's own explanation of a KVM failure, e.g. "KVM internal error. Suberror: 1".
fn kvm_failure_line(console_log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(console_log).ok()?;
    text.lines().find(|l| l.contains("KVM")).map(|l| l.trim().to_owned())
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_owned()
}
