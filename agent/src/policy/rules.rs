//! The policy's YAML model, its validation, and rule matching.
use std::collections::BTreeMap;

use globset::GlobSet;
use serde::{Deserialize, Serialize};

use crate::providers::Operation;

use super::{
    Subject,
    budgets::BudgetConfig,
    failover::FailoverChain,
    globs::{PolicyError, globs},
    limits::LimitsConfig,
    mcp_rules::{CompiledMcp, McpRule, compile_mcp},
    selector::{CompiledSelector, Selector},
};

/// What a rule does with the calls it matches.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Terminate, parse, account, forward.
    #[default]
    Allow,
    /// Refuse: an HTTP error shaped like the provider's (403) when the
    /// connection is terminated, else the connection is closed.
    Deny,
    /// Relay without terminating TLS: audited by server name and bytes; for
    /// workloads that do not trust the node CA.
    Observe,
}

/// The `policy` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// For calls no rule matches.
    pub default: Action,
    /// In order; the first rule that matches a call decides it.
    pub rules: Vec<Rule>,
    /// Chains of equivalent targets that rules may fail over along.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failover: Vec<FailoverChain>,
    /// Server names no provider lists that may still be relayed when a
    /// workload sends them to a provider address (globs, e.g. `chatgpt.com`
    /// for sites that share a provider's CDN addresses). Any other server
    /// name on a provider address is refused (`<reason>:foreign_host`): a
    /// provider's address is no way to reach another site (domain fronting).
    /// Observe rules relay them whatever this says.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub foreign_hosts: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Unique; the decision's reason is `rule:<name>`.
    pub name: String,
    /// Which workloads (every workload when empty).
    #[serde(rename = "match", default)]
    pub selector: Selector,
    /// Provider names (`providers[].name`); any when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers: Vec<String>,
    /// Globs over the requested model (`gpt-4o*`); any when empty. A rule
    /// with models is decided per request, so its connections are terminated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// The kinds of call the rule decides (`chat`, `responses`,
    /// `completions`, `embeddings`, `messages`, `generate_content`, `batch`,
    /// `files`, `realtime`, `other`); any when empty. Calls of other kinds
    /// go on to later rules. A rule with operations is decided per request,
    /// so its connections are terminated: `operations: [batch, files]`
    /// with `action: deny` refuses batch jobs and uploads and leaves chat
    /// to the next rules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operations: Vec<Operation>,
    pub action: Action,
    /// Shown to the workload when the rule denies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Cap on the output length a request may ask for (`max_tokens`,
    /// `max_completion_tokens`, `max_output_tokens`, `maxOutputTokens`);
    /// lowered to this, or set when the request leaves it open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u64>,
    /// Model names the workload may use, and the model each is sent as
    /// (`fast: gpt-4o-mini`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub model_aliases: BTreeMap<String, String>,
    /// Rate, token and concurrency limits for the calls this rule allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsConfig>,
    /// A file (Secret mount) with the credential to send instead of the
    /// workload's own, which is then never forwarded: a provider key; AWS
    /// keys or a web identity (Bedrock, signed with SigV4); a Google
    /// service-account key, workload identity federation file or
    /// `{"type": "metadata_server"}` (Vertex); an Entra application's
    /// secret or federated token file (Azure OpenAI). See the README.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_file: Option<std::path::PathBuf>,
    /// Spend limits for the calls this rule allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetConfig>,
    /// A `failover` chain (by name) for the calls this rule allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover: Option<String>,
    /// Request headers to drop or set on the way to the provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<HeaderRules>,
    /// Largest request body this rule lets through (below `tls.max_request_body`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_bytes: Option<usize>,
    /// For a rule with `models`: what happens to a request whose model
    /// cannot be read (batch and files endpoints, model listings, bodies
    /// that are not JSON). `refuse` (default: a model rule is never
    /// bypassed by hiding the model), `apply` (the rule's action applies as
    /// if a listed model were asked for), `skip` (the rule does not apply;
    /// later rules decide).
    #[serde(default, skip_serializing_if = "is_default")]
    pub without_model: WithoutModel,
    /// What happens to a provider connection of this rule that cannot be
    /// terminated (no ClientHello in time, no complete one in 64 KiB, a
    /// server name no provider lists, no node CA, a workload that rejects
    /// the CA): `refuse` (the default for a rule with any per-request
    /// control — models, caps, aliases, limits, budget, credential,
    /// failover, headers, size — which a relayed connection would skip) or
    /// `relay` (the default for a plain allow rule: relayed and audited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unterminated: Option<Unterminated>,
    /// Makes the rule one for MCP servers: it decides only calls to the
    /// `mcp_servers` it lists (any when `servers` is empty), and on an
    /// allow rule `tools` says which tools may be called; the others are
    /// refused with a JSON-RPC error and left out of the server's tool
    /// lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<McpRule>,
}

