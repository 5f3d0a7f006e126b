//! `kiln serve --socket PATH [--api kiln|openshell]`: kiln's driver API or OpenShell's
//! compute-driver contract (kiln-server) on a unix socket, until SIGINT or SIGTERM;
//! `--openshell-socket PATH` serves OpenShell's beside kiln's from the same process;
//! `--openshell-supervisor PATH --openshell-endpoint URL` runs OpenShell's supervisor in
//! its sandboxes, with `--openshell-tls-ca/-cert/-key PATH` for an `https` gateway.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use kiln_server::socket::SocketError;
use kiln_server::{
    openshell_env, Api, OpenShellConfig, OpenShellSupervisorConfig, ServeError, ServerConfig,
};
use kiln_vm::accel::AccelRequest;

use crate::exit::{CommandError, CommandResult};
use crate::globals::Globals;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Unix socket to listen on; created owner-only, in a directory only you (or root)
    /// can write to. A stale socket there is replaced; anything else is refused.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,

    /// The API served on --socket: `kiln` (kiln's driver API) or `openshell` (OpenShell's
    /// compute-driver contract, openshell.compute.v1.ComputeDriver).
    #[arg(long, value_name = "kiln|openshell", default_value = "kiln", value_parser = parse_api)]
    api: Api,

    /// Also serve OpenShell's compute-driver contract on this socket (with --api kiln).
    #[arg(long, value_name = "PATH")]
    openshell_socket: Option<PathBuf>,

    /// OpenShell: the image a sandbox boots when its template names none.
    #[arg(
        long,
        value_name = "REF",
        default_value = "",
        hide_default_value = true
    )]
    default_image: String,

    /// OpenShell: uid of the `sandbox` user written into each image (default 10001;
    /// OpenShell's bounds, 1..=4294967294).
    #[arg(long, value_name = "UID", value_parser = parse_sandbox_id)]
    sandbox_uid: Option<u32>,

    /// OpenShell: gid of the `sandbox` user written into each image (default 10001).
    #[arg(long, value_name = "GID", value_parser = parse_sandbox_id)]
    sandbox_gid: Option<u32>,

    /// OpenShell: host path of a static `openshell-sandbox`, started in each sandbox as
    /// its supervisor (needs --openshell-endpoint). Without it, kiln's own supervisor runs
    /// the sandbox's command.
    #[arg(long, value_name = "PATH", requires = "openshell_endpoint")]
    openshell_supervisor: Option<PathBuf>,

    /// OpenShell: the gateway's URL as this host reaches it (e.g. http://127.0.0.1:8080);
    /// a loopback URL is rewritten to the guest's view of the host, and that port of the
    /// host opened to the sandbox.
    #[arg(long, value_name = "URL", requires = "openshell_supervisor")]
    openshell_endpoint: Option<String>,

    /// OpenShell: the gateway's CA certificate (PEM), placed in each sandbox for the
    /// supervisor; required with an https:// endpoint, refused with an http:// one.
    #[arg(
        long,
        value_name = "PATH",
        requires_all = ["openshell_supervisor", "openshell_tls_cert", "openshell_tls_key"]
    )]
    openshell_tls_ca: Option<PathBuf>,

    /// OpenShell: the supervisor's client certificate (PEM) for the gateway.
    #[arg(
        long,
        value_name = "PATH",
        requires_all = ["openshell_supervisor", "openshell_tls_ca", "openshell_tls_key"]
    )]
    openshell_tls_cert: Option<PathBuf>,

    /// OpenShell: the supervisor's client key (PEM) for the gateway; kept owner-only in
    /// each sandbox's state and readable only by root in the guest.
    #[arg(
        long,
        value_name = "PATH",
        requires_all = ["openshell_supervisor", "openshell_tls_ca", "openshell_tls_cert"]
    )]
    openshell_tls_key: Option<PathBuf>,

    /// Accelerator for sandboxes created through the API: auto, kvm or tcg.
    #[arg(long, value_name = "auto|kvm|tcg", default_value = "auto")]
    accel: String,

    /// QEMU binary.
    #[arg(long, env = "KILN_QEMU", default_value = kiln_vm::qemu::DEFAULT_BINARY, hide = true)]
    qemu: PathBuf,
}

/// The OpenShell driver's ids follow OpenShell's rules (1..=4294967294), checked at launch
/// rather than at every create.
fn parse_sandbox_id(text: &str) -> Result<u32, String> {
    kiln_identity::parse_sandbox_id(text, kiln_identity::IdBounds::OPENSHELL)
        .map_err(|e| e.to_string())
}

