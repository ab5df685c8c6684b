//! Running the official SDK clients (`tests/clients/`) as applications of
//! a test pod, with the SDKs `cargo xtask setup` pins under target/e2e.
use std::path::PathBuf;

use crate::{TestNode, clients_dir, e2e_dir, require_installed, require_privileged};

/// The SDK installation under target/e2e, or None (skip) when it is
/// missing outside CI.
pub fn sdk(test: &str, path: &str) -> Option<PathBuf> {
    if !require_privileged(test) {
        return None;
    }
    let p = e2e_dir().join(path);
    require_installed(test, &[&p]).then_some(p)
}

pub fn run_app(node: &TestNode, mut cmd: std::process::Command) -> serde_json::Value {
    let out = cmd.output().expect("run the SDK client");
    assert!(
        out.status.success(),
        "client failed:\n{}\n{}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        node.agent_log()
    );
    serde_json::from_slice(out.stdout.trim_ascii()).expect("client prints one JSON line")
}

/// Run `tests/clients/<script>` with the pinned npm SDK as an app of pod
/// `pod`, trusting `ca` (besides Node's own roots) through
/// NODE_EXTRA_CA_CERTS only.
pub fn run_node(
    node: &TestNode,
    pod: usize,
    modules: &std::path::Path,
    script: &str,
    ca: &std::path::Path,
) -> serde_json::Value {
    // ESM resolves packages from the script's directory upwards: run a copy
    // placed next to the installed node_modules.
    let copy = modules.parent().unwrap().parent().unwrap().join(script);
    std::fs::copy(clients_dir().join(script), &copy).unwrap();
    let mut cmd = node.pods[pod].app(&node.pod_hosts_file(), "node", &[copy.to_str().unwrap()]);
    cmd.env("NODE_EXTRA_CA_CERTS", ca);
    run_app(node, cmd)
}

/// Run `tests/clients/<script>` with the pinned Python SDKs as an app of
/// pod 0, trusting the node CA only through SSL_CERT_FILE.
pub fn run_python(node: &TestNode, python: &std::path::Path, script: &str) -> serde_json::Value {
    run_python_with(node, python, script, &[])
}

/// `run_python` with arguments for the script.
pub fn run_python_with(
    node: &TestNode,
    python: &std::path::Path,
    script: &str,
    args: &[&str],
) -> serde_json::Value {
    let script = clients_dir().join(script);
    let mut argv = vec![script.to_str().unwrap()];
    argv.extend_from_slice(args);
    let mut cmd = node.pods[0].app(&node.pod_hosts_file(), python.to_str().unwrap(), &argv);
    cmd.env("SSL_CERT_FILE", node.node_ca_cert());
    run_app(node, cmd)
}

/// Run `tests/clients/bedrock_client.py` in pod 0 with the AWS keys `keys`
/// in its environment, trusting the node CA through AWS_CA_BUNDLE only.
pub fn boto3(
    node: &TestNode,
    python: &std::path::Path,
    calls: &[&str],
    (key, secret): (&str, &str),
) -> serde_json::Value {
    let script = clients_dir().join("bedrock_client.py");
    let mut argv = vec![script.to_str().unwrap()];
    argv.extend_from_slice(calls);
    let mut cmd = node.pods[0].app(&node.pod_hosts_file(), python.to_str().unwrap(), &argv);
    cmd.env("AWS_ACCESS_KEY_ID", key)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env("AWS_CA_BUNDLE", node.node_ca_cert())
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true");
    run_app(node, cmd)
}
