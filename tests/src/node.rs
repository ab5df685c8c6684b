//! The test node: namespaces, pods, the mock provider and the agent (its DNS in `dns`, what the far sides saw in `observed`).
use std::{
    fs,
    path::PathBuf,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use crate::{
    cgroups::{CgroupTree, cgroup2_mount, remove_tree},
    netns::{Netns, run_ok},
    pod::Pod,
    process::{Proc, wait_until},
};
pub use crate::{
    observed::{Route, peer_ip, route},
    yaml::merge_yaml,
};

/// Provider address served by the mock (the name `api.openai.com` resolves here).
pub const UPSTREAM_V4: &str = "10.77.0.2";
/// A second provider address, for DNS changes.
pub const UPSTREAM_V4_ALT: &str = "10.77.0.3";
pub const UPSTREAM_V6: &str = "fd77::2";
/// A second provider's address (`backup`, for failover), same mock.
pub const UPSTREAM_V4_BACKUP: &str = "10.77.0.4";
/// Node side of the upstream link: what the mock sees when the agent relays.
pub const NODE_UPSTREAM_V4: &str = "10.77.0.1";
pub const NODE_UPSTREAM_V6: &str = "fd77::1";
/// Provider port, and a port on the same host that no provider uses.
pub const PROVIDER_PORT: u16 = 443;
/// Provider port where the mock speaks TLS (certificate for the provider
/// hosts, signed by the test upstream CA); the agent terminates here.
pub const TLS_PORT: u16 = 8443;
pub const OTHER_PORT: u16 = 8080;
/// Proxy port used by the tests (not the default, to show it is configurable).
pub const PROXY_PORT: u16 = 15089;
pub const PROVIDER_HOST: &str = "api.openai.com";
/// A second provider on the same addresses (providers behind one CDN do this).
pub const ANTHROPIC_HOST: &str = "api.anthropic.com";
/// A third, with Gemini's API.
pub const GEMINI_HOST: &str = "generativelanguage.googleapis.com";
/// AWS Bedrock's runtime in us-east-1 (`mock_bedrock`), on the same
/// addresses, configured by `regions`.
pub const BEDROCK_HOST: &str = crate::mock_bedrock::HOST;
/// The second Bedrock region (provider `bedrock-west`), served by the same mock.
pub const BEDROCK_WEST_HOST: &str = crate::mock_bedrock::WEST_HOST;
/// Vertex AI's endpoints in two regions (Gemini in us-central1, Claude in
/// us-east5, where the SDKs' examples put them), configured by `regions`.
pub const VERTEX_HOSTS: [&str; 2] = [
    "us-central1-aiplatform.googleapis.com",
    "us-east5-aiplatform.googleapis.com",
];
/// An Azure OpenAI resource (`<name>.openai.azure.com`).
pub const AZURE_HOST: &str = "tollgate-test.openai.azure.com";
/// An OpenAI-compatible provider on its own address: a failover target.
pub const BACKUP_HOST: &str = "api.backup.test";
/// A remote MCP server (`mcp_servers`), at UPSTREAM_V4_ALT:MCP_PORT when a
/// test runs one (`tests/clients/mcp_server.py`).
pub const MCP_HOST: &str = "mcp.tools.test";
pub const MCP_PORT: u16 = 9443;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// How workload cgroups are laid out under the governed root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `kubepods.slice/kubepods-besteffort.slice/…-pod<uid>.slice/cri-containerd-<id>.scope`
    Kubelet,
    /// Host mode: `tollgate.slice/<name>.service`
    Host,
}

/// Fields are dropped in declaration order: processes first, then cgroups,
/// then namespaces, then files.
pub struct TestNode {
    pub agent: Option<Proc>,
    pub mock: Proc,
    pub(crate) dns: Option<Proc>,
    pub pods: Vec<Pod>,
    pub cgroups: CgroupTree,
    /// The subtree the agent governs (`kubepods.slice` or `tollgate.slice`).
    pub governed: PathBuf,
    pub layout: Layout,
    pub node: Netns,
    pub upstream: Netns,
    pub dir: PathBuf,
    pub id: String,
    pub bpffs_dir: PathBuf,
    /// DNS TTL dnsmasq gives its answers.
    pub dns_ttl: u32,
    /// `--log-format` the agent is started with: `text`, so that failure
    /// output is readable; a test of the default sets `auto`.
    pub log_format: &'static str,
}