fn parse_api(text: &str) -> Result<Api, String> {
    match text {
        "kiln" => Ok(Api::Kiln),
        "openshell" => Ok(Api::OpenShell),
        _ => Err(format!("unknown API {text:?}; accepted: kiln, openshell")),
    }
}

pub fn run(globals: &Globals, args: ServeArgs) -> CommandResult {
    let mut sockets = vec![(args.api, args.socket)];
    match (args.api, args.openshell_socket) {
        (_, None) => {}
        (Api::Kiln, Some(path)) => sockets.push((Api::OpenShell, path)),
        (Api::OpenShell, Some(_)) => {
            return Err(CommandError::usage(anyhow::anyhow!(
                "--openshell-socket serves OpenShell's API beside kiln's; with --api openshell, \
                 --socket serves it already"
            )))
        }
    }
    let accel: AccelRequest = args
        .accel
        .parse()
        .map_err(anyhow::Error::msg)
        .context("--accel")
        .map_err(CommandError::usage)?;
    let supervisor = match (args.openshell_supervisor, args.openshell_endpoint) {
        (Some(binary), Some(endpoint)) => {
            let binary = openshell_env::check_supervisor_binary(&binary)
                .context("--openshell-supervisor")
                .map_err(CommandError::usage)?;
            openshell_env::check_endpoint(&endpoint)
                .context("--openshell-endpoint")
                .map_err(CommandError::usage)?;
            let tls_paths = match (
                args.openshell_tls_ca,
                args.openshell_tls_cert,
                args.openshell_tls_key,
            ) {
                (Some(ca), Some(cert), Some(key)) => {
                    Some(openshell_env::TlsPaths { ca, cert, key })
                }
                // clap's `requires_all` makes each TLS flag need the other two.
                _ => None,
            };
            let tls = openshell_env::read_tls_material(&endpoint, tls_paths.as_ref())
                .map_err(|e| CommandError::usage(anyhow::Error::new(e)))?;
            Some(OpenShellSupervisorConfig {
                binary,
                endpoint,
                tls,
            })
        }
        // clap's `requires` makes each flag need the other.
        _ => None,
    };
    let monitor_exe = std::env::current_exe().context("finding the kiln executable")?;
    let config = ServerConfig {
        root: globals.root.clone(),
        sockets,
        openshell: OpenShellConfig {
            default_image: args.default_image,
            sandbox_uid: args.sandbox_uid,
            sandbox_gid: args.sandbox_gid,
            supervisor,
        },
        monitor_exe,
        accel,
        qemu: args.qemu,
        rootfs_cache_max: globals.rootfs_cache_max,
    };
    let quiet = globals.quiet;
    kiln_server::run(config, |api, socket| {
        if !quiet {
            let what = match api {
                Api::Kiln => "the driver API",
                Api::OpenShell => "OpenShell's compute-driver API",
            };
            eprintln!("kiln: serving {what} on {}", socket.display());
        }
    })
    .map_err(|err| match err {
        // Another server listening, or the system refusing: not a bad argument.
        ServeError::Socket(SocketError::Io { .. } | SocketError::InUse(_)) => {
            CommandError::failure(err)
        }
        // The path the user gave is unusable: their input to fix.
        ServeError::Socket(_) => CommandError::usage(err),
        other => CommandError::failure(other),
    })?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::ServeArgs;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(extra: &[&str]) -> Result<Cli, clap::Error> {
        let base = ["kiln", "--socket", "s", "--api", "openshell"];
        Cli::try_parse_from(base.iter().chain(extra))
    }

    #[test]
    fn tls_flags_come_all_three_with_the_supervisor_or_not_at_all() {
        let supervisor = [
            "--openshell-supervisor",
            "bin",
            "--openshell-endpoint",
            "https://127.0.0.1:8443",
        ];
        let tls = [
            "--openshell-tls-ca",
            "ca",
            "--openshell-tls-cert",
            "crt",
            "--openshell-tls-key",
            "key",
        ];
        let all = parse(&[&supervisor[..], &tls[..]].concat()).unwrap();
        assert_eq!(all.serve.openshell_tls_key.unwrap().to_str(), Some("key"));
        for partial in [&tls[..2], &tls[..4], &tls[2..]] {
            let err = parse(&[&supervisor[..], partial].concat()).unwrap_err();
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::MissingRequiredArgument,
                "{err}"
            );
            assert!(err.to_string().contains("--openshell-tls-"), "{err}");
        }
        let err = parse(&tls).unwrap_err();
        assert!(err.to_string().contains("--openshell-supervisor"), "{err}");
    }
}
