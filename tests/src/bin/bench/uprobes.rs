//! `uprobes`: what TLS uprobes cost the workload. The same client (Python's
//! ssl over the system's OpenSSL, N calls on one kept-alive connection,
//! relayed by an observe rule) runs with `tls_uprobes` on and off, in
//! interleaved rounds, each with its own agent; the client measures its own
//! CPU time per call. The difference is what the probes, the `sk_msg` hook
//! and the copies to the ring buffer add to the client.
use serde_json::{Value, json};
use tollgate_tests::{TestNode, clients_dir, e2e_dir, yaml::merge_yaml};

fn config(node: &TestNode, on: bool) -> String {
    merge_yaml(
        &format!(
            "policy:\n  rules:\n    - name: bench-observe\n      match: {{pod_uids: [\"{}\"]}}\n      action: observe\n",
            node.pods[0].uid
        ),
        &format!("tls_uprobes: {{enabled: {on}}}\n"),
    )
}

/// One round: a fresh agent (probes on or off), one client run.
fn round(node: &mut TestNode, on: bool, calls: usize) -> Value {
    if node.agent.is_some() {
        node.kill_agent();
    }
    node.start_agent(&config(node, on));
    let python = e2e_dir().join("venv/bin/python");
    let script = clients_dir().join("bench_tls_client.py");
    let mut cmd = node.pods[0].app(
        &node.pod_hosts_file(),
        python.to_str().unwrap(),
        &[script.to_str().unwrap(), &calls.to_string()],
    );
    cmd.env("SSL_CERT_FILE", node.dir.join("upstream-ca.crt"));
    let out = cmd.output().expect("run the bench client");
    if !out.status.success() {
        return json!({"failed": String::from_utf8_lossy(&out.stderr).trim().to_string()});
    }
    serde_json::from_slice(out.stdout.trim_ascii()).unwrap_or_else(|_| json!({"failed": "no JSON"}))
}

fn stats(xs: &mut [f64]) -> Value {
    xs.sort_by(f64::total_cmp);
    match xs {
        [] => json!(null),
        _ => json!({"median": xs[xs.len() / 2], "min": xs[0], "max": xs[xs.len() - 1]}),
    }
}

pub fn run(quick: bool) -> Value {
    let (rounds, calls) = if quick { (2, 200) } else { (5, 1000) };
    let mut node = TestNode::new(1);
    let mut off = Vec::new();
    let mut on = Vec::new();
    let mut added = Vec::new();
    let mut failures = Vec::new();
    for _ in 0..rounds {
        let a = round(&mut node, false, calls);
        let b = round(&mut node, true, calls);
        match (a["cpu_us_per_call"].as_f64(), b["cpu_us_per_call"].as_f64()) {
            (Some(x), Some(y)) => {
                off.push(x);
                on.push(y);
                added.push(y - x);
            }
            _ => failures.push(json!({"off": a, "on": b})),
        }
    }
    // The records prove the probes were on: one per call of the "on" rounds.
    let read = node
        .request_records()
        .iter()
        .filter(|r| r["observed_via"] == "tls_uprobe")
        .count();
    let (off, on, added) = (stats(&mut off), stats(&mut on), stats(&mut added));
    println!(
        "\nTLS uprobes: the client's own CPU per call (Python ssl / OpenSSL, {calls} calls on one connection, relayed; {rounds} interleaved rounds, {} mode)\n",
        if quick { "quick" } else { "full" }
    );
    let cell = |v: &Value| match v["median"].as_f64() {
        Some(m) => format!(
            "{m:>8.1}µs  [{:.1}–{:.1}]",
            v["min"].as_f64().unwrap_or(0.0),
            v["max"].as_f64().unwrap_or(0.0)
        ),
        None => "      n/a".into(),
    };
    println!("{:<44} {}", "uprobes off (relayed, not read)", cell(&off));
    println!(
        "{:<44} {}",
        "uprobes on (relayed, read at libssl)",
        cell(&on)
    );
    println!(
        "{:<44} {}",
        "added by the probes (paired rounds)",
        cell(&added)
    );
    println!("\n[min–max] over rounds; records read from the probed rounds' calls: {read}");
    for f in &failures {
        println!("failed round: {f}");
    }
    json!({"calls_per_round": calls, "rounds": rounds, "cpu_us_per_call_off": off,
        "cpu_us_per_call_on": on, "added_us": added, "records_read": read, "failures": failures})
}
