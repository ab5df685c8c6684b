//! The audit log's schema: one record per relayed (or refused) connection and
//! one per terminated request, with typed decisions and outcomes.
//!
//! This module is data only. It imports nothing from the proxy or the policy
//! (the record describes what happened; the state a call carries while it
//! runs — its budget, its hold on limits — travels beside the record, not in
//! it), so every layer can write records without an import circle.
use std::net::SocketAddr;

use serde::Serialize;

use crate::{identity::Workload, providers::Usage};

/// What policy made of a call or connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Forwarded (terminated and governed, or relayed as allowed).
    Allow,
    /// Relayed without terminating: server name and bytes only.
    Observe,
    /// Refused.
    Deny,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Observe => "observe",
            Decision::Deny => "deny",
        }
    }
}

/// How a terminated request ended (`result` in the record and the
/// `tollgate_requests_total` metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    /// The provider leg failed (connect, TLS, reset).
    UpstreamError,
    /// No response headers within the timeout.
    UpstreamTimeout,
    /// The provider stopped sending mid-body.
    UpstreamIdleTimeout,
    /// The workload went away before the response ended.
    ClientDisconnected,
    /// The request could not be read or is not what it declares.
    ClientError,
    RequestTooLarge,
    /// A policy rule denied it.
    Denied,
    RateLimited,
    BudgetExhausted,
    /// The rule's provider key could not be read.
    CredentialUnavailable,
    /// Refused for now: the node holds as many request bodies as it may.
    Overloaded,
    /// The agent stopped (crash, `kill -9`) during the call; recorded from
    /// the call journal when it started again, with usage estimated.
    AgentRestarted,
    /// Read at the workload's TLS library, the call's end was not seen
    /// (the connection closed first, or the capture lost bytes).
    Incomplete,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::UpstreamError => "upstream_error",
            Outcome::UpstreamTimeout => "upstream_timeout",
            Outcome::UpstreamIdleTimeout => "upstream_idle_timeout",
            Outcome::ClientDisconnected => "client_disconnected",
            Outcome::ClientError => "client_error",
            Outcome::RequestTooLarge => "request_too_large",
            Outcome::Denied => "denied",
            Outcome::RateLimited => "rate_limited",
            Outcome::BudgetExhausted => "budget_exhausted",
            Outcome::CredentialUnavailable => "credential_unavailable",
            Outcome::Overloaded => "overloaded",
            Outcome::AgentRestarted => "agent_restarted",
            Outcome::Incomplete => "incomplete",
        }
    }

    /// The provider leg failed in transport (as opposed to answering).
    pub fn is_upstream_failure(self) -> bool {
        matches!(
            self,
            Outcome::UpstreamError | Outcome::UpstreamTimeout | Outcome::UpstreamIdleTimeout
        )
    }
}

/// How a redirected connection ended (`result` in connection records and
/// the `tollgate_connections_total` metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionResult {
    /// Relayed to the end.
    Ok,
    /// Terminated: its requests have records of their own.
    Terminated,
    /// The workload rejected the node CA's certificate.
    ClientRejectedCa,
    /// The workload's TLS handshake failed (or timed out).
    ClientTlsFailed,
    /// Refused by policy.
    Denied,
    UpstreamConnectFailed,
    UpstreamTimeout,
    RelayError,
    /// Nobody redirected it: dialled the listener directly.
    NoRecord,
    /// Closed at once: its namespace had `proxy.max_connections_per_namespace` open.
    OverCapacity,
    /// Closed while open: the workload's budget or limit was spent (TLS uprobes).
    QuotaExhausted,
}

impl ConnectionResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionResult::Ok => "ok",
            ConnectionResult::Terminated => "terminated",
            ConnectionResult::ClientRejectedCa => "client_rejected_ca",
            ConnectionResult::ClientTlsFailed => "client_tls_failed",
            ConnectionResult::Denied => "denied",
            ConnectionResult::UpstreamConnectFailed => "upstream_connect_failed",
            ConnectionResult::UpstreamTimeout => "upstream_timeout",
            ConnectionResult::RelayError => "relay_error",
            ConnectionResult::NoRecord => "no_record",
            ConnectionResult::OverCapacity => "over_capacity",
            ConnectionResult::QuotaExhausted => "quota_exhausted",
        }
    }
}

