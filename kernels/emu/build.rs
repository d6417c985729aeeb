//! Compiles Medley's CUDA sources (`kernels/cuda/*.cu`) as C++ against the CPU emulation of
//! CUDA in `cpp/` (see `cpp/cuda_emu.h`). The one rewrite: `extern __shared__ T name[];` (dynamic
//! shared memory, which C++ has no spelling for) becomes `T* name = emu::dynamic_shared<T>();`.

use std::path::{Path, PathBuf};

/// The CUDA sources emulated, each with its `cpp/<name>.cpp` registry.
const SOURCES: [&str; 5] = ["lora", "fused", "attention", "sampling", "gather"];

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let cuda = manifest.join("../cuda");
    let cpp = manifest.join("cpp");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it"));
    println!("cargo::rerun-if-changed=cpp");
    println!("cargo::rerun-if-changed=../cuda/common.cuh");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .opt_level(2)
        .flag("-pthread")
        .flag_if_supported("-Wno-unknown-pragmas")
        .include(&cpp)
        .include(cpp.join("include"))
        .include(&cuda)
        .include(&out);
    for name in SOURCES {
        let src = cuda.join(format!("{name}.cu"));
        println!("cargo::rerun-if-changed=../cuda/{name}.cu");
        std::fs::write(out.join(format!("{name}.emu.cu")), rewrite(&src))
            .expect("writing the rewritten source");
        build.file(cpp.join(format!("{name}.cpp")));
    }
    build.file(cpp.join("emu.cpp"));
    build.compile("medley_cuda_emu");
    println!("cargo::rustc-link-lib=pthread");
}

/// `path`'s text with each `extern __shared__ T name[];` line turned into a pointer to the
/// emulated launch's dynamic shared memory.
fn rewrite(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("reading a CUDA source");
    text.lines()
        .map(|line| {
            let trimmed = line.trim();
            let decl = trimmed
                .strip_prefix("extern __shared__ ")
                .and_then(|rest| rest.strip_suffix("[];"));
            match decl.and_then(|d| d.rsplit_once(' ')) {
                Some((ty, name)) => {
                    let indent = &line[..line.len() - line.trim_start().len()];
                    format!("{indent}{ty}* {name} = emu::dynamic_shared<{ty}>();")
                }
                None => line.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}
