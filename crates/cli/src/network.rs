//! `kiln policy set|show` and `kiln logs --network`: a sandbox's network policy and its
//! decisions, printed.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use kiln_policy::{DecisionRecord, Verdict};

use crate::exit::{sandbox_error, CommandError, CommandResult};
use crate::globals::Globals;
use crate::run::read_policy_file;

#[derive(Debug, Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Replace a sandbox's network policy (a running sandbox decides new connections by
    /// it within a second; a file that does not validate is refused and the old one kept).
    Set {
        /// Sandbox id or name.
        id: String,
        /// An OpenShell sandbox policy file.
        file: PathBuf,
    },
    /// Print the network policy in force (or say that the sandbox has none).
    Show {
        /// Sandbox id or name.
        id: String,
    },
}

pub fn policy(globals: &Globals, args: PolicyArgs) -> CommandResult {
    match args.command {
        PolicyCommand::Set { id, file } => {
            let policy = read_policy_file(&file).map_err(CommandError::usage)?;
            let set = kiln_sandbox::set_policy(&globals.root, &id, &policy.file, &policy.text)
                .map_err(sandbox_error)?;
            report_not_enforced(globals, &set.not_enforced);
            if globals.json {
                println!("{}", serde_json::json!({ "digest": set.digest }));
            } else if !globals.quiet {
                println!("{}", set.digest);
            }
        }
        PolicyCommand::Show { id } => {
            match kiln_sandbox::show_policy(&globals.root, &id).map_err(sandbox_error)? {
                Some((text, digest)) if globals.json => {
                    println!(
                        "{}",
                        serde_json::json!({ "digest": digest, "policy": text })
                    );
                }
                Some((text, digest)) => {
                    println!("# {digest}");
                    print!("{text}");
                    if !text.ends_with('\n') {
                        println!();
                    }
                }
                None if globals.json => println!("{}", serde_json::json!({ "policy": null })),
                None => println!(
                    "# no network policy: the default network (the internet open; the host, \
                     link-local and private addresses refused but for --network-allow-host)"
                ),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints each "not enforced by kiln: FIELD (why)" line of a policy once, on stderr.
pub fn report_not_enforced(globals: &Globals, lines: &[String]) {
    if globals.quiet {
        return;
    }
    for line in lines {
        eprintln!("kiln: warning: {line}");
    }
}

/// `kiln logs --network ID`: the sandbox's decisions, as text or (`--json`) as the JSON
/// lines kiln keeps.
pub fn logs(globals: &Globals, id: &str, follow: bool) -> CommandResult {
    let which = if follow {
        kiln_sandbox::NetworkLogs::Follow
    } else {
        kiln_sandbox::NetworkLogs::All
    };
    let mut stdout = std::io::stdout().lock();
    let json = globals.json;
    let mut print = |record: &DecisionRecord| {
        let line = if json {
            record.to_json_line()
        } else {
            describe(record)
        };
        writeln!(stdout, "{line}")?;
        stdout.flush()
    };
    match kiln_sandbox::network_logs(&globals.root, id, which, &mut print) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(err) => Err(sandbox_error(err)),
    }
}

/// One decision as a line of text: time, verdict, protocol, destination, what named it,
/// the request, then what allowed it or why not, and the bytes of an ended flow.
pub fn describe(record: &DecisionRecord) -> String {
    let verdict = match record.decision {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
        Verdict::Audit => "audit",
    };
    let protocol = serde_json::to_value(record.protocol)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let mut line = format!(
        "{} {verdict} {protocol} {}:{}",
        record.time,
        addr(record.dst_addr),
        record.dst_port
    );
    if let Some(kind) = &record.query_type {
        line.push_str(&format!(" {kind} {}", record.names.join(",")));
        if !record.answers.is_empty() {
            let answers: Vec<String> = record.answers.iter().map(|a| a.to_string()).collect();
            line.push_str(&format!(" -> {}", answers.join(",")));
        }
    } else if !record.names.is_empty() {
        line.push_str(&format!(" ({})", record.names.join(",")));
    }
    if let Some(sni) = &record.sni {
        line.push_str(&format!(" sni={sni}"));
    }
    if let Some(host) = &record.host {
        line.push_str(&format!(" host={host}"));
    }
    if let (Some(method), Some(path)) = (&record.method, &record.path) {
        line.push_str(&format!(" {method} {path}"));
    }
    if let Some(entry) = &record.entry {
        line.push_str(&format!(" by {entry}"));
    }
    if let Some(reason) = &record.reason {
        line.push_str(&format!(": {reason}"));
    }
    if let (Some(up), Some(down)) = (record.bytes_up, record.bytes_down) {
        line.push_str(&format!(" [ended: {up} B up, {down} B down]"));
    }
    line
}

fn addr(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_policy::{Decision, DenyReason, FlowProtocol};

    #[test]
    fn a_denial_reads_as_one_line_with_its_reason() {
        let dst = "198.18.5.5:80".parse().unwrap();
        let deny = Decision::Deny(DenyReason::NoEntry {
            dst,
            names: vec!["other.test".into()],
        });
        let mut record =
            DecisionRecord::new("T".into(), "sb", FlowProtocol::Http, dst, &deny).unwrap();
        record.names = vec!["other.test".into()];
        record.host = Some("other.test".into());
        record.method = Some("GET".into());
        record.path = Some("/".into());
        assert_eq!(
            describe(&record),
            "T deny http 198.18.5.5:80 (other.test) host=other.test GET /: 198.18.5.5:80 \
             (known as other.test) matches no policy entry"
        );
    }
}
