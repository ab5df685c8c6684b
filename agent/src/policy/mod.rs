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
pub mod budgets;
pub mod credentials;
pub mod limits;
mod rules;

pub use rules::{
    Action, Caps, ConnectionDecision, PolicyConfig, PolicyError, RequestDecision, Rule, Selector,
};

use crate::identity::Workload;

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
}

impl Policy {
    /// Compile `cfg`; `providers` are the configured provider names (rules
    /// may only name those). Errors carry the field path.
    pub fn new(cfg: &PolicyConfig, providers: &[String]) -> Result<Self, PolicyError> {
        Ok(Self {
            rules: rules::compile(cfg, providers)?,
            default: cfg.default,
        })
    }

    /// A policy that allows everything (no `policy` section).
    pub fn allow_all() -> Self {
        Self {
            rules: Vec::new(),
            default: Action::Allow,
        }
    }

    /// The decision for a new connection of `subject` to `provider`.
    pub fn connection(&self, subject: Subject<'_>, provider: &str) -> ConnectionDecision {
        for r in &self.rules {
            if !r.matches(subject, provider) {
                continue;
            }
            if r.has_models() {
                // The model decides: terminate to see it.
                return ConnectionDecision::Terminate { reason: r.reason() };
            }
            return ConnectionDecision::for_action(r.rule.action, r.reason(), r.message());
        }
        ConnectionDecision::for_action(self.default, "default".into(), None)
    }

    /// The decision for one request asking `model` of `provider`.
    pub fn request(
        &self,
        subject: Subject<'_>,
        provider: &str,
        model: Option<&str>,
    ) -> RequestDecision {
        for r in &self.rules {
            if r.matches(subject, provider) && r.matches_model(model) {
                return r.decide(model);
            }
        }
        RequestDecision::for_default(self.default)
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }
}

#[cfg(test)]
mod tests;
