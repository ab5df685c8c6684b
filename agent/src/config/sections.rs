//! The sections of the configuration file, each with its defaults.
use std::{net::IpAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use super::DEFAULT_PROXY_PORT;

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Port of the loopback listeners the agent opens in each workload namespace.
    pub port: u16,
    /// SO_MARK set on the agent's provider connections (made inside the
    /// pod's namespace), for node firewalls or routing that want to tell
    /// them apart; 0 (the default) sets none. The kernel programs do not use
    /// it: they recognise the agent by its cgroup, since a pod with
    /// CAP_NET_RAW can set any mark. `skip_mark`, its former name, is read too.
    #[serde(alias = "skip_mark")]
    pub socket_mark: u32,
    /// How long to wait for the provider to accept the relayed connection.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub upstream_connect_timeout: Duration,
    /// Connections one workload namespace may hold open through the proxy
    /// at once; past it new ones are closed (`over_capacity`), so one pod
    /// cannot take the proxy's descriptors and memory from the others.
    pub max_connections_per_namespace: usize,
    /// Proxy threads, each with a runtime of its own and one listener per
    /// workload namespace (`workers`). 0: one per CPU this process may use
    /// (its affinity mask and CPU quota).
    pub worker_threads: usize,
}

impl ProxyConfig {
    /// The number of proxy threads `worker_threads` asks for.
    pub fn threads(&self) -> usize {
        match self.worker_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct HeartbeatConfig {
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub interval: Duration,
    /// Without a heartbeat for this long the kernel programs treat the agent as gone.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Name servers (`ip` or `ip:port`). Empty: the system's /etc/resolv.conf.
    pub servers: Vec<String>,
    /// Re-resolve no sooner than this, whatever the record TTL says.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub min_ttl: Duration,
    /// Re-resolve at least this often.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_ttl: Duration,
    /// After a failed lookup, retry after this long; the last good addresses
    /// stay in the map until their TTL (plus this grace) has passed.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub retry: Duration,
    /// Keep an address this long after its TTL ran out: applications cache
    /// answers (the JVM for 30 s by default) and connect after we re-resolved.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub stale_grace: Duration,
    /// Also learn provider addresses from the DNS answers workloads receive
    /// (a kernel program reads them before the application does), so an
    /// address only the workload's resolver returned is redirected on its
    /// first connection. Learned addresses live for the TTL clamped to
    /// `min_ttl..max_ttl`, plus `stale_grace`, and redirect only connections
    /// from the network namespace that received the answer. Only the first
    /// 4 `ports` of a provider are learned.
    pub learn_from_workloads: bool,
    /// The resolvers whose answers are learned, for every namespace (the
    /// cluster DNS, e.g. kube-dns's service address and node-local-dns).
    /// Empty: each namespace's own `nameserver`s from its /etc/resolv.conf.
    /// Answers from anywhere else (a pod answering itself) are not learned.
    pub workload_resolvers: Vec<IpAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub name: String,
    /// Host names to resolve and redirect.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Fixed addresses (no DNS), e.g. a private endpoint.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    #[serde(default = "default_ports")]
    pub ports: Vec<u16>,
    /// For `api: bedrock`: the AWS regions whose Bedrock runtime is governed
    /// (each adds `bedrock-runtime.<region>.amazonaws.com` to `hosts`); for
    /// `api: vertex`, Google Cloud regions (`<region>-aiplatform.googleapis.com`;
    /// `global`: `aiplatform.googleapis.com`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    /// API family: openai (and OpenAI-compatible), anthropic, gemini,
    /// bedrock. Default: from the name (anthropic, gemini, bedrock), else
    /// openai.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<crate::providers::Api>,
    /// OpenAI-style streams that did not ask for usage
    /// (`stream_options.include_usage`): `ask` makes the request ask for it
    /// and takes what that adds back out of the stream, so the workload gets
    /// the events it would have got and the record gets the provider's exact
    /// count; `leave` sends the request as it is and estimates. Default: ask
    /// for `openai` and Azure OpenAI hosts (api-version 2024-09-01 on),
    /// leave for other OpenAI-compatible servers (some reject unknown
    /// fields; most report usage in every stream anyway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_usage: Option<StreamUsage>,
}

/// One remote MCP server (`mcp_servers`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct McpServerConfig {
    /// What rules (`mcp.servers`), records and metrics call it.
    pub name: String,
    /// Host names to resolve and redirect (`api.githubcopilot.com`).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Fixed addresses (no DNS).
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    #[serde(default = "default_ports")]
    pub ports: Vec<u16>,
}

impl McpServerConfig {
    pub fn into_provider(self) -> ProviderConfig {
        ProviderConfig {
            name: self.name,
            hosts: self.hosts,
            addresses: self.addresses,
            ports: self.ports,
            regions: Vec::new(),
            api: Some(crate::providers::Api::Mcp),
            stream_usage: Some(StreamUsage::Leave),
        }
    }
}

/// `providers[].stream_usage`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StreamUsage {
    Ask,
    Leave,
}

