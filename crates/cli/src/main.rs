//! The `kiln` command line: parses arguments, calls the library crates, prints.
//!
//! Logic lives in the crates under `crates/`; this binary only turns flags into
//! calls and results into text (or JSON with `--json`) and exit codes.

mod attach;
mod build;
mod check;
mod completion;
mod doctor;
mod exit;
mod globals;
mod guest_setup;
mod guest_tasks;
mod identity;
mod images;
mod inspect;
mod kill;
mod kube;
mod listing;
mod logs;
mod network;
mod port;
mod ps;
mod pull;
mod rename;
mod restart;
mod run;
mod sandbox;
mod serve;
mod system;
mod wait;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

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
    /// List the images in the content store, newest first (-q: image ids only).
    Images(images::ImagesArgs),
    /// Show a sandbox (by id or name) as JSON, or a pulled image: manifest digest, platform, run config, layers.
    Inspect(inspect::InspectArgs),
    /// Run an image's command in a new microVM sandbox.
    Run(run::RunArgs),
    /// Remove an image from the content store (its blobs go with `kiln prune`).
    Rmi(images::RmiArgs),
    /// Remove blobs no image refers to and report the bytes freed.
    Prune(images::PruneArgs),
    /// Serve the driver API (gRPC: create, start, stop, delete, get, list, watch, exec), or OpenShell's compute-driver API, on a unix socket.
    Serve(serve::ServeArgs),
    /// Create a sandbox (pull, build, writable disk) without starting it; prints its id.
    Create(sandbox::CreateArgs),
    /// Start a created or stopped sandbox in the background.
    Start(sandbox::StartArgs),
    /// Stop a running sandbox: SIGTERM, then SIGKILL after the grace period.
    Stop(sandbox::StopArgs),
    /// Remove sandboxes and everything they hold.
    Rm(sandbox::RmArgs),
    /// List sandboxes, newest first (-q: ids only).
    Ps(ps::PsArgs),
    /// Show a sandbox's port forwards.
    Port(port::PortArgs),
    /// Give a sandbox another name.
    Rename(rename::RenameArgs),
    /// kiln's own data: `kiln system df` shows its disk use.
    System(system::SystemArgs),
    /// Print a shell completion script (bash, zsh or fish).
    Completion(completion::CompletionArgs),
    /// Print a sandbox's workload output (--network: its network decisions).
    Logs(sandbox::LogsArgs),
    /// Replace or show a sandbox's network policy.
    Policy(network::PolicyArgs),
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
    /// Show the processes of a running sandbox's guest.
    Top(guest_tasks::TopArgs),
    /// Show running sandboxes' CPU, memory and network use, as their VMs see it.
    Stats(guest_tasks::StatsArgs),
    /// Copy files and directories between a running sandbox and the host (modes and mtimes kept).
    Cp(guest_tasks::CpArgs),
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
        Command::Ps(args) => ps::ps(&globals, args),
        Command::Port(args) => port::run(&globals, args),
        Command::Rename(args) => rename::run(&globals, args),
        Command::System(args) => system::run(&globals, args),
        Command::Completion(args) => completion::run(args, Cli::command()),
        Command::Logs(args) => sandbox::logs(&globals, args),
        Command::Policy(args) => network::policy(&globals, args),
        Command::Exec(args) => sandbox::exec(&globals, args),
        Command::Attach(args) => attach::run(&globals, args),
        Command::Wait(args) => wait::run(&globals, args),
        Command::Kill(args) => kill::run(&globals, args),
        Command::Restart(args) => restart::run(&globals, args),
        Command::Top(args) => guest_tasks::top(&globals, args),
        Command::Stats(args) => guest_tasks::stats(&globals, args),
        Command::Cp(args) => guest_tasks::cp(&globals, args),
        Command::Monitor(args) => sandbox::monitor(&globals, args),
    };
    match result {
        Ok(code) => code,
        Err(err) => exit::report(&err),
    }
}
