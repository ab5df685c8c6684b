//! The agent's configuration: one typed serde model, validated at load.
//!
//! Every error names the field (`proxy.port`) and, where the YAML has it, the
//! line, so `tollgate check-config` answers "what is wrong and where".
use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

mod locate;
mod sections;

use locate::line_of;
pub use sections::*;

/// Default port of the proxy's loopback listeners inside each workload's network
/// namespace. Chosen outside the ephemeral range (32768–60999) so an outgoing
/// connection can never hold it, and away from ports meshes use (15001/15006 Istio).
pub const DEFAULT_PROXY_PORT: u16 = 15088;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "cannot read config file {path}: {source}\nhint: pass an existing file with --config, or omit --config to use the built-in defaults"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {location}field `{field}`: {message}")]
    Invalid {
        path: String,
        location: String,
        field: String,
        message: String,
    },
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Agent gone: provider connections go straight to the provider, ungoverned.
    #[default]
    Open,
    /// Agent gone: provider connections are refused (EPERM) until it is back.
    Closed,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// cgroup v2 subtree whose processes are governed. `auto`: the kubelet pods
    /// slice if this node runs one, else `tollgate.slice` (created) for host mode.
    /// Absolute, or relative to the cgroup2 mount.
    pub cgroup_root: String,
    pub proxy: ProxyConfig,
    pub failure_mode: FailureMode,
    pub heartbeat: HeartbeatConfig,
    pub dns: DnsConfig,
    /// LLM providers to redirect. Replaces the built-in list when given.
    pub providers: Vec<ProviderConfig>,
    /// Remote MCP servers to govern (README "MCP"): their hosts are
    /// redirected and terminated like providers', their JSON-RPC calls
    /// decided by rules' `mcp` and recorded one by one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mcp_servers: Vec<McpServerConfig>,
    /// Where each MCP server of `providers` was listed (`mcp_servers[i]`).
    #[serde(skip)]
    #[schemars(skip)]
    pub(crate) mcp_origin: std::collections::HashMap<String, usize>,
    pub opt_out: OptOutConfig,
    pub discovery: DiscoveryConfig,
    pub metrics: MetricsConfig,
    pub tls: TlsConfig,
    pub audit: AuditConfig,
    /// OpenTelemetry: one span per call to an OTLP/HTTP collector (off by default).
    pub otlp: crate::telemetry::otlp::OtlpConfig,
    /// Per-call records for pods that do not trust the node CA, read at
    /// their TLS library (README "TLS uprobes"; off by default).
    pub tls_uprobes: crate::uprobe::UprobeConfig,
    /// Prices for the `cost_usd` of audit records and the cost metric.
    pub pricing: crate::pricing::PricingConfig,
    /// Who may call what (README "Policy"). Reloaded on change and SIGHUP.
    pub policy: crate::policy::PolicyConfig,
    /// Where limits' and budgets' state lives: this node, or Redis (shared).
    pub state: crate::policy::shared::StateConfig,
    /// Where budget spend is kept across restarts (JSON, rewritten every few
    /// seconds). Empty: in memory only, spend starts at 0 after a restart.
    pub budget_state_file: String,
    /// Name of this node in audit records. Empty: `$NODE_NAME` (the
    /// DaemonSet sets it from `spec.nodeName`), else the host name.
    pub node_name: String,
    /// Pod metadata from the Kubernetes API (README "Kubernetes").
    pub kubernetes: crate::pods::KubernetesConfig,
    /// bpffs directory for pinned programs (fail-closed mode keeps them there so
    /// enforcement survives the agent).
    pub bpffs_dir: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            cgroup_root: "auto".into(),
            proxy: ProxyConfig::default(),
            failure_mode: FailureMode::Open,
            heartbeat: HeartbeatConfig::default(),
            dns: DnsConfig::default(),
            providers: default_providers(),
            mcp_servers: Vec::new(),
            mcp_origin: Default::default(),
            opt_out: OptOutConfig::default(),
            discovery: DiscoveryConfig::default(),
            metrics: MetricsConfig::default(),
            tls: TlsConfig::default(),
            audit: AuditConfig::default(),
            otlp: Default::default(),
            tls_uprobes: Default::default(),
            pricing: crate::pricing::PricingConfig::default(),
            policy: crate::policy::PolicyConfig::default(),
            node_name: String::new(),
            kubernetes: crate::pods::KubernetesConfig::default(),
            budget_state_file: String::new(),
            state: crate::policy::shared::StateConfig::default(),
            bpffs_dir: PathBuf::from("/sys/fs/bpf/tollgate"),
        }
    }
}

impl Config {
    /// This node's name for audit records (see `node_name`).
    pub fn node_name(&self) -> String {
        if !self.node_name.is_empty() {
            return self.node_name.clone();
        }
        std::env::var("NODE_NAME")
            .ok()
            .filter(|n| !n.is_empty())
            .or_else(|| {
                nix::unistd::gethostname()
                    .ok()
                    .and_then(|h| h.into_string().ok())
            })
            .unwrap_or_else(|| "unknown".into())
    }

