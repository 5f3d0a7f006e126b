//! A stand-in for OpenShell's supervisor (`openshell-sandbox`), for kiln's end-to-end
//! tests only: it is NOT OpenShell's supervisor and enforces nothing. kiln places it in
//! the guest where the real one goes; it reports what it was given (its ids, argv and
//! environment, the token file, the TLS files, the sandbox user of /etc/passwd) to the
//! test's gRPC server by dialling OPENSHELL_ENDPOINT, then runs the command of
//! OPENSHELL_MAIN_PROCESS_SPEC as the sandbox user in its `--workdir` and exits with the
//! command's status, as the real supervisor ends with its workload.
//!
//! It is no TLS client: for an `https` endpoint it dials the same host and port over
//! plain http (the test's server speaks plain http), so a test can give kiln TLS material
//! (which kiln takes only with an https gateway) and check the files placed in the guest.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitCode};
use std::time::Duration;

use kiln_openshell_standin::standin_report_client::StandinReportClient;
use kiln_openshell_standin::{FileReport, SupervisorReport};

/// The longest file this reads (the token, /etc/passwd).
const MAX_FILE: u64 = 1 << 20;

/// How long it keeps trying to reach the test's server.
const DIAL_ATTEMPTS: u32 = 20;

fn read_bounded(path: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_FILE)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// The uid and gid of the `sandbox` line of /etc/passwd, read as text (no NSS).
fn sandbox_ids() -> (u32, u32) {
    let passwd = read_bounded("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.len() >= 4 && fields[0] == "sandbox")
        .and_then(|fields| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
        .unwrap_or((0, 0))
}

/// The file `path`: mode bits, owner and content, or why it could not be read.
fn file_report(path: &str) -> FileReport {
    let mut report = FileReport {
        path: path.to_owned(),
        ..Default::default()
    };
    match std::fs::symlink_metadata(path).and_then(|meta| Ok((meta, read_bounded(path)?))) {
        Ok((meta, content)) => {
            report.mode = meta.mode() & 0o7777;
            report.uid = meta.uid();
            report.gid = meta.gid();
            report.content = content;
        }
        Err(e) => report.error = format!("{path}: {e}"),
    }
    report
}

fn report() -> SupervisorReport {
    let environment: HashMap<String, String> = std::env::vars().collect();
    let (passwd_uid, passwd_gid) = sandbox_ids();
    // SAFETY: getuid and getgid cannot fail and touch no memory of ours.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut report = SupervisorReport {
        uid,
        gid,
        argv: std::env::args().collect(),
        passwd_uid,
        passwd_gid,
        ..Default::default()
    };
    match environment.get("OPENSHELL_SANDBOX_TOKEN_FILE") {
        None => report.token_error = "OPENSHELL_SANDBOX_TOKEN_FILE is not set".into(),
        Some(path) => {
            match std::fs::symlink_metadata(path).and_then(|meta| Ok((meta, read_bounded(path)?))) {
                Ok((meta, token)) => {
                    report.token_mode = meta.mode() & 0o7777;
                    report.token_uid = meta.uid();
                    report.token_gid = meta.gid();
                    report.token = token;
                }
                Err(e) => report.token_error = format!("{path}: {e}"),
            }
        }
    }
    report.tls_files = [
        "OPENSHELL_TLS_CA",
        "OPENSHELL_TLS_CERT",
        "OPENSHELL_TLS_KEY",
    ]
    .iter()
    .filter_map(|name| environment.get(*name))
    .map(|path| file_report(path))
    .collect();
    report.environment = environment;
    report
}

async fn send(endpoint: String, report: SupervisorReport) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..DIAL_ATTEMPTS {
        match StandinReportClient::connect(endpoint.clone()).await {
            Ok(mut client) => {
                return client
                    .report(report)
                    .await
                    .map(drop)
                    .map_err(|e| format!("reporting: {e}"))
            }
            Err(e) => last = format!("dialling {endpoint}: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(last)
}

/// The command of OPENSHELL_MAIN_PROCESS_SPEC (`{"version":1,"command":[...]}`).
fn main_command() -> Result<Vec<String>, String> {
    let text = std::env::var("OPENSHELL_MAIN_PROCESS_SPEC")
        .map_err(|e| format!("OPENSHELL_MAIN_PROCESS_SPEC: {e}"))?;
    let spec: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("OPENSHELL_MAIN_PROCESS_SPEC: {e}"))?;
    let command: Vec<String> = spec["command"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if command.is_empty() {
        return Err(format!(
            "OPENSHELL_MAIN_PROCESS_SPEC has no command: {text}"
        ));
    }
    Ok(command)
}

/// The value after `--workdir` in argv.
fn workdir() -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let at = args.iter().position(|a| a == "--workdir")?;
    args.get(at + 1).cloned()
}

fn run() -> Result<ExitCode, String> {
    let endpoint =
        std::env::var("OPENSHELL_ENDPOINT").map_err(|e| format!("OPENSHELL_ENDPOINT: {e}"))?;
    // No TLS client here (see the crate's doc): the same host and port, plain http.
    let endpoint = match endpoint.strip_prefix("https://") {
        Some(rest) => format!("http://{rest}"),
        None => endpoint,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting a runtime: {e}"))?;
    runtime.block_on(send(endpoint, report()))?;

    let command = main_command()?;
    let uid: u32 = std::env::var("OPENSHELL_SANDBOX_UID")
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or("OPENSHELL_SANDBOX_UID is not a number")?;
    let gid: u32 = std::env::var("OPENSHELL_SANDBOX_GID")
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or("OPENSHELL_SANDBOX_GID is not a number")?;
    let user_env: HashMap<String, String> = std::env::var("OPENSHELL_USER_ENVIRONMENT")
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    let dir = workdir().unwrap_or_else(|| "/".into());
    let status = Command::new(&command[0])
        .args(&command[1..])
        .env_clear()
        .envs(user_env)
        .env("HOME", &dir)
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .current_dir(&dir)
        .gid(gid)
        .uid(uid)
        .status()
        .map_err(|e| format!("running {command:?}: {e}"))?;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    Ok(ExitCode::from(code as u8))
}

fn main() -> ExitCode {
    run().unwrap_or_else(|message| {
        eprintln!("openshell-sandbox-standin: {message}");
        ExitCode::from(70)
    })
}