impl TestNode {
    /// Build the node with `pods` kubelet-shaped pods.
    pub fn new(pods: u32) -> Self {
        Self::with_layout(pods, Layout::Kubelet)
    }

    /// Build the node with `pods` workloads laid out as `layout`.
    pub fn with_layout(pods: u32, layout: Layout) -> Self {
        let id = format!(
            "{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(format!("tgt-{id}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();

        let node = Netns::create(&format!("tgt-{id}-node"));
        let upstream = Netns::create(&format!("tgt-{id}-up"));
        node.sysctl("net.ipv4.ip_forward", "1");
        node.sysctl("net.ipv6.conf.all.forwarding", "1");
        wire(
            &node,
            "up0",
            [NODE_UPSTREAM_V4, NODE_UPSTREAM_V6],
            &upstream,
            &[
                UPSTREAM_V4,
                UPSTREAM_V4_ALT,
                UPSTREAM_V4_BACKUP,
                UPSTREAM_V6,
            ],
        );

        let mount = cgroup2_mount();
        let cgroups = CgroupTree::create(mount.join(format!("tollgate-test-{id}")));
        let governed = cgroups.mkdir(match layout {
            Layout::Kubelet => "kubepods.slice",
            Layout::Host => "tollgate.slice",
        });

        let (cert, key) = write_upstream_pki(&dir);
        run_ok(
            Command::new(agent_bin())
                .args(["ca", "init", "--dir"])
                .arg(dir.join("node-ca")),
        );
        let mock = Proc::spawn(
            "mock-upstream",
            upstream.command(&mock_upstream_bin()).args([
                "--cert".to_string(),
                cert,
                "--key".to_string(),
                key,
                "--log".to_string(),
                dir.join("mock-requests.jsonl").display().to_string(),
                "--google-sa-key".to_string(),
                dir.join("google-sa.pem").display().to_string(),
                format!("tls:{UPSTREAM_V4}:{TLS_PORT}"),
                format!("tls:[{UPSTREAM_V6}]:{TLS_PORT}"),
                format!("tls:{UPSTREAM_V4_BACKUP}:{TLS_PORT}"),
                format!("{UPSTREAM_V4}:{PROVIDER_PORT}"),
                format!("{UPSTREAM_V4_ALT}:{PROVIDER_PORT}"),
                format!("[{UPSTREAM_V6}]:{PROVIDER_PORT}"),
                format!("{UPSTREAM_V4}:{OTHER_PORT}"),
                format!("[{UPSTREAM_V6}]:{OTHER_PORT}"),
            ]),
        );

        let mut n = TestNode {
            agent: None,
            mock,
            dns: None,
            pods: Vec::new(),
            cgroups,
            governed,
            layout,
            node,
            upstream,
            bpffs_dir: PathBuf::from(format!("/sys/fs/bpf/tollgate-test-{id}")),
            dir,
            id,
            dns_ttl: 2,
            log_format: "text",
        };
        n.set_dns(&[UPSTREAM_V4, UPSTREAM_V6]);
        for _ in 0..pods {
            n.add_pod();
        }
        // The mock binds asynchronously; wait until a pod can reach it.
        if !n.pods.is_empty() {
            let ok = wait_until(Duration::from_secs(5), || {
                n.pods[0]
                    .curl(&format!("http://{UPSTREAM_V4}:{OTHER_PORT}/"))
                    .ok()
            });
            assert!(ok.is_some(), "mock upstream did not come up");
        }
        n
    }

    /// Add a pod: namespace + veth to the node + kubelet-shaped cgroup.
    pub fn add_pod(&mut self) -> &Pod {
        let index = self.pods.len() as u32 + 1;
        let netns = Netns::create(&format!("tgt-{}-pod{index}", self.id));
        let (gw4, ip4) = (format!("10.88.{index}.1"), format!("10.88.{index}.2"));
        let (gw6, ip6) = (format!("fd88:{index}::1"), format!("fd88:{index}::2"));
        wire(
            &self.node,
            &format!("pod{index}"),
            [&gw4, &gw6],
            &netns,
            &[&ip4, &ip6],
        );

        let uid = format!("{:08x}-0000-4000-8000-{:012x}", std::process::id(), index);
        let container_id = format!("{:0>64}", format!("{:x}c{index}", std::process::id()));
        let cgroup = self.cgroups.mkdir(&match self.layout {
            Layout::Kubelet => format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{container_id}.scope",
                uid.replace('-', "_")
            ),
            Layout::Host => format!("tollgate.slice/workload-{index}.service"),
        });
        // A long-lived process, like a pod's pause container: it keeps the
        // namespace discoverable through the cgroup. Like every container of
        // a Kubernetes pod it sees the pod's own /etc/resolv.conf, naming the
        // pod's gateway as its nameserver (where a test may run a resolver).
        let resolv = self.dir.join(format!("pod{index}-resolv.conf"));
        fs::write(
            &resolv,
            format!("nameserver {gw4}\noptions attempts:1 timeout:2\n"),
        )
        .unwrap();
        let pause = Proc::spawn(
            "pause",
            netns
                .command_in_cgroup("unshare", Some(&cgroup))
                .args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(format!(
                    "mount --bind {} /etc/resolv.conf && exec sleep 3600",
                    resolv.display()
                )),
        );
        self.pods.push(Pod {
            _pause: pause,
            index,
            uid,
            container_id,
            cgroup,
            netns,
            ip4,
            ip6,
        });
        self.pods.last().unwrap()
    }