/// What a client's first bytes were.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientProtocol {
    Tls,
    Plaintext,
    MalformedTls,
    /// Nothing (or not enough) arrived.
    None,
}

/// TLS details of a connection, as its ClientHello announced them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TlsInfo {
    /// Server Name Indication: the host the client wants (absent for IP-literal URLs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// Application protocols offered (e.g. `h2`, `http/1.1`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alpn: Vec<String>,
}

/// One attempt of a failover chain, for the audit record.
#[derive(Debug, Clone, Serialize)]
pub struct Attempt {
    pub provider: String,
    pub host: String,
    pub upstream: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// HTTP status, 0 when none came.
    pub status: u16,
    pub result: AttemptResult,
    pub ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptResult {
    Ok,
    /// A 429/5xx answer, dropped for the next target.
    Retried,
    UpstreamError,
    UpstreamTimeout,
}

/// What the agent saw of one connection.
#[derive(Debug, Clone, Serialize)]
pub struct ConnectionRecord {
    /// RFC 3339 UTC time the connection was accepted.
    pub time: String,
    pub workload: Workload,
    pub pid: u32,
    pub comm: String,
    pub provider: String,
    /// Original destination the workload connected to.
    pub destination: SocketAddr,
    /// Workload side of the connection as the proxy saw it.
    pub client: SocketAddr,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub duration_ms: u64,
    pub result: ConnectionResult,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What the client's first bytes were.
    pub client_protocol: ClientProtocol,
    /// `allow`, `observe` (relayed by policy) or `deny` (closed).
    pub decision: Decision,
    /// `rule:<name>` or `default`.
    pub reason: String,
    /// Server name and ALPN from the TLS ClientHello, when there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsInfo>,
}

/// One JSON line per HTTP request the proxy terminated and forwarded.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    /// RFC 3339 UTC time the request arrived.
    pub time: String,
    /// Always `request` (connection records have no `kind`).
    pub kind: &'static str,
    /// Tollgate's id of this call (UUIDv7), also sent to the workload as
    /// the `x-tollgate-request-id` response header.
    pub id: String,
    /// `allow` or `deny`.
    pub decision: Decision,
    /// Why: `rule:<name>` or `default` (the policy), or the proxy's own
    /// reason (`request_too_large`).
    pub reason: String,
    /// The model sent upstream when a policy alias rewrote it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routed_model: Option<String>,
    /// The output-token cap a policy applied to this request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capped_output_tokens: Option<u64>,
    /// Over a limit: how long the workload was told to wait (`retry-after-ms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// The policy replaced the workload's credentials with its own key.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub credential_injected: bool,
    /// With a failover chain: every attempt, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<Attempt>,
    /// The provider that answered, when failover moved the call elsewhere.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub served_by: Option<String>,
    pub workload: Workload,
    pub pid: u32,
    pub comm: String,
    pub provider: String,
    pub host: String,
    pub method: String,
    pub path: String,
    /// `chat`, `responses`, `embeddings`, `messages`, `generate_content`, …
    pub operation: crate::providers::Operation,
    /// Model the request asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Model the provider says answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_model: Option<String>,
    pub stream: bool,
    /// Tollgate made the stream ask for its usage
    /// (`providers[].stream_usage: ask`) and took what that added back out
    /// of the stream before the workload saw it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub stream_usage_asked: bool,
    pub usage: Usage,
    /// The provider's own usage object, when its numbers are not the
    /// normalised ones above (Anthropic's cache reads added to input,
    /// Gemini's thoughts added to output, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_usage: Option<serde_json::Value>,
    /// HTTP version the workload spoke (`HTTP/1.1`, `HTTP/2.0`).
    pub client_http: String,
    /// How Tollgate saw the call when it did not terminate it:
    /// `tls_uprobe` (read at the workload's TLS library, README "TLS
    /// uprobes"). Absent for terminated calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_via: Option<&'static str>,
    /// Provider address the request went to.
    pub upstream: SocketAddr,
    /// 0 when no response came.
    pub status: u16,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// Until response headers arrived.
    pub ttfb_ms: u64,
    /// Until the first response body byte (for streams: the first token).
    pub ttft_ms: u64,
    /// Until the response body ended (or the client went away).
    pub duration_ms: u64,
    /// `ok`, `upstream_error`, `upstream_timeout`, `upstream_idle_timeout`,
    /// `client_disconnected`, `request_too_large`, `client_error`.
    pub result: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// USD, from the price table; absent when no price matches the model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// The provider's id of the call (`x-request-id`, `request-id`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_request_id: Option<String>,
    /// With `audit.capture.headers`: the request headers, credentials redacted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<std::collections::BTreeMap<String, String>>,
    /// With `audit.capture.bodies`: bodies, secrets redacted, truncated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_body: Option<String>,
    /// A file upload (`operation: files`, multipart): purpose, file name
    /// and size, JSONL lines and the models they name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_input: Option<crate::providers::batch_input::BatchInput>,
    /// A Realtime session (`operation: realtime`): its responses; `usage`
    /// is their sum.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub realtime: Option<RealtimeSession>,
    /// A message to an MCP server (`operation: mcp`): what it asked and
    /// what the server answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mcp: Option<McpExchange>,
}

