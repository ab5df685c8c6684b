//! The systems compared, each reached by the same client from the same pod:
//! direct (the floor), Tollgate (transparent), and the peers a user would
//! pick instead — nginx, LiteLLM proxy and mitmproxy — started inside the
//! pod's network namespace on loopback, from a cgroup Tollgate does not
//! govern (their own upstream calls must not be redirected), each with an
//! /etc/hosts that names the mock provider as the real provider would be
//! named. A peer that cannot run says why; it is never silently left out.
use std::{
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use tollgate_tests::{
    TestNode,
    node::{PROVIDER_HOST, TLS_PORT, UPSTREAM_V4},
    process::wait_until,
};

/// One system under test, as the client reaches it.
pub struct System {
    pub name: &'static str,
    /// What the client dials (the provider's address for direct and Tollgate).
    pub addr: String,
    /// The CA the client trusts for PROVIDER_HOST on that address.
    pub ca: PathBuf,
    /// The client's cgroup: governed only for Tollgate.
    pub cgroup: PathBuf,
    /// The process tree whose CPU and memory are the system's cost (the
    /// mock provider for direct: what serving the calls costs at all).
    pub pid: u32,
    /// Version and configuration, as printed.
    pub about: String,
    _peer: Option<Peer>,
}

impl System {
    /// A peer listening on 127.0.0.1:`port` of the pod's namespace.
    fn peer(
        name: &'static str,
        port: u16,
        ca: impl Into<PathBuf>,
        cgroup: &Path,
        peer: Peer,
        about: String,
    ) -> Self {
        Self {
            name,
            addr: format!("127.0.0.1:{port}"),
            ca: ca.into(),
            cgroup: cgroup.to_path_buf(),
            pid: peer.0.id(),
            about,
            _peer: Some(peer),
        }
    }
}

/// A peer's process group, killed on drop.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the group this peer leads.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// Where the peers' virtualenvs live (`cargo xtask bench` installs them).
pub fn peers_dir() -> PathBuf {
    std::env::var_os("TOLLGATE_BENCH_PEERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::sibling("").join("../bench"))
}

const NGINX_PORT: u16 = 9443;
const LITELLM_PORT: u16 = 9444;
const MITM_PORT: u16 = 9445;
const FLOOR_PORT: u16 = 9446;

/// Every system, in table order; `Err` carries why a peer is not measured.
pub fn all(node: &TestNode, ungoverned: &Path) -> Vec<Result<System, (&'static str, String)>> {
    let upstream_ca = node.dir.join("upstream-ca.crt");
    let agent = node.agent.as_ref().expect("agent running");
    let (agent_v, nginx_v) = (
        version(&tollgate_tests::node::agent_bin(), &["--version"]),
        version("nginx", &["-v"]),
    );
    let all = vec![
        Ok(System {
            name: "direct",
            addr: format!("{UPSTREAM_V4}:{TLS_PORT}"),
            ca: upstream_ca.clone(),
            cgroup: ungoverned.to_path_buf(),
            pid: node.mock.pid(),
            about: "client → mock provider (hyper + rustls); CPU/RSS columns are the mock's".into(),
            _peer: None,
        }),
        Ok(System {
            name: "tollgate",
            addr: format!("{UPSTREAM_V4}:{TLS_PORT}"),
            ca: node.node_ca_cert(),
            cgroup: node.pods[0].cgroup.clone(),
            pid: agent.pid(),
            about: format!(
                "{agent_v}: eBPF redirect, TLS terminate, parse, {} policy rules, audit log, metrics",
                super::BENCH_RULES
            ),
            _peer: None,
        }),
    ];
    let mut all: Vec<Result<System, (&'static str, String)>> = all;
    all.retain(|s| s.as_ref().is_ok_and(|s| selected(s.name)));
    if selected("floor") {
        all.push(floor(node, ungoverned, &upstream_ca).map_err(|e| ("floor", e)));
    }
    if selected("nginx") {
        all.push(nginx(node, ungoverned, &upstream_ca, nginx_v).map_err(|e| ("nginx", e)));
    }
    if selected("litellm") {
        all.push(litellm(node, ungoverned, &upstream_ca).map_err(|e| ("litellm", e)));
    }
    if selected("mitmproxy") {
        all.push(mitmproxy(node, ungoverned, &upstream_ca).map_err(|e| ("mitmproxy", e)));
    }
    all
}

/// TOLLGATE_BENCH_SYSTEMS=direct,tollgate,…: measure only these (direct is
/// always kept: every "added" column is relative to it).
fn selected(name: &str) -> bool {
    std::env::var("TOLLGATE_BENCH_SYSTEMS").map_or(true, |v| {
        name == "direct" || v.split(',').any(|s| s.trim() == name)
    })
}

/// `program args` → its first output line (nginx prints on stderr).
fn version(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// Start `program args` as a peer in the pod's namespace, outside the
/// governed cgroup, with /etc/hosts naming the mock provider; wait until it
/// listens on 127.0.0.1:`port` (up to `startup`).
fn start(
    node: &TestNode,
    cgroup: &Path,
    name: &str,
    cmd: (&str, &[String]),
    env: &[(&str, String)],
    port: u16,
    startup: Duration,
) -> Result<Peer, String> {
    let log = node.dir.join(format!("bench-{name}.log"));
    let mut c = node.pods[0].app_in(cgroup, &node.pod_hosts_file(), cmd.0, &[]);
    c.args(cmd.1)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(&node.dir)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&log).map_err(|e| e.to_string())?)
        .stderr(fs::File::create(log.with_extension("err")).map_err(|e| e.to_string())?)
        .process_group(0);
    let mut peer = Peer(
        c.spawn()
            .map_err(|e| format!("cannot start {}: {e}", cmd.0))?,
    );
    let pid = peer.0.id();
    let up = wait_until(startup, || {
        if let Ok(Some(status)) = peer.0.try_wait() {
            return Some(Err(format!("exited at start ({status})")));
        }
        listens(pid, port).then_some(Ok(()))
    });
    let why = match up {
        Some(Ok(())) => return Ok(peer),
        Some(Err(e)) => e,
        None => format!("not listening after {startup:?}"),
    };
    let err = log.with_extension("err");
    let text = fs::read_to_string(&err).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(5).collect();
    Err(format!(
        "{why}; last lines of {}: {}",
        err.display(),
        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
    ))
}

/// Whether a TCP socket listens on 127.0.0.1:`port` in `pid`'s namespace.
fn listens(pid: u32, port: u16) -> bool {
    // /proc/<pid>/net/tcp lists the sockets of that process's namespace:
    // local address 0100007F:<port hex>, state 0A (LISTEN).
    let want = format!("0100007F:{port:04X}");
    fs::read_to_string(format!("/proc/{pid}/net/tcp")).is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&want.as_str()) && f.get(3) == Some(&"0A")
        })
    })
}

