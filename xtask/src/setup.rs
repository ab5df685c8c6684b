//! `cargo xtask setup`: everything a fresh machine needs, installed only when missing.
use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::run as exec;

/// Debian packages: LLVM 22 for bpf-linker; the test node's tools.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",     // bpf-linker links against LLVM 22
    "libpolly-22-dev", // …which llvm-22-dev's cmake config requires
    "dnsmasq-base",    // the test node's DNS server
    "redis-server",    // the shared state store the policy tests run
    "iproute2",        // ip netns / veth, ss
    "curl",            // the test clients
    "util-linux",      // nsenter
    "python3",         // test clients (getpeername check, SDK clients)
    "python3-venv",    // the SDK clients' virtualenv
    "nodejs",          // the npm SDK client
    "bpftool",         // the tests count the programs attached to a cgroup
    "nftables",        // the egress test's drop rule inside a pod's namespace
    "prometheus",      // the observability test scrapes the agent with it (and promtool)
    "tmux",            // the `tollgate top` test reads its screen from a tmux pane
    "buildah",         // `cargo xtask image` and the image test build the agent's image
    "podman",          // the image test runs it as the DaemonSet would
    "runc",            // …with runc: crun refuses hybrid cgroup hosts
    "openssl",         // the Vertex test makes a service account's RSA key
];

/// The official SDKs the end-to-end tests drive, pinned. Installed into
/// target/e2e (a virtualenv and an npm prefix), never system-wide.
// kubernetes-validate: the deploy test checks the manifests against the
// Kubernetes JSON schemas it bundles (offline).
const PY_CLIENTS: &[&str] = &[
    "openai==3.57.0",
    "anthropic[vertex]==2.13.0",
    "websockets==15.0.1", // the OpenAI SDK's Realtime client (`openai[realtime]`)
    "mcp==2.3.0",         // the MCP tests' client and server (its own uvicorn serves TLS)
    "boto3==1.44.8",      // the Bedrock tests' client (bedrock-runtime)
    "google-genai==3.6.1", // the Vertex AI tests' Gemini client (Claude: anthropic[vertex])
    "kubernetes-validate==1.37.0",
];
const NPM_CLIENTS: &[&str] = &["openai@7.57.0"];

/// bpf-linker pinned to the version verified with LLVM 22 and aya 0.14.
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// PATH with cargo's bin dir (bpf-linker) and LLVM 22's tools (llvm-config) in front.
pub fn path_with_tools() -> String {
    let home = std::env::var("CARGO_HOME").unwrap_or_else(|_| {
        format!(
            "{}/.cargo",
            std::env::var("HOME").unwrap_or_else(|_| "/root".into())
        )
    });
    let old = std::env::var("PATH").unwrap_or_default();
    format!("{home}/bin:{LLVM_PREFIX}/bin:{old}:/usr/sbin:/sbin")
}

pub fn run() -> Result<()> {
    apt()?;
    nightly()?;
    bpf_linker()?;
    cargo_fuzz()?;
    sdk_clients()?;
    eprintln!("setup: all prerequisites present");
    Ok(())
}

fn apt() -> Result<()> {
    apt_install(APT_PACKAGES)
}

/// Install the Debian packages of `packages` that are missing.
fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {missing:?}; run `cargo xtask setup` as root to install them"
        );
    }
    eprintln!("setup: installing {missing:?}");
    exec(Command::new("apt-get").args(["update", "-qq"]))?;
    exec(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn nightly() -> Result<()> {
    let has_nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_nightly {
        bail!(
            "the `nightly` Rust toolchain is missing; the eBPF programs need it (-Z build-std). \
             Install it with `rustup toolchain install nightly`"
        );
    }
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("running rustup")?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        exec(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    let ok = Command::new("bpf-linker")
        .arg("--version")
        .env("PATH", path_with_tools())
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        });
    if ok {
        return Ok(());
    }
    if !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        bail!(
            "LLVM 22 is missing at {LLVM_PREFIX}; run `cargo xtask setup` as root (installs llvm-22-dev)"
        );
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes, once)"
    );
    // llvm-config on PATH is how bpf-linker's build finds LLVM; without it,
    // it searches /usr and fails to link (-lLLVM not found).
    exec(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("PATH", path_with_tools())
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX),
    )
}

/// cargo-fuzz, pinned: the fuzz targets' driver (libFuzzer, nightly).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn cargo_fuzz() -> Result<()> {
    let ok = Command::new("cargo")
        .args(["fuzz", "--version"])
        .env("PATH", path_with_tools())
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION)
        });
    if ok {
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    exec(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
}

/// A virtualenv at `venv` holding exactly `packages` (pinned `name==version`,
/// extras allowed); (re)installed when one is missing or differs.
fn venv(venv: &Path, packages: &[&str], what: &str) -> Result<()> {
    let check = format!(
        "import importlib.metadata as m, sys; sys.exit(0 if all(m.version(p.split('==')[0].split('[')[0]) == p.split('==')[1] for p in {packages:?}) else 1)"
    );
    let ok = Command::new(venv.join("bin/python"))
        .args(["-c", &check])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Ok(());
    }
    eprintln!(
        "setup: installing {what} {packages:?} into {}",
        venv.display()
    );
    exec(
        Command::new("/usr/bin/python3")
            .args(["-m", "venv"])
            .arg(venv),
    )?;
    exec(
        Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "--disable-pip-version-check"])
            .args(packages),
    )
}

