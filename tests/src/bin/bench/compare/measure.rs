//! Running one scenario against one system: the load (the project's Rust
//! client, or wrk for closed-loop saturation), and what it cost the system —
//! CPU time and peak RSS of its whole process tree (nginx's and LiteLLM's
//! workers included), sampled while the load runs.
use std::{
    collections::{BTreeMap, HashMap},
    fs,
    io::{BufRead, BufReader},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};
use tollgate_tests::{TestNode, mock_llm::BENCH_CHAT, node::PROVIDER_HOST};

use super::peers::System;
use crate::sibling;

/// `root` and every process below it.
pub fn tree(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1)?.parse::<u32>().ok()) {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        out.extend(children.get(&out[i]).into_iter().flatten());
        i += 1;
    }
    out
}

/// /proc/<pid>/stat fields after `(comm)`: [0] state, [1] ppid, …
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(String::from).collect())
}

/// User + system CPU of the tree so far, in µs (clock-tick resolution).
pub fn cpu_us(root: u32) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    tree(root)
        .into_iter()
        .filter_map(|p| {
            let f = stat_fields(p)?;
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum::<u64>()
        * 1_000_000
        / hz
}

/// The scheduler's accounting so far of `pids`' threads (the tree listed
/// once, as the RSS sampler does), per thread name: (CPU ns, times put on a
/// CPU). From /proc/<pid>/task/<tid>/schedstat,
/// nanosecond-exact where the tick-based `cpu_us` rounds to 10 ms; a
/// thread's runs count each wake-up (and each preemption), so runs per call
/// say how often a call puts the system to sleep and back. Threads that
/// exit mid-run take theirs along.
pub fn sched(pids: &[u32]) -> BTreeMap<String, (u64, u64)> {
    let mut by_name: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for p in pids {
        for t in fs::read_dir(format!("/proc/{p}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let (Ok(s), Ok(comm)) = (
                fs::read_to_string(t.path().join("schedstat")),
                fs::read_to_string(t.path().join("comm")),
            ) else {
                continue;
            };
            let f: Vec<u64> = s
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            if let [ns, _waited, runs] = f[..] {
                let e = by_name.entry(comm.trim().to_string()).or_default();
                *e = (e.0 + ns, e.1 + runs);
            }
        }
    }
    by_name
}

/// Resident memory of the tree, KiB.
pub fn rss_kib(root: u32) -> u64 {
    rss_of(&tree(root))
}

fn rss_of(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|&p| tollgate_tests::process::status_field(p, "VmRSS:"))
        .sum()
}

/// Samples the tree's RSS every 25 ms until stopped; keeps the peak. The
/// tree is listed once (a scan of /proc every 25 ms would itself load the
/// CPUs being measured); the systems measured fork no workers mid-run.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
    cpu_before: u64,
    sched_before: BTreeMap<String, (u64, u64)>,
    pids: Vec<u32>,
    root: u32,
}

/// What a measured run used of the machine.
pub struct Used {
    /// User + system CPU, µs (clock ticks).
    pub cpu_us: u64,
    /// The same from the scheduler per thread name: ns, and how many times
    /// the threads ran.
    pub sched: BTreeMap<String, (u64, u64)>,
    /// Peak resident memory, KiB.
    pub peak_kib: u64,
}

impl Sampler {
    pub fn start(root: u32) -> Self {
        let (stop, peak) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (s, p) = (stop.clone(), peak.clone());
        let pids = tree(root);
        let sampled = pids.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_of(&sampled), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(25));
            }
        });
        Self {
            stop,
            peak,
            thread: Some(thread),
            cpu_before: cpu_us(root),
            sched_before: sched(&pids),
            pids,
            root,
        }
    }

    /// What the tree used since start.
    pub fn finish(mut self) -> Used {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let peak = self.peak.load(Ordering::Relaxed).max(rss_kib(self.root));
        let mut used = sched(&self.pids);
        for (name, (ns, runs)) in used.iter_mut() {
            let before = self.sched_before.get(name).copied().unwrap_or_default();
            *ns = ns.saturating_sub(before.0);
            *runs = runs.saturating_sub(before.1);
        }
        used.retain(|_, (_, runs)| *runs > 0);
        Used {
            cpu_us: cpu_us(self.root).saturating_sub(self.cpu_before),
            sched: used,
            peak_kib: peak,
        }
    }
}

/// The project's HTTPS client (`tollgate-bench-http`) in `mode`, aimed at
/// `sys` from the system's client cgroup of the pod.
fn http_client(node: &TestNode, sys: &System, mode: &[&str]) -> std::process::Command {
    let bin = sibling("tollgate-bench-http");
    let mut c = node.pods[0]
        .netns
        .command_in_cgroup(bin.to_str().unwrap(), Some(&sys.cgroup));
    c.arg(&sys.addr).arg(PROVIDER_HOST).arg(&sys.ca).args(mode);
    c
}

