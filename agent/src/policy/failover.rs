//! Failover chains: targets (provider + model) declared equivalent, tried
//! in turn when one fails before its response starts — a connect or TLS
//! error, no response headers in time, HTTP 429 or 5xx. Bounded by
//! `max_attempts` and a per-call `deadline`, with jittered exponential
//! backoff between attempts. Never after a response has begun streaming to
//! the workload, and never to a target the chain does not list.
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::providers::Api;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// A provider name (`providers[].name`); all targets of a chain share its API family.
    pub provider: String,
    /// The model to ask this provider for.
    pub model: String,
    /// Credential file for this provider, read as a rule's is (a key, AWS
    /// keys or an exchanged credential). Without one, a call moved here
    /// from another target carries no credential at all: the workload's and
    /// the rule's are for the target the call was made to. Bedrock targets
    /// need one: each attempt is signed for its own endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FailoverChain {
    /// Referenced by rules (`failover: <name>`).
    pub name: String,
    /// Equivalent targets, in order of preference.
    pub targets: Vec<Target>,
    /// Attempts at most, the first included (default: one per target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Wait before the 2nd attempt; doubles after each, ±50% jitter.
    #[serde(default = "default_backoff", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub backoff: Duration,
    /// The whole call, all attempts, until a response starts.
    #[serde(default = "default_deadline", with = "humantime_serde")]
    #[schemars(with = "String")]
    pub deadline: Duration,
}

fn default_backoff() -> Duration {
    Duration::from_millis(100)
}

fn default_deadline() -> Duration {
    Duration::from_secs(120)
}

impl FailoverChain {
    /// What a valid chain may still get wrong: targets without their own
    /// key, to which moved calls go without a credential.
    pub fn warnings(&self) -> Vec<(String, String)> {
        self.targets
            .iter()
            .enumerate()
            .filter(|(_, t)| t.credential_file.is_none())
            .map(|(j, t)| {
                (
                    format!("targets[{j}].credential_file"),
                    format!(
                        "not set: calls moved to `{}` from another target carry no credential (the workload's and the rule's keys stay with the target they were for)",
                        t.provider
                    ),
                )
            })
            .collect()
    }

