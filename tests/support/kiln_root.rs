//! One test's kiln: a fresh temporary `--root`, the `kiln` command pointed at it (and at
//! the test guest files), and the check that nothing kiln started for it outlives the test.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::{describe, guest_files, kiln_bin, run_with_timeout, text};

/// How long one kiln command may take: a boot takes 3-15 s under TCG, a pull of the debian
/// fixture longer, and a stop without the guest's help waits out its deadline; the rest is
/// slack for a loaded two-core machine.
pub const KILN_TIMEOUT: Duration = Duration::from_secs(300);

/// How long processes kiln started may take to end after the test is done with them.
const LEFTOVER_GRACE: Duration = Duration::from_secs(5);

/// A temporary directory holding a kiln root (`root/`), an empty HOME (`home/`) and
/// whatever else the test puts there (sockets, volumes). Every command from [`Self::kiln`]
/// uses that root and HOME, and none of the host's registry credentials.
///
/// On drop it gives the processes whose command line names the root (the QEMU and monitor
/// processes kiln started) a few seconds to end, SIGKILLs the rest so later tests are
/// unaffected, and, unless the test already failed, asserts that there were none.
pub struct KilnRoot {
    dir: TempDir,
    with_guest: bool,
    quiet: bool,
    remove_sandboxes_at_end: bool,
}

impl KilnRoot {
    /// A root for commands that boot sandboxes: kiln gets the test guest kernel and
    /// initramfs (built on first use, see [`guest_files`]).
    pub fn with_guest() -> KilnRoot {
        let mut root = KilnRoot::without_guest();
        root.with_guest = true;
        root
    }

    /// A root for commands that never boot (pull, images, inspect, build ...), so the
    /// guest files are not built for them.
    pub fn without_guest() -> KilnRoot {
        let dir = tempfile::Builder::new()
            .prefix("kiln-e2e.")
            .tempdir()
            .expect("creating the test's temp dir");
        fs::create_dir(dir.path().join("root")).expect("creating the kiln root");
        fs::create_dir(dir.path().join("home")).expect("creating the test HOME");
        KilnRoot {
            dir,
            with_guest: false,
            quiet: false,
            remove_sandboxes_at_end: false,
        }
    }

    /// Every command runs as `kiln -q ...`.
    pub fn quiet(mut self) -> KilnRoot {
        self.quiet = true;
        self
    }

    /// When the test ends, `kiln rm -f` every sandbox still there before the leftover
    /// check: for tests that leave sandboxes running on purpose.
    pub fn removing_sandboxes_at_end(mut self) -> KilnRoot {
        self.remove_sandboxes_at_end = true;
        self
    }

    /// The kiln root.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// HOME of every kiln command (empty unless the test writes to it).
    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// The temporary directory holding the root and HOME, for the test's other files.
    pub fn temp_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The `kiln` command with this root, HOME and (for [`Self::with_guest`]) the guest files.
    /// The root goes in the environment, not on the command line, so that the processes
    /// naming it are only those kiln started.
    pub fn kiln(&self) -> Command {
        let mut command = Command::new(kiln_bin());
        command
            .env("KILN_ROOT", self.path())
            .env("HOME", self.home())
            .env_remove("DOCKER_CONFIG")
            .env_remove("REGISTRY_AUTH_FILE")
            .env_remove("XDG_RUNTIME_DIR");
        if self.with_guest {
            let guest = guest_files();
            command
                .env("KILN_KERNEL", &guest.kernel)
                .env("KILN_INITRAMFS", &guest.initramfs);
        }
        if self.quiet {
            command.arg("-q");
        }
        command
    }

    /// `kiln ARGS`, run to its end within [`KILN_TIMEOUT`].
    pub fn run(&self, args: &[&str]) -> Output {
        run_with_timeout(self.kiln().args(args), KILN_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `kiln ARGS`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "kiln {args:?}: {}",
            describe(&output)
        );
        text(&output.stdout)
    }

    /// `kiln ARGS`, which must exit with `code`; its stderr.
    pub fn fails(&self, args: &[&str], code: i32) -> String {
        let output = self.run(args);
        assert_eq!(
            output.status.code(),
            Some(code),
            "kiln {args:?}: {}",
            describe(&output)
        );
        text(&output.stderr)
    }

    /// The state directories of the sandboxes under this root.
    pub fn sandbox_dirs(&self) -> Vec<PathBuf> {
        match fs::read_dir(self.path().join("sandboxes")) {
            Ok(dir) => dir
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.file_name().is_some_and(|n| n != ".names"))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Live processes whose command line names the root (kiln's monitors and QEMU), with
    /// their command lines.
    pub fn processes(&self) -> Vec<(u32, String)> {
        let root = self.path().as_os_str().as_bytes().to_vec();
        let mut found = Vec::new();
        for entry in fs::read_dir("/proc").expect("/proc").flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            if cmdline.windows(root.len()).any(|w| w == root.as_slice()) {
                found.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
            }
        }
        found
    }

    /// Waits up to `limit` for the processes naming the root to end; returns those left.
    pub fn leftovers_after(&self, limit: Duration) -> Vec<(u32, String)> {
        let deadline = Instant::now() + limit;
        loop {
            let left = self.processes();
            if left.is_empty() || Instant::now() >= deadline {
                return left;
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The pid of the monitor of sandbox `id` (`kiln monitor --root ROOT ID`).
    pub fn monitor_pid(&self, id: &str) -> u32 {
        let found: Vec<u32> = self
            .processes()
            .into_iter()
            .filter(|(_, cmd)| cmd.contains(" monitor ") && cmd.trim_end().ends_with(id))
            .map(|(pid, _)| pid)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "one monitor for {id}: {:?}",
            self.processes()
        );
        found[0]
    }

    /// Gives the processes naming the root a few seconds to end, SIGKILLs the rest and,
    /// unless the test already failed, asserts that there were none.
    pub fn assert_nothing_left(&self) {
        let left = self.leftovers_after(LEFTOVER_GRACE);
        for (pid, _) in &left {
            // SAFETY: kill has no memory-safety preconditions; the pid was just listed.
            unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
        }
        if !thread::panicking() {
            assert!(left.is_empty(), "processes left behind: {left:?}");
        }
    }

    /// `kiln rm -f` of every sandbox `kiln ps -a` lists (errors ignored: this is cleanup).
    fn remove_sandboxes(&self) {
        let Ok(output) = self.kiln().args(["ps", "-a", "--json"]).output() else {
            return;
        };
        let listed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
        for sandbox in listed.as_array().into_iter().flatten() {
            if let Some(id) = sandbox["id"].as_str() {
                let _ = self.kiln().args(["rm", "-f", id]).output();
            }
        }
    }
}

impl Drop for KilnRoot {
    fn drop(&mut self) {
        if self.remove_sandboxes_at_end {
            self.remove_sandboxes();
        }
        self.assert_nothing_left();
    }
}