impl ProviderConfig {
    pub fn api(&self) -> crate::providers::Api {
        self.api
            .unwrap_or_else(|| crate::providers::Api::for_provider_name(&self.name))
    }

    /// Whether streams that did not ask for usage are made to (see `stream_usage`).
    pub fn asks_stream_usage(&self) -> bool {
        match self.stream_usage {
            Some(s) => s == StreamUsage::Ask,
            None => {
                self.api() == crate::providers::Api::Openai
                    && (self.name == "openai"
                        || self
                            .hosts
                            .iter()
                            .any(|h| crate::providers::openai::is_azure(h)))
            }
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct OptOutConfig {
    /// Globs over cgroup paths relative to `cgroup_root`; a matching cgroup and
    /// everything below it is never redirected (e.g. `**/*pod<uid>.slice`).
    pub cgroups: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveryConfig {
    /// How often the cgroup tree is scanned for new workload namespaces (each
    /// gets a loopback listener) and new opted-out cgroups. Until a namespace
    /// has its listener, its provider connections follow `failure_mode`.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub scan_interval: Duration,
}

/// The audit log: one JSON line per relayed connection and per proxied request.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// A file path, or `-` for stdout.
    pub path: String,
    /// Rotate the file when it would grow past this many bytes.
    pub max_file_bytes: u64,
    /// Rotated files kept (`path.1` … `path.N`), oldest deleted.
    pub max_files: u32,
    /// Request headers and bodies in request records (off by default: prompts
    /// are often personal data). Credentials are always redacted.
    pub capture: CaptureConfig,
    /// The call journal: a small file of calls admitted and not yet
    /// recorded, so a crash loses none — after a restart each becomes one
    /// record (`result: agent_restarted`, usage estimated) and is charged.
    /// "" (the default outside the chart): no journal.
    pub journal: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    /// Add `request_headers` (credentials and cookies redacted).
    pub headers: bool,
    /// Add `request_body` and `response_body`, secrets redacted, truncated.
    pub bodies: bool,
    /// Longest captured body, in bytes (the record says how much was cut).
    pub max_body_bytes: usize,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            headers: false,
            bodies: false,
            max_body_bytes: 4096,
        }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        // 100 MiB × 5: a day of a busy node's calls, bounded on disk.
        Self {
            path: "-".into(),
            max_file_bytes: 100 * 1024 * 1024,
            max_files: 5,
            capture: CaptureConfig::default(),
            journal: String::new(),
        }
    }
}

/// See `TlsConfig::on_ca_rejected`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnCaRejected {
    Observe,
    Terminate,
}