/// What an MCP message's record adds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct McpExchange {
    /// The JSON-RPC method (`tools/call`, `notifications/initialized`);
    /// absent for the event stream a GET opens and a session's DELETE.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The request's JSON-RPC id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Bytes of a `tools/call`'s arguments (the arguments are not kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub argument_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<crate::providers::mcp::Peer>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<String>,
    /// `sha256:` and the first 16 hex digits of the `Mcp-Session-Id`: the
    /// calls of one session share it, and the id itself (which a server
    /// may accept as proof of the session) is not written down.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// JSON-RPC messages in the body; more than one is a batch, recorded
    /// by its first request.
    #[serde(skip_serializing_if = "is_one")]
    pub messages: u32,
    #[serde(flatten)]
    pub answered: crate::providers::mcp_response::Answered,
}

fn is_one(n: &u32) -> bool {
    *n <= 1
}

impl McpExchange {
    /// The record of `messages` (the first request's names; a
    /// notification's or response's when there is no request).
    pub fn of(messages: &[crate::providers::mcp::Message]) -> Self {
        let Some(m) = messages
            .iter()
            .find(|m| m.is_request())
            .or_else(|| messages.first())
        else {
            return Self::default();
        };
        Self {
            method: m.method.clone(),
            id: m.id.as_ref().map(crate::providers::mcp::id_text),
            tool: m.tool.clone(),
            resource: m.resource.clone(),
            prompt: m.prompt.clone(),
            argument_bytes: m.argument_bytes,
            client: m.client.clone(),
            protocol_version: m.protocol_version.clone(),
            messages: messages.len() as u32,
            ..Default::default()
        }
    }

    /// `session` for a `Mcp-Session-Id` value.
    pub fn session_of(id: &str) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, id.as_bytes());
        let hex: String = d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    }
}

/// What a Realtime session's record adds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RealtimeSession {
    /// `response.done` events seen.
    pub responses: u64,
    /// Each response's usage, in order (the first `MAX_LISTED`).
    pub response_usage: Vec<crate::providers::Usage>,
    /// Frames relayed, each way.
    pub client_frames: u64,
    pub server_frames: u64,
    /// Who ended the session: `client`, `provider`, `policy` (a budget or
    /// limit), `error`.
    pub ended_by: &'static str,
}

impl RealtimeSession {
    /// Responses listed one by one in a record; beyond, only counted.
    pub const MAX_LISTED: usize = 256;
}
