//! Detached sandboxes: create, start, stop, remove, get, list and exec, for the CLI and
//! the driver API alike.
//!
//! A created sandbox is a state directory (the `state` module) with its launch request
//! pinned to the image's manifest digest and its own writable disk. `start` runs a
//! monitor process (`kiln monitor`, the `monitor` module) that owns the VM, so the caller
//! can exit; everything else talks to that monitor over its unix socket (the `client`
//! module) or reads the state files.

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln_image::{PullEvent, Store};
use kiln_protocol::{RunSpec, WorkloadResult};
use kiln_vm::GuestImages;
use serde::Serialize;

use crate::boot::{
    main_run_spec, openshell_run_spec, sandbox_record, volume_shares, BootError, Upper,
};
use crate::client::{ExecSession, MonitorError};
use crate::error::{Error, ErrorKind};
use crate::launch::console_tail;
use crate::logs::lines::{parse_since, LineCounter, LineReader, LineSelection};
use crate::logs::LogReader;
use crate::network::write_network_policy;
use crate::prepare::{
    build_images, image_cache, pinned_images, sandbox_images, BuildStep, PrepareError,
};
use crate::request::{CreateRequest, ExecRequest};
use crate::state::{
    NetworkRecord, OpenShellRecord, SandboxDir, SandboxRecord, StateError, StateRecord, Status,
    MONITOR_LOG, RECORD_FILE, STATE_FILE, STDERR_LOG, STDOUT_LOG,
};

/// What is known about one sandbox.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxInfo {
    pub id: String,
    pub name: Option<String>,
    #[serde(flatten)]
    pub status: Status,
    /// The image reference as given at creation (canonical form).
    pub reference: String,
    /// The manifest digest every start boots.
    pub manifest_digest: String,
    pub created_unix: u64,
    pub started_unix: Option<u64>,
    pub ended_unix: Option<u64>,
    /// The monitor process while running.
    pub monitor_pid: Option<u32>,
    /// The main workload's run spec.
    pub run: RunSpec,
    pub cpus: u32,
    /// The CPU share asked for, in thousandths of a CPU (`cpus` is it rounded up).
    pub millicpus: u32,
    pub memory_mib: u32,
    pub network: NetworkRecord,
    pub labels: BTreeMap<String, String>,
    pub state_dir: PathBuf,
    /// What confines the VMM process while it runs, as read from /proc.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmm: Option<kiln_vm::Confinement>,
    /// Removed by its monitor when it stops (`run --rm -d`).
    pub auto_remove: bool,
}

impl SandboxInfo {
    /// Why the main workload could not start, and the exit code that stands for it
    /// (127 not found, 126 not executable), when that is how it ended.
    pub fn start_failure(&self) -> Option<(&str, i32)> {
        match &self.status {
            Status::Exited {
                result: WorkloadResult::StartFailed { message, .. },
                exit_code,
            } => Some((message, *exit_code)),
            _ => None,
        }
    }
}

/// A step of provisioning a sandbox, reported as it happens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ProvisionEvent {
    ResolvingImage {
        reference: String,
    },
    /// Layer `index` (from 1) of `count`: `downloaded` of `size` bytes.
    PullingLayer {
        index: usize,
        count: usize,
        digest: String,
        downloaded: u64,
        size: u64,
    },
    BuildingRootImage,
    BuildingIdentityLayer,
    Booting,
    Running,
    Exited {
        result: WorkloadResult,
        exit_code: i32,
    },
}

/// A boot under a new monitor that failed before its workload ran.
#[derive(Debug, thiserror::Error)]
#[error("sandbox {id} did not start: {message}")]
struct StartFailed {
    id: String,
    message: String,
}

impl From<StartFailed> for Error {
    fn from(err: StartFailed) -> Self {
        Error::new(ErrorKind::Internal, err)
    }
}

/// How long `start` waits for the monitor to report the workload running: the boot
/// deadline of a TCG guest plus room for a loaded host.
const START_WAIT: Duration = Duration::from_secs(300);

