//! The `tollgate` command line.
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Config;

#[derive(Debug, Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Govern the LLM API traffic of a node's workloads, without touching the workloads.",
    long_about = "Tollgate attaches eBPF programs to a cgroup v2 subtree (the kubelet's pods, or \
tollgate.slice on a plain host). Connections from processes there to LLM providers \
(api.openai.com, api.anthropic.com, …) are transparently redirected to a proxy the agent runs \
inside each workload's network namespace and attributed to the workload. With a node CA \
(`tollgate ca init`, `tls.ca_dir`) the proxy terminates TLS for provider hosts, parses each API \
call (model, stream, token usage, cost) and writes one audit line per call; without one, or for \
workloads that do not trust it, connections are relayed and audited by server name and bytes. \
Remote MCP servers listed in `mcp_servers` are governed the same way, call by call and tool by tool. \
In a cluster (a DaemonSet: deploy/helm/tollgate) pods are named by namespace, owner workload and \
labels from the API server. Prometheus metrics on `metrics.listen`.\n\n\
Needs: Linux ≥ 5.15 with BTF, cgroup v2 mounted (hybrid hosts are fine), root or \
CAP_BPF+CAP_PERFMON+CAP_NET_ADMIN+CAP_SYS_ADMIN.",
    after_help = "Examples:\n  tollgate ca init --dir /var/lib/tollgate/ca   # once per node (or mount a Secret)\n  tollgate run --config /etc/tollgate/config.yaml\n  tollgate check-config config.yaml\n  tollgate status   # budget spend of the running agent\n  tollgate top      # live calls, tokens, spend and refusals per workload\n  tollgate detach   # remove programs a fail-closed agent left pinned\n\nKubernetes: helm install tollgate deploy/helm/tollgate (or kubectl apply -f deploy/manifests/tollgate.yaml)\n\nDocumentation: README.md (deploying, configuration reference, audit record, metrics, reliability, limits)."
)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info`, `tollgate_agent=debug`.
    #[arg(long, env = "TOLLGATE_LOG", default_value = "info", global = true)]
    pub log: String,
    /// Log format: `text` for people, `json` (one object per line) for log
    /// collectors; `auto` is text on a terminal and json otherwise. Colours
    /// only ever go to a terminal.
    #[arg(
        long,
        value_enum,
        env = "TOLLGATE_LOG_FORMAT",
        default_value = "auto",
        global = true
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Auto,
    Text,
    Json,
}

impl LogFormat {
    /// The format in force, `auto` decided by whether stderr (where logs
    /// go) is a terminal.
    pub fn resolve(self, stderr_is_terminal: bool) -> LogFormat {
        match self {
            LogFormat::Auto if stderr_is_terminal => LogFormat::Text,
            LogFormat::Auto => LogFormat::Json,
            other => other,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach to the governed cgroup subtree and run the proxy until SIGTERM.
    Run {
        /// YAML configuration (see README "Configuration"). Omitted: built-in defaults.
        #[arg(long, short, env = "TOLLGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and print the effective configuration.
    CheckConfig {
        /// YAML configuration file.
        file: PathBuf,
    },
    /// Node CA for TLS termination: create one, or check one (e.g. a mounted Secret).
    #[command(subcommand)]
    Ca(CaCommand),
    /// Policy tools.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Show a running agent's policy and budget spend (from its metrics endpoint).
    Status {
        /// The agent's `metrics.listen` address.
        #[arg(long, default_value = "127.0.0.1:9464")]
        addr: std::net::SocketAddr,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        /// The agent's `metrics.bearer_token_file`, when it requires a token.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// A live view of a running agent, redrawn every second: per
    /// namespace/workload calls/s, tokens/s, calls and spend, refusals by
    /// reason, active streams (from its metrics endpoint).
    Top {
        /// The agent's `metrics.listen` address.
        #[arg(long, default_value = "127.0.0.1:9464")]
        addr: std::net::SocketAddr,
        /// The agent's `metrics.bearer_token_file`, when it requires a token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Time between scrapes (the rates are over it).
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        /// Print one view (two scrapes one interval apart) and exit, without
        /// clearing the screen: for scripts.
        #[arg(long)]
        once: bool,
    },
    /// The price table in force (shipped entries and the config's), or how
    /// one model is priced.
    Pricing {
        /// The agent's configuration (its `pricing` section); omitted: the shipped table.
        #[arg(long, short, env = "TOLLGATE_CONFIG")]
        config: Option<PathBuf>,
        /// A model name to price (as the provider reports it, e.g. gpt-4o-mini-2024-07-18).
        model: Option<String>,
        /// The provider it is called through (entries can be provider-scoped).
        #[arg(long, default_value = "openai")]
        provider: String,
    },
    /// Remove programs pinned by a fail-closed agent (provider connections flow again).
    Detach {
        /// bpffs directory the agent pinned into.
        #[arg(long, default_value = "/sys/fs/bpf/tollgate")]
        bpffs_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Print the JSON Schema of the configuration file (policy included), for
    /// editors and CI checks; `check-config` validates a file against the same types.
    Schema,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create ca.crt (0644) and ca.key (0600) in DIR. Workloads must trust ca.crt
    /// (SSL_CERT_FILE, REQUESTS_CA_BUNDLE, NODE_EXTRA_CA_CERTS) for TLS termination.
    Init {
        #[arg(long, default_value = "/var/lib/tollgate/ca")]
        dir: PathBuf,
        /// Subject common name of the CA.
        #[arg(long, default_value = "Tollgate node CA")]
        common_name: String,
        /// Replace an existing CA (workloads must then trust the new one).
        #[arg(long)]
        force: bool,
    },
    /// Load the CA in DIR as the agent would (key permissions included) and print its certificate.
    Check {
        #[arg(long, default_value = "/var/lib/tollgate/ca")]
        dir: PathBuf,
    },
}

pub fn load_config(path: Option<&std::path::Path>) -> Result<Config, crate::config::ConfigError> {
    match path {
        Some(p) => Config::load(p),
        None => Ok(Config::default()),
    }
}
