//! Compiles `candle-xent/src/xent.cu` as host C++ with the CUDA shim (emu/cuda_shim.h).
fn main() {
    let kernels = "../candle-xent/src";
    println!("cargo:rerun-if-changed={kernels}/xent.cu");
    println!("cargo:rerun-if-changed=emu/cuda_shim.h");
    println!("cargo:rerun-if-changed=emu/emu.cpp");
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .file("emu/emu.cpp")
        .include(kernels)
        .include("emu")
        .flag("-fno-strict-aliasing")
        .flag_if_supported("-Wno-unknown-pragmas")
        .warnings_into_errors(true)
        .opt_level(2)
        .compile("xent_emu");
}
