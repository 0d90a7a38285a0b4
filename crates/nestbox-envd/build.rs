//! Compiles `proto/envd` with protox (a pure-Rust protobuf compiler, so no `protoc` is needed),
//! generates the messages with prost and their proto3-canonical JSON serde impls with
//! pbjson. The one well-known type used, `Timestamp`, maps to `crate::wkt::Timestamp`,
//! whose JSON is canonical (`…Z`).

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        root.join("envd/process/process.proto"),
        root.join("envd/filesystem/filesystem.proto"),
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let fds = protox::compile(&files, [&root])?;
    let descriptor_bytes = fds.encode_to_vec();

    prost_build::Config::new()
        .extern_path(".google.protobuf.Timestamp", "crate::wkt::Timestamp")
        // Output chunks travel from the pipe to the socket without copies.
        .bytes(["."])
        .compile_fds(fds)?;

    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        .extern_path(".google.protobuf.Timestamp", "crate::wkt::Timestamp")
        // Newer SDKs may send fields this agent does not know yet.
        .ignore_unknown_fields()
        .build(&[".process", ".filesystem"])?;
    Ok(())
}
