use super::*;

fn policy(yaml: &str) -> Policy {
    let cfg: PolicyConfig = serde_yaml::from_str(yaml).unwrap();
    Policy::new(&cfg, &["openai".into(), "anthropic".into()]).unwrap()
}

fn pod(uid: &str) -> Workload {
    Workload {
        cgroup: format!("/kubepods.slice/kubepods-pod{uid}.slice/cri-containerd-abc.scope"),
        pod_uid: Some(uid.into()),
        ..Default::default()
    }
}

fn subject(w: &Workload) -> Subject<'_> {
    Subject {
        workload: w,
        comm: "python3",
    }
}

const RULES: &str = r#"
default: allow
rules:
  - name: batch-no-frontier
    match: {pod_uids: [batch]}
    models: ["gpt-4o", "gpt-4.1*", "o3*"]
    action: deny
    message: batch jobs use gpt-4o-mini
  - name: batch-capped
    match: {pod_uids: [batch]}
    providers: [openai]
    action: allow
    max_output_tokens: 256
    model_aliases: {fast: gpt-4o-mini}
  - name: untrusting
    match: {cgroups: ["**/*podlegacy.slice/**"]}
    action: observe
  - name: no-anthropic
    match: {processes: ["curl"]}
    providers: [anthropic]
    action: deny
"#;

#[test]
fn first_matching_rule_decides_requests() {
    let p = policy(RULES);
    let batch = pod("batch");
    let d = p.request(
        subject(&batch),
        "openai",
        Operation::Chat,
        Some("gpt-4.1-mini"),
    );
    assert_eq!(
        d,
        RequestDecision::Deny {
            reason: "rule:batch-no-frontier".into(),
            message: "batch jobs use gpt-4o-mini".into()
        }
    );
    // Not a denied model: the next rule caps and rewrites.
    let d = p.request(subject(&batch), "openai", Operation::Chat, Some("fast"));
    assert_eq!(
        d,
        RequestDecision::Allow {
            reason: "rule:batch-capped".into(),
            caps: Caps {
                max_output_tokens: Some(256),
                model: Some("gpt-4o-mini".into()),
                limits: None,
                credential_file: None,
                budget: None,
                failover: None,
                headers: None,
                max_request_bytes: None,
            }
        }
    );
    // Another pod: the default.
    let other = pod("web");
    assert_eq!(
        p.request(subject(&other), "openai", Operation::Chat, Some("gpt-4o")),
        RequestDecision::Allow {
            reason: "default".into(),
            caps: Caps::default()
        }
    );
}

#[test]
fn connections_are_terminated_when_a_model_rule_may_apply() {
    let p = policy(RULES);
    let batch = pod("batch");
    // The first matching rule names models: the model decides, so terminate.
    assert!(matches!(
        p.connection(subject(&batch), "openai"),
        ConnectionDecision::Terminate { .. }
    ));
    let legacy = pod("legacy");
    assert_eq!(
        p.connection(subject(&legacy), "openai"),
        ConnectionDecision::Observe {
            reason: "rule:untrusting".into()
        }
    );
    let curl = Subject {
        workload: &legacy,
        comm: "curl",
    };
    // Rule order: `untrusting` comes first for this cgroup.
    assert!(matches!(
        p.connection(curl, "anthropic"),
        ConnectionDecision::Observe { .. }
    ));
    let web = pod("web");
    let curl = Subject {
        workload: &web,
        comm: "curl",
    };
    assert_eq!(
        p.connection(curl, "anthropic"),
        ConnectionDecision::Deny {
            reason: "rule:no-anthropic".into(),
            message: None
        }
    );
}

#[test]
fn default_deny_denies_what_no_rule_allows() {
    let p =
        policy("default: deny\nrules:\n  - {name: ok, match: {pod_uids: [a]}, action: allow}\n");
    let a = pod("a");
    let b = pod("b");
    assert_eq!(
        p.connection(subject(&a), "openai"),
        ConnectionDecision::Terminate {
            reason: "rule:ok".into(),
            unterminated: Unterminated::Relay,
        }
    );
    assert!(matches!(
        p.connection(subject(&b), "openai"),
        ConnectionDecision::Deny { ref reason, .. } if reason == "default"
    ));
    assert!(matches!(
        p.request(subject(&b), "openai", Operation::Chat, Some("m")),
        RequestDecision::Deny { .. }
    ));
}

