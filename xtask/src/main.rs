//! `cargo xtask`: the project's tasks, one command each.
//!
//! * `setup` — install every prerequisite, idempotently (apt packages, the
//!   nightly `rust-src` component, bpf-linker built against LLVM 22).
//! * `test`  — setup, build, then every test (unit, real-kernel, end-to-end).
//! * `demo`  — setup, build, then a miniature node whose four SDK apps the agent governs.
//! * `image` — the agent's container image (buildah, deploy/image/Containerfile).
//! * `bench` — setup, build (release), then the benchmarks, baseline beside each number.
mod setup;

use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Tollgate project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install prerequisites (needs root for apt): LLVM 22, bpf-linker, rust-src, dnsmasq, iproute2, curl.
    Setup,
    /// Setup, build, and run every test. Real-kernel tests need root; with
    /// TOLLGATE_REQUIRE_PRIVILEGED=1 they fail instead of skipping.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run the demo: four pods' SDK apps under a demo policy; per workload: calls, tokens, cost, decisions.
    Demo,
    /// Fuzz the parsers of untrusted input (libFuzzer through cargo fuzz, on
    /// nightly): ClientHello, SSE, provider requests and responses, DNS
    /// answers, config/policy. A crash fails the run and leaves its input in
    /// fuzz/artifacts/<target>/ (turn it into a regression test).
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets (default: all).
        targets: Vec<String>,
    },
    /// A long soak: steady mixed load through the agent, then checks that no
    /// record or token was lost and descriptors/memory came back (the same
    /// test `cargo xtask test` runs for 30 s).
    Soak {
        /// Seconds of load.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
    },
    /// Build the agent's container image from deploy/image/Containerfile
    /// with buildah (FROM scratch: the release binary, the libraries it
    /// links, the CA bundle; nothing is pulled). Push it with
    /// `buildah push <tag> docker://<registry>/tollgate:<version>`.
    Image {
        /// Image name and tag.
        #[arg(long, default_value = concat!("localhost/tollgate:", env!("CARGO_PKG_VERSION")))]
        tag: String,
    },
    /// Render the Helm chart (deploy/helm/tollgate) with its default values
    /// into deploy/manifests/tollgate.yaml, the plain manifests.
    Manifests,
    /// Run the benchmarks and print each number beside its baseline.
    #[command(after_help = "Environment:\n  \
        TOLLGATE_BENCH_SYSTEMS=tollgate,nginx     compare only these (direct is always measured)\n  \
        TOLLGATE_BENCH_SCENARIOS=rate_200,…       only these: rate_200 rate_1000 saturation fresh_tls streaming idle\n  \
        TOLLGATE_BENCH_CHUNK_MS=10                pause between streamed chunks\n  \
        TOLLGATE_BENCH_AGENT_CONFIG='proxy: {worker_threads: 1}'   YAML merged into the agent's config\n  \
        TOLLGATE_BENCH_PROFILE=1                  perf profile of the agent per scenario (target/bench/profile-*.txt); =tollgate,nginx,floor: of each system named\n  \
        TOLLGATE_BENCH_SYSCALLS=1                 an extra round per scenario under strace -c: system calls per call\n  \
        TOLLGATE_BENCH_ALLOCS=1                   an extra round per scenario with uprobes on the allocator (perf probe): heap allocations per call\n\n\
        Needs root. Load stays on loopback and the test node's own addresses.")]
    Bench {
        /// Fewer iterations (for a quick look; numbers are noisier).
        #[arg(long)]
        quick: bool,
        /// Which benchmarks: `connect` (kernel programs), `compare` (an LLM
        /// call direct, through Tollgate, nginx, LiteLLM and mitmproxy:
        /// latency, throughput, CPU, memory; installs the peers on first
        /// use), `policy` (decision cost), `uprobes` (what TLS uprobes add
        /// to a workload's CPU per call). Default: all. Results also go to
        /// target/bench/results.json.
        which: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::run(),
        Cmd::Test { args } => test(&args),
        Cmd::Demo => demo(),
        Cmd::Image { tag } => image(&tag),
        Cmd::Manifests => manifests(),
        Cmd::Soak { seconds } => {
            setup::run()?;
            build_bins(false)?;
            run(cargo()
                .args([
                    "test",
                    "-p",
                    "tollgate-tests",
                    "--test",
                    "soak",
                    "--",
                    "--nocapture",
                ])
                .env("TOLLGATE_SOAK_SECS", seconds.to_string())
                .env("TOLLGATE_REQUIRE_PRIVILEGED", "1"))
        }
        Cmd::Fuzz { seconds, targets } => {
            setup::run()?;
            fuzz(seconds, &targets)
        }
        Cmd::Bench { quick, which } => bench(quick, &which),
    }
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.env("PATH", setup::path_with_tools());
    c
}

pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {}", display(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("spawning {}", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program().to_string_lossy().into_owned())
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Binaries the real-kernel tests spawn: the agent, the mock provider, the demo/bench drivers.
fn build_bins(release: bool) -> Result<()> {
    let mut c = cargo();
    c.args([
        "build",
        "-p",
        "tollgate-agent",
        "-p",
        "tollgate-tests",
        "--bins",
    ]);
    if release {
        c.arg("--release");
    }
    run(&mut c)
}

/// Seconds per fuzz target within `cargo xtask test`.
const FUZZ_SECONDS_IN_TEST: u64 = 10;

const FUZZ_TARGETS: [&str; 9] = [
    "client_hello",
    "sse",
    "stream_usage",
    "provider_response",
    "provider_request",
    "dns_answer",
    "config",
    "mcp",
    "captured_http",
];

/// Run each fuzz target for `seconds`, from the committed seeds
/// (fuzz/seeds/<target>) plus the corpus earlier runs grew.
fn fuzz(seconds: u64, targets: &[String]) -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let fuzz_dir = root.join("fuzz");
    let chosen: Vec<&str> = if targets.is_empty() {
        FUZZ_TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    for t in &chosen {
        if !FUZZ_TARGETS.contains(t) {
            bail!("no fuzz target `{t}`; targets: {}", FUZZ_TARGETS.join(", "));
        }
        let corpus = fuzz_dir.join("corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        run(Command::new("rustup")
            .args(["run", "nightly", "cargo", "fuzz", "run", t])
            .arg(&corpus)
            .arg(fuzz_dir.join("seeds").join(t))
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-rss_limit_mb=2048",
            ])
            .current_dir(&fuzz_dir)
            .env("PATH", setup::path_with_tools())
            // The agent's eBPF object is not needed to fuzz its parsers.
            .env("AYA_BUILD_SKIP", "1"))
        .with_context(|| {
            format!("fuzz target {t} failed: the crashing input is in fuzz/artifacts/{t}/")
        })?;
    }
    eprintln!(
        "fuzzed {} targets for {seconds} s each: no crash",
        chosen.len()
    );
    Ok(())
}

fn manifests() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = cargo()
        .args([
            "run",
            "-q",
            "-p",
            "tollgate-tests",
            "--bin",
            "tollgate-render-chart",
        ])
        .output()
        .context("running tollgate-render-chart")?;
    if !out.status.success() {
        bail!(
            "rendering the chart failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = root.join("deploy/manifests/tollgate.yaml");
    let header = "# Tollgate: deploy/helm/tollgate rendered with its default values as release\n\
                  # `tollgate` in namespace `tollgate-system` (`cargo xtask manifests`). Edit the\n\
                  # ConfigMap's config.yaml, then `kubectl apply -f` this file.\n";
    std::fs::write(&path, [header.as_bytes(), &out.stdout].concat())
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn test(args: &[String]) -> Result<()> {
    setup::run()?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))
        .context("code is not formatted: run `cargo fmt --all`")?;
    // Every crate but the eBPF one (the default members), tests included.
    run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))
        .context("clippy found problems: run `cargo clippy --all-targets` and fix them")?;
    build_bins(false)?;
    setup::sweep_leftovers();
    let mut c = cargo();
    // Every crate but the eBPF one, which only builds for the BPF target;
    // every test binary runs even after one fails, so a run shows all of
    // its failures (the count below still fails it).
    c.args([
        "test",
        "--workspace",
        "--exclude",
        "tollgate-ebpf",
        "--no-fail-fast",
    ])
    .args(args);
    let totals = run_counting(&mut c)?;
    // One closing line for the whole run (cargo's own last lines are per
    // crate and may be a crate with no doc tests).
    println!(
        "{} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.skipped
    );
    if totals.failed > 0 {
        bail!("{} tests failed", totals.failed);
    }
    // A short fuzz run of every parser of untrusted input (longer: `cargo xtask fuzz`).
    fuzz(FUZZ_SECONDS_IN_TEST, &[])?;
    if totals.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

