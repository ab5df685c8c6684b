//! What the terminating proxy adds to an LLM call. One HTTPS client
//! (`tollgate-bench-http`) in the pod's network namespace calls the mock
//! provider's address twice over:
//! * direct — from a cgroup outside the governed subtree: pod → provider;
//! * proxied — from the pod's governed cgroup: redirected to Tollgate, which
//!   terminates TLS, parses the call, forwards it over its pooled h2
//!   connection and meters the response.
//!
//! Rounds alternate direct and proxied so drift hits both alike. Memory: the
//! agent's RSS idle, and per idle kept-alive workload connection, beside the
//! mock provider (a bare hyper + rustls server) holding the same connections.
use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::Stdio,
    time::Duration,
};

use serde_json::Value;
use tollgate_tests::{
    TestNode,
    node::{PROVIDER_HOST, TLS_PORT, UPSTREAM_V4},
};

use crate::{median, sibling, us};

/// Both paths of one measurement.
struct Paths<'a> {
    node: &'a TestNode,
    ungoverned: &'a Path,
}

impl Paths<'_> {
    /// Run the client with `mode` on one path; returns its JSON.
    fn client(&self, proxied: bool, mode: &[&str]) -> Value {
        let out = self
            .command(proxied, mode)
            .output()
            .expect("run tollgate-bench-http");
        assert!(
            out.status.success(),
            "bench client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("bench client JSON")
    }

    fn command(&self, proxied: bool, mode: &[&str]) -> std::process::Command {
        let (cgroup, ca) = if proxied {
            (self.node.pods[0].cgroup.clone(), self.node.node_ca_cert())
        } else {
            (
                self.ungoverned.to_path_buf(),
                self.node.dir.join("upstream-ca.crt"),
            )
        };
        let bin = sibling("tollgate-bench-http");
        let mut c = self.node.pods[0]
            .netns
            .command_in_cgroup(bin.to_str().unwrap(), Some(&cgroup));
        c.arg(format!("{UPSTREAM_V4}:{TLS_PORT}"))
            .arg(PROVIDER_HOST)
            .arg(ca)
            .args(mode);
        c
    }

    /// Alternating rounds; the per-field median of each path, with
    /// `cpu_us_per_call`: CPU time the serving process (mock when direct,
    /// agent when proxied) spent per answered call.
    fn rounds(&self, n: usize, mode: &[&str]) -> (Value, Value) {
        let agent = self.node.agent.as_ref().expect("agent running").pid();
        let mock = self.node.mock.pid();
        let (mut direct, mut proxied) = (Vec::new(), Vec::new());
        let (mut cpu, mut calls) = ([0u64; 2], [0u64; 2]);
        for _ in 0..n {
            for (i, (proxied_path, pid)) in [(false, mock), (true, agent)].into_iter().enumerate() {
                let before = cpu_us(pid);
                let r = self.client(proxied_path, mode);
                cpu[i] += cpu_us(pid).saturating_sub(before);
                calls[i] += r["count"].as_u64().unwrap_or(0);
                if proxied_path {
                    proxied.push(r)
                } else {
                    direct.push(r)
                }
            }
        }
        let (mut d, mut t) = (median(&direct), median(&proxied));
        d["cpu_us_per_call"] = (cpu[0] as f64 / calls[0].max(1) as f64).into();
        t["cpu_us_per_call"] = (cpu[1] as f64 / calls[1].max(1) as f64).into();
        (d, t)
    }
}