#[test]
fn selectors_and_fields_combine_and_within_or_across() {
    let p = policy(
        "rules:\n  - name: r\n    match: {units: [\"batch-*.service\"], processes: [\"python*\"]}\n    action: deny\n",
    );
    let unit = |u: &str| Workload {
        cgroup: format!("/tollgate.slice/{u}"),
        unit: Some(u.into()),
        ..Default::default()
    };
    let (a, b) = (unit("batch-1.service"), unit("web.service"));
    let s = |w, comm| Subject { workload: w, comm };
    assert!(matches!(
        p.connection(s(&a, "python3"), "openai"),
        ConnectionDecision::Deny { .. }
    ));
    for other in [s(&a, "node"), s(&b, "python3")] {
        assert_eq!(
            p.connection(other, "openai"),
            ConnectionDecision::Terminate {
                reason: "default".into(),
                unterminated: Unterminated::Relay,
            }
        );
    }
}

#[test]
fn a_model_rule_does_not_apply_to_calls_without_a_model_when_it_skips_them() {
    let p = policy("rules:\n  - {name: r, models: [\"*\"], action: deny, without_model: skip}\n");
    let w = pod("x");
    assert!(matches!(
        p.request(subject(&w), "openai", Operation::Batch, None),
        RequestDecision::Allow { .. }
    ));
}

#[test]
fn a_model_rule_refuses_what_it_cannot_read_unless_told_otherwise() {
    let w = pod("x");
    // Allow-listed models only: a request hiding its model (a batch, a
    // body that is not JSON) is refused, not let through by the default.
    let p = policy(
        "default: allow\nrules:\n  - {name: minis, models: [\"*-mini\"], action: allow}\n  - {name: rest, action: deny}\n",
    );
    match p.request(subject(&w), "openai", Operation::Batch, None) {
        RequestDecision::Deny { reason, message } => {
            assert_eq!(reason, "rule:minis:model_unreadable");
            assert!(message.contains("without_model"), "{message}");
        }
        d => panic!("{d:?}"),
    }
    // A deny rule refuses it too (the batch may ask for the denied model).
    let p = policy("rules:\n  - {name: no-4o, models: [\"gpt-4o\"], action: deny}\n");
    assert!(matches!(
        p.request(subject(&w), "openai", Operation::Batch, None),
        RequestDecision::Deny { reason, .. } if reason == "rule:no-4o:model_unreadable"
    ));
    // `apply`: the rule's own action, with its caps.
    let p = policy(
        "default: deny\nrules:\n  - {name: minis, models: [\"*-mini\"], action: allow, max_output_tokens: 9, without_model: apply}\n",
    );
    match p.request(subject(&w), "openai", Operation::Batch, None) {
        RequestDecision::Allow { reason, caps } => {
            assert_eq!(
                (reason.as_str(), caps.max_output_tokens),
                ("rule:minis", Some(9))
            );
        }
        d => panic!("{d:?}"),
    }
    // A model that is read and not listed still falls through as before.
    assert!(matches!(
        p.request(subject(&w), "openai", Operation::Chat, Some("gpt-4o")),
        RequestDecision::Deny { reason, .. } if reason == "default"
    ));
}

#[test]
fn invalid_policies_name_the_field() {
    let bad = |yaml: &str| {
        let cfg: PolicyConfig = serde_yaml::from_str(yaml).unwrap();
        Policy::new(&cfg, &["openai".into()]).err().unwrap()
    };
    let e = bad("rules:\n  - {name: a, action: allow}\n  - {name: a, action: deny}\n");
    assert_eq!(e.field, "rules[1].name");
    let e = bad("rules:\n  - {name: a, providers: [openia], action: deny}\n");
    assert_eq!(e.field, "rules[0].providers[0]");
    assert!(e.message.contains("known: openai"), "{e}");
    let e = bad("rules:\n  - {name: a, models: [\"ok\", \"a[\"], action: deny}\n");
    assert_eq!(e.field, "rules[0].models[1]");
    let e = bad("rules:\n  - {name: a, action: deny, max_output_tokens: 5}\n");
    assert_eq!(e.field, "rules[0].action");
    let e = bad("rules:\n  - {name: a, action: allow, max_output_tokens: 0}\n");
    assert_eq!(e.field, "rules[0].max_output_tokens");
}

