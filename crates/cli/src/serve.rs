//! `kiln serve --socket PATH`: the driver API (kiln-server) on a unix socket, until
//! SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use kiln_server::socket::SocketError;
use kiln_server::{ServeError, ServerConfig};
use kiln_vm::accel::AccelRequest;

use crate::exit::{CommandError, CommandResult};
use crate::globals::Globals;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Unix socket to listen on; created owner-only, in a directory only you (or root)
    /// can write to. A stale socket there is replaced; anything else is refused.
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,

    /// Accelerator for sandboxes created through the API: auto, kvm or tcg.
    #[arg(long, value_name = "auto|kvm|tcg", default_value = "auto")]
    accel: String,

    /// QEMU binary.
    #[arg(long, env = "KILN_QEMU", default_value = kiln_vm::qemu::DEFAULT_BINARY, hide = true)]
    qemu: PathBuf,
}

pub fn run(globals: &Globals, args: ServeArgs) -> CommandResult {
    let accel: AccelRequest = args
        .accel
        .parse()
        .map_err(anyhow::Error::msg)
        .context("--accel")
        .map_err(CommandError::usage)?;
    let monitor_exe = std::env::current_exe().context("finding the kiln executable")?;
    let config = ServerConfig {
        root: globals.root.clone(),
        socket: args.socket,
        monitor_exe,
        accel,
        qemu: args.qemu,
        rootfs_cache_max: globals.rootfs_cache_max,
    };
    let quiet = globals.quiet;
    kiln_server::run(config, |socket| {
        if !quiet {
            eprintln!("kiln: serving the driver API on {}", socket.display());
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
