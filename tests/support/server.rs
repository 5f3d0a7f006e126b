//! A `kiln serve` process for a test's root, and the Rust client connected to it.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use kiln_server::openshell_proto::compute_driver_client::ComputeDriverClient;
use kiln_server::proto::driver_client::DriverClient;
use tonic::transport::Channel;

use crate::KilnRoot;

/// How long `kiln serve` may take to listen, or to end after SIGTERM.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `kiln serve`; dropping it kills it.
pub struct KilnServer {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl KilnServer {
    /// Where the server of `root` listens.
    pub fn socket_of(root: &KilnRoot) -> PathBuf {
        root.temp_dir().join("kiln.sock")
    }

    /// The socket this server listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Starts `kiln -v serve` on `root`'s socket (`kiln.sock` in its temp dir).
    pub fn start(root: &KilnRoot) -> KilnServer {
        KilnServer::start_with(root, root.kiln(), &[])
    }

    /// Starts `kiln -v serve ARGS` on `root`'s socket with `kiln`, a command that runs
    /// kiln of `root` (in a network namespace, say); `args` may choose its API and add a
    /// second socket (waited for too when it is `--openshell-socket PATH`).
    pub fn start_with(root: &KilnRoot, mut kiln: Command, args: &[&std::ffi::OsStr]) -> KilnServer {
        let socket = KilnServer::socket_of(root);
        let log = socket.with_extension(format!("log.{}", unique()));
        let second = args
            .iter()
            .position(|arg| *arg == "--openshell-socket")
            .and_then(|at| args.get(at + 1))
            .map(PathBuf::from);
        let mut child = kiln
            .args(["-v", "serve", "--socket"])
            .arg(&socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .process_group(0)
            .spawn()
            .expect("starting kiln serve");
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "kiln serve exited ({status}): {}",
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let listens = |path: &Path| std::os::unix::net::UnixStream::connect(path).is_ok();
            if listens(&socket) && second.as_deref().is_none_or(listens) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "kiln serve did not listen within {LISTEN_TIMEOUT:?}"
            );
            thread::sleep(Duration::from_millis(50));
        }
        KilnServer { child, socket, log }
    }

    /// A client of OpenShell's contract on `socket` (this server's, or its second one).
    pub async fn openshell_client(socket: &Path) -> ComputeDriverClient<Channel> {
        let channel = kiln_server::client::channel(socket)
            .await
            .expect("connecting to kiln serve");
        ComputeDriverClient::new(channel)
    }

    pub async fn client(&self) -> DriverClient<Channel> {
        kiln_server::client::connect(&self.socket)
            .await
            .expect("connecting to kiln serve")
    }

    /// SIGTERMs the server and waits for it to end.
    pub fn terminate(&mut self) -> ExitStatus {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill has no memory-safety preconditions; the child is not reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "kiln serve ignored SIGTERM");
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs the server (its sandboxes' monitors live on in their own sessions).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for KilnServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}