/// Pulls the image (as `request.pull` says), builds its root image and identity layer,
/// and makes the sandbox's state directory, pinned manifest digest and writable disk.
pub fn create(
    root: &Path,
    request: CreateRequest,
    events: &dyn Fn(ProvisionEvent),
) -> Result<SandboxInfo, Error> {
    events(ProvisionEvent::ResolvingImage {
        reference: request.reference.canonical(),
    });
    let store = Store::open(root).map_err(PrepareError::from)?;
    let image = pull_reporting(&store, &request, events)?;
    let prepared = build_images(
        root,
        &store,
        image,
        (request.sandbox_uid, request.sandbox_gid, request.id_bounds),
        Some(request.rootfs_cache_max),
        &build_events(events),
    )?;
    let mut run_spec = main_run_spec(&request, &prepared, None)?;
    let openshell = match &request.openshell {
        Some(supervisor) => {
            let layer = image_cache(root)
                .supervisor_layer(&supervisor.binary)
                .map_err(PrepareError::from)?;
            run_spec = openshell_run_spec(run_spec, supervisor);
            Some(OpenShellRecord {
                supervisor_digest: layer.digest,
            })
        }
        None => None,
    };

    let sandbox = SandboxDir::create(root, request.name.as_deref())?;
    let mut record = sandbox_record(&sandbox, &request, &prepared, run_spec);
    record.openshell = openshell;
    let token = request.openshell.as_ref().and_then(|o| o.token.as_deref());
    let tls = request.openshell.as_ref().and_then(|o| o.tls.as_ref());
    let written = sandbox
        .write_json(RECORD_FILE, &record)
        .and_then(|()| token.map_or(Ok(()), |t| sandbox.write_openshell_token(t)))
        .and_then(|()| tls.map_or(Ok(()), |t| sandbox.write_openshell_tls(t)))
        .and_then(|()| write_network_policy(&sandbox, &request))
        .and_then(|()| sandbox.write_json(STATE_FILE, &StateRecord::created()))
        .map_err(BootError::from)
        .and_then(|()| Upper::create(&sandbox).map_err(BootError::from));
    if let Err(err) = written {
        sandbox.remove()?;
        return Err(err.into());
    }
    info(&sandbox, record, StateRecord::created())
}

/// Pulls on a thread of its own so that pull progress reaches `events` on this thread.
fn pull_reporting(
    store: &Store,
    request: &CreateRequest,
    events: &dyn Fn(ProvisionEvent),
) -> Result<kiln_image::PulledImage, PrepareError> {
    let (tx, rx) = mpsc::channel::<PullEvent>();
    let mut options = request.pull.clone();
    let theirs = options.progress.take();
    options.progress = Some(std::sync::Arc::new(move |event: &PullEvent| {
        if let Some(theirs) = &theirs {
            theirs(event);
        }
        let _ = tx.send(event.clone());
    }));
    std::thread::scope(|scope| {
        let puller = scope.spawn(move || kiln_image::pull(store, &request.reference, &options));
        let mut layers = LayerCounter::default();
        for event in rx {
            if let Some(event) = layers.event(&event) {
                events(event);
            }
        }
        puller.join().expect("the pull thread does not panic")
    })
    .map_err(PrepareError::from)
}

/// Numbers layers in the order the pull reports them.
#[derive(Default)]
struct LayerCounter {
    count: usize,
    seen: Vec<String>,
}

impl LayerCounter {
    fn event(&mut self, event: &PullEvent) -> Option<ProvisionEvent> {
        let (digest, downloaded, size) = match event {
            PullEvent::Resolved { layers, .. } => {
                self.count = *layers;
                return None;
            }
            PullEvent::LayerCached { digest, size } | PullEvent::LayerDone { digest, size } => {
                (digest, *size, *size)
            }
            PullEvent::LayerStarted { digest, size } => (digest, 0, *size),
            PullEvent::LayerProgress {
                digest,
                downloaded,
                size,
            } => (digest, *downloaded, *size),
            _ => return None,
        };
        let digest = digest.to_string();
        let index = match self.seen.iter().position(|d| *d == digest) {
            Some(i) => i + 1,
            None => {
                self.seen.push(digest.clone());
                self.seen.len()
            }
        };
        Some(ProvisionEvent::PullingLayer {
            index,
            count: self.count.max(index),
            digest,
            downloaded,
            size,
        })
    }
}

/// Tells `events` of each build step.
fn build_events(events: &dyn Fn(ProvisionEvent)) -> impl Fn(BuildStep) + '_ {
    move |step| {
        events(match step {
            BuildStep::RootImage => ProvisionEvent::BuildingRootImage,
            BuildStep::IdentityLayer => ProvisionEvent::BuildingIdentityLayer,
        })
    }
}

