//! With the `cuda` feature, compiles `src/xent.cu` to PTX with nvcc (embedded by `src/cuda.rs`).
//!
//! Build-time PTX rather than NVRTC at run time: a `cuda` build of candle already needs nvcc
//! (candle-kernels is compiled the same way), compiler errors surface when building instead of at
//! the first loss call, and no process pays a compile on start-up. The PTX targets
//! `CUDA_COMPUTE_CAP` (candle's variable; default 80), and the driver JIT-compiles it for newer
//! GPUs. `NVCC` overrides the compiler found on PATH.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/xent.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("xent.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .and_then(|v| v.trim().replace('.', "").parse::<u32>().ok())
        .unwrap_or(80);
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", "-Werror", "all-warnings"])
        .arg(format!("-arch=sm_{cap}"))
        .arg("src/xent.cu")
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "candle-xent `cuda` feature: could not run `{nvcc}` ({e}); install the CUDA \
                 toolkit (or PyPI's nvidia-cuda-nvcc) and put nvcc on PATH or in $NVCC"
            )
        });
    assert!(
        status.success(),
        "candle-xent `cuda` feature: nvcc failed to compile src/xent.cu ({status})"
    );
}
