//! With the `cuda` feature: compiles each of [`SOURCES`] (`cuda/lora.cu`, `cuda/attention.cu`,
//! `cuda/fused.cu`, which include `cuda/common.cuh`, `cuda/sampling.cu`, `cuda/gather.cu` and
//! `cuda/timing.cu`) to PTX with nvcc
//! (`NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on `PATH`; `scripts/cuda/env.sh` sets them
//! up from the PyPI wheels) for `compute_$CUDA_COMPUTE_CAP` (default 80, the oldest GPU with
//! bf16; the driver compiles the PTX for newer ones). Without the feature nothing is built and no
//! CUDA is needed.

use std::path::PathBuf;
use std::process::Command;

/// The CUDA sources, each compiled to `$OUT_DIR/<name>.ptx`.
const SOURCES: [&str; 6] = ["lora", "attention", "fused", "sampling", "gather", "timing"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=cuda/common.cuh");
    for name in SOURCES {
        println!("cargo::rerun-if-changed=cuda/{name}.cu");
    }
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin/nvcc")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for name in SOURCES {
        let src = format!("cuda/{name}.cu");
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "--std=c++17", "-lineinfo", "-Icuda"])
            .arg(format!("-arch=compute_{cap}"))
            .arg(&src)
            .arg("-o")
            .arg(out_dir.join(format!("{name}.ptx")))
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("nvcc ({}) failed on {src}: {s}", nvcc.display()),
            Err(e) => panic!(
                "the `cuda` feature compiles {src} with nvcc, which did not run ({}: {e}); \
                 `source scripts/cuda/env.sh` or set NVCC",
                nvcc.display()
            ),
        }
    }
}