fn kube_pod(uid: &str, ns: &str, owner: &str, sa: &str, labels: &[(&str, &str)]) -> Workload {
    let (kind, name) = owner.split_once('/').unwrap();
    let mut w = pod(uid);
    w.kubernetes = Some(std::sync::Arc::new(crate::pods::PodMeta {
        namespace: ns.into(),
        name: format!("{name}-x1"),
        uid: uid.into(),
        workload: crate::pods::Owner {
            kind: kind.into(),
            name: name.into(),
        },
        service_account: sa.into(),
        node: "n1".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        serial: 1,
    }));
    w
}

#[test]
fn kubernetes_selectors_match_namespace_workload_labels_and_service_account() {
    let p = policy(
        r#"
default: deny
rules:
  - name: research-gold
    match: {namespaces: ["research-*"], labels: {tier: gold, team: "*"}}
    action: allow
  - name: nightly
    match: {workloads: ["CronJob/nightly-*"]}
    action: allow
  - name: chat-by-name
    match: {workloads: [chat], service_accounts: [llm-caller]}
    action: allow
"#,
    );
    let decide = |w: &Workload| match p.request(subject(w), "openai", Operation::Chat, Some("m")) {
        RequestDecision::Allow { reason, .. } => reason,
        RequestDecision::Deny { reason, .. } => format!("deny:{reason}"),
    };
    let gold = kube_pod(
        "u1",
        "research-nlp",
        "Deployment/x",
        "default",
        &[("tier", "gold"), ("team", "nlp")],
    );
    assert_eq!(decide(&gold), "rule:research-gold");
    // Every label must be there.
    let no_team = kube_pod(
        "u2",
        "research-nlp",
        "Deployment/x",
        "default",
        &[("tier", "gold")],
    );
    assert_eq!(decide(&no_team), "deny:default");
    let nightly = kube_pod("u3", "ops", "CronJob/nightly-report", "default", &[]);
    assert_eq!(decide(&nightly), "rule:nightly");
    // A glob with `/` looks at the kind too.
    let not_cron = kube_pod("u4", "ops", "Job/nightly-report", "default", &[]);
    assert_eq!(decide(&not_cron), "deny:default");
    // A bare glob matches the name, whatever the kind; both fields must match.
    let chat = kube_pod("u5", "web", "StatefulSet/chat", "llm-caller", &[]);
    assert_eq!(decide(&chat), "rule:chat-by-name");
    let chat_other_sa = kube_pod("u6", "web", "StatefulSet/chat", "default", &[]);
    assert_eq!(decide(&chat_other_sa), "deny:default");
    // No metadata (unknown pod, host mode): Kubernetes selectors never match.
    assert_eq!(decide(&pod("u1")), "deny:default");
}

#[test]
fn metadata_arriving_later_is_seen_by_the_memo() {
    let p = policy(
        r#"
default: deny
rules:
  - name: team-a
    match: {namespaces: [team-a]}
    action: allow
"#,
    );
    let unknown = pod("u1");
    assert!(matches!(
        p.request(subject(&unknown), "openai", Operation::Batch, None),
        RequestDecision::Deny { .. }
    ));
    let known = kube_pod("u1", "team-a", "Deployment/chat", "default", &[]);
    assert!(matches!(
        p.request(subject(&known), "openai", Operation::Batch, None),
        RequestDecision::Allow { .. }
    ));
}

#[test]
fn bad_label_glob_names_its_field() {
    let cfg: PolicyConfig =
        serde_yaml::from_str("rules: [{name: r, match: {labels: {app: \"[\"}}, action: allow}]")
            .unwrap();
    let e = Policy::new(&cfg, &["openai".into()]).err().unwrap();
    assert_eq!(e.field, "rules[0].match.labels.app");
}

