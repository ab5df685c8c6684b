//! A miniature Kubernetes node on the real kernel, for Tollgate's tests and demo.
//!
//! ```text
//!  pod netns (tgt-…-podN)          node netns (tgt-…-node)            upstream netns (tgt-…-up)
//!  eth0 10.88.N.2 / fd88:N::2  ──  podN 10.88.N.1 / fd88:N::1
//!  lo (proxy listener 127.0.0.1)   agent, dnsmasq on 127.0.0.1:53   up0 ── eth0 10.77.0.2, .3 / fd77::2
//!  cgroup: <root>/kubepods.slice/…-pod<uid>.slice/cri-containerd-<id>.scope       mock provider :443, :8080
//! ```
//!
//! Every address lives in a namespace the test created; no namespace has a
//! route anywhere else, and the machine's own network namespace is never
//! touched (veths are created directly inside the namespaces). Everything is
//! owned by guards whose `Drop` removes it, also when a test panics.
pub mod cgroups;
pub mod chart;
mod dns;
pub mod http_fixture;
pub mod image;
pub mod kube_api;
pub mod mock_bedrock;
pub mod mock_entra;
pub mod mock_google;
pub mod mock_llm;
pub mod mock_realtime;
pub mod netns;
pub mod node;
pub mod observed;
pub mod otlp_receiver;
pub mod pod;
pub mod privileged;
pub mod process;
pub mod prometheus;
pub mod redis;
pub mod sdk;
pub mod tls_client;
pub mod yaml;

pub use node::TestNode;
pub use pod::Pod;
pub use privileged::{require_installed, require_privileged};

/// target/e2e, where `cargo xtask setup` installs the pinned SDKs and tools.
pub fn e2e_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/e2e")
}

/// tests/clients: the apps the end-to-end tests and the demo run in pods.
pub fn clients_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients")
}