    /// Agent config for this node; `extra` is YAML merged over it (nested
    /// keys override one by one, e.g. `tls: {stream_idle_timeout: 1s}`).
    pub fn agent_config(&self, extra: &str) -> String {
        let base = format!(
            "cgroup_root: {}\nproxy:\n  port: {PROXY_PORT}\n  upstream_connect_timeout: 3s\n\
             heartbeat:\n  interval: 200ms\n  timeout: 2s\n\
             dns:\n  servers: [\"127.0.0.1\"]\n  min_ttl: 1s\n  stale_grace: 0s\n  retry: 1s\n\
             discovery:\n  scan_interval: 200ms\n\
             providers:\n  - name: openai\n    hosts: [{PROVIDER_HOST}]\n    ports: [{PROVIDER_PORT}, {TLS_PORT}]\n  - name: anthropic\n    hosts: [{ANTHROPIC_HOST}]\n    ports: [{PROVIDER_PORT}, {TLS_PORT}]\n\
             \x20 - name: gemini\n    hosts: [{GEMINI_HOST}]\n    ports: [{PROVIDER_PORT}, {TLS_PORT}]\n\
             \x20 - name: backup\n    hosts: [{BACKUP_HOST}]\n    ports: [{TLS_PORT}]\n    api: openai\n\
             \x20 - name: bedrock\n    regions: [us-east-1]\n    ports: [{TLS_PORT}]\n\
             \x20 - name: bedrock-west\n    api: bedrock\n    regions: [us-west-2]\n    ports: [{TLS_PORT}]\n\
             \x20 - name: vertex\n    regions: [us-central1, us-east5]\n    ports: [{TLS_PORT}]\n\
             \x20 - name: azure\n    hosts: [{AZURE_HOST}]\n    ports: [{TLS_PORT}]\n\
             tls:\n  ca_dir: {}\n  extra_roots: [{}]\n  system_roots: false\n\
             metrics:\n  listen: \"127.0.0.1:9464\"\n\
             audit:\n  path: {}\n  journal: {}\nbpffs_dir: {}\n",
            self.governed.display(),
            self.node_ca().display(),
            self.dir.join("upstream-ca.crt").display(),
            self.connection_log().display(),
            self.dir.join("state/calls.journal").display(),
            self.bpffs_dir.display(),
        );
        merge_yaml(&base, extra)
    }

    /// The node CA's certificate: what a workload trusts to have its TLS terminated.
    pub fn node_ca(&self) -> PathBuf {
        self.dir.join("node-ca")
    }

    pub fn node_ca_cert(&self) -> PathBuf {
        self.node_ca().join("ca.crt")
    }

    /// An /etc/hosts for pod applications: provider names → the mock's address.
    pub fn pod_hosts_file(&self) -> PathBuf {
        let p = self.dir.join("pod-hosts");
        fs::write(
            &p,
            format!(
                "127.0.0.1 localhost\n{UPSTREAM_V4} {PROVIDER_HOST} {ANTHROPIC_HOST} {GEMINI_HOST} {BEDROCK_HOST} {AZURE_HOST} {} {}\n\
                 {UPSTREAM_V4_ALT} {MCP_HOST}\n",
                VERTEX_HOSTS[0],
                VERTEX_HOSTS[1]
            ),
        )
        .unwrap();
        p
    }

    pub fn connection_log(&self) -> PathBuf {
        self.dir.join("connections.jsonl")
    }