/// Run the client against `sys`; its JSON (or why it failed).
pub fn client(node: &TestNode, sys: &System, mode: &[&str]) -> Value {
    let out = http_client(node, sys, mode)
        .output()
        .expect("run tollgate-bench-http");
    if !out.status.success() {
        return json!({"failed": String::from_utf8_lossy(&out.stderr).trim().to_string()});
    }
    serde_json::from_slice(&out.stdout).expect("bench client JSON")
}

/// wrk's Lua hooks: POST the benchmark chat call, then print one JSON line.
const WRK_SCRIPT: &str = r#"
wrk.method = "POST"
wrk.body = [==[BODY]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"socket_errors":%d,"status_errors":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"#;

/// Closed loop to saturation with wrk (Debian): `conns` connections on one
/// thread for `secs`. wrk does not verify certificates; it sends the
/// provider's name as SNI, which the system's /etc/hosts maps to its address.
pub fn wrk(node: &TestNode, sys: &System, conns: u32, secs: u32) -> Value {
    let script = node.dir.join("bench-wrk.lua");
    fs::write(&script, WRK_SCRIPT.replace("BODY", BENCH_CHAT)).unwrap();
    let (ip, port) = sys.addr.rsplit_once(':').expect("ADDR:PORT");
    let hosts = node.dir.join(format!("bench-hosts-{}", sys.name));
    fs::write(
        &hosts,
        format!("127.0.0.1 localhost\n{ip} {PROVIDER_HOST}\n"),
    )
    .unwrap();
    let url = format!("https://{PROVIDER_HOST}:{port}/v1/chat/completions");
    let out = node.pods[0]
        .app_in(
            &sys.cgroup,
            &hosts,
            "wrk",
            &[
                "-t1",
                &format!("-c{conns}"),
                &format!("-d{secs}s"),
                "--timeout",
                "10s",
                "-s",
                script.to_str().unwrap(),
                &url,
            ],
        )
        .stdin(Stdio::null())
        .output()
        .expect("run wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(line) = text.lines().find_map(|l| l.strip_prefix("WRK_JSON ")) else {
        return json!({"failed": format!("wrk: {} {}", text.trim(), String::from_utf8_lossy(&out.stderr).trim())});
    };
    let w: Value = serde_json::from_str(line).expect("wrk JSON");
    let n = |k: &str| w[k].as_u64().unwrap_or(0);
    let errors = n("socket_errors") + n("status_errors");
    let ok = n("requests").saturating_sub(n("status_errors"));
    json!({
        "count": ok, "errors": errors,
        "rps": ok as f64 / (n("duration_us").max(1) as f64 / 1e6),
        "p50_ns": n("p50_us") * 1000, "p90_ns": n("p90_us") * 1000,
        "p99_ns": n("p99_us") * 1000, "max_ns": n("max_us") * 1000,
    })
}

/// `conns` idle kept-alive connections through `sys`: (held, RSS KiB added
/// per connection to the system's tree).
pub fn idle(node: &TestNode, sys: &System, conns: usize) -> Value {
    let before = rss_kib(sys.pid);
    let mut child = http_client(node, sys, &["hold", &conns.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run tollgate-bench-http hold");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).expect("held line");
    let held: u64 = line
        .trim()
        .strip_prefix("held ")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    // Let lazily freed buffers settle, as they would between calls.
    std::thread::sleep(Duration::from_millis(500));
    let during = rss_kib(sys.pid);
    drop(child.stdin.take());
    let _ = child.wait();
    json!({
        "count": held, "errors": conns as u64 - held.min(conns as u64),
        "rss_before_kib": before, "rss_held_kib": during,
        "kib_per_conn": during.saturating_sub(before) as f64 / held.max(1) as f64,
    })
}

/// With TOLLGATE_BENCH_PROFILE=1 (or a list of systems, `tollgate,nginx`):
/// `perf record` (software clock, so it also works where the VM exposes no
/// hardware counters) on the agent (or each system named) during its first
/// round of a scenario; the report (self, then inclusive time per symbol)
/// goes to target/bench/profile-<scenario>[-<system>].txt.
pub struct Profile {
    perf: std::process::Child,
    data: std::path::PathBuf,
    report: std::path::PathBuf,
}

impl Profile {
    /// Whether `system` is to be profiled.
    pub fn wanted(system: &str) -> bool {
        std::env::var("TOLLGATE_BENCH_PROFILE").is_ok_and(|v| match v.trim() {
            "1" => system == "tollgate",
            list => list.split(',').any(|s| s.trim() == system),
        })
    }

    pub fn start(pid: u32, system: &str, scenario: &str) -> Option<Self> {
        if !Self::wanted(system) {
            return None;
        }
        let dir = super::peers_dir();
        // Tollgate's keeps the name it always had.
        let name = match system {
            "tollgate" => format!("profile-{scenario}"),
            other => format!("profile-{scenario}-{other}"),
        };
        let data = dir.join(format!("{name}.perf.data"));
        let perf = std::process::Command::new("perf")
            .args([
                "record",
                "-e",
                "cpu-clock",
                "-F",
                "4999",
                "--call-graph",
                "dwarf,16384",
                "-o",
            ])
            .arg(&data)
            // The whole process tree: nginx's work is in its worker processes.
            .args([
                "-p",
                &tree(pid)
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                eprintln!("TOLLGATE_BENCH_PROFILE: cannot run perf ({e}); install linux-perf")
            })
            .ok()?;
        std::thread::sleep(Duration::from_millis(300));
        Some(Self {
            perf,
            data,
            report: dir.join(format!("{name}.txt")),
        })
    }

    /// Stop recording; write the report; its path, or why there is none.
    pub fn finish(mut self) -> String {
        interrupt(&mut self.perf);
        // Self time per symbol, then inclusive time (callers included): the
        // second shows which stage of a call the time goes to.
        let report = |extra: &str| {
            std::process::Command::new("perf")
                .args([
                    "report",
                    "--stdio",
                    "--sort",
                    "dso,symbol",
                    "--percent-limit",
                    "1",
                ])
                .args(["-g", "none", extra, "-i"])
                .arg(&self.data)
                .output()
        };
        match (report("--no-children"), report("--children")) {
            (Ok(flat), Ok(inclusive)) => {
                match fs::write(&self.report, [flat.stdout, inclusive.stdout].concat()) {
                    Ok(()) => self.report.display().to_string(),
                    Err(e) => format!("cannot write {}: {e}", self.report.display()),
                }
            }
            (Err(e), _) | (_, Err(e)) => format!("perf report failed: {e}"),
        }
    }
}

/// With TOLLGATE_BENCH_SYSCALLS=1: `strace -c` on a system's whole process
/// tree during one extra round of a scenario (strace slows what it traces,
/// so that round's figures are not used): system calls per call, and the
/// most frequent ones.
pub struct Syscalls {
    strace: std::process::Child,
    out: std::path::PathBuf,
}

impl Syscalls {
    pub fn wanted() -> bool {
        std::env::var_os("TOLLGATE_BENCH_SYSCALLS").is_some()
    }

    pub fn start(root: u32, name: &str, scenario: &str) -> Option<Self> {
        let out = super::peers_dir().join(format!("syscalls-{scenario}-{name}.txt"));
        let mut c = std::process::Command::new("strace");
        c.args(["-f", "-c", "-q", "-o"]).arg(&out);
        for pid in tree(root) {
            c.args(["-p", &pid.to_string()]);
        }
        let strace = c
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                eprintln!("TOLLGATE_BENCH_SYSCALLS: cannot run strace ({e}); install strace")
            })
            .ok()?;
        std::thread::sleep(Duration::from_millis(500)); // attached to every thread
        Some(Self { strace, out })
    }

    /// Stop tracing; (system calls in all, the five most frequent with their counts).
    pub fn finish(mut self) -> Option<(u64, Vec<(String, u64)>)> {
        interrupt(&mut self.strace);
        parse_strace_summary(&fs::read_to_string(&self.out).ok()?)
    }
}

/// Stops a recorder (perf, strace) the way it writes its output: SIGINT, then wait.
pub fn interrupt(child: &mut std::process::Child) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let _ = child.wait();
}

