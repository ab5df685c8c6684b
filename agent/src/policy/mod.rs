//! Who may call what: ordered rules, first match wins, a default for the
//! rest. Every decision names its reason (`rule:<name>` or `default`), which
//! reaches the audit record, the `tollgate_decisions_total` metric and, for
//! a denial, the workload's error body.
//!
//! Decisions happen twice per call:
//! * per connection (workload and provider known, model not yet): refuse,
//!   relay without terminating (observe), or terminate to decide per request;
//! * per request (the model known): allow — possibly with a capped output
//!   length and a rewritten model — or deny.
pub mod admission;
pub mod budgets;
pub mod credentials;
pub mod failover;
pub mod gate;
mod globs;
pub mod limits;
mod mcp_rules;
mod rules;
mod selector;
pub mod shared;
pub mod sigv4;
pub mod spend;
pub mod token_exchange;

// What the proxy uses of the policy: the façade (admission and its
// results), nothing of the parts behind it.
pub use admission::{Admitted, Candidate, Enforcer, LimitRenewal, Refusal, Seen, Verdict};
pub use budgets::{BudgetKey, Exhausted};
pub use credentials::remove as remove_credentials;
pub use failover::FailoverChain;
pub use gate::Hold;
pub use globs::PolicyError;
pub use limits::Limited;
pub use mcp_rules::{McpRule, ToolRules};
pub use rules::{
    Action, Caps, ConnectionDecision, HeaderRules, PolicyConfig, RequestDecision, Rule,
    Unterminated, WithoutModel,
};
pub use selector::Selector;
pub use spend::{BudgetHold, SoftWarn};

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use crate::{identity::Workload, providers::Operation};

/// What the rules look at: the workload and, for host mode, its process.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub workload: &'a Workload,
    pub comm: &'a str,
}

/// The compiled policy: built once per (re)load, read on every call.
pub struct Policy {
    rules: Vec<rules::Compiled>,
    default: Action,
    /// `foreign_hosts`: server names relayed on provider addresses.
    foreign_hosts: Option<globset::GlobSet>,
    /// (cgroup, process, pod metadata serial) → indexes of the rules whose
    /// selector matches: a workload's selector matches are computed once per
    /// policy and pod metadata version, so a decision is a lookup plus
    /// provider and model checks on those rules.
    by_subject: Mutex<HashMap<SubjectKey, Arc<[u32]>>>,
}

/// (cgroup, process, pod metadata serial): what a workload's selector
/// matches depend on.
type SubjectKey = (String, String, u64);

/// Workloads remembered per policy; beyond, the memo starts over.
const SUBJECT_MEMO: usize = 16_384;

impl Policy {
    /// Compile `cfg`; `providers` are the configured provider names (rules
    /// may only name those). Errors carry the field path.
    pub fn new(cfg: &PolicyConfig, providers: &[String]) -> Result<Self, PolicyError> {
        Self::with_mcp(cfg, providers, &[])
    }

    /// `new`, where `mcp_servers` (among `providers`) are the MCP servers
    /// rules' `mcp` may name.
    pub fn with_mcp(
        cfg: &PolicyConfig,
        providers: &[String],
        mcp_servers: &[String],
    ) -> Result<Self, PolicyError> {
        Ok(Self {
            rules: rules::compile(cfg, providers, mcp_servers)?,
            default: cfg.default,
            foreign_hosts: globs::globs(&cfg.foreign_hosts, "foreign_hosts")?,
            by_subject: Mutex::default(),
        })
    }

    /// A policy that allows everything (no `policy` section).
    pub fn allow_all() -> Self {
        Self {
            rules: Vec::new(),
            default: Action::Allow,
            foreign_hosts: None,
            by_subject: Mutex::default(),
        }
    }

    /// May a connection to a provider address naming `sni`, a host no
    /// provider lists, be relayed (`foreign_hosts`)?
    pub fn allows_foreign_host(&self, sni: &str) -> bool {
        self.foreign_hosts
            .as_ref()
            .is_some_and(|g| g.is_match(sni.to_ascii_lowercase()))
    }

    /// The decision for a new connection of `subject` to `provider`.
    pub fn connection(&self, subject: Subject<'_>, provider: &str) -> ConnectionDecision {
        for &i in self.candidates(subject).iter() {
            let r = &self.rules[i as usize];
            if !r.matches_provider(provider) {
                continue;
            }
            let unterminated = r.rule.unterminated();
            if r.decides_per_request() {
                // The model or the kind of call decides: terminate to see it.
                return ConnectionDecision::Terminate {
                    reason: r.reason(),
                    unterminated,
                };
            }
            return ConnectionDecision::for_action(
                r.rule.action,
                r.reason(),
                r.message(),
                unterminated,
            );
        }
        ConnectionDecision::for_action(self.default, "default".into(), None, Unterminated::Relay)
    }

    /// The decision for one `operation` request asking `model` of `provider`.
    pub fn request(
        &self,
        subject: Subject<'_>,
        provider: &str,
        operation: Operation,
        model: Option<&str>,
    ) -> RequestDecision {
        for &i in self.candidates(subject).iter() {
            let r = &self.rules[i as usize];
            if !r.matches_provider(provider) || !r.matches_operation(operation) {
                continue;
            }
            match r.model_match(model) {
                rules::ModelMatch::Decides => return r.decide(operation, model),
                rules::ModelMatch::No => {}
                rules::ModelMatch::Unreadable => return r.refuse_unreadable(),
            }
        }
        RequestDecision::for_default(self.default, operation)
    }

    /// The decision for a message to MCP server `server`: a `tools/call`
    /// of `tool`, or another message (None).
    pub fn mcp(&self, subject: Subject<'_>, server: &str, tool: Option<&str>) -> RequestDecision {
        for &i in self.candidates(subject).iter() {
            let r = &self.rules[i as usize];
            if r.matches_provider(server) && r.matches_operation(Operation::Mcp) {
                return r.decide_mcp(tool);
            }
        }
        RequestDecision::for_default(self.default, Operation::Mcp)
    }

    /// The decision for a request that will ask for each of `models` (a
    /// batch input): refused if any of them is, else the first model's.
    pub fn request_each(
        &self,
        subject: Subject<'_>,
        provider: &str,
        operation: Operation,
        models: &[String],
    ) -> RequestDecision {
        let mut first = None;
        for m in models {
            match self.request(subject, provider, operation, Some(m)) {
                d @ RequestDecision::Deny { .. } => return d,
                d => {
                    first.get_or_insert(d);
                }
            }
        }
        first.unwrap_or_else(|| self.request(subject, provider, operation, None))
    }

    /// The rules whose selector matches `subject`, in order (memoised).
    fn candidates(&self, subject: Subject<'_>) -> Arc<[u32]> {
        let serial = subject.workload.kubernetes.as_ref().map_or(0, |k| k.serial);
        let key = (
            subject.workload.cgroup.clone(),
            subject.comm.to_string(),
            serial,
        );
        let mut memo = self.by_subject.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = memo.get(&key) {
            return c.clone();
        }
        let c: Arc<[u32]> = self
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.matches_subject(subject))
            .map(|(i, _)| i as u32)
            .collect();
        if memo.len() >= SUBJECT_MEMO {
            memo.clear();
        }
        memo.insert(key, c.clone());
        c
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }
}

#[cfg(test)]
mod tests;
