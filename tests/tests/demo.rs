//! `cargo xtask demo` shows the product: its table, per workload, is what
//! the apps did (the apps' own reports are printed beside it) and what the
//! agent recorded. Run as the demo runs, and read as a newcomer reads it.
use std::process::Command;

use tollgate_tests::{node::demo_bin, require_privileged};

#[test]
fn the_demo_shows_tokens_cost_and_decisions_per_workload() {
    if !require_privileged("the_demo_shows_tokens_cost_and_decisions_per_workload") {
        return;
    }
    let out = Command::new(demo_bin())
        .output()
        .expect("run tollgate-demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = |workload: &str| -> Vec<String> {
        text.lines()
            .find(|l| l.starts_with(workload))
            .unwrap_or_else(|| panic!("no row for {workload}:\n{text}"))
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    // namespace/workload calls models input output cost decisions…
    let chat = row("team-a/Deployment/chat");
    assert_eq!(chat[1..5], ["3", "gpt-4o-mini", "69", "21"], "{text}");
    assert!(chat[5].parse::<f64>().unwrap() > 0.0, "{text}");
    assert_eq!(chat[6..].join(" "), "allowed ×3", "{text}");
    // The SDK's retry after Tollgate's 429 succeeded: every answer arrived.
    let limited = row("team-b/Deployment/summarizer");
    let joined = limited.join(" ");
    assert!(joined.contains("allowed ×12"), "{text}");
    assert!(joined.contains("rate_limited ×"), "{text}");
    assert!(joined.contains("told to retry after"), "{text}");
    assert!(text.contains("the app saw: 12 answers"), "{text}");
    let denied = row("research/Deployment/eval");
    assert_eq!(denied[1..3], ["2", "gpt-4o"], "{text}");
    assert!(denied.join(" ").ends_with("denied ×2"), "{text}");
    assert!(
        text.contains(
            "PermissionDeniedError (403): Error code: 403 - tollgate: research uses gpt-4o-mini"
        ),
        "{text}"
    );
    let observed = row("legacy/Deployment/reports").join(" ");
    assert!(
        observed.contains("connection relayed, observed (ca_rejected)"),
        "{text}"
    );
    assert!(text.contains("the app saw: 2 answers"), "{text}");
    // Nothing claims a route it did not take.
    assert!(
        !text.contains("(direct)") && !text.contains(" ? "),
        "{text}"
    );
    assert!(text.contains("Removing the node"), "{text}");
}
