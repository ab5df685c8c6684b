//! What the far sides saw: the agent's records and metrics, the mock
//! provider's own request log, and its echo of each call.
use std::{fs, time::Duration};

use crate::{TestNode, node::TLS_PORT, process::wait_until};

impl TestNode {
    /// The connection records written so far.
    pub fn connections(&self) -> Vec<serde_json::Value> {
        fs::read_to_string(self.connection_log())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Wait for at least `n` connection records.
    pub fn wait_connections(&self, n: usize) -> Vec<serde_json::Value> {
        wait_until(Duration::from_secs(5), || {
            let c = self.connections();
            (c.len() >= n).then_some(c)
        })
        .unwrap_or_else(|| {
            panic!(
                "expected {n} connection records, have {:?}\nagent log:\n{}",
                self.connections(),
                self.agent_log()
            )
        })
    }

    /// Every request the mock provider received, as it recorded them
    /// (`request`, `peer`, `local`, `host`, `sni`, `credential`, `model`).
    pub fn mock_requests(&self) -> Vec<serde_json::Value> {
        fs::read_to_string(self.dir.join("mock-requests.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The mock provider's records whose request line (`METHOD /path
    /// VERSION`, or `METHOD /path` for token grants) passes `line`.
    pub fn mock_requests_where(&self, line: impl Fn(&str) -> bool) -> Vec<serde_json::Value> {
        requests_where(&self.mock_requests(), line)
            .into_iter()
            .cloned()
            .collect()
    }

    /// What reached the mock provider's TLS listeners (where terminated
    /// calls go), the node's readiness probes of its plain listener left out.
    pub fn provider_requests(&self) -> Vec<serde_json::Value> {
        let port = format!(":{TLS_PORT}");
        self.mock_requests()
            .into_iter()
            .filter(|r| r["local"].as_str().is_some_and(|l| l.ends_with(&port)))
            .collect()
    }

    /// The audit log's request records (connection records left out).
    pub fn request_records(&self) -> Vec<serde_json::Value> {
        self.connections()
            .into_iter()
            .filter(|r| r["kind"] == "request")
            .collect()
    }

    /// The audit log's request records, once there are at least `n`.
    pub fn wait_requests(&self, n: usize) -> Vec<serde_json::Value> {
        self.wait_requests_within(n, Duration::from_secs(5))
    }

    /// The request records, once there are at least `n`, waiting up to `timeout`.
    pub fn wait_requests_within(&self, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
        wait_until(timeout, || {
            let r = self.request_records();
            (r.len() >= n).then_some(r)
        })
        .unwrap_or_else(|| {
            panic!(
                "expected {n} request records: {:?}\n{}",
                self.connections(),
                self.agent_log()
            )
        })
    }

    /// Fetch the agent's /metrics (it listens on the node namespace's loopback).
    pub fn metrics(&self) -> String {
        let out = self
            .node
            .command("curl")
            .args(["-sS", "-m", "3", "http://127.0.0.1:9464/metrics"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The TCP peer the mock provider saw (its echo answer's `peer_ip`).
pub fn peer_ip(answer: &serde_json::Value) -> String {
    answer["peer_ip"].as_str().unwrap_or_default().to_string()
}

/// How a `Pod::curl` call reached the mock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The mock's peer was curl's own socket.
    Direct,
    /// The mock's peer was another socket: the agent's, made in the pod's
    /// namespace (so from the pod's address), while curl's was redirected
    /// to the agent's loopback listener.
    Agent,
}

/// Tell a redirected call from a direct one by the two ends: curl's own
/// end of its connection (`client`, from curl) against the peer the mock
/// saw. Both carry the pod's address when the agent dials from the pod's
/// namespace, so the address alone cannot tell; curl's redirected socket
/// ends on loopback, a direct one is the very peer the mock saw.
pub fn route(answer: &serde_json::Value) -> Route {
    let unmapped = |ip: &str| ip.trim_start_matches("::ffff:").to_string();
    let (client_ip, client_port) = answer["client"]
        .as_str()
        .and_then(|c| c.rsplit_once(' '))
        .unwrap_or_else(|| panic!("no curl end (`client`) in {answer}"));
    let (peer_ip, peer_port) = answer["peer"]
        .as_str()
        .and_then(|p| p.rsplit_once(':'))
        .unwrap_or_else(|| panic!("no mock peer in {answer}"));
    let peer_ip = peer_ip.trim_start_matches('[').trim_end_matches(']');
    if client_port == peer_port && unmapped(client_ip) == unmapped(peer_ip) {
        Route::Direct
    } else {
        Route::Agent
    }
}

/// The records of `log` (the mock provider's) whose request line passes `line`.
pub fn requests_where(
    log: &[serde_json::Value],
    line: impl Fn(&str) -> bool,
) -> Vec<&serde_json::Value> {
    log.iter()
        .filter(|r| r["request"].as_str().is_some_and(&line))
        .collect()
}
