use std::time::Duration;

use super::*;

/// The message a config that does not load is refused with.
fn refused(text: &str) -> String {
    Config::parse(text, "c").unwrap_err().to_string()
}

#[test]
fn empty_file_gives_defaults() {
    let c = Config::parse("{}", "t").unwrap();
    assert_eq!(c.proxy.port, DEFAULT_PROXY_PORT);
    assert_eq!(c.failure_mode, FailureMode::Open);
    assert!(
        c.providers
            .iter()
            .any(|p| p.hosts.contains(&"api.openai.com".to_string()))
    );
}

#[test]
fn full_config_parses() {
    let c = Config::parse(
        "cgroup_root: tollgate.slice\nfailure_mode: closed\nproxy:\n  port: 15099\nheartbeat:\n  interval: 500ms\n  timeout: 2s\ndns:\n  servers: [\"127.0.0.1:5353\", \"10.0.0.1\"]\nproviders:\n  - name: openai\n    hosts: [api.openai.com]\n    addresses: [\"10.1.2.3\"]\n    ports: [443, 8443]\nopt_out:\n  cgroups: [\"**/*pod1234*\"]\n",
        "t",
    )
    .unwrap();
    assert_eq!(c.failure_mode, FailureMode::Closed);
    assert_eq!(c.heartbeat.interval, Duration::from_millis(500));
    assert_eq!(c.providers[0].ports, vec![443, 8443]);
    assert_eq!(parse_dns_server(&c.dns.servers[1]).unwrap().port(), 53);
}

