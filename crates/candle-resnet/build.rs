//! With the `onednn` feature, compiles the C++ bridge `src/ops/onednn.cpp` and links oneDNN.
//!
//! oneDNN is found in `DNNL_ROOT` (its `include/` and `lib/`, e.g. an unpacked release or PyPI's
//! `onednn-devel` + `onednn`) or else on the system paths (Debian/Ubuntu: `apt install
//! libdnnl-dev`). Both the 2.x and the 3.x C++ API compile. Binaries built with `DNNL_ROOT` find
//! the library at run time through `LD_LIBRARY_PATH` (the rpath below reaches this crate's own
//! tests and examples only). The default build does not run any of this and needs no C++
//! compiler.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/ops/onednn.cpp");
    println!("cargo:rerun-if-env-changed=DNNL_ROOT");
    #[cfg(feature = "onednn")]
    onednn();
}

#[cfg(feature = "onednn")]
fn onednn() {
    use std::path::PathBuf;
    let root = std::env::var_os("DNNL_ROOT").map(PathBuf::from);
    let include = match &root {
        Some(r) => r.join("include"),
        None => PathBuf::from("/usr/include"),
    };
    let config = include.join("oneapi/dnnl/dnnl_config.h");
    let header = std::fs::read_to_string(&config).unwrap_or_else(|e| {
        panic!(
            "candle-resnet `onednn` feature: cannot read {} ({e}); install oneDNN (Debian/Ubuntu: \
             `apt install libdnnl-dev`) or point DNNL_ROOT at a folder with include/ and lib/",
            config.display()
        )
    });
    // The bridge sets the OpenMP team size per call when oneDNN runs on OpenMP.
    let omp = header.lines().any(|l| {
        l.trim_start()
            .starts_with("#define DNNL_CPU_THREADING_RUNTIME")
            && l.contains("DNNL_RUNTIME_OMP")
    });
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .file("src/ops/onednn.cpp")
        .include(&include)
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true);
    if omp {
        build.define("CR_DNNL_OMP", None);
    }
    build.compile("candle_resnet_onednn");
    if let Some(r) = &root {
        let lib = r.join("lib");
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
    println!("cargo:rustc-link-lib=dylib=dnnl");
    if omp {
        println!("cargo:rustc-link-lib=dylib=gomp");
    }
}
