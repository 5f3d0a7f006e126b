//! The guest's wall clock and the boot's RTC, with real VM boots under TCG: `date +%s` in
//! the guest is the host's time (within 2 s) when the workload starts, after `stop` and
//! `start`, and after the sandbox has run for 30 s; the kernel's own log of a boot holds
//! no RTC probe failure and says the RTC set the clock. Timing stays in
//! `scripts/bench-run`: these tests only compare clocks.

use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_e2e::{demo_image, require_root, KilnRoot};

/// How far the guest's clock may be from the host's.
const TOLERANCE_SECS: f64 = 2.0;

/// The host's wall clock in seconds since the epoch.
fn host_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The number after `key=` on the first line of `text` that has one.
fn reading(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.trim().strip_prefix(key)?.strip_prefix('='))
        .map(|value| {
            value
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("{key}={value:?} is not a number"))
        })
}

/// Asserts that the guest's `date +%s` reading, taken at some moment between the host's
/// readings `before` and `after`, is within the tolerance of the host's clock then.
fn assert_in_step(what: &str, guest: f64, before: f64, after: f64) {
    assert!(
        guest >= before - TOLERANCE_SECS && guest <= after + TOLERANCE_SECS,
        "{what}: the guest's clock read {guest}, the host's read {before:.3} before and \
         {after:.3} after (allowed: {TOLERANCE_SECS} s either side)"
    );
}

/// Polls `kiln logs ID` until a line `KEY=...` appears `count` times; returns the last
/// reading and the host's time when it was seen.
fn wait_for_reading(root: &KilnRoot, id: &str, key: &str, count: usize) -> (f64, f64) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let logs = root.ok(&["logs", id]);
        let seen = host_now();
        let readings: Vec<&str> = logs
            .lines()
            .filter(|line| line.starts_with(&format!("{key}=")))
            .collect();
        if readings.len() >= count {
            let last = readings[count - 1];
            return (reading(last, key).unwrap(), seen);
        }
        assert!(
            Instant::now() < deadline,
            "{key}= never appeared {count} times in the logs of {id}: {logs}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn guest_clock_is_the_hosts_at_start_after_restart_and_after_30_s() {
    require_root();
    let root = KilnRoot::with_guest().quiet().removing_sandboxes_at_end();

    // A foreground run: the workload's first act is to read the clock.
    let before = host_now();
    let out = root.ok(&[
        "run",
        "--rm",
        &demo_image(),
        "sh",
        "-c",
        "echo now=$(date +%s)",
    ]);
    let after = host_now();
    let guest = reading(&out, "now").unwrap_or_else(|| panic!("no reading in {out:?}"));
    assert_in_step("kiln run", guest, before, after);

    // A detached sandbox: each boot's workload reads the clock as it starts.
    let script = "echo boot=$(date +%s); exec sleep 100000";
    let before = host_now();
    let id = root.ok(&[
        "run",
        "-d",
        "--name",
        "clock",
        &demo_image(),
        "sh",
        "-c",
        script,
    ]);
    let id = id.trim();
    let (guest, seen) = wait_for_reading(&root, id, "boot", 1);
    assert_in_step("first boot", guest, before, seen);

    root.ok(&["stop", "-t", "1", id]);
    // Far enough apart that a clock carried over from the first boot would show.
    thread::sleep(Duration::from_secs(5));
    let before = host_now();
    root.ok(&["start", id]);
    let (guest, seen) = wait_for_reading(&root, id, "boot", 2);
    assert_in_step("boot after stop and start", guest, before, seen);

    // The clock keeps the host's pace while the sandbox runs.
    thread::sleep(Duration::from_secs(30));
    let before = host_now();
    let out = root.ok(&["exec", id, "sh", "-c", "echo now=$(date +%s)"]);
    let after = host_now();
    let guest = reading(&out, "now").unwrap_or_else(|| panic!("no reading in {out:?}"));
    assert_in_step("after 30 s of running", guest, before, after);

    root.ok(&["rm", "-f", id]);
}

/// The kernel's log of a sandbox's boot, read inside the guest (its ring buffer keeps every
/// level, unlike the `quiet` console): the CMOS RTC set the clock, and no RTC probe failed
/// or waited.
#[test]
#[ignore = "needs root (scripts/test runs it as root)"]
fn boot_log_has_no_rtc_probe_failure() {
    require_root();
    let root = KilnRoot::with_guest().quiet();
    let log = root.ok(&["run", "--rm", &demo_image(), "dmesg"]);
    assert!(
        log.contains("Linux version"),
        "dmesg did not print the kernel log: {log}"
    );
    for failure in [
        "Unable to read current time from RTC",
        "broken or not accessible",
        "RTC time is not valid",
    ] {
        assert!(
            !log.lines().any(|line| line.contains(failure)),
            "the kernel log holds {failure:?}:\n{log}"
        );
    }
    assert!(
        log.lines()
            .any(|line| line.contains("rtc_cmos") && line.contains("setting system clock")),
        "the CMOS RTC did not set the clock:\n{log}"
    );
}
