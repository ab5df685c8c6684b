//! Builds the eBPF object and places it in `OUT_DIR` for `include_bytes!`.
//!
//! Why a build script: cargo cannot yet express "this crate needs that crate's
//! binary built for another target" (artifact dependencies are unstable:
//! rust-lang/cargo#12374, #12375, #12385). aya-build runs
//! `rustup run nightly cargo build -Z build-std=core --target bpfel-unknown-none`
//! on `tollgate-ebpf` and copies the object here, so a plain `cargo build`,
//! `cargo test` or `cargo install` of the agent always embeds programs that
//! match its source. The build-dependency on `tollgate-ebpf` (an empty library
//! target) makes cargo rerun this script when the programs' crate or the shared
//! types change.
//!
//! Needs: the `nightly` toolchain with `rust-src`, and `bpf-linker` on PATH —
//! `cargo xtask setup` installs both. `AYA_BUILD_SKIP=1` skips the eBPF build
//! (for `cargo check` on a machine without the toolchain); the resulting binary
//! then refuses to load programs with a message saying so.
use std::{env, fs, path::PathBuf};

fn main() {
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    if skip {
        // Leave an empty object behind so include_bytes! compiles; the loader
        // detects the empty object and explains what to do.
        let obj = out.join("tollgate-ebpf");
        if !obj.exists() {
            fs::write(&obj, []).expect("write placeholder eBPF object");
        }
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        return;
    }
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap())
        .join("../ebpf/programs")
        .canonicalize()
        .expect("ebpf/programs exists");
    let package = aya_build::Package {
        name: "tollgate-ebpf",
        root_dir: root.to_str().expect("UTF-8 path"),
        ..Default::default()
    };
    if let Err(e) = aya_build::build_ebpf([package], aya_build::Toolchain::default()) {
        panic!(
            "building the eBPF programs failed: {e:#}\n\
             hint: run `cargo xtask setup` (installs the nightly rust-src component and bpf-linker), \
             or set AYA_BUILD_SKIP=1 to build the agent without programs"
        );
    }
}