/// The smallest `tls.max_request_head`: hyper's HTTP/1 server reads into a
/// buffer of at least this.
pub const MIN_REQUEST_HEAD: usize = 8192;

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Directory with the node CA (`ca.crt`, `ca.key`; `tollgate ca init`).
    /// Empty: no TLS termination, every connection is relayed as bytes.
    pub ca_dir: String,
    /// PEM files trusted for upstream (provider) certificates besides the system roots.
    pub extra_roots: Vec<PathBuf>,
    /// Trust the system's root certificates for upstream connections.
    pub system_roots: bool,
    /// How long a client may take to send its TLS ClientHello; without one
    /// by then, the connection is relayed unparsed (as a non-TLS protocol
    /// would be) and the provider's own idle timeouts apply.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub client_hello_timeout: Duration,
    /// A terminated client must send each request's headers within this,
    /// counted from their first byte (slowloris). An idle keep-alive
    /// connection (about 23 KiB once it has served a call) is left to the
    /// client to close.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub request_header_timeout: Duration,
    /// End a response stream when the provider sends nothing for this long.
    /// Reasoning models can think silently for minutes, hence 5 min.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub stream_idle_timeout: Duration,
    /// Largest HTTP/1 request head (request line and headers) a terminated
    /// client may send; a larger one is answered 431. It also sizes the
    /// connection's read buffer, which an idle kept-alive connection holds:
    /// 8 KiB (nginx's largest header line) keeps that buffer at 8 KiB,
    /// where HTTP/1's usual 400 KiB bound let it grow to 16 KiB per idle
    /// connection (README "Performance"). At least 8192.
    pub max_request_head: usize,
    /// Largest request body forwarded (it is read whole to learn the model).
    pub max_request_body: usize,
    /// Request bodies held at once by all terminated calls of the node; a
    /// body that would pass it gets a provider-shaped 503 with `retry-after`
    /// (the SDK retries), other calls go on. At least `max_request_body`.
    pub max_buffered_bytes: usize,
    /// Calls whose client left before the response headers are finished
    /// anyway (read for their usage, recorded, charged), at most this many
    /// at once on the node; beyond, such a call is cancelled and recorded
    /// without usage. Bounds what sending and resetting calls in a loop can
    /// keep running.
    pub max_abandoned_calls: usize,
    /// A terminated client must send each request's whole body within this,
    /// counted from its headers (a body trickled to hold memory gets a 408).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub request_body_timeout: Duration,
    /// Longest wait for a provider's response headers. Non-streaming completions
    /// send headers only when generation is done, so this is long.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub upstream_response_timeout: Duration,
    /// What to do with a workload that rejects the node CA's certificate:
    /// `observe` (relay its connections to that host untouched, for
    /// `ca_rejected_retry`) or `terminate` (keep terminating: it keeps failing).
    pub on_ca_rejected: OnCaRejected,
    /// How long a rejecting workload is relayed before termination is tried again.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub ca_rejected_retry: Duration,
    /// TLS 1.3 session tickets sent to a terminated client right after its
    /// handshake; each lets it resume one later connection without a full
    /// handshake. 0 (the default) sends none. The Python `websockets`
    /// client (the OpenAI SDK's Realtime client) reads its TLS socket from
    /// one thread while another writes the handshake request, and a ticket
    /// arriving during that write loses the request: about one session in a
    /// hundred then hangs until its open timeout. A proxy next to the pod
    /// answers fast enough to land in that window; a far provider seldom
    /// does. TLS 1.2 clients still resume by session id. At most 8.
    pub session_tickets: usize,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            ca_dir: String::new(),
            extra_roots: Vec::new(),
            system_roots: true,
            client_hello_timeout: Duration::from_secs(5),
            request_header_timeout: Duration::from_secs(30),
            stream_idle_timeout: Duration::from_secs(300),
            on_ca_rejected: OnCaRejected::Observe,
            ca_rejected_retry: Duration::from_secs(3600),
            session_tickets: 0,
            max_request_head: MIN_REQUEST_HEAD,
            // 32 MiB: long-context requests with images stay well below it.
            max_request_body: 32 * 1024 * 1024,
            // 256 MiB: eight maximal bodies at once, or thousands of usual ones.
            max_buffered_bytes: 256 * 1024 * 1024,
            max_abandoned_calls: 256,
            request_body_timeout: Duration::from_secs(60),
            upstream_response_timeout: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of `/metrics`, `/status`, `/healthz`, `/readyz`. Empty disables the endpoint.
    pub listen: String,
    /// A file holding a bearer token that `/metrics` and `/status` require
    /// (`Authorization: Bearer <token>`); re-read when it changes. Empty: no
    /// token, fit only for a loopback `listen`. The probes need none.
    pub bearer_token_file: PathBuf,
    /// The series of a pod gone from the node are dropped this long after
    /// it went (enough for scrapes to see its last counts): per-pod series
    /// would otherwise grow without bound on a node whose pods churn.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub pod_series_grace: Duration,
}

fn default_ports() -> Vec<u16> {
    vec![443]
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            port: DEFAULT_PROXY_PORT,
            socket_mark: 0,
            max_connections_per_namespace: 1024,
            upstream_connect_timeout: Duration::from_secs(10),
            worker_threads: 0,
        }
    }
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        // 1 s beats with a 5 s timeout: a busy node can miss a few beats without
        // flapping, and a hung agent stops governing within seconds.
        Self {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
        }
    }
}