/// Boots sandbox `id_or_name` under a new monitor process (`monitor_exe monitor`, the
/// kiln binary) with the QEMU binary `qemu`, and returns once its workload runs, or with
/// the boot's error. A sandbox that is running already is returned as it is.
pub fn start(
    root: &Path,
    id_or_name: &str,
    monitor_exe: &Path,
    qemu: &Path,
    events: &dyn Fn(ProvisionEvent),
) -> Result<SandboxInfo, Error> {
    let root = std::path::absolute(root).map_err(|e| StateError::Io {
        path: root.to_path_buf(),
        source: e,
    })?;
    let sandbox = SandboxDir::open(&root, id_or_name)?;
    let record: SandboxRecord = sandbox.read_json(RECORD_FILE)?;
    if sandbox.monitor_alive() {
        // Already what the caller asked for, as `docker start` treats it.
        return get_dir(&sandbox);
    }
    GuestImages::locate(&root)
        .check()
        .map_err(BootError::from)?;
    // A volume's host directory may be gone or replaced since create: say so before booting.
    volume_shares(&record.volumes)?;
    // The identity layer step is reported whether it is built or found; create already
    // said so, and a start only says when it rebuilds the root image.
    let rebuilds = |step| {
        if step == BuildStep::RootImage {
            events(ProvisionEvent::BuildingRootImage);
        }
    };
    pinned_images(&root, &record, &rebuilds)?;
    sandbox.write_json(STATE_FILE, &StateRecord::created())?;

    events(ProvisionEvent::Booting);
    let log = sandbox.open_log(MONITOR_LOG)?;
    let log_err = log.try_clone().map_err(|e| StateError::Io {
        path: sandbox.file(MONITOR_LOG),
        source: e,
    })?;
    // The monitor daemonizes: this child exits as soon as the daemon holds the lock.
    let status = Command::new(monitor_exe)
        .arg("--root")
        .arg(&root)
        .arg("monitor")
        .arg("--qemu")
        .arg(qemu)
        .arg(sandbox.id())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .current_dir("/")
        .status()
        .map_err(|e| monitor_err(&sandbox, format!("starting {}: {e}", monitor_exe.display())))?;
    if !status.success() {
        return Err(monitor_err(
            &sandbox,
            format!(
                "exited ({status}): {}",
                console_tail(&sandbox.file(MONITOR_LOG))
            ),
        ));
    }

    let deadline = Instant::now() + START_WAIT;
    loop {
        let state: StateRecord = match sandbox.read_json(STATE_FILE) {
            Ok(state) => state,
            // An auto-removed sandbox whose workload ran and ended before this look: it
            // did start, and is gone as asked.
            Err(_) if record.auto_remove && !sandbox.path().exists() => {
                events(ProvisionEvent::Running);
                let ran = StateRecord {
                    status: Status::Running,
                    ..StateRecord::created()
                };
                return info(&sandbox, record, ran);
            }
            Err(err) => return Err(err.into()),
        };
        match &state.status {
            Status::Running | Status::Exited { .. } => {
                events(ProvisionEvent::Running);
                if let Status::Exited { result, exit_code } = &state.status {
                    events(ProvisionEvent::Exited {
                        result: result.clone(),
                        exit_code: *exit_code,
                    });
                }
                return info(&sandbox, record, state);
            }
            Status::Failed { message } => {
                return Err(StartFailed {
                    id: sandbox.id().to_owned(),
                    message: message.clone(),
                }
                .into())
            }
            Status::Created if !sandbox.monitor_alive() => {
                // The monitor writes a final state before it lets go of its lock; read once more.
                let state: StateRecord = sandbox.read_json(STATE_FILE)?;
                if state.status != Status::Created {
                    continue;
                }
                let log = console_tail(&sandbox.file(MONITOR_LOG));
                return Err(monitor_err(
                    &sandbox,
                    format!("ended before the workload started: {log}"),
                ));
            }
            Status::Created if Instant::now() >= deadline => {
                return Err(monitor_err(
                    &sandbox,
                    format!("no workload after {} s", START_WAIT.as_secs()),
                ));
            }
            Status::Created => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn monitor_err(sandbox: &SandboxDir, message: String) -> Error {
    MonitorError {
        id: sandbox.id().to_owned(),
        message,
    }
    .into()
}

/// Stops a running sandbox: its workloads get SIGTERM, then SIGKILL after `grace`, the
/// guest syncs and powers off. A sandbox that is not running is left as it is; one its
/// monitor removed as it stopped (`run --rm -d`) is returned as it was before.
pub fn stop(root: &Path, id_or_name: &str, grace: Duration) -> Result<SandboxInfo, Error> {
    let sandbox = SandboxDir::open(root, id_or_name)?;
    if !sandbox.monitor_alive() {
        return get_dir(&sandbox);
    }
    let before = get_dir(&sandbox)?;
    crate::client::shutdown(&sandbox, grace)?;
    match get_dir(&sandbox) {
        // Its monitor is removing it (`run --rm -d`), maybe this moment, file by file.
        Err(_) if before.auto_remove => Ok(before),
        after => after,
    }
}

/// Sends `signal` (1 to 64) to the main workload of running sandbox `id_or_name`, as
/// `docker kill -s` does. SIGINT and SIGTERM also start the stop's grace period, as they
/// do for a foreground run: a workload that ignores them is stopped after it.
pub fn kill(root: &Path, id_or_name: &str, signal: i32) -> Result<SandboxInfo, Error> {
    if !(1..=kiln_protocol::MAX_SIGNAL).contains(&signal) {
        let err = crate::options::parse_signal(&signal.to_string()).unwrap_err();
        return Err(Error::new(ErrorKind::InvalidInput, err));
    }
    let sandbox = SandboxDir::open(root, id_or_name)?;
    if !sandbox.monitor_alive() {
        return Err(StateError::NotRunning(sandbox.id().to_owned()).into());
    }
    crate::client::signal_main(&sandbox, signal)?;
    get_dir(&sandbox)
}

/// Stops sandbox `id_or_name` if it runs (SIGTERM, SIGKILL after `grace`) and starts it
/// again with its writable disk, as [`stop`] then [`start`].
pub fn restart(
    root: &Path,
    id_or_name: &str,
    grace: Duration,
    monitor_exe: &Path,
    qemu: &Path,
    events: &dyn Fn(ProvisionEvent),
) -> Result<SandboxInfo, Error> {
    stop(root, id_or_name, grace)?;
    start(root, id_or_name, monitor_exe, qemu, events)
}

/// Removes a sandbox and everything it has; a running one only with `force` (it is
/// stopped at once, without a grace period).
pub fn remove(root: &Path, id_or_name: &str, force: bool) -> Result<(), Error> {
    let sandbox = SandboxDir::open(root, id_or_name)?;
    if sandbox.monitor_alive() {
        if !force {
            return Err(StateError::Running(sandbox.id().to_owned()).into());
        }
        crate::client::shutdown(&sandbox, Duration::ZERO)?;
    }
    Ok(sandbox.remove()?)
}

/// The sandbox `id_or_name`.
pub fn get(root: &Path, id_or_name: &str) -> Result<SandboxInfo, Error> {
    get_dir(&SandboxDir::open(root, id_or_name)?)
}

fn get_dir(sandbox: &SandboxDir) -> Result<SandboxInfo, Error> {
    let record: SandboxRecord = sandbox.read_json(RECORD_FILE)?;
    let state: StateRecord = sandbox.read_json(STATE_FILE)?;
    info(sandbox, record, state)
}

/// Gives sandbox `id_or_name` the name `new_name` (which no other sandbox may have).
pub fn rename(root: &Path, id_or_name: &str, new_name: &str) -> Result<SandboxInfo, Error> {
    let mut sandbox = SandboxDir::open(root, id_or_name)?;
    sandbox.rename(new_name)?;
    get_dir(&sandbox)
}

/// Blocks until sandbox `id_or_name` is not running (its monitor has ended) and returns
/// how it ended; at once for a sandbox that is not running.
pub fn wait(root: &Path, id_or_name: &str) -> Result<SandboxInfo, Error> {
    let sandbox = SandboxDir::open(root, id_or_name)?;
    sandbox.wait_for_monitor()?;
    get_dir(&sandbox)
}

/// Every sandbox under `root`, by id. Sandboxes whose state cannot be read (being created
/// or removed at this moment) are left out.
pub fn list(root: &Path) -> Result<Vec<SandboxInfo>, Error> {
    let mut infos = Vec::new();
    for id in SandboxDir::list(root)? {
        match get(root, &id) {
            Ok(info) => infos.push(info),
            Err(err) => tracing::debug!("skipping sandbox {id}: {err}"),
        }
    }
    Ok(infos)
}

/// What [`prune_images`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PruneReport {
    /// Content store blobs, and the bytes they took.
    pub blobs_removed: u64,
    pub bytes_freed: u64,
    /// Manifest digests whose built root images were removed, and the disk space they
    /// took.
    pub root_images_removed: Vec<String>,
    pub root_image_bytes_freed: u64,
}

/// Removes the content store's blobs that no image record and no sandbox needs, and the
/// built root images of manifests that are in neither: a sandbox keeps the image it is
/// pinned to even after `kiln rmi`, so it can always start.
pub fn prune_images(root: &Path) -> Result<PruneReport, Error> {
    let store = Store::open(root).map_err(PrepareError::from)?;
    let pinned = sandbox_images(root)?;
    let blobs = store.prune(&pinned).map_err(PrepareError::from)?;
    let images = store.images().map_err(PrepareError::from)?;
    let keep: HashSet<String> = images
        .iter()
        .chain(&pinned)
        .map(|image| image.manifest_digest.to_string())
        .collect();
    let root_images = image_cache(root)
        .retain(|digest| keep.contains(digest))
        .map_err(PrepareError::from)?;
    Ok(PruneReport {
        blobs_removed: blobs.blobs_removed,
        bytes_freed: blobs.bytes_freed,
        root_images_removed: root_images.manifest_digests,
        root_image_bytes_freed: root_images.bytes_freed,
    })
}

/// What one kind of kiln's data holds on disk (`kiln system df`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub total: usize,
    /// In use: images and root images a sandbox is pinned to, running sandboxes.
    pub active: usize,
    /// Disk space taken (allocated blocks, so sparse files count what they hold).
    pub bytes: u64,
    /// What removing the unused ones would free (for images: their recorded size, which
    /// may count layers they share).
    pub reclaimable_bytes: u64,
}

/// Disk use under `root`, as `docker system df` reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DiskUsage {
    pub images: Usage,
    pub root_images: Usage,
    pub sandboxes: Usage,
}