#[test]
fn operations_select_the_calls_a_rule_decides() {
    // Chat only for the batch team: everything else of theirs is refused,
    // with the kind of call named; another team is untouched.
    let p = policy(
        r#"
default: allow
rules:
  - name: chat-only
    match: {pod_uids: [team]}
    operations: [chat, responses]
    action: allow
  - name: nothing-else
    match: {pod_uids: [team]}
    action: deny
  - name: no-batch
    operations: [batch, files]
    action: deny
"#,
    );
    let team = pod("team");
    let other = pod("other");
    let cases = [
        (&team, Operation::Chat, Some("gpt-4o"), Ok("rule:chat-only")),
        (
            &team,
            Operation::Responses,
            Some("o4-mini"),
            Ok("rule:chat-only"),
        ),
        (&team, Operation::Batch, None, Err("rule:nothing-else")),
        (
            &team,
            Operation::Embeddings,
            Some("e"),
            Err("rule:nothing-else"),
        ),
        (&other, Operation::Chat, Some("gpt-4o"), Ok("default")),
        (&other, Operation::Batch, None, Err("rule:no-batch")),
        (&other, Operation::Files, None, Err("rule:no-batch")),
        (
            &other,
            Operation::Realtime,
            Some("gpt-realtime"),
            Ok("default"),
        ),
    ];
    for (w, op, model, want) in cases {
        let got = match p.request(subject(w), "openai", op, model) {
            RequestDecision::Allow { reason, .. } => Ok(reason),
            RequestDecision::Deny { reason, .. } => Err(reason),
        };
        assert_eq!(
            got.as_ref().map(String::as_str).map_err(String::as_str),
            want,
            "{op} {model:?} from {:?}",
            w.pod_uid
        );
    }
    // The refusal names the kind of call.
    match p.request(subject(&other), "openai", Operation::Batch, None) {
        RequestDecision::Deny { message, .. } => {
            assert_eq!(
                message,
                "denied by policy rule `no-batch` for `batch` calls"
            )
        }
        d => panic!("{d:?}"),
    }
    // A rule with operations is decided per request: its connections are
    // terminated, and refused when they cannot be.
    assert_eq!(
        p.connection(subject(&other), "openai"),
        ConnectionDecision::Terminate {
            reason: "rule:no-batch".into(),
            unterminated: Unterminated::Refuse,
        }
    );
}

