//! `kiln run`: one sandbox from image reference to workload result, in the foreground.

use std::path::Path;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use kiln_protocol::WorkloadResult;
use kiln_vm::accel::AccelVerdict;
use kiln_vm::GuestImages;
use serde::Serialize;

use crate::boot::{boot, end_status, main_run_spec, sandbox_record, BootError, Host, Upper};
use crate::error::Error;
use crate::launch::{Control, HostIo, VmTimings};
use crate::logs::{RotatingLog, Tee};
use crate::network::write_network_policy;
use crate::prepare::prepare_images;
use crate::request::RunRequest;
use crate::state::{
    now_unix, SandboxDir, SandboxRecord, StateError, StateRecord, Status, RECORD_FILE, STATE_FILE,
    STDERR_LOG, STDOUT_LOG,
};

/// Durations of every phase of a run, on the host's clock but for the guest's boot
/// phases; together they add up to `total`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunTimings {
    /// Resolving the reference and pulling what is missing.
    pub pull: Duration,
    /// Building or finding the root image and identity layer (and checking the guest
    /// files first).
    pub build: Duration,
    /// Kiln's work between the images and the VMM's spawn: the sandbox's directory and
    /// writable layer, the boot configuration, the accelerator.
    pub setup: Option<Duration>,
    #[serde(flatten)]
    pub vm: VmTimings,
    /// After the VM ended: removing a `--rm` sandbox or recording how it ended.
    pub cleanup: Option<Duration>,
    /// The whole run, from its start until it returned.
    pub total: Duration,
    /// From the start of the run until the host heard that the workload started: what a
    /// user waits before their command runs (pull, build, VMM start, boot). Not a phase.
    pub to_workload: Option<Duration>,
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

/// Runs one sandbox. `notice` receives one-line messages for the user (the acceleration
/// fallback, build warnings); `control` forwards kiln's signals and terminal resizes.
pub fn run(
    root: &Path,
    request: RunRequest,
    io: HostIo,
    control: Receiver<Control>,
    notice: &dyn Fn(&str),
) -> Result<RunReport, Error> {
    let run_started = Instant::now();
    let guest = GuestImages::locate(root);
    guest.check().map_err(BootError::from)?;
    let create = &request.sandbox;
    let prepared = prepare_images(
        root,
        &create.reference,
        &create.pull,
        create.sandbox_uid,
        create.sandbox_gid,
        create.rootfs_cache_max,
    )?;
    let prepared_at = Instant::now();
    for warning in &prepared.warnings {
        notice(&format!("warning: {warning}"));
    }
    let run_spec = main_run_spec(create, &prepared, request.terminal)?;
    let host =
        Host::new(root, guest, create.accel, &request.qemu, notice).map_err(BootError::from)?;

    let sandbox = SandboxDir::create(root, create.name.as_deref())?;
    let record = sandbox_record(&sandbox, create, &prepared, run_spec);
    // This process is the sandbox's monitor while it runs: `start` and `rm` see it alive.
    let _lock = sandbox.lock_monitor()?;
    let started = StateRecord {
        status: Status::Running,
        monitor_pid: Some(std::process::id()),
        started_unix: Some(now_unix()),
        ended_unix: None,
    };
    let outcome = sandbox
        .write_json(RECORD_FILE, &record)
        .and_then(|()| write_network_policy(&sandbox, create))
        .and_then(|()| sandbox.write_json(STATE_FILE, &started))
        .and_then(|()| keep_logs(&sandbox, &record, io, request.remove))
        .map_err(BootError::from)
        .and_then(|io| {
            let upper = if request.remove {
                Upper::Tmpfs
            } else {
                Upper::create(&sandbox)?
            };
            boot(
                &sandbox,
                &record,
                &prepared,
                &host,
                upper,
                request.timeout,
                io,
                control,
            )
        });
    let sandbox_id = sandbox.id().to_owned();
    if request.remove {
        sandbox.remove()?;
    } else {
        // A kept sandbox can be started again later, like a created one.
        let ended = StateRecord {
            status: end_status(&outcome),
            monitor_pid: None,
            ended_unix: Some(now_unix()),
            ..started
        };
        sandbox.write_json(STATE_FILE, &ended)?;
    }
    let ended_at = Instant::now();
    let outcome = outcome?;
    Ok(RunReport {
        sandbox_id,
        root_image_built: prepared.root_built,
        result: outcome.result,
        accel: host.verdict,
        timings: RunTimings {
            pull: prepared.pull_time,
            build: prepared_at
                .saturating_duration_since(run_started)
                .saturating_sub(prepared.pull_time),
            setup: (outcome.timings.vmm_spawned_at)
                .map(|at| at.saturating_duration_since(prepared_at)),
            cleanup: (outcome.timings.ended_at).map(|at| ended_at.saturating_duration_since(at)),
            total: ended_at.saturating_duration_since(run_started),
            to_workload: (outcome.timings.workload_started_at)
                .map(|at| at.saturating_duration_since(run_started)),
            vm: outcome.timings,
        },
    })
}

/// The output of a run that keeps its sandbox goes to the sandbox's logs too, as a
/// detached sandbox's does, for `kiln logs`; a `--rm` run keeps nothing.
fn keep_logs(
    sandbox: &SandboxDir,
    record: &SandboxRecord,
    mut io: HostIo,
    remove: bool,
) -> Result<HostIo, StateError> {
    if remove {
        return Ok(io);
    }
    let log = |name: &str| {
        RotatingLog::open(&sandbox.file(name), record.log_max_size).map_err(|source| {
            StateError::Io {
                path: sandbox.file(name),
                source,
            }
        })
    };
    io.stdout = Box::new(Tee::new(io.stdout, log(STDOUT_LOG)?));
    io.stderr = Box::new(Tee::new(io.stderr, log(STDERR_LOG)?));
    Ok(io)
}
