//! The `kiln` command line: parses arguments, calls the library crates, prints.
//!
//! Logic lives in the crates under `crates/`; this binary only turns flags into
//! calls and results into text (or JSON with `--json`) and exit codes.

mod attach;
mod build;
mod check;
mod doctor;
mod exit;
mod globals;
mod identity;
mod images;
mod inspect;
mod kill;
mod kube;
mod pull;
mod restart;
mod run;
mod sandbox;
mod serve;
mod wait;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::exit::CommandError;
use crate::globals::{GlobalArgs, Globals};

/// Turn an OCI container image into a microVM sandbox.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build (or reuse) the EROFS root image and sandbox identity layer of an image.
    Build(build::BuildArgs),
    /// Report whether an image can run as a sandbox, and what to fix (exit 1 if not).
    Check(check::CheckArgs),
    /// Check that this host can run sandboxes, and say how to fix what is missing.
    Doctor(doctor::DoctorArgs),
    /// Sandbox identity: which uid/gid a sandbox runs as, and why.
    Identity(identity::IdentityArgs),
    /// Kubernetes: render the sandbox pod, check it, build the supervisor image.
    Kube(kube::KubeArgs),
    /// Get an image into the local content store (registry, oci:, oci-archive:, docker-archive:).
    Pull(pull::PullArgs),
    /// List the images in the content store.
    Images(images::ImagesArgs),
    /// Show a sandbox (by id or name) as JSON, or a pulled image: manifest digest, platform, run config, layers.
    Inspect(inspect::InspectArgs),
    /// Run an image's command in a new microVM sandbox.
    Run(run::RunArgs),
    /// Remove an image from the content store (its blobs go with `kiln prune`).
    Rmi(images::RmiArgs),
    /// Remove blobs no image refers to and report the bytes freed.
    Prune(images::PruneArgs),
    /// Serve the driver API (gRPC: create, start, stop, delete, get, list, watch, exec) on a unix socket.
    Serve(serve::ServeArgs),
    /// Create a sandbox (pull, build, writable disk) without starting it; prints its id.
    Create(sandbox::CreateArgs),
    /// Start a created or stopped sandbox in the background.
    Start(sandbox::StartArgs),
    /// Stop a running sandbox: SIGTERM, then SIGKILL after the grace period.
    Stop(sandbox::StopArgs),
    /// Remove sandboxes and everything they hold.
    Rm(sandbox::RmArgs),
    /// List sandboxes.
    Ps(sandbox::PsArgs),
    /// Print a sandbox's workload output.
    Logs(sandbox::LogsArgs),
    /// Run a command in a running sandbox.
    Exec(sandbox::ExecArgs),
    /// Print a running detached sandbox's output from now on until it stops; signals go to its workload.
    Attach(attach::AttachArgs),
    /// Block until sandboxes stop, then print their exit codes.
    Wait(wait::WaitArgs),
    /// Send a signal to the main workload of running sandboxes (default SIGKILL).
    Kill(kill::KillArgs),
    /// Stop sandboxes (if running) and start them again, keeping their writable disk.
    Restart(restart::RestartArgs),
    /// A sandbox's monitor process (started by `kiln start`).
    #[command(hide = true)]
    Monitor(sandbox::MonitorArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return exit::parse_failure(&err),
    };
    let globals = match Globals::from_args(cli.global) {
        Ok(globals) => globals,
        Err(err) => return exit::report(&CommandError::usage(err)),
    };
    globals.init_logging();

    let result: exit::CommandResult = match cli.command {
        Command::Build(args) => build::run(&globals, args),
        Command::Check(args) => check::run(&globals, args),
        Command::Doctor(args) => doctor::run(&globals, args),
        Command::Identity(args) => identity::run(&globals, args),
        Command::Kube(args) => kube::run(&globals, args),
        Command::Pull(args) => pull::run(&globals, args),
        Command::Images(args) => images::images(&globals, args),
        Command::Inspect(args) => inspect::run(&globals, args),
        Command::Run(args) => run::run(&globals, args),
        Command::Rmi(args) => images::rmi(&globals, args),
        Command::Prune(args) => images::prune(&globals, args),
        Command::Serve(args) => serve::run(&globals, args),
        Command::Create(args) => sandbox::create(&globals, args),
        Command::Start(args) => sandbox::start(&globals, args),
        Command::Stop(args) => sandbox::stop(&globals, args),
        Command::Rm(args) => sandbox::rm(&globals, args),
        Command::Ps(args) => sandbox::ps(&globals, args),
        Command::Logs(args) => sandbox::logs(&globals, args),
        Command::Exec(args) => sandbox::exec(&globals, args),
        Command::Attach(args) => attach::run(&globals, args),
        Command::Wait(args) => wait::run(&globals, args),
        Command::Kill(args) => kill::run(&globals, args),
        Command::Restart(args) => restart::run(&globals, args),
        Command::Monitor(args) => sandbox::monitor(&globals, args),
    };
    match result {
        Ok(code) => code,
        Err(err) => exit::report(&err),
    }
}