#[test]
fn an_unknown_operation_is_refused_with_the_known_ones() {
    let err = serde_yaml::from_str::<PolicyConfig>(
        "rules:\n  - {name: r, operations: [chat, batches], action: deny}\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("unknown variant `batches`"), "{err}");
    assert!(err.contains("`batch`") && err.contains("`files`"), "{err}");
}

#[test]
fn a_batch_input_is_decided_by_every_model_it_names() {
    let p = policy(
        "rules:\n  - {name: minis, models: [\"*-mini\"], action: allow}\n  - {name: rest, models: [\"*\"], action: deny}\n",
    );
    let w = pod("x");
    let each = |models: &[&str]| {
        let models: Vec<String> = models.iter().map(|m| m.to_string()).collect();
        match p.request_each(subject(&w), "openai", Operation::Files, &models) {
            RequestDecision::Allow { reason, .. } => Ok(reason),
            RequestDecision::Deny { reason, message } => Err((reason, message)),
        }
    };
    assert_eq!(each(&["gpt-4o-mini", "o4-mini"]), Ok("rule:minis".into()));
    // One frontier line refuses the whole upload, naming it.
    assert_eq!(
        each(&["gpt-4o-mini", "gpt-4o"]),
        Err((
            "rule:rest".into(),
            "denied by policy rule `rest` for model `gpt-4o`".into()
        ))
    );
    // No models: as a request whose model cannot be read.
    assert!(matches!(each(&[]), Err((r, _)) if r == "rule:minis:model_unreadable"));
}

#[test]
fn a_realtime_rule_is_warned_of_what_sessions_ignore() {
    let cfg: PolicyConfig = serde_yaml::from_str(
        "rules:\n  - {name: voice, operations: [chat, realtime], action: allow, max_output_tokens: 9, model_aliases: {fast: gpt-realtime-mini}}\n  - {name: chat, operations: [chat], action: allow, max_output_tokens: 9}\n",
    )
    .unwrap();
    let fields: Vec<String> = cfg.warnings().into_iter().map(|(f, _)| f).collect();
    assert_eq!(
        fields,
        ["rules[0].max_output_tokens", "rules[0].model_aliases"]
    );
}

#[test]
fn mcp_rules_are_checked_against_the_mcp_servers() {
    let bad = |yaml: &str, mcp: &[&str]| {
        let cfg: PolicyConfig = serde_yaml::from_str(yaml).unwrap();
        let mcp: Vec<String> = mcp.iter().map(|s| s.to_string()).collect();
        let mut providers = vec!["openai".to_string()];
        providers.extend(mcp.iter().cloned());
        Policy::with_mcp(&cfg, &providers, &mcp).err().unwrap()
    };
    let e = bad("rules: [{name: m, mcp: {}, action: allow}]", &[]);
    assert_eq!(e.field, "rules[0].mcp");
    assert!(e.message.contains("no `mcp_servers`"), "{e}");
    let e = bad(
        "rules: [{name: m, mcp: {servers: [gh, openai]}, action: allow}]",
        &["gh"],
    );
    assert_eq!(e.field, "rules[0].mcp.servers[1]");
    assert!(e.message.contains("known: gh"), "{e}");
    let e = bad(
        "rules: [{name: m, mcp: {tools: {deny: [x]}}, action: deny}]",
        &["gh"],
    );
    assert_eq!(e.field, "rules[0].mcp.tools");
    for (field, yaml) in [
        ("budget", "budget: {daily_usd: 1}"),
        ("models", "models: [gpt-4o]"),
        (
            "limits.input_tokens_per_minute",
            "limits: {input_tokens_per_minute: 5}",
        ),
    ] {
        let e = bad(
            &format!("rules: [{{name: m, mcp: {{}}, action: allow, {yaml}}}]"),
            &["gh"],
        );
        assert_eq!(e.field, format!("rules[0].{field}"), "{e}");
    }
    let e = bad(
        "rules: [{name: m, mcp: {tools: {allow: [\"[\"]}}, action: allow}]",
        &["gh"],
    );
    assert_eq!(e.field, "rules[0].mcp.tools.allow[0]");
}

#[test]
fn mcp_rules_decide_only_mcp_calls_and_model_rules_none() {
    let cfg: PolicyConfig = serde_yaml::from_str(
        "default: deny\nrules:\n  - {name: models, models: [\"gpt-*\"], action: allow}\n  - {name: gh, mcp: {servers: [gh], tools: {deny: [\"delete_*\"]}}, action: allow}\n  - {name: rest, action: allow}\n",
    )
    .unwrap();
    let providers = ["openai".to_string(), "gh".into(), "jira".into()];
    let p = Policy::with_mcp(&cfg, &providers, &["gh".into(), "jira".into()]).unwrap();
    let w = crate::identity::Workload::default();
    let s = Subject {
        workload: &w,
        comm: "app",
    };
    let reason = |d: RequestDecision| match d {
        RequestDecision::Allow { reason, .. } => format!("allow {reason}"),
        RequestDecision::Deny { reason, .. } => format!("deny {reason}"),
    };
    // A model rule does not see MCP calls; the MCP rule decides its server's.
    assert_eq!(reason(p.mcp(s, "gh", Some("list_issues"))), "allow rule:gh");
    assert_eq!(reason(p.mcp(s, "gh", Some("delete_repo"))), "deny rule:gh");
    assert_eq!(reason(p.mcp(s, "gh", None)), "allow rule:gh");
    // Another server is not the MCP rule's.
    assert_eq!(
        reason(p.mcp(s, "jira", Some("delete_repo"))),
        "allow rule:rest"
    );
    // An LLM call is not the MCP rule's either.
    assert_eq!(
        reason(p.request(s, "openai", Operation::Chat, Some("o3"))),
        "allow rule:rest"
    );
    assert_eq!(
        reason(p.request(s, "openai", Operation::Chat, Some("gpt-4o"))),
        "allow rule:models"
    );
}
