//! The VM as a host process: tied to kiln's lifetime, waited on with deadlines.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use crate::jail::Cgroup;
use crate::{GuestEnd, VmError};

/// How often a deadline wait polls the child. VM lifetimes are seconds, so 10 ms of
/// latency is noise, and polling avoids a reaper thread per VM.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// How long after the VMM's exit its last report may still be on the way: the VMM sends
/// it before exiting, so this is only the reporting thread's wake-up.
const REPORT_WAIT: Duration = Duration::from_secs(2);

/// A running VMM process. Dropping it kills the process (by pid, never by name).
#[derive(Debug)]
pub struct VmProcess {
    child: Child,
    exited: Option<ExitStatus>,
    /// The VMM's report of the guest's end, until it is read into `guest_end`.
    end_report: Option<Receiver<GuestEnd>>,
    guest_end: Option<GuestEnd>,
    /// The VMM's cgroup, removed once the process is gone.
    cgroup: Option<Cgroup>,
}

impl VmProcess {
    /// Spawns `command` so that the kernel kills it with SIGKILL when this process dies,
    /// even by SIGKILL: no VM outlives the kiln that started it. Linux sends the signal
    /// when the *thread* that forked exits, so spawn from a thread that outlives the VM.
    ///
    /// The VMM gets a process group of its own: a terminal's ^C (SIGINT to the foreground
    /// group) or `timeout` (which signals its whole group) reaches kiln only, which passes
    /// signals on to the workload instead of losing the VM under it.
    pub(crate) fn spawn(mut command: Command) -> std::io::Result<Self> {
        let parent = std::process::id();
        command.process_group(0);
        // SAFETY: the closure runs in the forked child before exec and only calls
        // async-signal-safe functions (prctl, getppid, _exit).
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl; then nobody would
                // ever signal us.
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = command.spawn()?;
        Ok(Self {
            child,
            exited: None,
            end_report: None,
            guest_end: None,
            cgroup: None,
        })
    }

    /// Removes `cgroup` once this process has ended.
    pub(crate) fn own_cgroup(&mut self, cgroup: Option<Cgroup>) {
        self.cgroup = cgroup;
    }

    /// Takes the guest's end from `report` (see [`VmProcess::guest_end`]).
    pub(crate) fn report_guest_end(&mut self, report: Receiver<GuestEnd>) {
        self.end_report = Some(report);
    }

