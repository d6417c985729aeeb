//! Generates the gRPC code for both APIs into `OUT_DIR` (never into `src/`).
//!
//! `protoc` comes from `$PROTOC`, then from `PATH`, then from the vendored binary shipped by
//! `protoc-bin-vendored`, so a fresh machine needs no system package.

use std::path::PathBuf;

fn protoc_on_path() -> bool {
    std::process::Command::new("protoc")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() && !protoc_on_path() {
        let vendored = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
        unsafe { std::env::set_var("PROTOC", vendored) };
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = ["medley/v1/generate.proto", "medley/shard/v1/shard.proto"];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("medley_descriptor.bin"))
        // Messages carrying an `api_token`: their `Debug` (in src/lib.rs) never shows it.
        .skip_debug([
            ".medley.v1.GenerateParameters",
            ".medley.v1.PreloadAdapterRequest",
            ".medley.v1.UnloadAdapterRequest",
            ".medley.shard.v1.AdapterRef",
        ])
        .compile_protos(&protos, &["."])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