    /// Load and validate a YAML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parse and validate YAML text; `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let de = serde_yaml::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            let location = inner
                .location()
                .map(|l| format!("line {}, column {}: ", l.line(), l.column()))
                .unwrap_or_default();
            // serde_yaml prefixes its message with the path and suffixes the
            // position; both are already in our own format.
            let text = inner.to_string();
            let message = text.split(" at line ").next().unwrap_or_default();
            let message = match message.split_once(": ") {
                Some((prefix, rest)) if field.starts_with(prefix) => rest.to_string(),
                _ => message.to_string(),
            };
            let field = if field == "." {
                "(top level)".into()
            } else {
                field
            };
            ConfigError::Invalid {
                path: origin.into(),
                location,
                field,
                message,
            }
        })?;
        let mut config = config;
        config.adopt_mcp_servers();
        config.providers = std::mem::take(&mut config.providers)
            .into_iter()
            .map(ProviderConfig::with_region_hosts)
            .collect();
        if let Err((field, message)) = config.validate() {
            let location = line_of(text, &field)
                .map(|l| format!("line {l}: "))
                .unwrap_or_default();
            return Err(ConfigError::Invalid {
                path: origin.into(),
                location,
                field,
                message,
            });
        }
        Ok(config)
    }

    /// Semantic checks serde cannot express. Returns (field path, message).
    fn validate(&self) -> Result<(), (String, String)> {
        let err = |f: &str, m: String| Err((f.to_string(), m));
        if self.proxy.port == 0 {
            return err("proxy.port", "must be a port number 1-65535".into());
        }
        if self.proxy.max_connections_per_namespace == 0 {
            return err(
                "proxy.max_connections_per_namespace",
                "must be at least 1 (0 would close every connection)".into(),
            );
        }
        if self.tls.max_request_head < sections::MIN_REQUEST_HEAD {
            return err(
                "tls.max_request_head",
                format!(
                    "must be at least {} bytes (the HTTP/1 server's smallest read buffer)",
                    sections::MIN_REQUEST_HEAD
                ),
            );
        }
        if self.tls.max_buffered_bytes < self.tls.max_request_body {
            return err(
                "tls.max_buffered_bytes",
                format!(
                    "must be at least tls.max_request_body ({}): a body of that size could never be read",
                    self.tls.max_request_body
                ),
            );
        }
        if self.tls.session_tickets > 8 {
            return err(
                "tls.session_tickets",
                format!(
                    "{} tickets per handshake is more than any client uses (at most 8; 0 sends none)",
                    self.tls.session_tickets
                ),
            );
        }
        if self.tls.request_body_timeout.is_zero() {
            return err(
                "tls.request_body_timeout",
                "must be greater than zero".into(),
            );
        }
        if self.heartbeat.interval.is_zero() {
            return err("heartbeat.interval", "must be greater than zero".into());
        }
        if self.heartbeat.timeout < self.heartbeat.interval * 2 {
            return err(
                "heartbeat.timeout",
                format!(
                    "must be at least twice heartbeat.interval ({:?}), or one late beat would stop governing",
                    self.heartbeat.interval
                ),
            );
        }
        if self.dns.min_ttl > self.dns.max_ttl {
            return err("dns.min_ttl", "must not exceed dns.max_ttl".into());
        }
        if self.audit.max_file_bytes < 4096 {
            return err(
                "audit.max_file_bytes",
                "must be at least 4096 (one record must fit)".into(),
            );
        }
        if self.audit.max_files == 0 {
            return err("audit.max_files", "must be at least 1".into());
        }
        if let Err((field, message)) = self.otlp.validate() {
            return err(&format!("otlp.{field}"), message);
        }
        if let Err((i, e)) = crate::pricing::PriceTable::new(&self.pricing) {
            return err(&format!("pricing.models[{i}]"), e.to_string());
        }
        if self.state.backend == crate::policy::shared::Backend::Redis
            && let Err(e) = crate::policy::shared::SharedBudgets::new(&self.state)
        {
            return err("state.redis_url", e.to_string());
        }
        let names: Vec<String> = self.providers.iter().map(|p| p.name.clone()).collect();
        if let Err(e) =
            crate::policy::Policy::with_mcp(&self.policy, &names, &self.mcp_server_names())
        {
            return err(&format!("policy.{}", e.field), e.message);
        }
        let api_of = |name: &str| {
            self.providers
                .iter()
                .find(|p| p.name == name)
                .map(|p| p.api())
        };
        for (i, chain) in self.policy.failover.iter().enumerate() {
            if let Err((field, message)) = chain.check_targets(api_of) {
                return err(&format!("policy.failover[{i}].{field}"), message);
            }
        }
        if self.discovery.scan_interval.is_zero() {
            return err(
                "discovery.scan_interval",
                "must be greater than zero".into(),
            );
        }
        for (i, s) in self.dns.servers.iter().enumerate() {
            if parse_dns_server(s).is_none() {
                return err(
                    &format!("dns.servers[{i}]"),
                    format!("`{s}` is not an IP address or IP:port"),
                );
            }
        }
        if !self.metrics.listen.is_empty() && self.metrics.listen.parse::<SocketAddr>().is_err() {
            return err(
                "metrics.listen",
                format!(
                    "`{}` is not an address like 127.0.0.1:9464",
                    self.metrics.listen
                ),
            );
        }
        if self.providers.is_empty() {
            return err(
                "providers",
                "lists no provider: nothing would be governed".into(),
            );
        }
        let mut names = HashSet::new();
        for (i, p) in self.providers.iter().enumerate() {
            // MCP servers were checked under their own section (`adopt_mcp_servers`).
            let at = match self.mcp_origin.get(&p.name) {
                Some(j) => format!("mcp_servers[{j}]"),
                None => format!("providers[{i}]"),
            };
            if !names.insert(&p.name) {
                return err(
                    &format!("{at}.name"),
                    format!(
                        "`{}` is listed twice (providers and mcp_servers share names)",
                        p.name
                    ),
                );
            }
            check_governed(p, &at)?;
        }
        let static_entries: usize = self
            .providers
            .iter()
            .map(|p| p.addresses.len() * p.ports.len())
            .sum();
        let capacity = tollgate_common::capacity::PROVIDERS as usize;
        if static_entries > capacity {
            return err(
                "providers",
                format!(
                    "{static_entries} (address, port) pairs from `addresses` exceed the kernel provider map ({capacity}); list fewer"
                ),
            );
        }
        for (i, g) in self.opt_out.cgroups.iter().enumerate() {
            if let Err(e) = globset::Glob::new(g) {
                return err(
                    &format!("opt_out.cgroups[{i}]"),
                    format!("invalid glob: {e}"),
                );
            }
        }
        Ok(())
    }

    /// `mcp_servers` become governed hosts like providers (API `mcp`): the
    /// same redirection, termination and rules. Moved into `providers`
    /// once parsed, remembering where each came from for error messages.
    fn adopt_mcp_servers(&mut self) {
        for (j, m) in std::mem::take(&mut self.mcp_servers)
            .into_iter()
            .enumerate()
        {
            self.mcp_origin.insert(m.name.clone(), j);
            self.providers.push(m.into_provider());
        }
    }

    /// The names of the MCP servers among the providers.
    pub fn mcp_server_names(&self) -> Vec<String> {
        self.providers
            .iter()
            .filter(|p| p.api() == crate::providers::Api::Mcp)
            .map(|p| p.name.clone())
            .collect()
    }
}

