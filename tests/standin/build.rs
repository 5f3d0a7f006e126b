//! Generates the report service's client (for the stand-in) and server (for the test)
//! from proto/kiln/test/v1/standin.proto; protox parses it without `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/kiln/test/v1/standin.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