    /// Start the agent in the node namespace, inside the governed subtree
    /// (so any loop through its own upstream connections would show), and
    /// wait until it governs every pod.
    /// (Re)write the agent's config file (what a running agent reloads).
    pub fn write_agent_config(&self, extra_config: &str) -> PathBuf {
        let cfg = self.dir.join("agent.yaml");
        // Write then rename: the agent never reads a half-written file.
        let tmp = self.dir.join("agent.yaml.tmp");
        fs::write(&tmp, self.agent_config(extra_config)).unwrap();
        fs::rename(&tmp, &cfg).unwrap();
        cfg
    }

    pub fn start_agent(&mut self, extra_config: &str) {
        self.start_agent_wrapped(extra_config, &[]);
    }

    /// Start the agent as `wrapper… tollgate run …` (e.g. `setpriv` with a
    /// reduced capability set); an empty wrapper runs it directly.
    pub fn start_agent_wrapped(&mut self, extra_config: &str, wrapper: &[&str]) {
        let cfg = self.write_agent_config(extra_config);
        let agent_cg = self.governed.join("tollgate-agent.scope");
        fs::create_dir_all(&agent_cg).unwrap();
        let log = fs::File::create(self.agent_log_path()).unwrap();
        let agent = agent_bin();
        let mut cmd = match wrapper.split_first() {
            None => self.node.command_in_cgroup(&agent, Some(&agent_cg)),
            Some((program, args)) => {
                let mut c = self.node.command_in_cgroup(program, Some(&agent_cg));
                c.args(args).arg(&agent);
                c
            }
        };
        let proc = Proc::spawn(
            "tollgate",
            cmd.args(["--log-format", self.log_format, "run", "--config"])
                .arg(&cfg)
                // Tests read the debug lines; the benchmarks set `info`, as production runs.
                .env(
                    "TOLLGATE_LOG",
                    std::env::var("TOLLGATE_LOG").unwrap_or("info,tollgate_agent=debug".into()),
                )
                .stdout(Stdio::null())
                .stderr(log),
        );
        self.agent = Some(proc);
        let started = wait_until(Duration::from_secs(20), || {
            if !self.agent.as_mut().unwrap().is_running() {
                panic!("agent exited during startup:\n{}", self.agent_log());
            }
            self.agent_log()
                .contains("tollgate is running")
                .then_some(())
        });
        assert!(
            started.is_some(),
            "agent did not start:\n{}",
            self.agent_log()
        );
        for i in 0..self.pods.len() {
            self.wait_for_listener(i);
        }
    }

    /// SIGKILL the agent (no cleanup of its own can run) and reap it.
    pub fn kill_agent(&mut self) {
        let agent = self.agent.as_mut().expect("agent running");
        agent.signal(libc::SIGKILL);
        agent
            .wait_for(Duration::from_secs(5))
            .expect("agent exits on SIGKILL");
    }

    pub fn agent_log_path(&self) -> PathBuf {
        self.dir.join("agent.log")
    }

    pub fn agent_log(&self) -> String {
        fs::read_to_string(self.agent_log_path()).unwrap_or_default()
    }

