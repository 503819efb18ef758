//! Gives the shared library its soname on Linux: `libiris.so.<ABI major>`,
//! so programs linked against one ABI never load an incompatible one.

#[allow(dead_code, reason = "build.rs only needs the major number")]
mod abi {
    include!("src/abi.rs");
}

fn main() {
    println!("cargo:rerun-if-changed=src/abi.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!(
            "cargo:rustc-cdylib-link-arg=-Wl,-soname,libiris.so.{}",
            abi::IRIS_ABI_VERSION_MAJOR
        );
    }
}
