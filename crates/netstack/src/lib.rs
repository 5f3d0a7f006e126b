//! kiln's per-sandbox network endpoint: the guest's only way out.
//!
//! QEMU's `-netdev stream` carries the guest's virtio-net NIC over a unix socket that this
//! crate listens on (kiln-vm connects it and hands QEMU the descriptor); every Ethernet frame crosses it behind a 4-byte big-endian length
//! (QEMU's stream and socket netdevs share that framing). Behind the socket runs a
//! user-space TCP/IP stack, [smoltcp], that terminates each guest TCP connection. A new
//! connection (a guest SYN) is held while the [`Egress`] decision is taken and, when
//! allowed, while this side opens the host-side connection itself (tokio); only then does
//! the guest get its SYN-ACK, and the two connections are relayed. A denied connection,
//! or one whose host-side connect fails, is answered with a reset at once, so the workload
//! sees ECONNREFUSED and never a hang.
//!
//! smoltcp, because QEMU's own user-mode NAT (libslirp) connects on the guest's behalf
//! with no hook to decide per connection, and a stack in the kernel (a tap device) would
//! need privileges and host routing that kiln must not touch. smoltcp is a small,
//! allocation-bounded, well-kept stack that runs in this process with no privileges.
//!
//! What else crosses: ARP; UDP to the resolver address's port 53, answered by the
//! [resolver](dns) from the host's own configuration; and `-p` port forwards, host
//! loopback listeners whose connections this stack opens into the guest. Every other
//! packet (other UDP, ICMP, IPv6, fragments) is dropped.
//!
//! The endpoint runs on a thread of the process that owns the VM, so it ends with that
//! process (even on SIGKILL); the socket file is removed as soon as QEMU's end is connected.
//! Every resource is bounded by the constants in [`limits`].

mod dns;
mod egress;
mod frame;
mod http;
pub mod limits;
mod log;
mod packet;
mod stack;

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

pub use egress::{DecisionLog, DefaultEgress, Egress, FlowFacts, PolicyEgress};
pub use log::{DenialNotice, JsonLinesLog};

/// The guest's side of the network: its address and the two addresses this stack owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    pub guest: Ipv4Addr,
    pub prefix_len: u8,
    /// The guest's default route; connections to it are the host's own services.
    pub gateway: Ipv4Addr,
    /// The guest's resolver (UDP port 53).
    pub dns: Ipv4Addr,
}

/// A TCP port on host loopback forwarded to a port in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortForward {
    pub host: u16,
    pub guest: u16,
}

/// What an endpoint serves.
pub struct EndpointConfig {
    pub addresses: Addresses,
    pub forwards: Vec<PortForward>,
    /// Decides every new guest connection, HTTP request and DNS query.
    pub egress: Arc<dyn Egress>,
    /// Receives every final decision.
    pub log: Arc<dyn DecisionLog>,
    /// Names this sandbox in log lines.
    pub sandbox: String,
}

/// Why an endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("network socket {}", .path.display())]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("port forward 127.0.0.1:{port}")]
    Forward { port: u16, source: std::io::Error },
    #[error("starting the network endpoint")]
    Runtime(#[source] std::io::Error),
}

/// A running endpoint. Dropping it stops the stack and closes every relayed connection.
pub struct Endpoint {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    socket: PathBuf,
}

impl Endpoint {
    /// Listens on `socket` (the path kiln-vm connects QEMU's `-netdev stream` to) and on
    /// each forward's host port, then serves them on a thread of its own. A stale socket
    /// file at `socket` is replaced.
    pub fn start(socket: &Path, config: EndpointConfig) -> Result<Endpoint, Error> {
        let socket_error = |source| Error::Socket {
            path: socket.to_owned(),
            source,
        };
        match std::fs::remove_file(socket) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(socket_error(err)),
        }
        let listener = UnixListener::bind(socket).map_err(socket_error)?;
        listener.set_nonblocking(true).map_err(socket_error)?;
        let forwards = config
            .forwards
            .iter()
            .map(|forward| {
                let bound =
                    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, forward.host)))
                        .and_then(|l| l.set_nonblocking(true).map(|()| l))
                        .map_err(|source| Error::Forward {
                            port: forward.host,
                            source,
                        })?;
                Ok((bound, forward.guest))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::Runtime)?;
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let socket_path = socket.to_owned();
        let thread = std::thread::Builder::new()
            .name("kiln-netstack".into())
            .spawn(move || {
                runtime.block_on(stack::serve(
                    listener,
                    socket_path,
                    forwards,
                    config,
                    stopped,
                ))
            })
            .map_err(Error::Runtime)?;
        Ok(Endpoint {
            stop: Some(stop),
            thread: Some(thread),
            socket: socket.to_owned(),
        })
    }

    /// The socket QEMU connects to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}
