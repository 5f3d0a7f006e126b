//! Guest tasks ([`kiln_protocol::GuestTask`]): `kiln top`, `kiln stats` and `kiln cp`,
//! done by kiln-init's own binary in an exec session.
//!
//! The session runs `/proc/self/exe task JSON` through the supervisor like any exec, so a
//! task has the session's identity (the sandbox user, never root), its stdin and stdout,
//! and its end is the session's result: exit 0, or 1 with the reason on stderr. Only init
//! can start one: the workload cannot name init's binary (/proc/1/exe is root's).

use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use kiln_protocol::{GuestStats, GuestTask, ProcessInfo, MAX_COMMAND_LEN};

/// The argument that makes kiln-init a task instead of PID 1.
const TASK_ARG: &str = "task";

/// The argv that runs `task` in an exec session.
pub fn argv(task: &GuestTask) -> Vec<String> {
    vec![
        "/proc/self/exe".into(),
        TASK_ARG.into(),
        serde_json::to_string(task).expect("a task always serializes"),
    ]
}

/// The task this process was started for, if it was started as one.
pub fn from_args() -> Option<Result<GuestTask, String>> {
    let args: Vec<String> = std::env::args().collect();
    match args.as_slice() {
        [_, arg, json] if arg == TASK_ARG => {
            Some(serde_json::from_str(json).map_err(|e| format!("task {json:?}: {e}")))
        }
        _ => None,
    }
}

/// Runs `task` to its end; the process's exit code.
pub fn run(task: Result<GuestTask, String>) -> i32 {
    let result = task.and_then(|task| {
        let stdout = io::stdout().lock();
        match task {
            GuestTask::Processes => processes(stdout),
            GuestTask::Stats {
                samples,
                interval_ms,
            } => stats(stdout, samples, Duration::from_millis(interval_ms.into())),
            GuestTask::ArchiveOut { path } => archive_out(stdout, Path::new(&path)),
            GuestTask::ArchiveIn { path } => archive_in(io::stdin().lock(), Path::new(&path)),
        }
    });
    match result {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("{message}");
            1
        }
    }
}

fn sysconf(name: libc::c_int) -> u64 {
    // SAFETY: sysconf only reads the configuration value named.
    let value = unsafe { libc::sysconf(name) };
    u64::try_from(value).unwrap_or(1).max(1)
}

/// Every numeric entry of /proc: the pids.
fn pids() -> Result<Vec<u32>, String> {
    let entries = fs::read_dir("/proc").map_err(|e| format!("reading /proc: {e}"))?;
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    Ok(pids)
}

/// One process from /proc/PID/{stat,status,cmdline}; `None` when it ended meanwhile.
fn process(pid: u32, ticks_per_second: u64, page_kib: u64) -> Option<ProcessInfo> {
    let dir = PathBuf::from(format!("/proc/{pid}"));
    let stat = fs::read_to_string(dir.join("stat")).ok()?;
    // The name is in parentheses and may hold anything, ')' included: the last one ends it.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?;
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // Fields after the name, from 3 (state) on, so field N is fields[N - 3].
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    let to_ms = |ticks: u64| ticks.saturating_mul(1000) / ticks_per_second;
    let uid = fs::read_to_string(dir.join("status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next()?.parse().ok())?;
    let cmdline = fs::read(dir.join("cmdline")).unwrap_or_default();
    let mut command = if cmdline.is_empty() {
        format!("[{name}]")
    } else {
        String::from_utf8_lossy(&cmdline)
            .trim_end_matches('\0')
            .replace('\0', " ")
    };
    if command.len() > MAX_COMMAND_LEN {
        let mut end = MAX_COMMAND_LEN;
        while !command.is_char_boundary(end) {
            end -= 1;
        }
        command.truncate(end);
    }
    Some(ProcessInfo {
        pid,
        ppid: u32::try_from(field(4)?).ok()?,
        uid,
        state: fields.first()?.to_string(),
        rss_kib: field(24)?.saturating_mul(page_kib),
        cpu_ms: to_ms(field(14)?.saturating_add(field(15)?)),
        started_ms: to_ms(field(22)?),
        command,
    })
}

fn write_line(out: &mut impl Write, value: &impl serde::Serialize) -> Result<(), String> {
    serde_json::to_writer(&mut *out, value)
        .map_err(io::Error::from)
        .and_then(|()| out.write_all(b"\n"))
        .map_err(|e| format!("writing to the host: {e}"))
}

/// Every process but this task itself, one JSON line each.
fn processes(out: impl Write) -> Result<(), String> {
    let mut out = BufWriter::new(out);
    let ticks = sysconf(libc::_SC_CLK_TCK);
    let page_kib = (sysconf(libc::_SC_PAGESIZE) / 1024).max(1);
    let me = std::process::id();
    for pid in pids()?.into_iter().filter(|pid| *pid != me) {
        if let Some(info) = process(pid, ticks, page_kib) {
            write_line(&mut out, &info)?;
        }
    }
    out.flush().map_err(|e| format!("writing to the host: {e}"))
}

fn read(path: &str) -> Result<String, String> {
    fs::read_to_string(path).map_err(|e| format!("reading {path}: {e}"))
}

/// The guest's counters now.
fn sample() -> Result<GuestStats, String> {
    let stat = read("/proc/stat")?;
    let mut cpu = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .ok_or("/proc/stat has no cpu line")?
        .split_whitespace()
        .map(|v| v.parse::<u64>().unwrap_or(0));
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let ticks: Vec<u64> = cpu.by_ref().take(8).collect();
    let total: u64 = ticks.iter().sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    let online_cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();

    let meminfo = read("/proc/meminfo")?;
    let kib = |key: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let (memory_total_bytes, available) = (kib("MemTotal:"), kib("MemAvailable:"));

    let (mut net_rx_bytes, mut net_tx_bytes) = (0u64, 0u64);
    for line in read("/proc/net/dev")?.lines().skip(2) {
        let Some((name, counters)) = line.split_once(':') else {
            continue;
        };
        if name.trim() == "lo" {
            continue;
        }
        let counters: Vec<u64> = counters
            .split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        net_rx_bytes += counters.first().copied().unwrap_or(0);
        net_tx_bytes += counters.get(8).copied().unwrap_or(0);
    }
    Ok(GuestStats {
        cpu_busy_ticks: total.saturating_sub(idle),
        cpu_total_ticks: total,
        online_cpus: u32::try_from(online_cpus).unwrap_or(u32::MAX),
        memory_used_bytes: memory_total_bytes.saturating_sub(available),
        memory_total_bytes,
        net_rx_bytes,
        net_tx_bytes,
        processes: u32::try_from(pids()?.len()).unwrap_or(u32::MAX),
    })
}

fn stats(mut out: impl Write, samples: u32, interval: Duration) -> Result<(), String> {
    for index in 0..samples {
        if index > 0 {
            std::thread::sleep(interval);
        }
        write_line(&mut out, &sample()?)?;
        out.flush()
            .map_err(|e| format!("writing to the host: {e}"))?;
    }
    Ok(())
}

/// The last component of an absolute, normalised `path` (`None` for `/`).
fn name_of(path: &Path) -> Result<&std::ffi::OsStr, String> {
    if !path.is_absolute() || path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!(
            "{}: accepted: an absolute path without '..'",
            path.display()
        ));
    }
    path.file_name()
        .ok_or_else(|| format!("{}: the root cannot be copied whole", path.display()))
}

