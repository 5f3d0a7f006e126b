//! Generates the gRPC server and client code from kiln's own driver API
//! (proto/kiln/driver/v1/driver.proto) and from kiln's copy of OpenShell's compute-driver
//! contract (proto/openshell/compute/v1/compute_driver.proto).
//! protox parses the .proto in Rust, so building kiln needs no `protoc` on the host; it
//! also supplies google/protobuf/struct.proto, which the OpenShell contract imports.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/kiln/driver/v1/driver.proto",
        "proto/openshell/compute/v1/compute_driver.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