/// The peers serve the provider's name with the provider's certificate
/// (signed by the test upstream CA), so one client config fits all.
fn provider_cert(node: &TestNode) -> (PathBuf, PathBuf) {
    (node.dir.join("upstream.crt"), node.dir.join("upstream.key"))
}

/// The physical floor: `tollgate-bench-floor`, a rustls TLS-terminating
/// byte relay (one upstream TLS connection per client connection).
fn floor(node: &TestNode, cgroup: &Path, upstream_ca: &Path) -> Result<System, String> {
    let (cert, key) = provider_cert(node);
    let bin = crate::sibling("tollgate-bench-floor");
    let args = [
        format!("127.0.0.1:{FLOOR_PORT}"),
        cert.display().to_string(),
        key.display().to_string(),
        format!("{UPSTREAM_V4}:{TLS_PORT}"),
        PROVIDER_HOST.to_string(),
        upstream_ca.display().to_string(),
    ];
    let peer = start(
        node,
        cgroup,
        "floor",
        (bin.to_str().unwrap_or_default(), &args),
        &[],
        FLOOR_PORT,
        Duration::from_secs(10),
    )?;
    Ok(System::peer(
        "floor",
        FLOOR_PORT,
        upstream_ca.to_path_buf(),
        cgroup,
        peer,
        "rustls TLS-terminating byte relay (tokio, one upstream TLS connection per client connection, no HTTP parse, no policy): what any Rust interceptor pays".into(),
    ))
}

