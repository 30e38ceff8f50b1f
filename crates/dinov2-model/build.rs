//! With the `cuda` feature: compiles `src/ops/cuda/kernels.cu` to PTX with nvcc (tools/build_cuda.sh provides
//! one from PyPI wheels), embedded in the library and loaded at run time. Without it: nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let src = "src/ops/cuda/kernels.cu";
    println!("cargo:rerun-if-changed={src}");
    for var in ["NVCC", "CUDA_HOME", "DINOV2_PTX_ARCH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin/nvcc")))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    // PTX for compute capability 8.0: the driver JIT-compiles it for the GPU it runs on (A100, H100, H200, ...).
    let arch = std::env::var("DINOV2_PTX_ARCH").unwrap_or_else(|_| "compute_80".into());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap()).join("dinov2_kernels.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", &format!("-arch={arch}"), "-o"])
        .arg(&out)
        .arg(src)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "dinov2-model (feature `cuda`): cannot run nvcc ({}): {e}. Set CUDA_HOME or NVCC, or build with \
                 tools/build_cuda.sh, which sets up a toolkit from PyPI wheels",
                nvcc.display()
            )
        });
    assert!(
        status.success(),
        "dinov2-model: nvcc failed on {src} ({status})"
    );
}
