//! `cargo xtask gpu-check`: builds here (no GPU needed) a self-contained bundle that checks
//! candle-xent's CUDA kernels on any Linux x86-64 machine with a CUDA 13 driver, PyTorch and an
//! NVIDIA GPU, and that needs no Rust there:
//!
//! ```text
//! target/gpu-check/
//!   run.sh              entry point: `bash target/gpu-check/run.sh OUT_DIR`
//!   cuda-tests          crates/candle-xent/tests/cuda.rs (parity vs the CPU op and the fixtures)
//!   xent_cuda_bench     crates/candle-xent/examples/xent_cuda_bench.rs (time, peak memory)
//!   gpu_check.py        scripts/gpu_check.py (PyTorch CUDA parity, torch / Liger benchmark)
//!   fixtures/           the PyTorch fixtures and their reference module
//!   wheels/             optional: wheels to install there (e.g. liger-kernel), from --wheels
//! ```
//!
//! The binaries are linked against stub libraries that only carry the sonames of the CUDA
//! driver and libraries candle links (libcuda.so.1, libcudart.so.13, libnvrtc.so.13,
//! libcublas.so.13, libcublasLt.so.13, libcurand.so.10): the real ones are found at run time, the driver's in the
//! system and the others in PyTorch's `nvidia` wheels (run.sh puts them on LD_LIBRARY_PATH).
//! The PTX (candle's and ours) comes from the nvcc on PATH: a driver runs PTX of its own CUDA
//! version or older, so build with the oldest nvcc 13.x the target drivers have (13.0 for a
//! 580-series driver).

use crate::{run_capture, workspace_root};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(clap::Args)]
pub struct Args {
    /// Output folder of the bundle (relative to the workspace root).
    #[arg(long, default_value = "target/gpu-check")]
    out: PathBuf,
    /// Compute capability of the PTX (CUDA_COMPUTE_CAP); the driver JIT-compiles it for newer
    /// GPUs.
    #[arg(long, default_value_t = 80)]
    compute_cap: u32,
    /// Folder of wheels to ship and install on the GPU machine (e.g. liger-kernel).
    #[arg(long)]
    wheels: Option<PathBuf>,
}

/// (soname, link name) of every CUDA library a `cuda` build links: cudarc's `dynamic-linking`
/// set, and cudart for candle-kernels' statically compiled kernels.
const STUBS: [(&str, &str); 6] = [
    ("libcuda.so.1", "cuda"),
    ("libcudart.so.13", "cudart"),
    ("libnvrtc.so.13", "nvrtc"),
    ("libcublas.so.13", "cublas"),
    ("libcublasLt.so.13", "cublasLt"),
    ("libcurand.so.10", "curand"),
];

fn stubs(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let src = dir.join("stub.c");
    std::fs::write(&src, "int candle_xent_gpu_check_stub;\n")?;
    for (soname, name) in STUBS {
        let so = dir.join(format!("lib{name}.so"));
        run_capture(Command::new("cc").args([
            "-shared",
            "-fPIC",
            &format!("-Wl,-soname,{soname}"),
            "-o",
            so.to_str().context("utf-8 path")?,
            src.to_str().context("utf-8 path")?,
        ]))?;
    }
    Ok(())
}

fn nvcc_version() -> Result<String> {
    let out = run_capture(Command::new("nvcc").arg("--version"))
        .context("nvcc is not on PATH (see ../shared/notes/cuda-build.md or the README)")?;
    Ok(out
        .lines()
        .find(|l| l.contains("release"))
        .unwrap_or("unknown")
        .trim()
        .to_string())
}

pub fn run(a: Args) -> Result<()> {
    let root = workspace_root();
    let nvcc = nvcc_version()?;
    eprintln!("nvcc: {nvcc} (the PTX needs a driver of at least this CUDA version)");
    let link = root.join("target/gpu-check-link");
    stubs(&link)?;
    // Undefined driver/library symbols are left to the dynamic loader, which finds them in the
    // real libraries named by the stubs' sonames.
    let rustflags = format!(
        "-L native={} -C link-arg=-Wl,--no-as-needed -C link-arg=-Wl,--unresolved-symbols=ignore-all",
        link.display()
    );
    let target_dir = root.join("target/gpu-check-build");
    let cargo = |args: &[&str]| -> Result<String> {
        eprintln!("cargo {}", args.join(" "));
        run_capture(
            Command::new(env!("CARGO"))
                .args(args)
                .env("RUSTFLAGS", &rustflags)
                .env("CUDA_COMPUTE_CAP", a.compute_cap.to_string())
                .env("CARGO_TARGET_DIR", &target_dir),
        )
    };
    let common = [
        "--release",
        "--locked",
        "-p",
        "candle-xent",
        "--features",
        "cuda",
        "--message-format",
        "json",
    ];
    let mut test_args = vec!["test", "--no-run", "--test", "cuda"];
    test_args.extend_from_slice(&common);
    let test_json = cargo(&test_args)?;
    let mut bench_args = vec!["build", "--example", "xent_cuda_bench"];
    bench_args.extend_from_slice(&common);
    let bench_json = cargo(&bench_args)?;
    let exe = |json: &str, name: &str| -> Result<PathBuf> {
        for line in json.lines() {
            let v: serde_json::Value = match serde_json::from_str(line) {
                Ok(v) => v,
                Err(_) => continue,
            };
            if v["reason"] == "compiler-artifact" && v["target"]["name"] == name {
                if let Some(p) = v["executable"].as_str() {
                    return Ok(PathBuf::from(p));
                }
            }
        }
        bail!("cargo did not report an executable for {name}")
    };
    let out = root.join(&a.out);
    if out.exists() {
        std::fs::remove_dir_all(&out)?;
    }
    std::fs::create_dir_all(out.join("fixtures"))?;
    let copy = |from: &Path, to: &str| -> Result<()> {
        std::fs::copy(from, out.join(to))
            .with_context(|| format!("copy {} to {to}", from.display()))?;
        Ok(())
    };
    copy(&exe(&test_json, "cuda")?, "cuda-tests")?;
    copy(&exe(&bench_json, "xent_cuda_bench")?, "xent_cuda_bench")?;
    copy(&root.join("scripts/gpu_check.py"), "gpu_check.py")?;
    copy(&root.join("scripts/gpu_check.sh"), "run.sh")?;
    let fx = root.join("crates/candle-xent/tests/fixtures");
    for f in ["xent.json", "xent.safetensors", "xent_reference.py"] {
        copy(&fx.join(f), &format!("fixtures/{f}"))?;
    }
    if let Some(w) = &a.wheels {
        std::fs::create_dir_all(out.join("wheels"))?;
        for e in std::fs::read_dir(root.join(w))? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "whl") {
                copy(
                    &p,
                    &format!("wheels/{}", p.file_name().unwrap().to_string_lossy()),
                )?;
            }
        }
    }
    std::fs::write(
        out.join("BUILD_INFO"),
        format!("nvcc: {nvcc}\ncompute_cap: {}\n", a.compute_cap),
    )?;
    let mut total = 0;
    for e in walk(&out)? {
        total += std::fs::metadata(&e)?.len();
    }
    eprintln!(
        "bundle: {} ({:.1} MiB). On the GPU machine: bash {}/run.sh OUT_DIR",
        out.display(),
        total as f64 / (1 << 20) as f64,
        a.out.display()
    );
    Ok(())
}

fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(walk(&p)?);
        } else {
            out.push(p);
        }
    }
    Ok(out)
}
