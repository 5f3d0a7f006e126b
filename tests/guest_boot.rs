//! The guest kernel (scripts/build-kernel) and kiln-init's initramfs
//! (scripts/build-initramfs) boot under QEMU TCG, and init speaks the kiln protocol on the
//! virtio-serial channel: a boot that cannot mount its root reports a typed boot error
//! naming that step; a busybox EROFS root runs a workload as a numeric uid with its
//! streams and exit code carried over the channel, on a terminal, and under a host signal;
//! an identity layer, an ext4 upper that persists across boots and eth0 work; exec
//! sessions run side by side with their own streams, terminal and results, a busy session
//! id is refused, and the host's shutdown ends everything (SIGTERM, then SIGKILL after the
//! grace period) with the exec results before the main one, as does the main workload's
//! own end; a shutdown before the run spec powers off without a workload; a `kiln.vol=`
//! without its share is a `mount_volume` boot error; and each time the VM powers itself
//! off. The `kiln.*` arguments are written out literally: they are the documented wire
//! form of the boot configuration (docs/protocol.md) that the guest must accept.

use std::io::ErrorKind;
use std::net::Ipv4Addr;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kiln_e2e::{guest_files, run_with_timeout};
use kiln_protocol::{
    read_frame, write_frame, BootError, BootPhase, BootStep, Frame, Hello, Identity, Message,
    RunAs, RunSpec, SessionId, ShutdownRequest, SignalRequest, Stream, TerminalSize, WallClock,
    WorkloadResult, CHANNEL_PORT, CONTROL_SESSION, IDENTITY_DISK_ID, MAIN_SESSION, ROOT_DISK_ID,
    UPPER_DISK_ID,
};
use kiln_vm::qemu::Qemu;
use kiln_vm::{Accel, Backend, Channel, Disk, Network, Share, VmSpec};

/// A failing boot takes about 5 s under TCG; the rest is slack for a loaded machine.
const BOOT_DEADLINE: Duration = Duration::from_secs(120);

/// The host's TSC rate in kHz, measured against the monotonic clock. Under TCG the guest's
/// TSC is the host's; on a busy host the guest kernel cannot calibrate it against the PIT
/// and hangs, so it is told the rate (`tsc_early_khz=`) and to trust it (`tsc=reliable`).
fn host_tsc_khz() -> u64 {
    // SAFETY: RDTSC has no preconditions on x86_64.
    let rdtsc = || unsafe { std::arch::x86_64::_rdtsc() };
    let (start, tsc_start) = (Instant::now(), rdtsc());
    thread::sleep(Duration::from_millis(50));
    let (elapsed, ticks) = (start.elapsed(), rdtsc() - tsc_start);
    (ticks as u128 * 1_000_000 / elapsed.as_micros()) as u64 / 1000
}

/// Waits for QEMU to connect to the channel socket.
fn accept_until(listener: &UnixListener, deadline: Instant) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).unwrap();
                return stream;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("QEMU did not connect to the channel socket: {e}"),
        }
    }
}

/// What a boot left behind: every frame the guest sent and the serial console.
struct Boot {
    frames: Vec<Frame>,
    console: String,
}

impl Boot {
    fn control(&self) -> Vec<&Message> {
        self.frames
            .iter()
            .filter(|f| f.session == CONTROL_SESSION)
            .map(|f| &f.message)
            .collect()
    }

    fn phases(&self) -> Vec<BootPhase> {
        self.control()
            .into_iter()
            .filter_map(|m| match m {
                Message::Phase(p) => Some(p.phase),
                _ => None,
            })
            .collect()
    }