impl Default for DnsConfig {
    fn default() -> Self {
        // min 5 s keeps a 0-TTL record from turning into a query storm; max 5 min
        // bounds how stale a long-TTL answer can get.
        Self {
            servers: Vec::new(),
            min_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(300),
            retry: Duration::from_secs(10),
            stale_grace: Duration::from_secs(60),
            learn_from_workloads: true,
            workload_resolvers: Vec::new(),
        }
    }
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            scan_interval: Duration::from_millis(500),
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
            bearer_token_file: PathBuf::new(),
            pod_series_grace: Duration::from_secs(600),
        }
    }
}

/// The providers Tollgate knows out of the box. Azure OpenAI hosts are per
/// resource (`<name>.openai.azure.com`) and must be listed in the config.
pub fn default_providers() -> Vec<ProviderConfig> {
    let p = |name: &str, hosts: &[&str]| ProviderConfig {
        name: name.into(),
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        addresses: Vec::new(),
        ports: default_ports(),
        regions: Vec::new(),
        api: None,
        stream_usage: None,
    };
    let bedrock = ProviderConfig {
        regions: BEDROCK_REGIONS.iter().map(|r| r.to_string()).collect(),
        ..p("bedrock", &[])
    }
    .with_region_hosts();

    vec![
        p("openai", &["api.openai.com"]),
        p("anthropic", &["api.anthropic.com"]),
        p("gemini", &["generativelanguage.googleapis.com"]),
        p("mistral", &["api.mistral.ai"]),
        p("groq", &["api.groq.com"]),
        p("deepseek", &["api.deepseek.com"]),
        p("openrouter", &["openrouter.ai"]),
        p("cohere", &["api.cohere.com", "api.cohere.ai"]),
        bedrock,
        // Not built in: Vertex AI. Its endpoints share Google's front-end
        // addresses with every googleapis.com service, so governing them
        // by default would take in (and, under a terminating rule, refuse
        // as foreign hosts) other Google API traffic landing on them.
    ]
}

/// The regions of the built-in `bedrock` provider: where Bedrock's runtime
/// served on-demand models in 2025.
pub const BEDROCK_REGIONS: [&str; 15] = [
    "us-east-1",
    "us-east-2",
    "us-west-2",
    "ca-central-1",
    "sa-east-1",
    "eu-central-1",
    "eu-west-1",
    "eu-west-2",
    "eu-west-3",
    "eu-north-1",
    "ap-northeast-1",
    "ap-northeast-2",
    "ap-south-1",
    "ap-southeast-1",
    "ap-southeast-2",
];

impl ProviderConfig {
    /// `hosts` with the endpoint of each of `regions` added (Bedrock's
    /// runtime, Vertex AI's).
    pub fn with_region_hosts(mut self) -> Self {
        let vertex = self.api() == crate::providers::Api::Vertex;
        for r in &self.regions {
            let h = match (vertex, r.as_str()) {
                (true, "global") => "aiplatform.googleapis.com".to_string(),
                (true, r) => format!("{r}-aiplatform.googleapis.com"),
                (false, r) => format!("bedrock-runtime.{r}.amazonaws.com"),
            };
            if !self.hosts.contains(&h) {
                self.hosts.push(h);
            }
        }
        self
    }
}

/// A Google Cloud region name (`us-central1`, `europe-west4`) or `global`.
pub fn valid_gcp_region(r: &str) -> bool {
    r == "global"
        || r.split_once('-').is_some_and(|(a, b)| {
            !a.is_empty()
                && a.bytes().all(|c| c.is_ascii_lowercase())
                && b.bytes().last().is_some_and(|c| c.is_ascii_digit())
                && b.bytes().next().is_some_and(|c| c.is_ascii_lowercase())
                && b.bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        })
}

/// An AWS region name: `us-east-1`, `us-gov-west-1`, `ap-southeast-2`.
pub fn valid_region(r: &str) -> bool {
    let parts: Vec<&str> = r.split('-').collect();
    parts.len() >= 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
        && parts
            .last()
            .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        && parts[0].len() == 2
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_thread_per_usable_cpu_unless_set() {
        let auto = super::ProxyConfig::default();
        assert_eq!(
            auto.threads(),
            std::thread::available_parallelism().unwrap().get()
        );
        let explicit = super::ProxyConfig {
            worker_threads: 4,
            ..Default::default()
        };
        assert_eq!(explicit.threads(), 4);
    }
}
