//! kiln-server serves kiln's sandbox lifecycle (kiln-sandbox) as a gRPC service.

pub mod client;
mod events;
pub mod socket;

/// The code generated from `proto/kiln/driver/v1/driver.proto`: messages, the server
/// trait and the client.
pub mod proto {
    tonic::include_proto!("kiln.driver.v1");
}
