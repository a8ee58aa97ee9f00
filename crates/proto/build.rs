//! Compiles `proto/` with protox (no system `protoc`) and writes the descriptor set used for
//! server reflection.
use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        root.join("openinfer/v1/inference.proto"),
        root.join("openinfer/worker/v1/worker.proto"),
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("openinfer_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;

    // etcd's v3 API, client side only (cluster membership).
    let third = root.join("third_party");
    println!("cargo:rerun-if-changed={}", third.display());
    let etcd = protox::compile([third.join("etcd/api/etcdserverpb/rpc.proto")], [&third])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(etcd)?;
    Ok(())
}