/// A rule's answer to a provider connection it cannot terminate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Unterminated {
    Refuse,
    Relay,
}

impl Rule {
    /// Does the rule act per request (so relaying would skip it)?
    pub fn has_request_controls(&self) -> bool {
        !self.models.is_empty()
            || !self.operations.is_empty()
            || self.max_output_tokens.is_some()
            || !self.model_aliases.is_empty()
            || self.limits.is_some()
            || self.budget.is_some()
            || self.credential_file.is_some()
            || self.failover.is_some()
            || self.headers.is_some()
            || self.max_request_bytes.is_some()
            || self.mcp.is_some()
    }

    /// `unterminated`, or its default for this rule.
    pub fn unterminated(&self) -> Unterminated {
        self.unterminated.unwrap_or(if self.has_request_controls() {
            Unterminated::Refuse
        } else {
            Unterminated::Relay
        })
    }
}

/// A model rule's answer to a request whose model cannot be read.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum WithoutModel {
    #[default]
    Refuse,
    Apply,
    Skip,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// A rule's `headers`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct HeaderRules {
    /// Header names removed from the request.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
    /// Headers set (replacing any the workload sent). Credentials are not
    /// allowed here: use `credential_file`, which keeps keys out of configs.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
}

impl PolicyConfig {
    /// Warnings for a valid policy (`tollgate check-config` prints them, the
    /// agent logs them at start): field path below `policy`, and message.
    pub fn warnings(&self) -> Vec<(String, String)> {
        let chains = self.failover.iter().enumerate().flat_map(|(i, c)| {
            c.warnings()
                .into_iter()
                .map(move |(f, m)| (format!("failover[{i}].{f}"), m))
        });
        // What a rule for Realtime sessions says that a session cannot do.
        let sessions = self.rules.iter().enumerate().flat_map(|(i, r)| {
            let realtime = r.operations.contains(&Operation::Realtime);
            [
                ("max_output_tokens", r.max_output_tokens.is_some()),
                ("model_aliases", !r.model_aliases.is_empty()),
                ("failover", r.failover.is_some()),
            ]
            .into_iter()
            .filter(move |(_, set)| realtime && *set)
            .map(move |(f, _)| {
                (
                    format!("rules[{i}].{f}"),
                    "does not apply to Realtime sessions (the model is in the session URL, the \
                     output limit in session.update; a session is not failed over): only the \
                     rule's other calls get it"
                        .to_string(),
                )
            })
        });
        chains.chain(sessions).collect()
    }
}

impl HeaderRules {
    pub fn apply(&self, h: &mut http::HeaderMap) {
        for name in &self.remove {
            h.remove(name.as_str());
        }
        for (k, v) in &self.set {
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.as_bytes()),
                http::HeaderValue::from_str(v),
            ) {
                h.insert(k, v);
            }
        }
    }

    fn validate(&self) -> Result<(), (String, String)> {
        for (i, n) in self.remove.iter().enumerate() {
            if http::HeaderName::from_bytes(n.as_bytes()).is_err() {
                return Err((
                    format!("remove[{i}]"),
                    format!("`{n}` is not a header name"),
                ));
            }
        }
        for (k, v) in &self.set {
            if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
                return Err((format!("set.{k}"), format!("`{k}` is not a header name")));
            }
            if ["authorization", "x-api-key", "api-key", "x-goog-api-key"]
                .contains(&k.to_ascii_lowercase().as_str())
            {
                return Err((
                    format!("set.{k}"),
                    "credentials do not belong in the policy: use credential_file".into(),
                ));
            }
            if http::HeaderValue::from_str(v).is_err() {
                return Err((format!("set.{k}"), "is not a valid header value".into()));
            }
        }
        Ok(())
    }
}

/// Limits a rule puts on a request it allows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Caps {
    pub max_output_tokens: Option<u64>,
    /// The model to send instead of the requested one.
    pub model: Option<String>,
    /// The rule's limits (buckets are per rule name and key).
    pub limits: Option<LimitsConfig>,
    /// The provider key to inject.
    pub credential_file: Option<std::path::PathBuf>,
    /// The rule's budget (spend is per rule name and key).
    pub budget: Option<BudgetConfig>,
    /// The rule's failover chain.
    pub failover: Option<std::sync::Arc<FailoverChain>>,
    pub headers: Option<HeaderRules>,
    pub max_request_bytes: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionDecision {
    /// Terminate TLS and decide per request; `unterminated` says what to
    /// do when that is not possible (relayed connections record `reason`).
    Terminate {
        reason: String,
        unterminated: Unterminated,
    },
    /// Relay the bytes; `reason` for the record.
    Observe { reason: String },
    /// Refuse.
    Deny {
        reason: String,
        message: Option<String>,
    },
}

