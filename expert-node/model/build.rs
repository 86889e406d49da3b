//! With the `cuda` feature, compiles `src/ops/cuda/kernels.cu` to PTX with nvcc (as candle builds
//! its own kernels); the PTX is embedded in the library and loaded by the driver at first use.
//! `CUDA_COMPUTE_CAP` picks the target (default 90, the H100/H200); `NVCC` names the compiler.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let src = "src/ops/cuda/kernels.cu";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-changed=src/ops/cuda/norm.cuh");
    println!("cargo:rerun-if-changed=src/ops/cuda/mma.cuh");
    println!("cargo:rerun-if-changed=src/ops/cuda/moe_mma.cuh");
    println!("cargo:rerun-if-changed=src/ops/cuda/moe_plan.cuh");
    println!("cargo:rerun-if-changed=src/ops/cuda/sample.cuh");
    println!("cargo:rerun-if-changed=src/ops/cuda/attention.cuh");
    println!("cargo:rerun-if-changed=src/ops/cuda/prefill_attention.cuh");
    println!("cargo:rerun-if-changed=src/ops/cuda/router.cuh");
    println!("cargo:rerun-if-changed=src/ops/cuda/exchange.cuh");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("omnishard_kernels.ptx");
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", "-lineinfo"])
        .arg(format!("-arch=compute_{cap}"))
        .arg(src)
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {nvcc} ({e}): the `cuda` feature needs the CUDA compiler on PATH \
                 (on a machine without a GPU: source ../shared/tools/cuda-env.sh)"
            )
        });
    assert!(status.success(), "{nvcc} failed on {src}");
}
