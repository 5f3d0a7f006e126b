//! `kiln top`, `kiln stats` and `kiln cp`: what a running sandbox's guest reports or
//! copies (kiln-sandbox's tasks), printed as docker prints it.

use std::io::Write;
use std::process::ExitCode;

use clap::Args;
use kiln_sandbox::{CopyEndpoint, SandboxStats};

use crate::exit::{sandbox_error, CommandResult};
use crate::globals::Globals;

#[derive(Debug, Args)]
pub struct TopArgs {
    /// Sandbox id or name.
    id: String,
}

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Print the figures once, instead of every second.
    #[arg(long)]
    no_stream: bool,

    /// Sandbox ids or names [default: every running sandbox].
    ids: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CpArgs {
    /// What to copy: SANDBOX:/PATH or a host path.
    source: String,

    /// Where to: a host path or SANDBOX:/PATH (an existing directory receives the source
    /// under its own name).
    dest: String,
}

/// CPU time as `[H:]MM:SS`.
fn cpu_time(ms: u64) -> String {
    let seconds = ms / 1000;
    let (hours, minutes, seconds) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
    if hours > 0 {
        format!("{hours}:{minutes:02}:{seconds:02}")
    } else {
        format!("{minutes:02}:{seconds:02}")
    }
}

pub fn top(globals: &Globals, args: TopArgs) -> CommandResult {
    let processes = kiln_sandbox::top(&globals.root, &args.id).map_err(sandbox_error)?;
    if globals.json {
        println!("{}", serde_json::to_string_pretty(&processes)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<8} {:>7} {:>7} {:<4} {:>9} {:>8} CMD",
        "UID", "PID", "PPID", "STAT", "RSS(KiB)", "TIME"
    );
    for p in &processes {
        println!(
            "{:<8} {:>7} {:>7} {:<4} {:>9} {:>8} {}",
            p.uid,
            p.pid,
            p.ppid,
            p.state,
            p.rss_kib,
            cpu_time(p.cpu_ms),
            p.command.escape_debug()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Bytes with docker's units: binary for memory, decimal for traffic.
fn size(bytes: u64, binary: bool) -> String {
    let (base, units): (f64, [&str; 5]) = if binary {
        (1024.0, ["B", "KiB", "MiB", "GiB", "TiB"])
    } else {
        (1000.0, ["B", "kB", "MB", "GB", "TB"])
    };
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= base && unit < units.len() - 1 {
        value /= base;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.1}{}", units[unit])
    }
}

fn print_stats(globals: &Globals, rows: &[SandboxStats]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    if globals.json {
        writeln!(out, "{}", serde_json::to_string(rows)?)?;
        return out.flush();
    }
    writeln!(
        out,
        "{:<14} {:<20} {:>7} {:>21} {:>7} {:>19} {:>5}",
        "ID", "NAME", "CPU %", "MEM USAGE / LIMIT", "MEM %", "NET I/O", "PIDS"
    )?;
    for row in rows {
        let memory_percent = if row.memory_limit_bytes == 0 {
            0.0
        } else {
            row.memory_used_bytes as f64 / row.memory_limit_bytes as f64 * 100.0
        };
        writeln!(
            out,
            "{:<14} {:<20} {:>6.2}% {:>21} {:>6.2}% {:>19} {:>5}",
            row.id,
            row.name.as_deref().unwrap_or("-"),
            row.cpu_percent,
            format!(
                "{} / {}",
                size(row.memory_used_bytes, true),
                size(row.memory_limit_bytes, true)
            ),
            memory_percent,
            format!(
                "{} / {}",
                size(row.net_rx_bytes, false),
                size(row.net_tx_bytes, false)
            ),
            row.processes
        )?;
    }
    out.flush()
}

pub fn stats(globals: &Globals, args: StatsArgs) -> CommandResult {
    let mut printed = Ok(());
    kiln_sandbox::stats(&globals.root, &args.ids, !args.no_stream, &mut |rows| {
        printed = print_stats(globals, rows);
        // A closed stdout (`kiln stats | head`) ends the stream.
        printed.is_ok()
    })
    .map_err(sandbox_error)?;
    printed?;
    Ok(ExitCode::SUCCESS)
}

pub fn cp(globals: &Globals, args: CpArgs) -> CommandResult {
    let source = CopyEndpoint::parse(&args.source).map_err(sandbox_error)?;
    let dest = CopyEndpoint::parse(&args.dest).map_err(sandbox_error)?;
    kiln_sandbox::copy(&globals.root, &source, &dest).map_err(sandbox_error)?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_times_read_as_dockers() {
        assert_eq!(size(512, true), "512B");
        assert_eq!(size(3 << 20, true), "3.0MiB");
        assert_eq!(size(1500, false), "1.5kB");
        assert_eq!(cpu_time(61_000), "01:01");
        assert_eq!(cpu_time(3_661_000), "1:01:01");
    }
}