    fn boot_errors(&self) -> Vec<&BootError> {
        self.control()
            .into_iter()
            .filter_map(|m| match m {
                Message::BootError(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    /// The bytes of one stream of the main session, and whether its end came.
    fn stream(&self, stream: Stream) -> (String, bool) {
        session_stream(&self.frames, MAIN_SESSION, stream)
    }
}

/// The bytes of one stream of `session` in `frames`, and whether its end came.
fn session_stream(frames: &[Frame], session: SessionId, stream: Stream) -> (String, bool) {
    let mut bytes = Vec::new();
    let mut ended = false;
    for frame in frames.iter().filter(|f| f.session == session) {
        match &frame.message {
            Message::Data {
                stream: s,
                bytes: b,
            } if *s == stream => bytes.extend_from_slice(b),
            Message::Eof { stream: s } if *s == stream => ended = true,
            _ => {}
        }
    }
    (String::from_utf8_lossy(&bytes).into_owned(), ended)
}

/// The results of `session` in `frames`, with their positions among all frames.
fn session_results(frames: &[Frame], session: SessionId) -> Vec<(usize, &WorkloadResult)> {
    frames
        .iter()
        .enumerate()
        .filter_map(|(i, f)| match &f.message {
            Message::Result(r) if f.session == session => Some((i, r)),
            _ => None,
        })
        .collect()
}

/// A guest being talked to: frames go to it at will, and a reader thread collects every
/// frame it sends until QEMU closes the channel.
struct Conversation {
    stream: UnixStream,
    received: Arc<Mutex<Vec<Frame>>>,
    reader: thread::JoinHandle<Result<(), String>>,
    vm: kiln_vm::VmProcess,
    console_log: PathBuf,
    deadline: Instant,
    _dir: tempfile::TempDir,
}

impl Conversation {
    /// Boots the guest with `cmdline` (besides the TSC arguments), `disks`, `shares` and
    /// `network`, and waits for QEMU to connect to the channel.
    fn start(cmdline: &[&str], disks: Vec<Disk>, shares: Vec<Share>, network: Network) -> Self {
        let files = guest_files();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("channel.sock");
        let console_log = dir.path().join("console.log");
        let listener = UnixListener::bind(&socket).unwrap();
        let mut args = vec![
            format!("tsc_early_khz={}", host_tsc_khz()),
            "tsc=reliable".into(),
        ];
        args.extend(cmdline.iter().map(|a| a.to_string()));
        let spec = VmSpec {
            kernel: files.kernel.clone(),
            initramfs: files.initramfs.clone(),
            cmdline: args,
            disks,
            shares,
            cpus: 1,
            cpu_millis: 1000,
            memory_mib: 256,
            network,
            channel: Channel {
                socket: socket.clone(),
                port_name: CHANNEL_PORT.into(),
            },
            console_log: console_log.clone(),
            accel: Accel::Tcg,
        };
        let deadline = Instant::now() + BOOT_DEADLINE;
        // VmProcess kills QEMU when dropped, so a failed assertion leaves nothing behind.
        let vm = Qemu::default().start(&spec).expect("starting QEMU");
        let stream = accept_until(&listener, deadline);
        let received = Arc::new(Mutex::new(Vec::new()));
        let (mut reading, sink) = (stream.try_clone().unwrap(), Arc::clone(&received));
        let mut answering = stream.try_clone().unwrap();
        let reader = thread::spawn(move || loop {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            reading.set_read_timeout(Some(left)).unwrap();
            match read_frame(&mut reading) {
                Ok(Some(frame)) => {
                    // As kiln does: the guest powers off once the host has its result.
                    if frame.session == MAIN_SESSION && matches!(frame.message, Message::Result(_))
                    {
                        let answer = Message::Shutdown(ShutdownRequest { grace_ms: 0 });
                        let _ = write_frame(&mut answering, &Frame::new(CONTROL_SESSION, answer));
                    }
                    sink.lock().unwrap().push(frame)
                }
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("reading the channel: {e}")),
            }
        });
        Conversation {
            stream,
            received,
            reader,
            vm,
            console_log,
            deadline,
            _dir: dir,
        }
    }

    /// Sends `frame`; a host Hello is followed by the host's wall clock, as kiln sends it
    /// (kiln-init sets its clock from it before it mounts anything).
    fn send(&mut self, frame: Frame) {
        let hello = matches!(frame.message, Message::Hello(_));
        write_frame(&mut self.stream, &frame).expect("writing to the guest");
        if hello {
            let clock = Frame::new(CONTROL_SESSION, Message::Clock(WallClock::now()));
            write_frame(&mut self.stream, &clock).expect("writing to the guest");
        }
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.console_log).unwrap_or_default()
    }

    /// Waits until the frames received so far satisfy `done`; panics at the deadline.
    fn wait_for(&self, what: &str, done: impl Fn(&[Frame]) -> bool) {
        while !done(&self.received.lock().unwrap()) {
            assert!(
                Instant::now() < self.deadline && !self.reader.is_finished(),
                "no {what} from the guest: {:?}\nconsole:\n{}",
                self.received.lock().unwrap(),
                self.console()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Collects what comes back until QEMU exits by itself; panics if it does not within
    /// the deadline (QEMU is killed then).
    fn finish(mut self) -> Boot {
        let read = self.reader.join().expect("reader thread");
        let status = self.vm.wait_until(self.deadline).expect("waiting for QEMU");
        let console = std::fs::read_to_string(&self.console_log).unwrap_or_default();
        let frames = std::mem::take(&mut *self.received.lock().unwrap());
        read.unwrap_or_else(|e| panic!("{e} after {frames:?}"));
        assert!(
            status.is_some(),
            "QEMU (pid {}) did not exit by itself within {BOOT_DEADLINE:?}; console:\n{console}",
            self.vm.pid()
        );
        Boot { frames, console }
    }
}

/// Boots the guest with `cmdline` (besides the TSC arguments), `disks` and `network`, sends
/// `to_guest` once QEMU connects to the channel, and collects what comes back until QEMU
/// exits by itself.
fn boot(cmdline: &[&str], disks: Vec<Disk>, network: Network, to_guest: &[Frame]) -> Boot {
    let mut guest = Conversation::start(cmdline, disks, Vec::new(), network);
    for frame in to_guest {
        guest.send(frame.clone());
    }
    guest.finish()
}

#[test]
fn init_reports_a_missing_root_disk_as_a_typed_boot_error() {
    // The root is named but no disk is attached. init mounts only after the host's hello
    // and clock.
    let boot = boot(
        &["kiln.root=root", "kiln.upper=tmpfs"],
        Vec::new(),
        Network::None,
        &[Frame::new(
            CONTROL_SESSION,
            Message::Hello(Hello::ours("guest_boot test")),
        )],
    );
    let (frames, control) = (&boot.frames, boot.control());
    assert!(
        matches!(control.first(), Some(Message::Hello(h)) if h.software.starts_with("kiln-init")),
        "{frames:?}"
    );
    assert!(
        matches!(control.get(1), Some(Message::Phase(p)) if p.phase == BootPhase::InitStarted && p.boottime_ns > 0),
        "{frames:?}"
    );
    let errors = boot.boot_errors();
    assert_eq!(
        errors.len(),
        1,
        "exactly one boot error expected: {frames:?}\nconsole:\n{}",
        boot.console
    );
    assert_eq!(errors[0].step, BootStep::MountRoot, "{frames:?}");
    assert!(
        errors[0].message.contains("\"root\""),
        "the error names the missing disk: {:?}",
        errors[0]
    );
    assert_eq!(
        boot.phases(),
        [BootPhase::InitStarted, BootPhase::Shutdown],
        "{frames:?}"
    );
    assert!(
        boot.console.contains("boot failed at step MountRoot"),
        "console:\n{}",
        boot.console
    );
}

/// The tests that make root images of Debian's static busybox start with this.
fn require_busybox() {
    assert!(
        Path::new("/bin/busybox").is_file(),
        "this test needs /bin/busybox (Debian's busybox-static; scripts/install-deps installs it)"
    );
}

/// Packs `tree` into the EROFS image `image` with mkfs.erofs.
fn mkfs_erofs(tree: &Path, image: &Path) -> PathBuf {
    let output = run_with_timeout(
        Command::new("mkfs.erofs").arg(image).arg(tree),
        Duration::from_secs(120),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        output.status.success(),
        "mkfs.erofs: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    image.to_path_buf()
}

/// A root image holding static busybox, its account files and /sandbox, made by
/// mkfs.erofs.
fn busybox_root(dir: &Path) -> PathBuf {
    let tree = dir.join("tree");
    for sub in ["bin", "etc", "sandbox", "proc", "sys", "dev", "tmp", "run"] {
        std::fs::create_dir_all(tree.join(sub)).unwrap();
    }
    std::fs::copy("/bin/busybox", tree.join("bin/busybox")).expect("busybox-static is installed");
    for applet in [
        "sh", "id", "echo", "cat", "stat", "hostname", "ifconfig", "route", "tty", "sleep", "stty",
    ] {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).unwrap();
    }
    std::fs::write(tree.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(tree.join("etc/group"), "root:x:0:\n").unwrap();
    mkfs_erofs(&tree, &dir.join("root.erofs"))
}

/// The host's side of a run: hello, the spec, and stdin closed at once.
fn run_frames(script: &str, identity: Identity) -> Vec<Frame> {
    let spec = RunSpec {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: Vec::new(),
        cwd: None,
        identity,
        tty: false,
        terminal: None,
        task: None,
        openshell: None,
    };
    vec![
        Frame::new(
            CONTROL_SESSION,
            Message::Hello(Hello::ours("guest_boot test")),
        ),
        Frame::new(MAIN_SESSION, Message::Run(spec)),
        Frame::new(
            MAIN_SESSION,
            Message::Eof {
                stream: Stream::Stdin,
            },
        ),
    ]
}

/// The main session's results.
fn results(boot: &Boot) -> Vec<&WorkloadResult> {
    boot.frames
        .iter()
        .filter_map(|f| match &f.message {
            Message::Result(r) if f.session == MAIN_SESSION => Some(r),
            _ => None,
        })
        .collect()
}

#[test]
fn a_busybox_root_runs_the_workload_as_a_numeric_uid() {
    require_busybox();
    let dir = tempfile::tempdir().unwrap();
    let root = busybox_root(dir.path());
    let script = "id -u; id -g; id -G; stat -c %u:%g /sandbox; pwd; cat; echo oops >&2; exit 3";
    let mut to_guest = run_frames(
        script,
        Identity {
            run_as: RunAs::Uid,
            uid: 10001,
            gid: 10001,
        },
    );
    let stdin = Message::Data {
        stream: Stream::Stdin,
        bytes: b"from the host\n".to_vec(),
    };
    to_guest.insert(2, Frame::new(MAIN_SESSION, stdin));
    let disk = Disk {
        id: ROOT_DISK_ID.into(),
        path: root,
        read_only: true,
    };
    let boot = boot(
        &["kiln.root=root", "kiln.upper=tmpfs"],
        vec![disk],
        Network::None,
        &to_guest,
    );
    let frames = &boot.frames;
    assert!(
        boot.boot_errors().is_empty(),
        "{frames:?}\nconsole:\n{}",
        boot.console
    );
    assert_eq!(
        boot.stream(Stream::Stdout),
        (
            "10001\n10001\n10001\n10001:10001\n/sandbox\nfrom the host\n".to_string(),
            true
        ),
        "{frames:?}\nconsole:\n{}",
        boot.console
    );
    assert_eq!(boot.stream(Stream::Stderr), ("oops\n".to_string(), true));
    assert_eq!(
        results(&boot),
        [&WorkloadResult::Exited { code: 3 }],
        "{frames:?}"
    );
    assert_eq!(
        boot.phases(),
        [
            BootPhase::InitStarted,
            BootPhase::SupervisorStarted,
            BootPhase::WorkloadStarted,
            BootPhase::WorkloadEnded,
            BootPhase::Shutdown
        ],
        "{frames:?}"
    );
}

/// An identity layer (EROFS) naming the `sandbox` user and owning /sandbox to it.
fn identity_layer(dir: &Path) -> PathBuf {
    let tree = dir.join("ident");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::create_dir_all(tree.join("sandbox")).unwrap();
    std::fs::write(
        tree.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nsandbox:x:10001:10001:sandbox:/sandbox:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(tree.join("etc/group"), "root:x:0:\nsandbox:x:10001:\n").unwrap();
    std::os::unix::fs::chown(tree.join("sandbox"), Some(10001), Some(10001)).unwrap();
    mkfs_erofs(&tree, &dir.join("ident.erofs"))
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn identity_layer_network_and_a_persistent_upper() {
    kiln_e2e::require_root();
    require_busybox();
    let dir = tempfile::tempdir().unwrap();
    let root = busybox_root(dir.path());
    let ident = identity_layer(dir.path());
    let upper = dir.path().join("upper.ext4");
    kiln_vm::disk::create_upper_disk(&upper, 64).expect("making the ext4 upper");
    let disks = || {
        vec![
            Disk {
                id: ROOT_DISK_ID.into(),
                path: root.clone(),
                read_only: true,
            },
            Disk {
                id: IDENTITY_DISK_ID.into(),
                path: ident.clone(),
                read_only: true,
            },
            Disk {
                id: UPPER_DISK_ID.into(),
                path: upper.clone(),
                read_only: false,
            },
        ]
    };
    let cmdline = [
        "kiln.root=root",
        "kiln.ident=ident",
        "kiln.upper=upper",
        "kiln.hostname=box-1",
        "kiln.net=10.0.2.15/24,10.0.2.2,10.0.2.3",
    ];
    let sandbox = Identity {
        run_as: RunAs::Sandbox,
        uid: 10001,
        gid: 10001,
    };
    // kiln's network endpoint behind the NIC (this test only looks at the guest's side).
    let socket = dir.path().join("net.sock");
    let endpoint = || {
        let gateway = Ipv4Addr::new(10, 0, 2, 2);
        let dns = Ipv4Addr::new(10, 0, 2, 3);
        let config = kiln_netstack::EndpointConfig {
            addresses: kiln_netstack::Addresses {
                guest: Ipv4Addr::new(10, 0, 2, 15),
                prefix_len: 24,
                gateway,
                dns,
            },
            forwards: Vec::new(),
            egress: Arc::new(kiln_netstack::DefaultEgress::new(
                gateway,
                Vec::new(),
                Vec::new(),
            )),
            log: Arc::new(
                kiln_netstack::JsonLinesLog::open(&dir.path().join("network.log"), 1 << 20, None)
                    .expect("opening the network log"),
            ),
            sandbox: "box-1".into(),
        };
        kiln_netstack::Endpoint::start(&socket, config).expect("starting the network endpoint")
    };
    let network = || Network::Stream {
        socket: socket.clone(),
    };

    let script =
        "hostname; cat /etc/resolv.conf; ifconfig eth0; route -n; echo kept > /sandbox/note; id -u";
    let first_endpoint = endpoint();
    let first = boot(&cmdline, disks(), network(), &run_frames(script, sandbox));
    drop(first_endpoint);
    let frames = &first.frames;
    assert_eq!(
        results(&first),
        [&WorkloadResult::Exited { code: 0 }],
        "{frames:?}\nconsole:\n{}",
        first.console
    );
    let (out, _) = first.stream(Stream::Stdout);
    assert!(out.starts_with("box-1\nnameserver 10.0.2.3\n"), "{out}");
    assert!(
        out.contains("inet addr:10.0.2.15") && out.contains("Mask:255.255.255.0"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("0.0.0.0") && l.contains("10.0.2.2") && l.contains("UG")),
        "default route via the gateway: {out}"
    );
    assert!(out.ends_with("10001\n"), "{out}");

    // The same upper disk, booted again: what the workload wrote is still there.
    let _second_endpoint = endpoint();
    let second = boot(
        &cmdline,
        disks(),
        network(),
        &run_frames("cat /sandbox/note; stat -c %u /sandbox/note", sandbox),
    );
    assert_eq!(
        results(&second),
        [&WorkloadResult::Exited { code: 0 }],
        "{:?}",
        second.frames
    );
    assert_eq!(second.stream(Stream::Stdout).0, "kept\n10001\n");
}

#[test]
fn a_terminal_workload_and_a_signal_from_the_host() {
    require_busybox();
    let dir = tempfile::tempdir().unwrap();
    let root = busybox_root(dir.path());
    let disk = || {
        vec![Disk {
            id: ROOT_DISK_ID.into(),
            path: root.clone(),
            read_only: true,
        }]
    };
    let uid = Identity {
        run_as: RunAs::Uid,
        uid: 10001,
        gid: 10001,
    };

    // A terminal of the requested size on devpts; output arrives as stdout only.
    let mut to_guest = run_frames("tty; stty size", uid);
    if let Message::Run(spec) = &mut to_guest[1].message {
        spec.tty = true;
        spec.terminal = Some(TerminalSize {
            rows: 33,
            cols: 101,
        });
    }
    let tty = boot(&["kiln.root=root"], disk(), Network::None, &to_guest);
    assert_eq!(
        results(&tty),
        [&WorkloadResult::Exited { code: 0 }],
        "{:?}\n{}",
        tty.frames,
        tty.console
    );
    let (out, ended) = tty.stream(Stream::Stdout);
    assert!(
        out.starts_with("/dev/pts/") && out.contains("33 101"),
        "{out:?}"
    );
    assert!(ended);

    // The host's SIGTERM reaches the workload (started and exec'd before init reads it).
    let mut to_guest = run_frames("exec sleep 600", uid);
    to_guest.push(Frame::new(
        MAIN_SESSION,
        Message::Signal(SignalRequest { signal: 15 }),
    ));
    let signalled = boot(&["kiln.root=root"], disk(), Network::None, &to_guest);
    assert_eq!(
        results(&signalled),
        [&WorkloadResult::Killed { signal: 15 }],
        "{:?}",
        signalled.frames
    );
}

/// The run spec of `sh -c script` as uid 10001.
fn shell_spec(script: &str) -> RunSpec {
    RunSpec {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
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
    }
}

/// Boots a busybox root and starts `main` as the main workload, its stdin closed unless
/// `keep_stdin`.
fn start_main(dir: &Path, main: &str, keep_stdin: bool) -> Conversation {
    let disk = Disk {
        id: ROOT_DISK_ID.into(),
        path: busybox_root(dir),
        read_only: true,
    };
    let mut guest = Conversation::start(&["kiln.root=root"], vec![disk], Vec::new(), Network::None);
    guest.send(Frame::new(
        CONTROL_SESSION,
        Message::Hello(Hello::ours("guest_boot test")),
    ));
    guest.send(Frame::new(MAIN_SESSION, Message::Run(shell_spec(main))));
    if !keep_stdin {
        guest.send(stdin_eof(MAIN_SESSION));
    }
    guest
}

fn stdin_eof(session: SessionId) -> Frame {
    Frame::new(
        session,
        Message::Eof {
            stream: Stream::Stdin,
        },
    )
}

/// Whether `session` printed `text` on stdout.
fn printed(session: SessionId, text: &'static str) -> impl Fn(&[Frame]) -> bool {
    move |frames| {
        session_stream(frames, session, Stream::Stdout)
            .0
            .contains(text)
    }
}

#[test]
fn exec_sessions_run_side_by_side_and_a_shutdown_ends_the_sandbox() {
    require_busybox();
    let dir = tempfile::tempdir().unwrap();
    let mut guest = start_main(dir.path(), "echo main; exec sleep 600", false);
    guest.wait_for("main workload output", printed(MAIN_SESSION, "main"));

    // Four sessions at once, each with its own output, input and exit code.
    for session in 2..=5 {
        let script =
            format!("read line; echo out-$line-{session}; echo err-{session} >&2; exit {session}");
        guest.send(Frame::new(session, Message::Run(shell_spec(&script))));
    }
    for session in (2..=5).rev() {
        let line = Message::Data {
            stream: Stream::Stdin,
            bytes: format!("in{session}\n").into_bytes(),
        };
        guest.send(Frame::new(session, line));
    }
    // A terminal session, and a long one whose id is then asked for again.
    // The terminal session reports its size, waits for a line, and reports it again.
    let mut tty = shell_spec("tty; stty size; read line; stty size");
    tty.tty = true;
    tty.terminal = Some(TerminalSize { rows: 30, cols: 90 });
    guest.send(Frame::new(6, Message::Run(tty)));
    guest.wait_for("the terminal's first size", printed(6, "30 90"));
    guest.send(Frame::new(
        6,
        Message::Resize(TerminalSize {
            rows: 40,
            cols: 120,
        }),
    ));
    let line = Message::Data {
        stream: Stream::Stdin,
        bytes: b"go\n".to_vec(),
    };
    guest.send(Frame::new(6, line));
    guest.send(Frame::new(
        7,
        Message::Run(shell_spec("echo long; exec sleep 600")),
    ));
    let mut missing = shell_spec("");
    missing.argv = vec!["/no/such/command".into()];
    guest.send(Frame::new(8, Message::Run(missing)));
    guest.wait_for("the long session's output", printed(7, "long"));
    guest.send(Frame::new(7, Message::Run(shell_spec("echo second"))));
    guest.wait_for("results of sessions 2-6 and the busy refusal", |frames| {
        (2..=6).all(|s| !session_results(frames, s).is_empty())
            && !session_results(frames, 7).is_empty()
            && !session_results(frames, 8).is_empty()
    });
    guest.send(Frame::new(
        CONTROL_SESSION,
        Message::Shutdown(ShutdownRequest { grace_ms: 10_000 }),
    ));
    let boot = guest.finish();
    let frames = &boot.frames;

    for session in 2..=5u32 {
        let results: Vec<_> = session_results(frames, session)
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        assert_eq!(
            results,
            [&WorkloadResult::Exited {
                code: session as i32
            }],
            "session {session}: {frames:?}"
        );
        assert_eq!(
            session_stream(frames, session, Stream::Stdout),
            (format!("out-in{session}-{session}\n"), true),
            "session {session}"
        );
        assert_eq!(
            session_stream(frames, session, Stream::Stderr),
            (format!("err-{session}\n"), true)
        );
    }
    assert!(
        matches!(
            session_results(frames, 6)[..],
            [(_, WorkloadResult::Exited { code: 0 })]
        ),
        "{frames:?}"
    );
    let (out, ended) = session_stream(frames, 6, Stream::Stdout);
    assert!(
        out.starts_with("/dev/pts/") && out.contains("30 90") && out.contains("40 120") && ended,
        "{out:?}"
    );

    assert!(
        matches!(
            session_results(frames, 8)[..],
            [(
                _,
                WorkloadResult::StartFailed {
                    reason: kiln_protocol::StartFailure::NotFound,
                    ..
                }
            )]
        ),
        "{frames:?}"
    );

    // Session 7: refused while busy, then ended by the shutdown's SIGTERM, before the
    // main workload's result.
    let long = session_results(frames, 7);
    assert!(
        matches!(
            long[..],
            [
                (
                    _,
                    WorkloadResult::StartFailed {
                        reason: kiln_protocol::StartFailure::Other,
                        ..
                    }
                ),
                (_, WorkloadResult::Killed { signal: 15 })
            ]
        ),
        "{long:?}"
    );
    assert!(!session_stream(frames, 7, Stream::Stdout)
        .0
        .contains("second"));
    let main = session_results(frames, MAIN_SESSION);
    assert!(
        matches!(main[..], [(_, WorkloadResult::Killed { signal: 15 })]),
        "{main:?}"
    );
    assert!(
        long[1].0 < main[0].0,
        "exec results come before the main result: {frames:?}"
    );
    assert_eq!(
        boot.phases().last(),
        Some(&BootPhase::Shutdown),
        "{frames:?}"
    );

    assert!(boot.boot_errors().is_empty(), "{frames:?}");
}

#[test]
fn a_shutdown_kills_what_ignores_sigterm_after_the_grace_period() {
    require_busybox();
    let dir = tempfile::tempdir().unwrap();
    let stubborn = "trap '' TERM; echo ready; while :; do sleep 1; done";
    let mut guest = start_main(dir.path(), stubborn, false);
    guest.send(Frame::new(2, Message::Run(shell_spec(stubborn))));
    guest.wait_for("both workloads ready", |frames| {
        printed(MAIN_SESSION, "ready")(frames) && printed(2, "ready")(frames)
    });
    guest.send(Frame::new(
        CONTROL_SESSION,
        Message::Shutdown(ShutdownRequest { grace_ms: 2_000 }),
    ));
    let boot = guest.finish();
    let frames = &boot.frames;
    let exec = session_results(frames, 2);
    let main = session_results(frames, MAIN_SESSION);
    assert!(
        matches!(exec[..], [(_, WorkloadResult::Killed { signal: 9 })]),
        "{frames:?}"
    );
    assert!(
        matches!(main[..], [(_, WorkloadResult::Killed { signal: 9 })]),
        "{frames:?}"
    );
    assert!(exec[0].0 < main[0].0, "{frames:?}");
    assert_eq!(
        boot.phases().last(),
        Some(&BootPhase::Shutdown),
        "{frames:?}"
    );
}

#[test]
fn the_main_workload_ending_kills_exec_sessions_first() {
    require_busybox();
    let dir = tempfile::tempdir().unwrap();
    // The main workload ends when its stdin does.
    let mut guest = start_main(dir.path(), "cat; exit 4", true);
    guest.send(Frame::new(
        2,
        Message::Run(shell_spec("echo long; exec sleep 600")),
    ));
    guest.wait_for("the exec session's output", printed(2, "long"));
    guest.send(stdin_eof(MAIN_SESSION));
    let boot = guest.finish();
    let frames = &boot.frames;
    let exec = session_results(frames, 2);
    let main = session_results(frames, MAIN_SESSION);
    assert!(
        matches!(exec[..], [(_, WorkloadResult::Killed { signal: 9 })]),
        "{frames:?}"
    );
    assert!(
        matches!(main[..], [(_, WorkloadResult::Exited { code: 4 })]),
        "{frames:?}"
    );
    assert!(exec[0].0 < main[0].0, "{frames:?}");
}

#[test]
fn a_shutdown_before_the_run_spec_powers_off_and_a_missing_share_is_a_volume_boot_error() {
    require_busybox();
    let dir = tempfile::tempdir().unwrap();
    let root = busybox_root(dir.path());
    let disk = || {
        vec![Disk {
            id: ROOT_DISK_ID.into(),
            path: root.clone(),
            read_only: true,
        }]
    };
    let hello = Frame::new(
        CONTROL_SESSION,
        Message::Hello(Hello::ours("guest_boot test")),
    );
    let shutdown = Frame::new(
        CONTROL_SESSION,
        Message::Shutdown(ShutdownRequest { grace_ms: 1_000 }),
    );
    let stopped = boot(
        &["kiln.root=root"],
        disk(),
        Network::None,
        &[hello.clone(), shutdown],
    );
    assert!(stopped.boot_errors().is_empty(), "{:?}", stopped.frames);
    assert!(
        results(&stopped).is_empty(),
        "no workload ran: {:?}",
        stopped.frames
    );
    assert_eq!(
        stopped.phases(),
        [BootPhase::InitStarted, BootPhase::Shutdown],
        "{:?}",
        stopped.frames
    );

    // kiln.vol names a share QEMU does not have.
    let missing = boot(
        &["kiln.root=root", "kiln.vol=vol0,/data"],
        disk(),
        Network::None,
        &[hello],
    );
    let errors = missing.boot_errors();
    assert!(
        matches!(errors[..], [e] if e.step == BootStep::MountVolume
            && e.message.contains("\"vol0\"") && e.message.contains("/data")),
        "{:?}\nconsole:\n{}",
        missing.frames,
        missing.console
    );
}
