//! kiln-sandbox runs sandboxes: it takes a run request, gets the image (kiln-image),
//! builds or reuses its root and identity images (kiln-rootfs), boots the microVM
//! (kiln-vm), drives the workload over the host-guest protocol (kiln-protocol) and
//! returns the workload's result. It also owns a sandbox's state directory and the
//! detached lifecycle: create, start (under a monitor process that owns the VM), stop,
//! exec, remove.
//!
//! The user-facing parsing rules of `kiln run` (environment assignments, env files, port
//! forwards, sandbox names) live here too, so that every front end — the CLI and the
//! driver API — accepts exactly the same input.

pub mod client;
pub mod launch;
pub mod lifecycle;
pub mod monitor;
pub mod options;
pub mod prepare;
pub mod run;
pub mod spec;
pub mod state;
