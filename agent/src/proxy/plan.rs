//! What to do with one redirected connection, decided before anything is
//! done: terminate it (which provider, which API), relay it (to where it
//! was going, and why), or refuse it (why). `plan` is pure — what is known
//! goes in, a `Plan` comes out — and `accept` only executes it (the shape
//! of ztunnel's `build_request` / `proxy_to`).
use super::{
    client_hello::Hello,
    context::{KnownProvider, by_host},
    trust::Distrust,
};
use crate::{
    policy::{ConnectionDecision, Policy, Subject, Unterminated},
    telemetry::records::Decision,
};

/// What is known about a connection when its first bytes have been peeked.
pub struct Facts<'a> {
    pub subject: Subject<'a>,
    /// The provider of the dialled address (the kernel's provider map).
    pub dialled: &'a str,
    /// The client's first bytes.
    pub hello: &'a Hello,
    /// Configured providers, to match the server name against.
    pub providers: &'a [KnownProvider],
    /// Present when a node CA is configured (termination possible), with the
    /// workloads that rejected it.
    pub trust: Option<&'a Distrust>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Terminate TLS with a leaf for `host`; decide per request.
    Terminate {
        provider: KnownProvider,
        host: String,
    },
    /// Relay the bytes untouched to the dialled address.
    Relay {
        provider: String,
        decision: Decision,
        reason: String,
    },
    /// Close the connection: nothing can be answered in (no termination).
    Refuse { provider: String, reason: String },
}