/// How much of the disk the images, built root images and sandboxes under `root` take.
pub fn disk_usage(root: &Path) -> Result<DiskUsage, Error> {
    let store = Store::open(root).map_err(PrepareError::from)?;
    let pinned: HashSet<String> = sandbox_images(root)?
        .iter()
        .map(|image| image.manifest_digest.to_string())
        .collect();
    let records = store.images().map_err(PrepareError::from)?;
    let recorded: HashSet<String> = records
        .iter()
        .map(|r| r.manifest_digest.to_string())
        .collect();
    let unused = records
        .iter()
        .filter(|r| !pinned.contains(&r.manifest_digest.to_string()));
    let images = Usage {
        total: records.len(),
        active: records.len() - unused.clone().count(),
        bytes: allocated_bytes(&store.dir().join("blobs")),
        reclaimable_bytes: unused.map(|r| r.size).sum(),
    };
    let built = image_cache(root).images().map_err(PrepareError::from)?;
    let root_images = Usage {
        total: built.len(),
        active: built
            .iter()
            .filter(|b| pinned.contains(&b.manifest_digest))
            .count(),
        bytes: built.iter().map(|b| b.disk_bytes).sum(),
        // What `kiln prune` removes: those of images neither recorded nor pinned.
        reclaimable_bytes: built
            .iter()
            .filter(|b| {
                !pinned.contains(&b.manifest_digest) && !recorded.contains(&b.manifest_digest)
            })
            .map(|b| b.disk_bytes)
            .sum(),
    };
    let mut sandboxes = Usage::default();
    for info in list(root)? {
        let bytes = allocated_bytes(&info.state_dir);
        sandboxes.total += 1;
        sandboxes.bytes += bytes;
        if info.status == Status::Running {
            sandboxes.active += 1;
        } else {
            sandboxes.reclaimable_bytes += bytes;
        }
    }
    Ok(DiskUsage {
        images,
        root_images,
        sandboxes,
    })
}

