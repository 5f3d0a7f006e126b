//! For scripts/bench-net only: one kiln-netstack endpoint on its own, so the benchmark can
//! boot the same guest behind it and behind QEMU's user-mode NAT. It listens on SOCKET,
//! opens the host's loopback PORTs to the guest (as `--network-allow-host
//! host.kiln.internal:PORT` does) and serves until its stdin closes.
//!
//! Usage: bench_endpoint SOCKET PORT... (decisions go to SOCKET's name with `.log`)

use std::io::Read;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use kiln_netstack::{Addresses, DefaultEgress, Endpoint, EndpointConfig, JsonLinesLog};
use kiln_policy::AllowHost;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let socket = PathBuf::from(args.next().ok_or("usage: bench_endpoint SOCKET PORT...")?);
    let allows = args
        .map(|port| format!("host.kiln.internal:{port}").parse::<AllowHost>())
        .collect::<Result<Vec<_>, _>>()?;
    let gateway = Ipv4Addr::new(10, 0, 2, 2);
    let config = EndpointConfig {
        addresses: Addresses {
            guest: Ipv4Addr::new(10, 0, 2, 15),
            prefix_len: 24,
            gateway,
            dns: Ipv4Addr::new(10, 0, 2, 3),
        },
        forwards: Vec::new(),
        egress: Arc::new(DefaultEgress::new(
            gateway,
            allows,
            DefaultEgress::host_addresses()?,
        )),
        // Decisions are logged as a sandbox logs them, beside the socket.
        log: Arc::new(JsonLinesLog::open(
            &socket.with_extension("log"),
            1 << 20,
            None,
        )?),
        sandbox: "bench".into(),
    };
    let endpoint = Endpoint::start(&socket, config)?;
    let mut rest = Vec::new();
    std::io::stdin().read_to_end(&mut rest)?;
    drop(endpoint);
    Ok(())
}