    /// Wait until the agent listens inside pod `i`'s namespace.
    pub fn wait_for_listener(&self, i: usize) {
        let pod = &self.pods[i];
        let ok = wait_until(Duration::from_secs(10), || {
            let out = pod
                .netns
                .command("ss")
                .args(["-Hltn", &format!("sport = :{PROXY_PORT}")])
                .output()
                .ok()?;
            (!out.stdout.is_empty()).then_some(())
        });
        assert!(
            ok.is_some(),
            "agent never listened in pod {}:\n{}",
            pod.index,
            self.agent_log()
        );
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.agent.take();
        self.dns.take();
        // Programs a fail-closed agent pinned must not outlive the test.
        if let Ok(rd) = fs::read_dir(&self.bpffs_dir) {
            for run in rd.flatten() {
                if let Ok(files) = fs::read_dir(run.path()) {
                    for f in files.flatten() {
                        let _ = fs::remove_file(f.path());
                    }
                }
                let _ = fs::remove_dir(run.path());
            }
            let _ = fs::remove_dir(&self.bpffs_dir);
        }
        let _ = remove_tree(&self.cgroups.root);
        if std::thread::panicking() {
            eprintln!("--- agent log ({}) ---\n{}", self.id, self.agent_log());
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A veth between `host` (interface `host_if`, addresses `host_addrs`: v4 and
/// v6 gateway) and `peer` (interface `eth0`, `peer_addrs`), with the peer's
/// default routes through the host. Created inside `host` with the peer end
/// placed straight into `peer`: the machine's own namespace never sees either.
fn wire(host: &Netns, host_if: &str, host_addrs: [&str; 2], peer: &Netns, peer_addrs: &[&str]) {
    host.ip(&format!(
        "link add {host_if} type veth peer name eth0 netns {}",
        peer.name
    ));
    let cidr = |a: &str| {
        if a.contains(':') {
            format!("{a}/64 nodad")
        } else {
            format!("{a}/24")
        }
    };
    for a in host_addrs {
        host.ip(&format!("addr add {} dev {host_if}", cidr(a)));
    }
    host.ip(&format!("link set {host_if} up"));
    for a in peer_addrs {
        peer.ip(&format!("addr add {} dev eth0", cidr(a)));
    }
    peer.ip("link set eth0 up");
    peer.ip(&format!("route add default via {}", host_addrs[0]));
    peer.ip(&format!("-6 route add default via {}", host_addrs[1]));
}

/// The test upstream CA (`upstream-ca.crt`) and a certificate it signed for the
/// provider host, as the real provider would present. Returns (cert, key) paths.
fn write_upstream_pki(dir: &std::path::Path) -> (String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Tollgate test upstream CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec![
        // The mock's token endpoint is reached by address (`mock_google`).
        UPSTREAM_V4.to_string(),
        PROVIDER_HOST.to_string(),
        ANTHROPIC_HOST.to_string(),
        GEMINI_HOST.to_string(),
        BEDROCK_HOST.to_string(),
        VERTEX_HOSTS[0].to_string(),
        VERTEX_HOSTS[1].to_string(),
        AZURE_HOST.to_string(),
        BACKUP_HOST.to_string(),
        BEDROCK_WEST_HOST.to_string(),
        MCP_HOST.to_string(),
    ])
    .unwrap()
    .signed_by(&leaf_key, &issuer)
    .unwrap();
    fs::write(dir.join("upstream-ca.crt"), ca_cert.pem()).unwrap();
    let (cert, key) = (dir.join("upstream.crt"), dir.join("upstream.key"));
    fs::write(&cert, leaf.pem()).unwrap();
    fs::write(&key, leaf_key.serialize_pem()).unwrap();
    (cert.display().to_string(), key.display().to_string())
}

/// Path of a binary built next to the running test executable.
fn sibling_bin(name: &str, env: &str) -> String {
    if let Ok(p) = std::env::var(env) {
        return p;
    }
    let exe = std::env::current_exe().expect("current exe");
    // A test runs from target/<profile>/deps/, a binary (demo, bench) from
    // target/<profile>/: the sibling is in the first of these that has it.
    let here = exe.parent().expect("exe dir");
    let p = [Some(here), here.parent()]
        .into_iter()
        .flatten()
        .map(|d| d.join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| here.join(name));
    assert!(
        p.exists(),
        "{} not found; build it first (`cargo build -p tollgate-agent -p tollgate-tests --bins`, done by `cargo xtask test`) or set {env}",
        p.display()
    );
    p.display().to_string()
}

/// A test node with `pods` pods and a running agent (`config` merged over
/// the defaults), or None (test skipped) when it cannot run privileged here.
pub fn governed_node(test: &str, pods: u32, config: &str) -> Option<TestNode> {
    if !crate::require_privileged(test) {
        return None;
    }
    let mut node = TestNode::new(pods);
    node.start_agent(config);
    Some(node)
}

pub fn agent_bin() -> String {
    sibling_bin("tollgate", "TOLLGATE_BIN")
}

pub fn bench_bin() -> String {
    sibling_bin("tollgate-bench", "TOLLGATE_BENCH_BIN")
}

pub fn demo_bin() -> String {
    sibling_bin("tollgate-demo", "TOLLGATE_DEMO_BIN")
}

pub fn mock_upstream_bin() -> String {
    sibling_bin("tollgate-mock-upstream", "TOLLGATE_MOCK_UPSTREAM_BIN")
}

/// Run a command to completion inside a namespace and return stdout.
pub fn output_in(ns: &Netns, program: &str, args: &[&str]) -> String {
    String::from_utf8_lossy(&run_ok(ns.command(program).args(args)).stdout).into_owned()
}