/// What `cargo xtask bench` compares Tollgate with, pinned: Debian's nginx
/// and wrk; LiteLLM proxy and mitmproxy from PyPI, each in its own
/// virtualenv under target/bench (their dependencies conflict: together,
/// pip settles on a 2015 mitmproxy). mitmproxy 11.0 is the last release for
/// this machine's Python 3.11.
const BENCH_APT: &[&str] = &["nginx", "wrk", "linux-perf"]; // linux-perf: TOLLGATE_BENCH_PROFILE
const LITELLM: &[&str] = &["litellm[proxy]==1.108.7"];
const MITMPROXY: &[&str] = &["mitmproxy==11.0.2"];

/// Install the benchmark peers; each failure is reported and skipped (the
/// benchmark then says which peer it could not measure, and why).
pub fn bench_peers(dir: &Path) {
    type Step<'a> = (&'a str, Box<dyn Fn() -> Result<()> + 'a>);
    let steps: [Step; 3] = [
        ("nginx, wrk and perf", Box::new(|| apt_install(BENCH_APT))),
        (
            "LiteLLM",
            Box::new(|| venv(&dir.join("litellm"), LITELLM, "LiteLLM proxy")),
        ),
        (
            "mitmproxy",
            Box::new(|| venv(&dir.join("mitmproxy"), MITMPROXY, "mitmproxy")),
        ),
    ];
    for (what, step) in steps {
        if let Err(e) = step() {
            eprintln!("setup: could not install {what} for the benchmarks: {e:#}");
        }
    }
}

/// Where the SDK clients live: <workspace>/target/e2e.
pub fn e2e_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/e2e")
}

fn sdk_clients() -> Result<()> {
    let dir = e2e_dir();
    venv(&dir.join("venv"), PY_CLIENTS, "Python SDK clients")?;
    let node_dir = dir.join("node");
    let npm_ok = NPM_CLIENTS.iter().all(|spec| {
        let (name, version) = spec.rsplit_once('@').expect("name@version");
        std::fs::read_to_string(
            node_dir
                .join("node_modules")
                .join(name)
                .join("package.json"),
        )
        .is_ok_and(|p| p.contains(&format!("\"version\": \"{version}\"")))
    });
    if !npm_ok {
        eprintln!(
            "setup: installing npm SDK clients {NPM_CLIENTS:?} into {}",
            node_dir.display()
        );
        exec(
            Command::new("npm")
                .args([
                    "install",
                    "--no-audit",
                    "--no-fund",
                    "--loglevel=error",
                    "--prefix",
                ])
                .arg(&node_dir)
                .args(NPM_CLIENTS),
        )?;
    }
    Ok(())
}

/// Remove test namespaces, cgroups and pins left behind by a run that was
/// killed (guards cannot run on SIGKILL). Only names the harness creates.
pub fn sweep_leftovers() {
    if !is_root() {
        return;
    }
    // Names carry the creating test process's pid (`tgt-<pid>x<n>…`,
    // `tollgate-test-<pid>x<n>`): a run still going (another terminal, a
    // soak) is left alone.
    let leftover = |name: &str, prefix: &str| {
        let Some(rest) = name.strip_prefix(prefix) else {
            return false;
        };
        let pid = rest
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap_or("");
        pid.is_empty() || !Path::new("/proc").join(pid).exists()
    };
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if leftover(name, "tgt-") {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir("/sys/fs/bpf") {
        for e in rd.flatten() {
            if leftover(&e.file_name().to_string_lossy(), "tollgate-test-") {
                let _ = Command::new("rm").arg("-rf").arg(e.path()).status();
            }
        }
    }
    // Test cgroups: kill and remove bottom-up (rmdir only works on empty cgroups).
    if let Ok(mi) = std::fs::read_to_string("/proc/self/mountinfo") {
        let mount = mi.lines().find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(String::from))?
        });
        if let Some(mount) = mount
            && let Ok(rd) = std::fs::read_dir(&mount)
        {
            for e in rd.flatten() {
                if leftover(&e.file_name().to_string_lossy(), "tollgate-test-") {
                    let _ = std::fs::write(e.path().join("cgroup.kill"), "1");
                    let _ = Command::new("sh")
                        .arg("-c")
                        .arg(format!(
                            "sleep 0.2; find '{}' -depth -type d -exec rmdir {{}} \\; 2>/dev/null",
                            e.path().display()
                        ))
                        .status();
                }
            }
        }
    }
}