/// Bytes of disk the files under `path` take; what cannot be read counts nothing.
fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let own = meta.blocks() * 512;
    if !meta.is_dir() {
        return own;
    }
    let children = std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| allocated_bytes(&entry.path()))
        .sum::<u64>();
    own + children
}

/// Starts `request` in the running sandbox `id_or_name`, as the sandbox's identity.
pub fn exec(root: &Path, id_or_name: &str, request: ExecRequest) -> Result<ExecSession, Error> {
    let sandbox = SandboxDir::open(root, id_or_name)?;
    let record: SandboxRecord = sandbox.read_json(RECORD_FILE)?;
    if !sandbox.monitor_alive() {
        return Err(StateError::NotRunning(sandbox.id().to_owned()).into());
    }
    crate::client::exec(&sandbox, &record, request)
}

/// What `kiln logs` shows of the workload's output (docker's `logs` flags).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogOptions {
    /// Keep copying new output until the sandbox is no longer running.
    pub follow: bool,
    /// Only the last this many lines of each stream (`None`: all).
    pub tail: Option<u64>,
    /// Only lines that arrived at or after this time: RFC 3339, Unix seconds, or a
    /// duration ago (`10m`).
    pub since: Option<String>,
    /// Start each line with the time it arrived (RFC 3339, UTC, nanoseconds).
    pub timestamps: bool,
}

