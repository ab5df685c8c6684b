//! Loading, attaching and talking to the kernel programs.
//!
//! * `loader` — load the embedded object, attach to the governed cgroup,
//!   pin (fail-closed) and detach.
//! * `maps` — typed access to the maps shared with the programs.
//! * `tls_probes` — the TLS uprobes: loaded when enabled, attached per process.
//! * `error` — what can go wrong, with hints.
pub mod error;
pub mod loader;
pub mod maps;
pub mod tls_probes;

pub use error::BpfError;
pub use loader::{Attached, LoadOptions, detach_pinned};
pub use maps::{Maps, OrigDst};

/// The eBPF object built by `agent/build.rs` from `ebpf/programs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tollgate-ebpf"));

/// CLOCK_MONOTONIC now, in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available on Linux");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}
