//! `kiln port ID [GUESTPORT[/tcp]]`: a sandbox's port forwards, as `docker port`.

use std::process::ExitCode;

use clap::Args;
use kiln_sandbox::NetworkRecord;

use crate::exit::{sandbox_error, CommandError, CommandResult};
use crate::globals::Globals;

#[derive(Debug, Args)]
pub struct PortArgs {
    /// Sandbox id, unique id prefix or name.
    id: String,

    /// Only the host address of this guest port (as 80 or 80/tcp).
    #[arg(value_name = "GUESTPORT[/tcp]")]
    port: Option<String>,
}

pub fn run(globals: &Globals, args: PortArgs) -> CommandResult {
    let info = kiln_sandbox::get(&globals.root, &args.id).map_err(sandbox_error)?;
    let forwards = match &info.network {
        NetworkRecord::None => Vec::new(),
        NetworkRecord::User { forwards, .. } => forwards.clone(),
    };
    let Some(wanted) = &args.port else {
        for (host, guest) in &forwards {
            println!("{guest}/tcp -> 127.0.0.1:{host}");
        }
        return Ok(ExitCode::SUCCESS);
    };
    let guest: u16 = wanted
        .strip_suffix("/tcp")
        .unwrap_or(wanted)
        .parse()
        .ok()
        .filter(|&port| port != 0)
        .ok_or_else(|| {
            CommandError::usage(anyhow::anyhow!(
                "invalid port {wanted:?}: expected a guest port from 1 to 65535, optionally followed by /tcp"
            ))
        })?;
    let hosts: Vec<u16> = forwards
        .iter()
        .filter(|(_, g)| *g == guest)
        .map(|(host, _)| *host)
        .collect();
    if hosts.is_empty() {
        return Err(CommandError::failure(anyhow::anyhow!(
            "no port {guest}/tcp of sandbox {} is published (see `kiln port {}`)",
            info.id,
            info.id
        )));
    }
    for host in hosts {
        println!("127.0.0.1:{host}");
    }
    Ok(ExitCode::SUCCESS)
}