impl ConnectionDecision {
    pub(super) fn for_action(
        action: Action,
        reason: String,
        message: Option<String>,
        unterminated: Unterminated,
    ) -> Self {
        match action {
            Action::Allow => Self::Terminate {
                reason,
                unterminated,
            },
            Action::Observe => Self::Observe { reason },
            Action::Deny => Self::Deny { reason, message },
        }
    }
}

// One per request, moved once and never stored: boxing the caps would only
// add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum RequestDecision {
    Allow { reason: String, caps: Caps },
    Deny { reason: String, message: String },
}

impl RequestDecision {
    pub(super) fn for_default(action: Action, operation: Operation) -> Self {
        match action {
            Action::Deny => Self::Deny {
                reason: "default".into(),
                message: format!("no policy rule allows this `{operation}` call"),
            },
            // Observe by default yet terminated (a model rule of another
            // workload asked for it): forward as allowed.
            _ => Self::Allow {
                reason: "default".into(),
                caps: Caps::default(),
            },
        }
    }
}

/// How a rule meets one request's model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ModelMatch {
    /// The rule decides the request.
    Decides,
    /// Not this rule: the next one is asked.
    No,
    /// A model rule, and the request's model cannot be read: refused.
    Unreadable,
}

pub(super) struct Compiled {
    pub rule: Rule,
    failover: Option<std::sync::Arc<FailoverChain>>,
    selector: CompiledSelector,
    models: Option<GlobSet>,
    mcp: Option<CompiledMcp>,
}

impl Compiled {
    pub fn matches_provider(&self, provider: &str) -> bool {
        (self.rule.providers.is_empty() || self.rule.providers.iter().any(|p| p == provider))
            && self
                .mcp
                .as_ref()
                .is_none_or(|m| m.servers.iter().any(|s| s == provider))
    }

    /// The workload part of the match (the costly part: globs), cached per
    /// workload by `Policy`.
    pub fn matches_subject(&self, s: Subject<'_>) -> bool {
        self.selector.matches(s)
    }

    /// Is the rule decided per request (by model or operation), so a
    /// connection must be terminated to apply it?
    pub fn decides_per_request(&self) -> bool {
        self.models.is_some() || !self.rule.operations.is_empty() || self.mcp.is_some()
    }

    /// Does the rule decide calls of this kind? An MCP rule decides only
    /// MCP calls; a model rule none (they have no model).
    pub fn matches_operation(&self, op: Operation) -> bool {
        let kind = match op {
            Operation::Mcp => self.models.is_none(),
            _ => self.mcp.is_none(),
        };
        kind && (self.rule.operations.is_empty() || self.rule.operations.contains(&op))
    }

    /// The decision for an MCP call naming `tool` (a `tools/call`), or
    /// another MCP message (None).
    pub fn decide_mcp(&self, tool: Option<&str>) -> RequestDecision {
        let r = &self.rule;
        if r.action == Action::Deny {
            return RequestDecision::Deny {
                reason: self.reason(),
                message: r
                    .message
                    .clone()
                    .unwrap_or_else(|| format!("denied by policy rule `{}` for MCP calls", r.name)),
            };
        }
        if let (Some(t), Some(m)) = (tool, &self.mcp)
            && !m.allows_tool(t)
        {
            return RequestDecision::Deny {
                reason: self.reason(),
                message: r.message.clone().unwrap_or_else(|| {
                    format!("tool `{t}` is not allowed by policy rule `{}`", r.name)
                }),
            };
        }
        // What applies to a call without a model or tokens.
        RequestDecision::Allow {
            reason: self.reason(),
            caps: Caps {
                limits: r.limits.clone(),
                credential_file: r.credential_file.clone(),
                headers: r.headers.clone(),
                max_request_bytes: r.max_request_bytes,
                ..Caps::default()
            },
        }
    }

    /// Whether the rule decides a request asking `model` (None: the model
    /// cannot be read), and how.
    pub fn model_match(&self, model: Option<&str>) -> ModelMatch {
        match (&self.models, model) {
            (None, _) => ModelMatch::Decides,
            (Some(g), Some(m)) if g.is_match(m) => ModelMatch::Decides,
            (Some(_), Some(_)) => ModelMatch::No,
            (Some(_), None) => match self.rule.without_model {
                WithoutModel::Apply => ModelMatch::Decides,
                WithoutModel::Skip => ModelMatch::No,
                WithoutModel::Refuse => ModelMatch::Unreadable,
            },
        }
    }

    /// The refusal of a request whose model this model rule cannot see.
    pub fn refuse_unreadable(&self) -> RequestDecision {
        RequestDecision::Deny {
            reason: format!("{}:model_unreadable", self.reason()),
            message: format!(
                "policy rule `{}` decides by model, and this request's model cannot be read \
                 (batch, files or listing endpoint, or a body that is not JSON); the rule's \
                 `without_model` can allow or skip such calls",
                self.rule.name
            ),
        }
    }