#[test]
fn unknown_field_names_path_and_line() {
    let e = Config::parse("proxy:\n  prot: 1\n", "cfg.yaml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("cfg.yaml"), "{e}");
    assert!(e.contains("line 2"), "{e}");
    assert!(e.contains("proxy"), "{e}");
    assert!(e.contains("unknown field `prot`"), "{e}");
}

#[test]
fn mcp_servers_are_governed_hosts_checked_under_their_own_name() {
    let c = Config::parse(
        "mcp_servers:\n  - name: github\n    hosts: [api.githubcopilot.com]\n",
        "c",
    )
    .unwrap();
    let gh = c.providers.iter().find(|p| p.name == "github").unwrap();
    assert_eq!(gh.api(), crate::providers::Api::Mcp);
    assert_eq!(gh.ports, [443]);
    assert!(c.providers.len() > 1, "the built-in providers stay");
    assert_eq!(c.mcp_server_names(), ["github"]);
    for (yaml, field) in [
        (
            "mcp_servers:\n  - name: x\n    hosts: [\"*.example.com\"]\n",
            "mcp_servers[0].hosts[0]",
        ),
        (
            "mcp_servers:\n  - name: openai\n    hosts: [mcp.example.com]\n",
            "mcp_servers[0].name",
        ),
        ("mcp_servers:\n  - name: x\n", "mcp_servers[0]"),
    ] {
        let e = refused(yaml);
        assert!(e.contains(field), "{yaml}: {e}");
    }
}

#[test]
fn bedrock_regions_become_its_runtime_hosts() {
    let c = Config::parse(
        "providers:\n  - name: aws\n    api: bedrock\n    regions: [us-east-1, eu-central-1]\n    hosts: [bedrock-runtime-fips.us-east-1.amazonaws.com]\n",
        "c",
    )
    .unwrap();
    assert_eq!(
        c.providers[0].hosts,
        [
            "bedrock-runtime-fips.us-east-1.amazonaws.com",
            "bedrock-runtime.us-east-1.amazonaws.com",
            "bedrock-runtime.eu-central-1.amazonaws.com"
        ]
    );
    assert_eq!(c.providers[0].api(), crate::providers::Api::Bedrock);
    // The built-in provider governs the shipped regions.
    let d = Config::default();
    let b = d.providers.iter().find(|p| p.name == "bedrock").unwrap();
    assert_eq!(b.api(), crate::providers::Api::Bedrock);
    assert!(
        b.hosts
            .contains(&"bedrock-runtime.us-west-2.amazonaws.com".to_string())
    );
    assert_eq!(b.hosts.len(), sections::BEDROCK_REGIONS.len());
    for (yaml, field, says) in [
        (
            "providers:\n  - name: bedrock\n    regions: [us-east-1, \"us east 2\"]\n",
            "providers[0].regions[1]",
            "not an AWS region",
        ),
        (
            "providers:\n  - name: openai\n    regions: [us-east-1]\n    hosts: [api.openai.com]\n",
            "providers[0].regions",
            "api: bedrock` and `api: vertex",
        ),
        (
            "providers:\n  - name: bedrock\n",
            "providers[0]",
            "`regions`",
        ),
    ] {
        let e = refused(yaml);
        assert!(e.contains(field) && e.contains(says), "{yaml}: {e}");
    }
    let v = Config::parse(
        "providers:\n  - name: gcp\n    api: vertex\n    regions: [global, europe-west4]\n",
        "c",
    )
    .unwrap();
    assert_eq!(
        v.providers[0].hosts,
        [
            "aiplatform.googleapis.com",
            "europe-west4-aiplatform.googleapis.com"
        ]
    );
    let e = refused("providers:\n  - name: vertex\n    regions: [us-east-1]\n");
    assert!(
        e.contains("providers[0].regions[0]") && e.contains("Google Cloud region"),
        "{e}"
    );
    for (r, ok) in [
        ("us-central1", true),
        ("global", true),
        ("europe-west4", true),
        ("us-east-1", false),
        ("US1", false),
    ] {
        assert_eq!(sections::valid_gcp_region(r), ok, "{r}");
    }
    for (r, ok) in [
        ("us-east-1", true),
        ("us-gov-west-1", true),
        ("ap-southeast-2", true),
        ("us-east", false),
        ("US-EAST-1", false),
        ("us--1", false),
        ("useast-1-x", false),
    ] {
        assert_eq!(sections::valid_region(r), ok, "{r}");
    }
}

#[test]
fn type_error_names_field() {
    let e = refused("proxy:\n  port: lots\n");
    assert!(e.contains("proxy.port"), "{e}");
    assert!(e.contains("line 2"), "{e}");
}

#[test]
fn semantic_error_names_field_and_line() {
    let text = "heartbeat:\n  interval: 2s\n  timeout: 3s\n";
    let e = refused(text);
    assert!(e.contains("heartbeat.timeout"), "{e}");
    assert!(e.contains("line 3"), "{e}");

    let e = refused("providers:\n  - name: x\n    hosts: [\"*.openai.azure.com\"]\n");
    assert!(e.contains("providers[0].hosts[0]"), "{e}");
    assert!(e.contains("wildcards"), "{e}");
    assert!(e.contains("line 3"), "{e}");
}

#[test]
fn policy_errors_point_at_the_rule() {
    let text = "policy:\n  rules:\n    - name: a\n      action: allow\n    - name: b\n      providers: [openia]\n      action: deny\n";
    let e = refused(text);
    assert!(e.contains("policy.rules[1].providers[0]"), "{e}");
    assert!(e.contains("line 6"), "{e}");
    let flow = "policy:\n  rules:\n  - {name: a, action: allow}\n  - {name: a, action: deny}\n";
    let e = refused(flow);
    assert!(e.contains("policy.rules[1].name"), "{e}");
    assert!(e.contains("line 4"), "{e}");
}

#[test]
fn rejects_more_static_addresses_than_the_map_holds() {
    let addrs: Vec<String> = (0..4097u32)
        .map(|i| format!("\"10.{}.{}.{}\"", i >> 16, (i >> 8) & 255, i & 255))
        .collect();
    let text = format!(
        "providers:\n  - name: big\n    addresses: [{}]\n",
        addrs.join(",")
    );
    let e = refused(&text);
    assert!(e.contains("exceed the kernel provider map (4096)"), "{e}");
}

#[test]
fn rejects_duplicate_and_empty_providers() {
    let dup = "providers:\n  - {name: a, hosts: [a.example]}\n  - {name: a, hosts: [b.example]}\n";
    assert!(refused(dup).contains("listed twice"));
    assert!(refused("providers: []\n").contains("no provider"));
    let none = "providers:\n  - {name: a}\n";
    assert!(refused(none).contains("hosts`, `addresses`"));
}

#[test]
fn session_tickets_default_to_none_and_are_bounded() {
    assert_eq!(Config::parse("{}", "t").unwrap().tls.session_tickets, 0);
    let two = Config::parse("tls:\n  session_tickets: 2\n", "t").unwrap();
    assert_eq!(two.tls.session_tickets, 2);
    let e = refused("tls:\n  session_tickets: 100\n");
    assert!(
        e.contains("tls.session_tickets") && e.contains("at most 8"),
        "{e}"
    );
}

#[test]
fn the_request_head_bound_is_8_kib_and_no_less() {
    assert_eq!(Config::parse("{}", "t").unwrap().tls.max_request_head, 8192);
    let big = Config::parse("tls:\n  max_request_head: 65536\n", "t").unwrap();
    assert_eq!(big.tls.max_request_head, 65536);
    let e = refused("tls:\n  max_request_head: 4096\n");
    assert!(
        e.contains("tls.max_request_head") && e.contains("at least 8192"),
        "{e}"
    );
}
