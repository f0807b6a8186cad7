//! Compiles `candle-xent/src/xent.cu` and `candle-xent/src/xent.metal` as host C++ with the CUDA
//! and Metal shims (emu/cuda_shim.h, emu/metal_shim.h).
fn main() {
    let kernels = "../candle-xent/src";
    println!("cargo:rerun-if-changed={kernels}/xent.cu");
    println!("cargo:rerun-if-changed={kernels}/xent.metal");
    println!("cargo:rerun-if-changed=emu/emu_threads.h");
    println!("cargo:rerun-if-changed=emu/metal_shim.h");
    println!("cargo:rerun-if-changed=emu/emu_metal.cpp");
    println!("cargo:rerun-if-changed=emu/cuda_shim.h");
    println!("cargo:rerun-if-changed=emu/emu.cpp");
    println!("cargo:rerun-if-changed=emu/fiber_switch.cpp");
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .file("emu/emu.cpp")
        .file("emu/emu_metal.cpp")
        .file("emu/fiber_switch.cpp")
        .include(kernels)
        .include("emu")
        .flag("-fno-strict-aliasing")
        .flag_if_supported("-Wno-unknown-pragmas")
        // Metal's [[buffer(n)]]-style attributes mean nothing to the host compiler.
        .flag_if_supported("-Wno-attributes")
        .warnings_into_errors(true)
        .opt_level(2)
        .compile("xent_emu");
}