/// Copies the main workload's output so far (`stdout.log`, `stderr.log`, each after
/// its rotated older part) to `stdout` and `stderr`, the lines `options` select; with
/// `follow`, keeps copying until the sandbox is no longer running. `--tail` counts the
/// lines of each stream apart.
pub fn logs<'a>(
    root: &Path,
    id_or_name: &str,
    options: &LogOptions,
    stdout: &'a mut (dyn Write + 'a),
    stderr: &'a mut (dyn Write + 'a),
) -> Result<(), Error> {
    let since = options
        .since
        .as_deref()
        .map(|text| parse_since(text, jiff::Timestamp::now()))
        .transpose()
        .map_err(|e| Error::new(ErrorKind::InvalidInput, e))?;
    let sandbox = SandboxDir::open(root, id_or_name)?;
    let mut streams = Vec::new();
    for (name, out) in [(STDOUT_LOG, stdout), (STDERR_LOG, stderr)] {
        let path = sandbox.file(name);
        // The lines to leave out for --tail: all but the last N of what is there now.
        let skip = match options.tail {
            None => 0,
            Some(tail) => {
                let mut counter = LineCounter::default();
                LogReader::new(&path)
                    .copy_new(&mut counter)
                    .map_err(log_error(&sandbox, name))?;
                counter.lines().saturating_sub(tail)
            }
        };
        let selection = LineSelection {
            timestamps: options.timestamps,
            since,
            skip,
        };
        streams.push((name, LogReader::new(&path), LineReader::new(out, selection)));
    }
    copy_logs(&sandbox, streams, options.follow)
}

/// Prints what the workload of running sandbox `id_or_name` writes from now on, until the
/// sandbox stops (across restarts), as `docker attach` does; returns how it ended. A
/// detached sandbox has no stdin to attach to.
pub fn attach<'a>(
    root: &Path,
    id_or_name: &str,
    stdout: &'a mut (dyn Write + 'a),
    stderr: &'a mut (dyn Write + 'a),
) -> Result<SandboxInfo, Error> {
    let sandbox = SandboxDir::open(root, id_or_name)?;
    if !sandbox.monitor_alive() {
        return Err(StateError::NotRunning(sandbox.id().to_owned()).into());
    }
    let mut streams = Vec::new();
    for (name, out) in [(STDOUT_LOG, stdout), (STDERR_LOG, stderr)] {
        let log = LogReader::at_end(&sandbox.file(name)).map_err(log_error(&sandbox, name))?;
        streams.push((name, log, LineReader::new(out, LineSelection::default())));
    }
    copy_logs(&sandbox, streams, true)?;
    get_dir(&sandbox)
}

/// How reading or writing log `name` of `sandbox` failed.
fn log_error(sandbox: &SandboxDir, name: &str) -> impl FnOnce(std::io::Error) -> StateError {
    let path = sandbox.file(name);
    move |source| StateError::Io { path, source }
}

