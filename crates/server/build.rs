//! Generates the gRPC server and client code from proto/kiln/driver/v1/driver.proto.
//! protox parses the .proto in Rust, so building kiln needs no `protoc` on the host.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/kiln/driver/v1/driver.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