pub fn run(node: &TestNode, ungoverned: &Path, quick: bool) {
    let p = Paths { node, ungoverned };
    let (secs, streams, conns) = if quick {
        ("1", "10", 200)
    } else {
        ("4", "60", 1000)
    };
    // Memory first, while both processes are fresh: after load, freed heap
    // is reused and RSS deltas would understate per-connection cost.
    let memory = memory(&p, conns);
    // Warm both paths (TLS sessions, pools, page cache).
    p.client(false, &["rate", "100", "1", "keepalive"]);
    p.client(true, &["rate", "100", "1", "keepalive"]);

    let rows = [
        (
            "chat JSON, keep-alive, 1000 req/s",
            p.rounds(3, &["rate", "1000", secs, "keepalive"]),
            "p50 ≤ 0.3 ms, p99 ≤ 1 ms added",
        ),
        (
            "chat JSON, new TLS connection each, 200 req/s",
            p.rounds(3, &["rate", "200", secs, "fresh"]),
            "(handshake with the node CA leaf)",
        ),
        (
            "streamed chunk, send → arrival",
            p.rounds(3, &["stream", streams]),
            "≤ 50 µs p50 added per chunk",
        ),
    ];
    println!(
        "\nLLM call latency, direct to the provider vs through Tollgate (median of 3 alternating rounds, {} mode)\n",
        if quick { "quick" } else { "full" }
    );
    println!(
        "{:<46} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  target",
        "scenario", "calls", "p50 dir", "p50 tg", "added", "p99 dir", "p99 tg", "added"
    );
    for (name, (d, t), target) in &rows {
        let added = |k: &str| {
            (t[k].as_u64().unwrap_or(0) as f64 - d[k].as_u64().unwrap_or(0) as f64) / 1000.0
        };
        let errors = d["errors"].as_u64().unwrap_or(0) + t["errors"].as_u64().unwrap_or(0);
        println!(
            "{:<46} {:>7} {:>7.0}µs {:>7.0}µs {:>7.0}µs {:>7.0}µs {:>7.0}µs {:>7.0}µs  {target}{}",
            name,
            t["count"],
            us(&d["p50_ns"]),
            us(&t["p50_ns"]),
            added("p50_ns"),
            us(&d["p99_ns"]),
            us(&t["p99_ns"]),
            added("p99_ns"),
            if errors > 0 {
                format!("  ({errors} errors)")
            } else {
                String::new()
            }
        );
    }
    let (d, t) = &rows[0].1;
    println!(
        "\nCPU per keep-alive call: Tollgate {:.0} µs (TLS in and out, HTTP both ways, parsing, audit, metrics); the mock provider serving it directly {:.0} µs.",
        t["cpu_us_per_call"].as_f64().unwrap_or(0.0),
        d["cpu_us_per_call"].as_f64().unwrap_or(0.0)
    );
    println!(
        "fixed-rate rows are open loop (requests go out on schedule, not after earlier answers); client, agent and mock share {} CPUs.",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    print!("{memory}");
}

/// RSS idle and per held connection, Tollgate beside the mock provider:
/// the table to print.
fn memory(p: &Paths, conns: usize) -> String {
    let agent = p.node.agent.as_ref().expect("agent running").pid();
    let mock = p.node.mock.pid();
    let agent_idle = rss_kib(agent);
    let mock_idle = rss_kib(mock);
    let per_conn = |proxied: bool, pid: u32| -> (f64, usize) {
        let before = rss_kib(pid);
        let mut child = p
            .command(proxied, &["hold", &conns.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run tollgate-bench-http hold");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).expect("held line");
        let held: usize = line
            .trim()
            .strip_prefix("held ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("bench client said `{line}`"));
        std::thread::sleep(Duration::from_millis(300));
        let during = rss_kib(pid);
        let _ = child.stdin.take().unwrap().write_all(b"");
        let _ = child.wait();
        (
            during.saturating_sub(before) as f64 / held.max(1) as f64,
            held,
        )
    };
    let (direct, held_d) = per_conn(false, mock);
    let (proxied, held_t) = per_conn(true, agent);
    let mut t = String::from("\nMemory (RSS)\n\n");
    t += &format!(
        "{:<58} {:>12} {:>12}  target",
        "", "Tollgate", "mock (ref.)"
    );
    t.push('\n');
    t += &format!(
        "{:<58} {:>9.1}MiB {:>9.1}MiB  ≤ 60 MiB",
        "idle",
        agent_idle as f64 / 1024.0,
        mock_idle as f64 / 1024.0
    );
    t.push('\n');
    t += &format!(
        "{:<58} {:>9.1}KiB {:>9.1}KiB  ≤ 20 KiB",
        format!("per idle kept-alive TLS connection ({held_t} / {held_d} held)"),
        proxied,
        direct
    );
    t.push('\n');
    t += &format!(
        "\nthe mock column is the same client's connections held by a bare hyper + rustls server: the cost of TLS + HTTP state alone."
    );
    t.push('\n');
    t
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU time of a process so far, in µs (clock-tick resolution).
fn cpu_us(pid: u32) -> u64 {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the `(comm)`, which may contain spaces.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ticks * 1_000_000 / hz
}