/// `strace -c`'s table: `% time seconds usecs/call calls [errors] syscall`
/// rows, then a `total` row.
fn parse_strace_summary(text: &str) -> Option<(u64, Vec<(String, u64)>)> {
    let mut rows = Vec::new();
    let mut total = None;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 5 || f[0].parse::<f64>().is_err() {
            continue;
        }
        let calls = f[3].parse::<u64>().ok()?;
        let name = f[f.len() - 1];
        if name == "total" {
            total = Some(calls);
        } else {
            rows.push((name.to_string(), calls));
        }
    }
    rows.sort_by_key(|r| std::cmp::Reverse(r.1));
    rows.truncate(5);
    Some((total?, rows))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_strace_summary_is_read() {
        let text = "% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 45.10    0.120000          30      4000           writev
 30.00    0.080000          20      4000      1000 read
 24.90    0.066000          33      2000           epoll_wait
------ ----------- ----------- --------- --------- ----------------
100.00    0.266000          26     10000      1000 total
";
        let (total, top) = super::parse_strace_summary(text).unwrap();
        assert_eq!(total, 10000);
        assert_eq!(top[0], ("writev".to_string(), 4000));
        assert_eq!(top.len(), 3);
        assert!(super::parse_strace_summary("no table").is_none());
    }
}