    /// How the guest ended, as the VMM reported it (never from what the guest printed):
    /// `None` while the process runs, when it ended for another reason (killed, its own
    /// failure, a signal) or when its backend reports nothing.
    pub fn guest_end(&mut self) -> Option<GuestEnd> {
        self.exited?;
        if let Some(report) = self.end_report.take() {
            self.guest_end = report.recv_timeout(REPORT_WAIT).ok();
        }
        self.guest_end
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if the process has ended.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, VmError> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().map_err(|source| VmError::Wait {
                pid: self.pid(),
                source,
            })?;
        }
        Ok(self.exited)
    }

    /// Waits until the process ends or `deadline` passes; `None` means still running.
    pub fn wait_until(&mut self, deadline: Instant) -> Result<Option<ExitStatus>, VmError> {
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL_INTERVAL.min(deadline - now));
        }
    }

    /// Sends `signal` to the VMM process, if it is still running.
    pub fn signal(&mut self, signal: libc::c_int) -> Result<(), VmError> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        // The child is not reaped yet (try_wait said so), so its pid cannot have been reused.
        // SAFETY: plain syscall on a pid we own.
        if unsafe { libc::kill(self.pid() as libc::pid_t, signal) } != 0 {
            let source = std::io::Error::last_os_error();
            if source.raw_os_error() != Some(libc::ESRCH) {
                return Err(VmError::Wait {
                    pid: self.pid(),
                    source,
                });
            }
        }
        Ok(())
    }

    /// Kills the process and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus, VmError> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        self.signal(libc::SIGKILL)?;
        let status = self.child.wait().map_err(|source| VmError::Wait {
            pid: self.pid(),
            source,
        })?;
        self.exited = Some(status);
        Ok(status)
    }

    /// Asks the VMM to stop with SIGTERM, then kills it if it has not ended after `grace`.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus, VmError> {
        self.signal(libc::SIGTERM)?;
        match self.wait_until(Instant::now() + grace)? {
            Some(status) => Ok(status),
            None => self.kill(),
        }
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        match self.kill() {
            Ok(_) => {
                if let Some(cgroup) = self.cgroup.take() {
                    cgroup.remove();
                }
            }
            Err(err) => tracing::warn!("killing VM process {}: {err}", self.pid()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn wait_until_reports_exit_and_timeout() {
        let mut quick = VmProcess::spawn(Command::new("true")).unwrap();
        let status = quick
            .wait_until(Instant::now() + Duration::from_secs(10))
            .unwrap();
        assert!(status.unwrap().success());

        let mut slow = VmProcess::spawn(sleeper()).unwrap();
        assert!(slow
            .wait_until(Instant::now() + Duration::from_millis(50))
            .unwrap()
            .is_none());
        let status = slow.terminate(Duration::from_secs(5)).unwrap();
        assert_eq!(status.signal(), Some(libc::SIGTERM));
    }

    #[test]
    fn the_vmm_has_a_process_group_of_its_own() {
        let vm = VmProcess::spawn(sleeper()).unwrap();
        let pid = vm.pid() as libc::pid_t;
        // SAFETY: getpgid reads a process attribute; no memory is involved.
        let (group, ours) = unsafe { (libc::getpgid(pid), libc::getpgid(0)) };
        assert_eq!(group, pid, "the VMM leads its own process group");
        assert_ne!(
            group, ours,
            "a terminal's SIGINT to kiln's group must miss the VMM"
        );
    }

    fn sleeper() -> Command {
        let mut command = Command::new("sleep");
        command.arg("30");
        command
    }

    /// True while `pid` is a live (not zombie) child of this process.
    fn is_live_child(pid: u32) -> bool {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            return false;
        };
        status.contains(&format!("\nPPid:\t{}\n", std::process::id()))
            && !status.contains("\nState:\tZ")
    }

    #[test]
    fn drop_kills_the_process() {
        let vm = VmProcess::spawn(sleeper()).unwrap();
        let pid = vm.pid();
        assert!(is_live_child(pid));
        drop(vm);
        assert!(!is_live_child(pid));
    }

    /// Role of the re-executed test binary in `child_dies_with_its_parent`.
    const ROLE_ENV: &str = "KILN_VM_TEST_PARENT_ROLE";

    #[test]
    fn parent_role_spawns_and_vanishes() {
        if std::env::var_os(ROLE_ENV).is_none() {
            return; // Only meaningful when run by child_dies_with_its_parent.
        }
        let vm = VmProcess::spawn(sleeper()).unwrap();
        println!("vm-pid={}", vm.pid());
        // Exit without running destructors, as a SIGKILLed kiln would.
        std::process::exit(0);
    }

    #[test]
    fn child_dies_with_its_parent() {
        let output = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "process::tests::parent_role_spawns_and_vanishes",
                "--nocapture",
            ])
            .env(ROLE_ENV, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let pid: i32 = stdout
            .lines()
            .find_map(|line| line.strip_prefix("vm-pid="))
            .unwrap_or_else(|| panic!("helper printed no pid: {stdout}"))
            .trim()
            .parse()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        // The orphan is reparented to init (or a subreaper) and must be gone soon.
        while Instant::now() < deadline {
            // SAFETY: signal 0 only checks existence.
            let alive = unsafe { libc::kill(pid, 0) } == 0
                && !std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .map(|s| s.contains("\nState:\tZ"))
                    .unwrap_or(true);
            if !alive {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: clean up the leaked process before failing.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        panic!("VM process {pid} outlived its parent");
    }
}