/// nginx (Debian) as a TLS-terminating, re-encrypting reverse proxy with a
/// keep-alive upstream pool: interception without LLM awareness.
fn nginx(
    node: &TestNode,
    cgroup: &Path,
    upstream_ca: &Path,
    about: String,
) -> Result<System, String> {
    if about.is_empty() {
        return Err("nginx is not installed (`cargo xtask bench` installs Debian's nginx)".into());
    }
    let dir = node.dir.join("nginx");
    for sub in ["", "tmp", "logs"] {
        fs::create_dir_all(dir.join(sub)).map_err(|e| e.to_string())?;
    }
    let (cert, key) = provider_cert(node);
    let conf = format!(
        r#"user root;
worker_processes auto;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/logs/error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {dir}/tmp/body;
  proxy_temp_path {dir}/tmp/proxy;
  fastcgi_temp_path {dir}/tmp/fastcgi;
  uwsgi_temp_path {dir}/tmp/uwsgi;
  scgi_temp_path {dir}/tmp/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  upstream provider {{ server {UPSTREAM_V4}:{TLS_PORT}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{NGINX_PORT} ssl;
    server_name {PROVIDER_HOST};
    ssl_certificate {cert};
    ssl_certificate_key {key};
    location / {{
      proxy_pass https://provider;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host {PROVIDER_HOST};
      proxy_ssl_server_name on;
      proxy_ssl_name {PROVIDER_HOST};
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate {ca};
      proxy_ssl_session_reuse on;
      proxy_buffering off;
    }}
  }}
}}
"#,
        dir = dir.display(),
        cert = cert.display(),
        key = key.display(),
        ca = upstream_ca.display(),
    );
    let path = dir.join("nginx.conf");
    fs::write(&path, conf).map_err(|e| e.to_string())?;
    let args = ["-c".to_string(), path.display().to_string()];
    let peer = start(
        node,
        cgroup,
        "nginx",
        ("nginx", &args),
        &[],
        NGINX_PORT,
        Duration::from_secs(10),
    )?;
    Ok(System::peer(
        "nginx",
        NGINX_PORT,
        upstream_ca.to_path_buf(),
        cgroup,
        peer,
        format!(
            "{about}: TLS terminate + re-encrypt, keepalive 128 upstream, proxy_buffering off, worker_processes auto, access_log off"
        ),
    ))
}

