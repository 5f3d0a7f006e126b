//! kiln-server serves kiln's sandbox lifecycle (kiln-sandbox's create, start, stop, ...) as
//! gRPC services on unix sockets that only the server's own user can reach: kiln's own
//! driver API (`proto/kiln/driver/v1/driver.proto`, docs/driver-api.md) and OpenShell's
//! compute-driver contract (`proto/openshell/compute/v1/compute_driver.proto`,
//! docs/openshell.md). One process may serve both, each on its own socket.
//!
//! It holds no state of its own beyond memory: sandboxes live in their state directories
//! under kiln's root and run under their own monitor processes, so a restarted server
//! simply finds them again (running ones are re-attached, stopped ones stay stopped, one
//! whose monitor died reads as failed).
//!
//! Clients: every accepted connection is read through [`front`], which replaces an
//! `:authority` the h2 crate would refuse (the socket path that gRPC's C core, grpc-java
//! and grpc-swift send on a unix socket) before h2 parses it. h2 offers no way to relax
//! that check and the clients cannot be changed, so the fix sits in between, inside h2's
//! own reads; the module doc says how it stays in step with the client's HPACK state.
//!
//! Code generation: the .proto is compiled by `protox`, a protobuf compiler written in
//! Rust, and turned into tonic code by tonic-prost-build. That keeps `protoc` (and its
//! version) off the list of things a host must install to build kiln.

pub mod client;
mod convert;
mod events;
pub mod front;
pub mod openshell_env;
mod openshell_service;
pub mod openshell_spec;
mod openshell_status;
pub mod quantity;
mod service;
pub mod socket;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_vm::accel::AccelRequest;
use tokio_stream::StreamExt;

use crate::socket::{OwnerSocket, SocketError};

pub use crate::openshell_service::{
    OpenShellConfig, SupervisorConfig as OpenShellSupervisorConfig,
    NAME_LABEL as OPENSHELL_NAME_LABEL,
};

/// The code generated from `proto/kiln/driver/v1/driver.proto`: messages, the server
/// trait and the client.
pub mod proto {
    tonic::include_proto!("kiln.driver.v1");
}

/// The code generated from `proto/openshell/compute/v1/compute_driver.proto`, kiln's
/// wire-compatible copy of OpenShell's compute-driver contract: messages, the server
/// trait and the client.
// The generated watch event's oneof holds a whole sandbox snapshot in one variant; that
// size is the contract's shape, and the events are short-lived.
#[allow(clippy::large_enum_variant)]
pub mod openshell_proto {
    tonic::include_proto!("openshell.compute.v1");
}

/// How to run the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// kiln's root: the content store and the sandboxes' state.
    pub root: PathBuf,
    /// Where to listen, and which API each socket serves.
    pub sockets: Vec<(Api, PathBuf)>,
    /// The OpenShell driver's settings (used when a socket serves [`Api::OpenShell`]).
    pub openshell: OpenShellConfig,
    /// The kiln executable: started sandboxes run under `kiln monitor`.
    pub monitor_exe: PathBuf,
    /// Accelerator for sandboxes created through the API.
    pub accel: AccelRequest,
    /// QEMU binary that sandboxes started through the API boot with.
    pub qemu: PathBuf,
    /// Disk space the built root images may take (`None`: kiln-sandbox's default).
    pub rootfs_cache_max: Option<u64>,
}

/// The gRPC service a socket serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// kiln's own driver API, `kiln.driver.v1.Driver`.
    Kiln,
    /// OpenShell's compute-driver contract, `openshell.compute.v1.ComputeDriver`.
    OpenShell,
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves until SIGINT or SIGTERM, then removes the sockets. `ready` is called with each
/// socket's API and path once it accepts connections.
pub fn run(config: ServerConfig, mut ready: impl FnMut(Api, &Path)) -> Result<(), ServeError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| ServeError::Io {
            context: "starting the async runtime".into(),
            source,
        })?;
    let outcome = runtime.block_on(async {
        let mut sockets = Vec::new();
        for (api, path) in &config.sockets {
            sockets.push((*api, OwnerSocket::bind(path)?));
        }
        let stop = shutdown_signal()?;
        for (api, socket) in &sockets {
            ready(*api, socket.path());
        }
        serve(&config, &mut sockets, stop).await
    });
    // Watch and Exec streams still open end here rather than keep the process alive.
    runtime.shutdown_background();
    outcome
}

