//! Generates the gRPC test service (`proto/orders.proto`) with a vendored `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/orders.proto");
    tonic_prost_build::configure().compile_protos(&["proto/orders.proto"], &["proto"])?;
    Ok(())
}
