//! A bounded soak: steady mixed load (streamed and not) from a pod for
//! `TOLLGATE_SOAK_SECS` seconds (30 in `cargo xtask test`, 600 in `cargo
//! xtask soak`) while the policy and the injected key are rewritten (an
//! invalid policy among them), then: every call the client saw succeed has exactly one
//! audit record, the tokens in the audit log sum to what the mock served,
//! no error the mock did not inject, and the agent's descriptors and memory
//! came back within a bound.
use std::{path::PathBuf, time::Duration};

use tollgate_tests::{
    TestNode,
    mock_llm::OPENAI_USAGE,
    node::{PROVIDER_HOST, TLS_PORT},
    process::{fd_count, status_field, wait_until},
    require_privileged,
};

#[test]
fn soak_loses_no_record_and_no_token() {
    if !require_privileged("soak_loses_no_record_and_no_token") {
        return;
    }
    let secs: u64 = std::env::var("TOLLGATE_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let rate = 40; // calls per second
    let mut node = TestNode::new(1);
    // The injected key and the policy are rewritten under load (as a
    // Secret and a ConfigMap update would: write, then rename), including
    // an invalid policy that must be rejected while calls go on.
    let key = node.dir.join("soak-key");
    std::fs::write(&key, "sk-soak-0\n").unwrap();
    let policy = |variant: u32| {
        format!(
            "policy:\n  rules:\n    - {{name: v{variant}, providers: [openai], action: allow, credential_file: {}}}\n",
            key.display()
        )
    };
    node.start_agent(&policy(0));
    let pid = node.agent.as_ref().unwrap().pid();
    let (fds_before, rss_before) = (fd_count(pid), status_field(pid, "VmRSS:"));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (stop, key) = (stop.clone(), key.clone());
        let configs: Vec<String> = (0..3)
            .map(|v| {
                if v == 2 {
                    node.agent_config("policy: {rules: [{name: broken, action: maybe}]}")
                } else {
                    node.agent_config(&policy(v))
                }
            })
            .collect();
        let cfg_path = node.dir.join("agent.yaml");
        std::thread::spawn(move || {
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let tmp = key.with_extension("tmp");
                std::fs::write(&tmp, format!("sk-soak-{i}\n")).unwrap();
                std::fs::rename(&tmp, &key).unwrap();
                let tmp = cfg_path.with_extension("tmp");
                std::fs::write(&tmp, &configs[(i % 3) as usize]).unwrap();
                std::fs::rename(&tmp, &cfg_path).unwrap();
                std::thread::sleep(Duration::from_millis(700));
            }
            i
        })
    };
    // Memory once warmed up (pools, caches, the allocator's arenas filled):
    // growth from there on is what would grow without bound.
    let warm_up = Duration::from_secs((secs / 5).clamp(1, 60));
    let rss_warm = std::thread::spawn(move || {
        std::thread::sleep(warm_up);
        status_field(pid, "VmRSS:")
    });
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("clients/soak_client.py");
    let out = node.pods[0]
        .app(
            &node.pod_hosts_file(),
            "python3",
            &[
                script.to_str().unwrap(),
                node.node_ca_cert().to_str().unwrap(),
                PROVIDER_HOST,
                &TLS_PORT.to_string(),
                &rate.to_string(),
                &secs.to_string(),
            ],
        )
        .output()
        .expect("run the soak client");
    let stats: serde_json::Value = serde_json::from_slice(out.stdout.trim_ascii())
        .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rewrites = churn.join().unwrap();
    eprintln!("soak {secs} s at {rate}/s, {rewrites} key and config rewrites: {stats}");
    assert_eq!(
        stats["errors"], 0,
        "no error the mock did not inject: {stats}"
    );
    let ok = stats["ok"].as_u64().unwrap();
    assert!(
        ok as f64 >= 0.9 * (rate * secs) as f64,
        "the rate was held: {stats}"
    );

    // Every call has its record, with the tokens the mock served.
    let recs = node.wait_requests_within(ok as usize, Duration::from_secs(10));
    assert_eq!(recs.len() as u64, ok, "exactly one record per call");
    let sum = |k: &str| -> u64 { recs.iter().map(|r| r["usage"][k].as_u64().unwrap()).sum() };
    assert_eq!(sum("input_tokens"), ok * OPENAI_USAGE.input);
    assert_eq!(sum("output_tokens"), ok * OPENAI_USAGE.output);
    assert!(recs.iter().all(|r| r["result"] == "ok"));
    assert!(
        recs.iter().all(|r| r["credential_injected"] == true),
        "every call carried an injected key, across key rewrites"
    );
    // What the provider itself received: one of the rotated keys on every
    // call — never the workload's own — and the rotation did reach it.
    let got = node.provider_requests();
    assert!(
        got.len() as u64 >= ok,
        "{} provider requests for {ok} calls",
        got.len()
    );
    let keys: std::collections::HashSet<&str> = got
        .iter()
        .map(|r| r["credential"].as_str().unwrap_or_default())
        .collect();
    assert!(
        keys.iter().all(|k| k.starts_with("Bearer sk-soak-")),
        "a call reached the provider without the injected key: {keys:?}"
    );
    if rewrites >= 3 {
        assert!(keys.len() >= 2, "the rotated key never arrived: {keys:?}");
    }
    let m = node.metrics();
    assert!(
        m.contains("tollgate_config_reloads_total{result=\"rejected\"}"),
        "the invalid policy was seen and rejected: {m}"
    );
    assert_eq!(
        recs.iter().filter(|r| r["stream"] == true).count() as u64,
        stats["streamed"].as_u64().unwrap()
    );
    assert!(
        node.metrics()
            .contains("tollgate_audit_records_dropped_total 0"),
        "no record dropped"
    );

    // Descriptors come back once the client's connections are gone; memory
    // stays within a generous bound (allocator caches make it noisy).
    let settled = wait_until(Duration::from_secs(10), || {
        (fd_count(pid) <= fds_before + 8).then_some(())
    });
    assert!(
        settled.is_some(),
        "descriptors: {fds_before} before, {} after",
        fd_count(pid)
    );
    let rss_after = status_field(pid, "VmRSS:");
    let rss_warm = rss_warm.join().unwrap();
    let journal = std::fs::metadata(node.dir.join("state/calls.journal")).map_or(0, |m| m.len());
    eprintln!(
        "agent RSS {rss_before} KiB at start, {rss_warm} KiB after {warm_up:?} of load, {rss_after} KiB at the end: {:+.1} % after warm-up; call journal {journal} bytes at the end",
        (rss_after as f64 - rss_warm as f64) * 100.0 / rss_warm.max(1) as f64
    );
    assert!(
        rss_after < rss_before + 64 * 1024,
        "memory grew by {} KiB",
        rss_after.saturating_sub(rss_before)
    );
}