/// Resolves on SIGINT or SIGTERM.
fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, ServeError> {
    use tokio::signal::unix::{signal, SignalKind};
    let io = |source| ServeError::Io {
        context: "installing signal handlers".into(),
        source,
    };
    let mut interrupt = signal(SignalKind::interrupt()).map_err(io)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(io)?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

/// Serves each socket's API until `stop` resolves. Connections from another uid are
/// closed unread.
pub async fn serve(
    config: &ServerConfig,
    sockets: &mut [(Api, OwnerSocket)],
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    let shared = Arc::new(service::Shared {
        root: config.root.clone(),
        monitor_exe: config.monitor_exe.clone(),
        machine: convert::Machine {
            accel: config.accel,
            qemu: config.qemu.clone(),
            rootfs_cache_max: config.rootfs_cache_max,
        },
        hub: events::Hub::default(),
    });
    let mut statuses = service::StatusWatcher::default();
    // What exists now is the starting point, not news.
    statuses.poll(&shared).await;
    let watcher = tokio::spawn(statuses.run(Arc::clone(&shared)));

    let mut servers = tokio::task::JoinSet::new();
    for (api, socket) in sockets.iter_mut() {
        let listener = socket.take_listener().map_err(|source| ServeError::Io {
            context: format!("listening on {}", socket.path().display()),
            source,
        })?;
        let incoming = same_user_connections(listener);
        let mut builder = tonic::transport::Server::builder();
        match api {
            Api::Kiln => servers.spawn(
                builder
                    .add_service(proto::driver_server::DriverServer::new(
                        service::DriverService::new(Arc::clone(&shared)),
                    ))
                    .serve_with_incoming(incoming),
            ),
            Api::OpenShell => servers.spawn(
                builder
                    .add_service(
                        openshell_proto::compute_driver_server::ComputeDriverServer::new(
                            openshell_service::OpenShellService::new(
                                Arc::clone(&shared),
                                config.openshell.clone(),
                            ),
                        ),
                    )
                    .serve_with_incoming(incoming),
            ),
        };
    }
    // Not a graceful shutdown: Watch streams never end by themselves. A server that
    // ends (on a transport error) ends them all.
    let outcome = tokio::select! {
        Some(ended) = servers.join_next() => match ended {
            Ok(outcome) => outcome,
            Err(_) => Ok(()),
        },
        () = stop => Ok(()),
    };
    servers.abort_all();
    watcher.abort();
    Ok(outcome?)
}

/// The connections `listener` accepts, each read through [`front`]; one from another uid
/// comes as an error, which tonic drops, closing it unread.
fn same_user_connections(
    listener: tokio::net::UnixListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<front::NormalisedStream>> {
    tokio_stream::wrappers::UnixListenerStream::new(listener).map(|connection| {
        connection.and_then(|stream| {
            if socket::same_user(&stream) {
                Ok(front::normalise_authority(stream))
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    "peer runs as another uid",
                ))
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use crate::openshell_proto::{
        watch_sandboxes_event, DriverSandbox, DriverSandboxSpec, GetCapabilitiesResponse,
        WatchSandboxesDeletedEvent, WatchSandboxesEvent,
    };

    // The bytes are written out by hand from OpenShell's field numbers, so a renumbered
    // field in kiln's copy of the contract fails here rather than against a gateway.
    #[test]
    fn openshell_messages_use_the_contracts_field_numbers() {
        let spec = DriverSandboxSpec {
            sandbox_token: "t".into(),
            command: vec!["a".into()],
            tty: true,
            ..Default::default()
        };
        assert_eq!(
            spec.encode_to_vec(),
            [0x5a, 1, b't', 0x62, 1, b'a', 0x68, 1]
        );
        let sandbox = DriverSandbox {
            id: "i".into(),
            workspace: "w".into(),
            ..Default::default()
        };
        assert_eq!(sandbox.encode_to_vec(), [0x0a, 1, b'i', 0x32, 1, b'w']);
        let capabilities = GetCapabilitiesResponse {
            gateway_manages_lifecycle: true,
            ..Default::default()
        };
        assert_eq!(capabilities.encode_to_vec(), [0x30, 1]);
        let deleted = WatchSandboxesEvent {
            payload: Some(watch_sandboxes_event::Payload::Deleted(
                WatchSandboxesDeletedEvent {
                    sandbox_id: "x".into(),
                },
            )),
        };
        assert_eq!(deleted.encode_to_vec(), [0x12, 3, 0x0a, 1, b'x']);
    }

    #[test]
    fn openshell_messages_skip_fields_they_do_not_know() {
        // Field 99 (varint 7) is unknown to this copy of the contract.
        let bytes = [0x98, 0x06, 7, 0x0a, 1, b'i'];
        let sandbox = DriverSandbox::decode(&bytes[..]).unwrap();
        assert_eq!(sandbox.id, "i");
    }
}
