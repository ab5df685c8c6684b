//! Tollgate node agent: governs LLM provider traffic from the node.
//!
//! The path of one connection, module by module:
//! `bpf` (kernel redirect) → `netns` (listener in the workload's namespace) →
//! `identity` (cgroup → workload) → `proxy` (relay) → `telemetry`.
//! `workers` are the proxy's threads, a runtime each.
//! `resolver` keeps the kernel's provider map fresh; `config` is the one
//! typed configuration; `run` wires it together; `cli` is the command line.
pub mod bpf;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod egress;
pub mod identity;
pub mod journal;
pub mod live;
pub mod namespaces;
pub mod netns;
pub mod pods;
pub mod policy;
pub mod preflight;
pub mod pricing;
pub mod providers;
pub mod proxy;
pub mod resolver;
pub mod run;
pub mod status;
pub mod telemetry;
pub mod tls;
pub mod top;
pub mod uprobe;
pub mod workers;