/// Copies the new output of each log to its line reader; with `follow`, again until the
/// sandbox's monitor is gone.
fn copy_logs(
    sandbox: &SandboxDir,
    mut streams: Vec<(&str, LogReader, LineReader<'_>)>,
    follow: bool,
) -> Result<(), Error> {
    loop {
        // Checked before copying, so the last round copies everything the workload wrote.
        let more = follow && sandbox.monitor_alive();
        for (name, log, out) in streams.iter_mut() {
            log.copy_new(out).map_err(log_error(sandbox, name))?;
            if more {
                let _ = out.flush();
            } else {
                out.finish().map_err(log_error(sandbox, name))?;
            }
        }
        if !more {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The info of a sandbox; a `running` state whose monitor is gone reads as failed.
fn info(
    sandbox: &SandboxDir,
    record: SandboxRecord,
    mut state: StateRecord,
) -> Result<SandboxInfo, Error> {
    if state.status == Status::Running && !sandbox.monitor_alive() {
        // The monitor writes its final state before it lets go of its lock.
        state = sandbox.read_json(STATE_FILE)?;
        if state.status == Status::Running {
            state.status = Status::Failed {
                message: "the sandbox's monitor process died".into(),
            };
            state.monitor_pid = None;
        }
    }
    let vmm = (state.status == Status::Running)
        .then_some(state.monitor_pid)
        .flatten()
        .and_then(vmm_of);
    Ok(SandboxInfo {
        id: record.id,
        name: record.name,
        status: state.status,
        reference: record.image.reference,
        manifest_digest: record.image.manifest_digest.to_string(),
        created_unix: record.created_unix,
        started_unix: state.started_unix,
        ended_unix: state.ended_unix,
        monitor_pid: state.monitor_pid,
        run: record.run,
        cpus: record.cpus,
        millicpus: record.millicpus.unwrap_or(record.cpus * 1000),
        memory_mib: record.memory_mib,
        network: record.network,
        labels: record.labels,
        state_dir: sandbox.path().to_path_buf(),
        vmm,
        auto_remove: record.auto_remove,
    })
}

/// The confinement of the VMM a monitor runs: its only child process.
fn vmm_of(monitor_pid: u32) -> Option<kiln_vm::Confinement> {
    let tasks = std::fs::read_dir(format!("/proc/{monitor_pid}/task")).ok()?;
    let child = tasks.flatten().find_map(|task| {
        let children = std::fs::read_to_string(task.path().join("children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    })?;
    kiln_vm::jail::observe(child).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(hex: char) -> kiln_image::Digest {
        format!("sha256:{}", hex.to_string().repeat(64))
            .parse()
            .unwrap()
    }

    #[test]
    fn layers_are_numbered_in_the_order_the_pull_reports_them() {
        let mut counter = LayerCounter::default();
        let resolved = PullEvent::Resolved {
            reference: "r".into(),
            manifest_digest: digest('0'),
            platform: "linux/amd64".into(),
            layers: 2,
        };
        assert_eq!(counter.event(&resolved), None);
        let (a, b) = (digest('a'), digest('b'));
        let events = [
            PullEvent::LayerStarted {
                digest: b.clone(),
                size: 10,
            },
            PullEvent::LayerCached {
                digest: a.clone(),
                size: 5,
            },
            PullEvent::LayerProgress {
                digest: b.clone(),
                downloaded: 4,
                size: 10,
            },
        ];
        let got: Vec<_> = events.iter().filter_map(|e| counter.event(e)).collect();
        let layer =
            |index, digest: &kiln_image::Digest, downloaded, size| ProvisionEvent::PullingLayer {
                index,
                count: 2,
                digest: digest.to_string(),
                downloaded,
                size,
            };
        assert_eq!(
            got,
            vec![layer(1, &b, 0, 10), layer(2, &a, 5, 5), layer(1, &b, 4, 10)]
        );
    }

    #[test]
    fn unknown_and_bad_ids_have_their_kinds() {
        let root = tempfile::tempdir().unwrap();
        let kind = |result: Result<(), Error>| result.unwrap_err().kind();
        assert_eq!(
            kind(get(root.path(), "nope").map(drop)),
            ErrorKind::NotFound
        );
        assert_eq!(
            kind(get(root.path(), "a/b").map(drop)),
            ErrorKind::InvalidInput
        );
        assert_eq!(kind(remove(root.path(), "nope", true)), ErrorKind::NotFound);
        assert_eq!(
            kind(stop(root.path(), "..", Duration::ZERO).map(drop)),
            ErrorKind::InvalidInput
        );
        assert!(list(root.path()).unwrap().is_empty());
    }
}
