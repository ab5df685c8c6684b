/// The eBPF object is linked by `bpf-linker`, a binary cargo knows nothing about.
/// Declaring its path as a rerun trigger makes cargo rebuild the programs when
/// the linker is reinstalled (e.g. for a new LLVM), instead of keeping an object
/// linked by the old one. `cargo xtask setup` installs it.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!(
            "cargo:warning=bpf-linker not found on PATH: run `cargo xtask setup` (it installs bpf-linker built against LLVM 22)"
        ),
    }
}
