//! A rule's `mcp`: which MCP servers it decides and which of their tools
//! a workload may call; checked against the configured `mcp_servers` and
//! compiled with the rest of the rule (`rules`).
use globset::GlobSet;
use serde::{Deserialize, Serialize};

use super::{
    globs::{PolicyError, globs},
    rules::{Action, Rule},
};

/// A rule's `mcp`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct McpRule {
    /// `mcp_servers[].name`s; every MCP server when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<String>,
    pub tools: ToolRules,
}

/// Which tools an MCP rule lets a workload call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ToolRules {
    /// Globs over tool names; when given, only matching tools may be called.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Globs over tool names that may not be called (wins over `allow`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

impl ToolRules {
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }
}

/// A rule's `mcp`, its server list resolved and its globs compiled.
pub(super) struct CompiledMcp {
    pub servers: Vec<String>,
    allow: Option<GlobSet>,
    deny: Option<GlobSet>,
}

impl CompiledMcp {
    pub fn allows_tool(&self, tool: &str) -> bool {
        self.allow.as_ref().is_none_or(|g| g.is_match(tool))
            && !self.deny.as_ref().is_some_and(|g| g.is_match(tool))
    }
}

/// A rule's `mcp`, checked against the configured `mcp_servers`.
pub(super) fn compile_mcp(
    r: &Rule,
    m: &McpRule,
    mcp_servers: &[String],
    at: &dyn Fn(&str) -> String,
) -> Result<CompiledMcp, PolicyError> {
    let err = |field: String, message: String| PolicyError { field, message };
    if mcp_servers.is_empty() {
        return Err(err(
            at("mcp"),
            "no `mcp_servers` are configured: list the MCP servers to govern first".into(),
        ));
    }
    for (j, s) in m.servers.iter().enumerate() {
        if !mcp_servers.contains(s) {
            return Err(err(
                at(&format!("mcp.servers[{j}]")),
                format!(
                    "`{s}` is not one of the mcp_servers (known: {})",
                    mcp_servers.join(", ")
                ),
            ));
        }
    }
    if r.action == Action::Deny && !m.tools.is_empty() {
        return Err(err(
            at("mcp.tools"),
            "a deny rule refuses every call to its servers: list tools on an allow rule".into(),
        ));
    }
    // What an MCP call does not have: a model, an output length, a price.
    for (field, set) in [
        ("models", !r.models.is_empty()),
        ("max_output_tokens", r.max_output_tokens.is_some()),
        ("model_aliases", !r.model_aliases.is_empty()),
        ("budget", r.budget.is_some()),
        ("failover", r.failover.is_some()),
        (
            "limits.input_tokens_per_minute",
            r.limits
                .as_ref()
                .is_some_and(|l| l.input_tokens_per_minute.is_some()),
        ),
        (
            "limits.output_tokens_per_minute",
            r.limits
                .as_ref()
                .is_some_and(|l| l.output_tokens_per_minute.is_some()),
        ),
    ] {
        if set {
            return Err(err(
                at(field),
                "does not apply to MCP calls (no model, tokens or price): put it on a rule of its own"
                    .into(),
            ));
        }
    }
    Ok(CompiledMcp {
        servers: if m.servers.is_empty() {
            mcp_servers.to_vec()
        } else {
            m.servers.clone()
        },
        allow: globs(&m.tools.allow, &at("mcp.tools.allow"))?,
        deny: globs(&m.tools.deny, &at("mcp.tools.deny"))?,
    })
}