/// The plan for a connection under `policy`.
///
/// The ClientHello's server name says which provider this is and, with a
/// CA, that it can be terminated; policy needs the provider even when
/// nothing is terminated (deny by provider). A terminated connection that
/// policy denies still gets terminated: the request stage meets the same
/// rule and answers with the provider-shaped 403 and the rule's message.
pub fn plan(facts: &Facts<'_>, policy: &Policy) -> Plan {
    let mut provider = facts.dialled.to_string();
    let mut governed = None;
    let mut distrusted = false;
    // A server name no provider lists, sent to a provider address.
    let foreign = match facts.hello {
        Hello::Tls(info) => info
            .sni
            .as_deref()
            .filter(|s| by_host(facts.providers, s).is_none()),
        _ => None,
    };
    if let Hello::Tls(info) = facts.hello
        && let Some((known, sni)) = info
            .sni
            .as_deref()
            .and_then(|s| by_host(facts.providers, s).map(|k| (k, s)))
    {
        provider = known.name.clone();
        if let Some(trust) = facts.trust {
            if trust.is_distrusted(&facts.subject.workload.cgroup, sni) {
                // It rejected the node CA: relayed, not terminated (`trust`).
                distrusted = true;
            } else {
                governed = Some((known, sni));
            }
        }
    }
    let decision = policy.connection(facts.subject, &provider);
    if let (
        Some((known, sni)),
        ConnectionDecision::Terminate { .. } | ConnectionDecision::Deny { .. },
    ) = (governed, &decision)
    {
        return Plan::Terminate {
            provider: known.clone(),
            host: sni.to_string(),
        };
    }
    match decision {
        ConnectionDecision::Deny { reason, .. } => Plan::Refuse { provider, reason },
        ConnectionDecision::Observe { reason } => Plan::Relay {
            provider,
            decision: Decision::Observe,
            reason,
        },
        // The rule acts per request, and relaying would skip it: a
        // connection that cannot be terminated (late, oversized or foreign
        // ClientHello, no CA, a workload rejecting the CA) is refused.
        ConnectionDecision::Terminate {
            reason,
            unterminated: Unterminated::Refuse,
        } => Plan::Refuse {
            provider,
            reason: format!("{reason}:unterminated"),
        },
        // Another site behind a provider's address (domain fronting),
        // unless the policy lets it through.
        ConnectionDecision::Terminate { reason, .. }
            if foreign.is_some_and(|host| !policy.allows_foreign_host(host)) =>
        {
            Plan::Refuse {
                provider,
                reason: format!("{reason}:foreign_host"),
            }
        }
        // Would be terminated, but the workload rejects the node CA.
        ConnectionDecision::Terminate { .. } if distrusted => Plan::Relay {
            provider,
            decision: Decision::Observe,
            reason: "ca_rejected".into(),
        },
        ConnectionDecision::Terminate { reason, .. } => Plan::Relay {
            provider,
            decision: Decision::Allow,
            reason,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        identity::Workload, policy::PolicyConfig, providers::Api, telemetry::records::TlsInfo,
    };

    /// (what, first bytes, trust state, policy, workload cgroup, plan)
    type Case<'a> = (
        &'a str,
        Hello,
        Option<&'a Distrust>,
        &'a Policy,
        &'a str,
        Plan,
    );

    fn providers() -> Vec<KnownProvider> {
        vec![
            KnownProvider {
                name: "openai".into(),
                hosts: vec!["api.openai.com".into()],
                api: Api::Openai,
                asks_stream_usage: true,
            },
            KnownProvider {
                name: "anthropic".into(),
                hosts: vec!["api.anthropic.com".into()],
                api: Api::Anthropic,
                asks_stream_usage: false,
            },
        ]
    }

    fn policy(yaml: &str) -> Policy {
        let cfg: PolicyConfig = serde_yaml::from_str(yaml).unwrap();
        Policy::new(&cfg, &["openai".into(), "anthropic".into()]).unwrap()
    }

    fn tls(sni: &str) -> Hello {
        Hello::Tls(TlsInfo {
            sni: Some(sni.into()),
            alpn: vec!["h2".into()],
        })
    }

    /// The plan for a workload at `cgroup` that dialled an openai address.
    fn plan_for(hello: &Hello, trust: Option<&Distrust>, policy: &Policy, cgroup: &str) -> Plan {
        let workload = Workload {
            cgroup: cgroup.into(),
            ..Default::default()
        };
        let providers = providers();
        let facts = Facts {
            subject: Subject {
                workload: &workload,
                comm: "app",
            },
            dialled: "openai",
            hello,
            providers: &providers,
            trust,
        };
        plan(&facts, policy)
    }

    fn relay(provider: &str, decision: Decision, reason: &str) -> Plan {
        Plan::Relay {
            provider: provider.into(),
            decision,
            reason: reason.into(),
        }
    }

    fn terminate(i: usize, host: &str) -> Plan {
        Plan::Terminate {
            provider: providers()[i].clone(),
            host: host.into(),
        }
    }

    #[test]
    fn plans() {
        let trust = Distrust::new(Duration::from_secs(3600));
        trust.mark("/distrusting", "api.openai.com");
        let allow = policy("default: allow");
        let deny_anthropic = policy(
            "default: allow\nrules:\n  - {name: no-claude, providers: [anthropic], action: deny}",
        );
        let observe = policy("default: observe");
        let fronting_ok = policy("default: allow\nforeign_hosts: [\"*.example\"]");
        let models = policy(
            "default: observe\nrules:\n  - {name: minis, models: [\"*-mini\"], action: allow}",
        );
        let upper = tls("API.OpenAI.com");
        let cases: Vec<Case> = vec![
            (
                "known SNI with a CA: terminated",
                tls("api.openai.com"),
                Some(&trust),
                &allow,
                "/app",
                terminate(0, "api.openai.com"),
            ),
            (
                "server names match case-insensitively, the SNI is kept as sent",
                upper,
                Some(&trust),
                &allow,
                "/app",
                terminate(0, "API.OpenAI.com"),
            ),
            (
                "the SNI names the provider, not the dialled address",
                tls("api.anthropic.com"),
                Some(&trust),
                &allow,
                "/app",
                terminate(1, "api.anthropic.com"),
            ),
            (
                "denied but terminated: the request stage answers with a 403",
                tls("api.anthropic.com"),
                Some(&trust),
                &deny_anthropic,
                "/app",
                terminate(1, "api.anthropic.com"),
            ),
            (
                "denied without a CA: closed",
                tls("api.anthropic.com"),
                None,
                &deny_anthropic,
                "/app",
                Plan::Refuse {
                    provider: "anthropic".into(),
                    reason: "rule:no-claude".into(),
                },
            ),
            (
                "no CA: relayed as allowed",
                tls("api.openai.com"),
                None,
                &allow,
                "/app",
                relay("openai", Decision::Allow, "default"),
            ),
            (
                "unknown SNI (domain fronting): refused",
                tls("other.example"),
                Some(&trust),
                &allow,
                "/app",
                Plan::Refuse {
                    provider: "openai".into(),
                    reason: "default:foreign_host".into(),
                },
            ),
            (
                "unknown SNI the policy lets through: relayed under the dialled provider",
                tls("Other.Example"),
                Some(&trust),
                &fronting_ok,
                "/app",
                relay("openai", Decision::Allow, "default"),
            ),
            (
                "unknown SNI, observed: relayed",
                tls("other.example"),
                Some(&trust),
                &observe,
                "/app",
                relay("openai", Decision::Observe, "default"),
            ),
            (
                "no SNI (IP-literal URL): relayed",
                Hello::Tls(TlsInfo::default()),
                Some(&trust),
                &allow,
                "/app",
                relay("openai", Decision::Allow, "default"),
            ),
            (
                "plaintext: relayed",
                Hello::NotTls,
                Some(&trust),
                &allow,
                "/app",
                relay("openai", Decision::Allow, "default"),
            ),
            (
                "no ClientHello in time: relayed",
                Hello::Pending,
                Some(&trust),
                &allow,
                "/app",
                relay("openai", Decision::Allow, "default"),
            ),
            (
                "observe policy: relayed even with a CA",
                tls("api.openai.com"),
                Some(&trust),
                &observe,
                "/app",
                relay("openai", Decision::Observe, "default"),
            ),
            (
                "a model rule needs termination",
                tls("api.openai.com"),
                Some(&trust),
                &models,
                "/app",
                terminate(0, "api.openai.com"),
            ),
            (
                "a workload that rejected the CA: observed",
                tls("api.openai.com"),
                Some(&trust),
                &allow,
                "/distrusting",
                relay("openai", Decision::Observe, "ca_rejected"),
            ),
            (
                "rejected the CA for another host only: terminated",
                tls("api.anthropic.com"),
                Some(&trust),
                &allow,
                "/distrusting",
                terminate(1, "api.anthropic.com"),
            ),
        ];
        for (what, hello, trust, policy, cgroup, want) in cases {
            assert_eq!(plan_for(&hello, trust, policy, cgroup), want, "{what}");
        }
    }

    #[test]
    fn a_rule_that_acts_per_request_is_never_relayed() {
        let trust = Distrust::new(Duration::from_secs(3600));
        trust.mark("/distrusting", "api.openai.com");
        let limited =
            policy("rules:\n  - {name: rpm, action: allow, limits: {requests_per_minute: 10}}");
        let models = policy("rules:\n  - {name: minis, models: [\"*-mini\"], action: allow}");
        let relaying = policy(
            "rules:\n  - {name: rpm, action: allow, limits: {requests_per_minute: 10}, unterminated: relay}",
        );
        let refused = |reason: &str| Plan::Refuse {
            provider: "openai".into(),
            reason: reason.into(),
        };
        let cases: Vec<Case> = vec![
            (
                "terminated as usual",
                tls("api.openai.com"),
                Some(&trust),
                &limited,
                "/app",
                terminate(0, "api.openai.com"),
            ),
            (
                "no ClientHello in time",
                Hello::Pending,
                Some(&trust),
                &limited,
                "/app",
                refused("rule:rpm:unterminated"),
            ),
            (
                "a broken or oversized ClientHello",
                Hello::Malformed("x".into()),
                Some(&trust),
                &limited,
                "/app",
                refused("rule:rpm:unterminated"),
            ),
            (
                "a server name no provider lists",
                tls("fronted.example"),
                Some(&trust),
                &limited,
                "/app",
                refused("rule:rpm:unterminated"),
            ),
            (
                "plaintext",
                Hello::NotTls,
                Some(&trust),
                &limited,
                "/app",
                refused("rule:rpm:unterminated"),
            ),
            (
                "no node CA",
                tls("api.openai.com"),
                None,
                &limited,
                "/app",
                refused("rule:rpm:unterminated"),
            ),
            (
                "a workload that rejected the CA",
                tls("api.openai.com"),
                Some(&trust),
                &limited,
                "/distrusting",
                refused("rule:rpm:unterminated"),
            ),
            (
                "a model rule too",
                Hello::Pending,
                Some(&trust),
                &models,
                "/app",
                refused("rule:minis:unterminated"),
            ),
            (
                "unterminated: relay keeps the old fallback",
                Hello::Pending,
                Some(&trust),
                &relaying,
                "/app",
                relay("openai", Decision::Allow, "rule:rpm"),
            ),
        ];
        for (what, hello, trust, policy, cgroup, want) in cases {
            assert_eq!(plan_for(&hello, trust, policy, cgroup), want, "{what}");
        }
    }
}
