//! Connecting to a `kiln serve` socket: the generated clients over a unix socket.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::proto::driver_client::DriverClient;

/// A client of the driver API listening on `socket`.
pub async fn connect(socket: &Path) -> Result<DriverClient<Channel>, tonic::transport::Error> {
    Ok(DriverClient::new(channel(socket).await?))
}

/// A channel to the server listening on `socket`, for either API's client. The URI given
/// to tonic is a placeholder: every connection goes to the socket.
pub async fn channel(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let socket: PathBuf = socket.to_path_buf();
    Endpoint::from_static("http://kiln.invalid")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { UnixStream::connect(socket).await.map(TokioIo::new) }
        }))
        .await
}
