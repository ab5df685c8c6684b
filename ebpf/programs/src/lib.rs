//! Intentionally empty: the programs are the `tollgate-ebpf` binary target,
//! built for `bpfel-unknown-none` by `agent/build.rs`. This library target only
//! exists so the agent can depend on the crate (see agent/build.rs).
#![no_std]
