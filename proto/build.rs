//! Compiles the protobuf contract with protox (pure Rust, no `protoc` needed) and generates the
//! tonic client and server. Tensor payloads are generated as `bytes::Bytes` to avoid copies.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/omnishard/v1/expert.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .bytes(".omnishard.v1.Tensor.data")
        .compile_fds(fds)?;
    Ok(())
}