    /// The targets to try for a call to `provider` asking `model`: the
    /// matching target first, then the others in order; empty when the call
    /// is not one of the chain's targets (then it is not failed over).
    pub fn plan(&self, provider: &str, model: Option<&str>) -> Vec<&Target> {
        let Some(first) = self
            .targets
            .iter()
            .position(|t| t.provider == provider && Some(t.model.as_str()) == model)
        else {
            return Vec::new();
        };
        let max = self.max_attempts.unwrap_or(self.targets.len() as u32) as usize;
        std::iter::once(&self.targets[first])
            .chain(
                self.targets
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != first)
                    .map(|(_, t)| t),
            )
            .take(max.max(1))
            .collect()
    }

    /// Wait before attempt `n` (1-based; the 2nd attempt is n = 2).
    pub fn backoff_before(&self, n: u32) -> Duration {
        let base = self
            .backoff
            .saturating_mul(1 << (n.saturating_sub(2)).min(10));
        // ±50% jitter from the clock's low bits: spreads retries of many
        // workloads without a random-number dependency.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        base.mul_f64(0.5 + (nanos % 1000) as f64 / 1000.0)
    }

    /// What the targets' providers allow, given each provider's API
    /// family: one family per chain (requests are not translated), and a
    /// credential on every Bedrock target (a call moved to it is signed
    /// again for its endpoint and region; the workload's signature is for
    /// the endpoint it dialled).
    pub fn check_targets(
        &self,
        api_of: impl Fn(&str) -> Option<Api>,
    ) -> Result<(), (String, String)> {
        let first = api_of(&self.targets[0].provider);
        for (j, t) in self.targets.iter().enumerate() {
            let api = api_of(&t.provider);
            if api != first {
                return Err((
                    format!("targets[{j}].provider"),
                    "targets of a chain must speak the same API family (requests are not translated)".into(),
                ));
            }
            if api == Some(Api::Bedrock) && t.credential_file.is_none() {
                return Err((
                    format!("targets[{j}].credential_file"),
                    format!(
                        "a Bedrock target needs one (AWS keys or a web identity): a call moved to `{}` must be signed again for its endpoint",
                        t.provider
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn validate(&self, providers: &[String]) -> Result<(), (String, String)> {
        if self.name.trim().is_empty() {
            return Err(("name".into(), "must not be empty".into()));
        }
        if self.targets.len() < 2 {
            return Err((
                "targets".into(),
                "a chain needs at least two targets".into(),
            ));
        }
        for (i, t) in self.targets.iter().enumerate() {
            if !providers.contains(&t.provider) {
                return Err((
                    format!("targets[{i}].provider"),
                    format!("`{}` is not a configured provider", t.provider),
                ));
            }
            if t.credential_file.as_ref().is_some_and(|p| !p.is_absolute()) {
                return Err((
                    format!("targets[{i}].credential_file"),
                    "must be an absolute path".into(),
                ));
            }
        }
        if self.max_attempts == Some(0) {
            return Err(("max_attempts".into(), "must be at least 1".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn targets_without_a_key_are_warned_about() {
        let c: FailoverChain = serde_yaml::from_str(
            "{name: c, targets: [{provider: a, model: m, credential_file: /k}, {provider: b, model: m}]}",
        )
        .unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(w[0].0, "targets[1].credential_file");
        assert!(
            w[0].1.contains("`b`") && w[0].1.contains("no credential"),
            "{}",
            w[0].1
        );
    }

    use super::*;

    fn chain(y: &str) -> FailoverChain {
        serde_yaml::from_str(y).unwrap()
    }

    #[test]
    fn targets_share_a_family_and_bedrock_targets_hold_keys() {
        let api_of = |p: &str| match p {
            "openai" | "backup" => Some(Api::Openai),
            "anthropic" => Some(Api::Anthropic),
            "east" | "west" => Some(Api::Bedrock),
            _ => None,
        };
        for (targets, refused) in [
            (
                "[{provider: openai, model: a}, {provider: backup, model: b}]",
                None,
            ),
            (
                "[{provider: openai, model: a}, {provider: anthropic, model: b}]",
                Some(("targets[1].provider", "same API family")),
            ),
            (
                "[{provider: east, model: a, credential_file: /k}, {provider: west, model: a, credential_file: /w}]",
                None,
            ),
            (
                "[{provider: east, model: a, credential_file: /k}, {provider: west, model: a}]",
                Some(("targets[1].credential_file", "signed again")),
            ),
            (
                "[{provider: east, model: a}, {provider: west, model: a, credential_file: /w}]",
                Some(("targets[0].credential_file", "`east`")),
            ),
        ] {
            let c = chain(&format!("{{name: c, targets: {targets}}}"));
            match (c.check_targets(api_of), refused) {
                (Ok(()), None) => {}
                (Err((field, msg)), Some((f, m))) => {
                    assert_eq!(field, f, "{targets}");
                    assert!(msg.contains(m), "{targets}: {msg}");
                }
                (got, want) => panic!("{targets}: {got:?}, expected {want:?}"),
            }
        }
    }

    #[test]
    fn plan_starts_at_the_calls_target_and_stays_in_the_chain() {
        let c = chain(
            "{name: c, targets: [{provider: a, model: m1}, {provider: b, model: m2}, {provider: c, model: m3}], max_attempts: 2}",
        );
        let p: Vec<_> = c
            .plan("b", Some("m2"))
            .iter()
            .map(|t| t.provider.as_str())
            .collect();
        assert_eq!(
            p,
            ["b", "a"],
            "own target first, then in order, at most max_attempts"
        );
        assert!(
            c.plan("b", Some("other")).is_empty(),
            "not a declared target: no failover"
        );
        assert!(c.plan("b", None).is_empty());
    }

    #[test]
    fn backoff_doubles_with_jitter() {
        let c = chain(
            "{name: c, targets: [{provider: a, model: m}, {provider: b, model: m}], backoff: 100ms}",
        );
        for _ in 0..20 {
            let b2 = c.backoff_before(2);
            let b3 = c.backoff_before(3);
            assert!(
                b2 >= Duration::from_millis(50) && b2 <= Duration::from_millis(150),
                "{b2:?}"
            );
            assert!(
                b3 >= Duration::from_millis(100) && b3 <= Duration::from_millis(300),
                "{b3:?}"
            );
        }
        assert_eq!(c.deadline, Duration::from_secs(120));
    }

    #[test]
    fn validation() {
        let names = ["a".to_string(), "b".to_string()];
        assert!(
            chain("{name: c, targets: [{provider: a, model: m}]}")
                .validate(&names)
                .is_err()
        );
        let e = chain("{name: c, targets: [{provider: a, model: m}, {provider: z, model: m}]}")
            .validate(&names)
            .unwrap_err();
        assert_eq!(e.0, "targets[1].provider");
    }
}