/// Parse `ip` or `ip:port` (`[v6]:port`), defaulting to port 53.
pub fn parse_dns_server(s: &str) -> Option<SocketAddr> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa);
    }
    s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53))
}

/// The checks every governed host entry (provider or MCP server) passes;
/// `at` is its field path.
fn check_governed(p: &ProviderConfig, at: &str) -> Result<(), (String, String)> {
    let err = |f: &str, m: String| Err((format!("{at}{f}"), m));
    if p.name.trim().is_empty() {
        return err(".name", "must not be empty".into());
    }
    for (j, r) in p.regions.iter().enumerate() {
        let valid = match p.api() {
            crate::providers::Api::Bedrock => sections::valid_region(r),
            crate::providers::Api::Vertex => sections::valid_gcp_region(r),
            _ => {
                return err(
                    ".regions",
                    "is for `api: bedrock` and `api: vertex` providers (their hosts follow from the region); list `hosts` instead".into(),
                );
            }
        };
        if !valid {
            let like = match p.api() {
                crate::providers::Api::Vertex => {
                    "a Google Cloud region name like us-central1 (or global)"
                }
                _ => "an AWS region name like us-east-1",
            };
            return err(&format!(".regions[{j}]"), format!("`{r}` is not {like}"));
        }
    }
    if p.hosts.is_empty() && p.addresses.is_empty() {
        return err(
            "",
            "needs `hosts`, `addresses` or (for bedrock and vertex) `regions`".into(),
        );
    }
    for (j, h) in p.hosts.iter().enumerate() {
        if !valid_host_name(h) {
            return err(
                &format!(".hosts[{j}]"),
                format!(
                    "`{h}` is not a DNS host name (wildcards cannot be resolved; list each host)"
                ),
            );
        }
    }
    if p.ports.is_empty() || p.ports.contains(&0) {
        return err(".ports", "needs at least one port, each 1-65535".into());
    }
    Ok(())
}

fn valid_host_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
        })
}

#[cfg(test)]
mod tests;