/// LiteLLM proxy (PyPI): no database, one wildcard route to the mock
/// provider, a master key, TLS on its listener, one worker per CPU.
fn litellm(node: &TestNode, cgroup: &Path, upstream_ca: &Path) -> Result<System, String> {
    let bin = venv_bin("litellm", "litellm", "litellm[proxy]")?;
    let dir = node.dir.join("litellm");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let cfg = dir.join("config.yaml");
    fs::write(
        &cfg,
        format!(
            "model_list:\n  - model_name: \"*\"\n    litellm_params:\n      model: \"openai/*\"\n      api_base: \"https://{PROVIDER_HOST}:{TLS_PORT}/v1\"\n      api_key: sk-bench\n\
             litellm_settings:\n  drop_params: true\n  telemetry: false\ngeneral_settings:\n  master_key: sk-bench\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let (cert, key) = provider_cert(node);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let args: Vec<String> = [
        "--config",
        &cfg.display().to_string(),
        "--host",
        "127.0.0.1",
        "--port",
        &LITELLM_PORT.to_string(),
        "--num_workers",
        &workers.to_string(),
        "--ssl_certfile_path",
        &cert.display().to_string(),
        "--ssl_keyfile_path",
        &key.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    let env = [
        // Offline: the price map ships with the package.
        ("LITELLM_LOCAL_MODEL_COST_MAP", "True".to_string()),
        ("SSL_CERT_FILE", upstream_ca.display().to_string()),
        ("LITELLM_LOG", "ERROR".to_string()),
    ];
    let bin = bin.display().to_string();
    let peer = start(
        node,
        cgroup,
        "litellm",
        (&bin, &args),
        &env,
        LITELLM_PORT,
        Duration::from_secs(90),
    )?;
    Ok(System::peer(
        "litellm",
        LITELLM_PORT,
        upstream_ca.to_path_buf(),
        cgroup,
        peer,
        format!(
            "LiteLLM {}: proxy, no database, wildcard route, master key, TLS listener, {workers} workers",
            py_version(&peers_dir().join("litellm"), "litellm")
        ),
    ))
}

/// mitmproxy (PyPI) in reverse mode: it mints a leaf for the SNI from its
/// own CA, terminates, parses HTTP and re-encrypts — the interception work
/// of its regular mode, without the CONNECT round trip that wrk cannot
/// send. Responses are streamed (`stream_large_bodies`): by default it holds
/// a whole SSE answer back until its end.
fn mitmproxy(node: &TestNode, cgroup: &Path, upstream_ca: &Path) -> Result<System, String> {
    let venv = peers_dir().join("mitmproxy");
    let bin = venv_bin("mitmproxy", "mitmdump", "mitmproxy")?;
    let dir = node.dir.join("mitmproxy");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let args: Vec<String> = [
        "--mode".to_string(),
        format!("reverse:https://{PROVIDER_HOST}:{TLS_PORT}@{MITM_PORT}"),
        "--listen-host".into(),
        "127.0.0.1".into(),
        "--set".into(),
        format!("confdir={}", dir.display()),
        "--set".into(),
        format!("ssl_verify_upstream_trusted_ca={}", upstream_ca.display()),
        "--set".into(),
        "stream_large_bodies=1".into(),
        "--set".into(),
        "flow_detail=0".into(),
        "-q".into(),
    ]
    .to_vec();
    let bin = bin.display().to_string();
    let peer = start(
        node,
        cgroup,
        "mitmproxy",
        (&bin, &args),
        &[],
        MITM_PORT,
        Duration::from_secs(30),
    )?;
    let ca = dir.join("mitmproxy-ca-cert.pem");
    if !ca.exists() {
        return Err(format!(
            "mitmproxy started without writing {}",
            ca.display()
        ));
    }
    Ok(System::peer(
        "mitmproxy",
        MITM_PORT,
        ca,
        cgroup,
        peer,
        format!(
            "mitmproxy {}: reverse mode, leaf per SNI from its CA, re-encrypt, streamed bodies, no flow output",
            py_version(&venv, "mitmproxy")
        ),
    ))
}

/// `program` of the peers' virtualenv `venv`, or why it is not there.
fn venv_bin(venv: &str, program: &str, package: &str) -> Result<PathBuf, String> {
    let bin = peers_dir().join(venv).join("bin").join(program);
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!(
            "{} is missing (`cargo xtask bench` installs {package} from PyPI)",
            bin.display()
        ))
    }
}

/// A package's version in a virtualenv.
fn py_version(venv: &Path, package: &str) -> String {
    version(
        &venv.join("bin/python").display().to_string(),
        &[
            "-c",
            &format!("import importlib.metadata as m; print(m.version('{package}'))"),
        ],
    )
}