#[derive(Default)]
struct Totals {
    passed: u64,
    failed: u64,
    skipped: u64,
}

/// Run `cargo test`, passing its output through, and add up its result lines.
/// Privileged tests that skip print `SKIPPED <name>: <why>` on stderr.
fn run_counting(cmd: &mut Command) -> Result<Totals> {
    use std::io::{BufRead, BufReader, Write};
    eprintln!("+ {}", display(cmd));
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {}", display(cmd)))?;
    let stderr = child.stderr.take().expect("piped");
    let skipped = std::thread::spawn(move || {
        let mut n = 0u64;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("SKIPPED ") {
                n += 1;
            }
            let _ = writeln!(std::io::stderr(), "{line}");
        }
        n
    });
    let mut t = Totals::default();
    for line in BufReader::new(child.stdout.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
    {
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            // "ok. 13 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 6.10s"
            for part in rest.split(';') {
                let mut w = part.split_whitespace().rev();
                let (Some(kind), Some(n)) = (w.next(), w.next()) else {
                    continue;
                };
                let n: u64 = n.parse().unwrap_or(0);
                match kind {
                    "passed" => t.passed += n,
                    "failed" => t.failed += n,
                    _ => {}
                }
            }
        }
    }
    let status = child.wait()?;
    t.skipped = skipped.join().unwrap_or(0);
    // A skipping privileged test still reports "ok"; don't count it twice.
    t.passed = t.passed.saturating_sub(t.skipped);
    if !status.success() && t.failed == 0 {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(t)
}

fn demo() -> Result<()> {
    setup::run()?;
    build_bins(false)?;
    require_root("the demo")?;
    setup::sweep_leftovers();
    run(Command::new("target/debug/tollgate-demo").env("PATH", setup::path_with_tools()))
}

fn image(tag: &str) -> Result<()> {
    setup::run()?;
    build_bins(true)?;
    require_root("building the image (buildah)")?;
    run(Command::new("target/release/tollgate-build-image").args([
        "target/release/tollgate",
        tag,
        "target/image",
    ]))?;
    eprintln!(
        "image {tag} built; run it as the chart does (deploy/helm/tollgate), or push it:\n  \
         buildah push {tag} docker://<registry>/tollgate:<version>\n  \
         then helm install … --set image.repository=<registry>/tollgate --set image.tag=<version>"
    );
    Ok(())
}

fn bench(quick: bool, which: &[String]) -> Result<()> {
    setup::run()?;
    build_bins(true)?;
    require_root("the benchmarks")?;
    if which.is_empty() || which.iter().any(|w| w == "compare") {
        setup::bench_peers(std::path::Path::new("target/bench"));
    }
    setup::sweep_leftovers();
    let mut c = Command::new("target/release/tollgate-bench");
    c.env("PATH", setup::path_with_tools());
    if quick {
        c.arg("--quick");
    }
    c.args(which);
    run(&mut c)
}

fn require_root(what: &str) -> Result<()> {
    if !setup::is_root() {
        bail!(
            "{what} create network namespaces, cgroups and load eBPF programs: run as root (e.g. `sudo -E cargo xtask …`)"
        );
    }
    Ok(())
}