    pub fn reason(&self) -> String {
        format!("rule:{}", self.rule.name)
    }

    pub fn message(&self) -> Option<String> {
        self.rule.message.clone()
    }

    pub fn decide(&self, operation: Operation, model: Option<&str>) -> RequestDecision {
        let r = &self.rule;
        match r.action {
            Action::Deny => RequestDecision::Deny {
                reason: self.reason(),
                message: r.message.clone().unwrap_or_else(|| {
                    let what = match model {
                        Some(m) => format!(" for model `{m}`"),
                        // Say what was refused when the kind of call decided it.
                        None if !r.operations.is_empty() => format!(" for `{operation}` calls"),
                        None => String::new(),
                    };
                    format!("denied by policy rule `{}`{what}", r.name)
                }),
            },
            Action::Allow | Action::Observe => RequestDecision::Allow {
                reason: self.reason(),
                caps: Caps {
                    max_output_tokens: r.max_output_tokens,
                    model: model.and_then(|m| r.model_aliases.get(m)).cloned(),
                    limits: r.limits.clone(),
                    credential_file: r.credential_file.clone(),
                    budget: r.budget.clone(),
                    failover: self.failover.clone(),
                    headers: r.headers.clone(),
                    max_request_bytes: r.max_request_bytes,
                },
            },
        }
    }
}

pub(super) fn compile(
    cfg: &PolicyConfig,
    providers: &[String],
    mcp_servers: &[String],
) -> Result<Vec<Compiled>, PolicyError> {
    let mut chains = std::collections::HashMap::new();
    for (i, c) in cfg.failover.iter().enumerate() {
        c.validate(providers).map_err(|(f, message)| PolicyError {
            field: format!("failover[{i}].{f}"),
            message,
        })?;
        if chains
            .insert(c.name.as_str(), std::sync::Arc::new(c.clone()))
            .is_some()
        {
            return Err(PolicyError {
                field: format!("failover[{i}].name"),
                message: format!("`{}` names two chains", c.name),
            });
        }
    }
    let mut names = std::collections::HashSet::new();
    cfg.rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let at = |f: &str| format!("rules[{i}].{f}");
            let err = |field: String, message: String| PolicyError { field, message };
            if r.name.trim().is_empty() {
                return Err(err(at("name"), "must not be empty".into()));
            }
            if !names.insert(r.name.as_str()) {
                return Err(err(at("name"), format!("`{}` names two rules", r.name)));
            }
            for (j, p) in r.providers.iter().enumerate() {
                if !providers.contains(p) {
                    return Err(err(
                        at(&format!("providers[{j}]")),
                        format!(
                            "`{p}` is not a configured provider (known: {})",
                            providers.join(", ")
                        ),
                    ));
                }
            }
            if r.max_output_tokens == Some(0) {
                return Err(err(at("max_output_tokens"), "must be at least 1".into()));
            }
            if let Some(Err((f, m))) = r.limits.as_ref().map(LimitsConfig::validate) {
                return Err(err(at(&format!("limits.{f}")), m));
            }
            if let Some(Err((f, m))) = r.headers.as_ref().map(HeaderRules::validate) {
                return Err(err(at(&format!("headers.{f}")), m));
            }
            if r.max_request_bytes == Some(0) {
                return Err(err(at("max_request_bytes"), "must be at least 1".into()));
            }
            if let Some(Err((f, m))) = r.budget.as_ref().map(BudgetConfig::validate) {
                return Err(err(at(&format!("budget.{f}")), m));
            }
            if r.credential_file.as_ref().is_some_and(|p| !p.is_absolute()) {
                return Err(err(
                    at("credential_file"),
                    "must be an absolute path (a mounted Secret's file)".into(),
                ));
            }
            if r.action == Action::Deny
                && (r.max_output_tokens.is_some()
                    || !r.model_aliases.is_empty()
                    || r.limits.is_some()
                    || r.credential_file.is_some()
                    || r.budget.is_some())
            {
                return Err(err(
                    at("action"),
                    "a deny rule cannot also cap, rewrite, limit or inject: split it in two rules"
                        .into(),
                ));
            }
            let failover = match &r.failover {
                None => None,
                Some(name) => Some(chains.get(name.as_str()).cloned().ok_or_else(|| {
                    err(
                        at("failover"),
                        format!("no failover chain is named `{name}`"),
                    )
                })?),
            };
            let mcp = match &r.mcp {
                None => None,
                Some(m) => Some(compile_mcp(r, m, mcp_servers, &at)?),
            };
            Ok(Compiled {
                failover,
                selector: r.selector.compile(&at("match"))?,
                models: globs(&r.models, &at("models"))?,
                mcp,
                rule: r.clone(),
            })
        })
        .collect()
}