/// `path` (a file, a directory with everything below it, or a symlink itself) as a tar
/// archive named by its last component; nothing is followed.
fn archive_out(out: impl Write, path: &Path) -> Result<(), String> {
    let name = name_of(path)?;
    let fail = |e: io::Error| format!("{}: {}", path.display(), with_causes(&e));
    let meta = fs::symlink_metadata(path).map_err(fail)?;
    let mut archive = tar::Builder::new(BufWriter::new(out));
    archive.follow_symlinks(false);
    if meta.is_dir() {
        archive.append_dir_all(name, path).map_err(fail)?;
    } else {
        archive.append_path_with_name(path, name).map_err(fail)?;
    }
    archive
        .into_inner()
        .and_then(|mut out| out.flush())
        .map_err(|e| format!("writing to the host: {e}"))
}

/// `error` and the errors it wraps (tar's name the path, their causes say why).
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        text.push_str(&format!(": {next}"));
        cause = next.source();
    }
    text
}

/// Unpacks a tar archive of one top entry from `input`: into the directory `path` when
/// that exists, else as `path` itself (unpacked beside it first and then renamed, so a
/// failed copy leaves nothing at `path`). Modes and mtimes are kept; no entry may land
/// outside the destination (tar's own checks: no `..`, no absolute names, no path
/// through a symlink it unpacked).
fn archive_in(input: impl Read, path: &Path) -> Result<(), String> {
    let name = name_of(path)?;
    let fail = |what: &str, e: io::Error| format!("{what}: {}", with_causes(&e));
    let unpack = |into: &Path| {
        let mut archive = tar::Archive::new(input);
        archive.set_preserve_permissions(true);
        archive.set_preserve_mtime(true);
        archive.set_unpack_xattrs(false);
        archive
            .unpack(into)
            .map_err(|e| fail(&format!("unpacking into {}", into.display()), e))
    };
    if fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        return unpack(path);
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    let staging = parent.join(format!(".kiln-cp-{}", std::process::id()));
    fs::create_dir(&staging).map_err(|e| fail(&format!("creating {}", staging.display()), e))?;
    let result = unpack(&staging).and_then(|()| {
        let entries: Vec<_> = fs::read_dir(&staging)
            .map_err(|e| fail("reading the unpacked copy", e))?
            .filter_map(Result::ok)
            .collect();
        let [entry] = entries.as_slice() else {
            return Err(format!(
                "the archive holds {} top entries; accepted: one",
                entries.len()
            ));
        };
        fs::rename(entry.path(), path)
            .map_err(|e| fail(&format!("renaming the copy to {}", path.display()), e))
    });
    let _ = fs::remove_dir_all(&staging);
    result.map_err(|e| format!("{} ({name:?}): {e}", path.display()))
}
