//! The `tollgate` command line as a user meets it: help, config errors, and
//! the errors of a run that cannot start.
use std::process::Command;

use tollgate_tests::{node::agent_bin, require_privileged};

fn tollgate(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(agent_bin())
        .args(args)
        .output()
        .expect("run tollgate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &std::path::Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.display().to_string()
}

fn tmpdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tollgate-cli-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn help_answers_the_obvious_questions() {
    let (ok, out, _) = tollgate(&["--help"]);
    assert!(ok);
    for needle in [
        "run",
        "check-config",
        "detach",
        "cgroup v2",
        "BTF",
        "CAP_BPF",
        "ca init",
        "tls.ca_dir",
        "audit",
    ] {
        assert!(
            out.contains(needle),
            "--help should mention {needle}:\n{out}"
        );
    }
    let (ok, out, _) = tollgate(&["run", "--help"]);
    assert!(ok);
    assert!(out.contains("--config"), "{out}");
}

#[test]
fn check_config_reports_field_and_line() {
    let d = tmpdir("check");
    let bad = write(
        &d,
        "bad.yaml",
        "proxy:\n  port: 15088\nheartbeat:\n  interval: 1s\n  timeout: 1s\n",
    );
    let (ok, _, err) = tollgate(&["check-config", &bad]);
    assert!(!ok);
    assert!(
        err.contains("heartbeat.timeout") && err.contains("line 5") && err.contains("bad.yaml"),
        "{err}"
    );

    let typo = write(&d, "typo.yaml", "failure_mode: sometimes\n");
    let (ok, _, err) = tollgate(&["check-config", &typo]);
    assert!(!ok);
    assert!(
        err.contains("failure_mode")
            && err.contains("line 1")
            && err.contains("open")
            && err.contains("closed"),
        "{err}"
    );

    let good = write(
        &d,
        "good.yaml",
        "failure_mode: closed\nproviders:\n  - name: openai\n    hosts: [api.openai.com]\n",
    );
    let (ok, out, err) = tollgate(&["check-config", &good]);
    assert!(ok, "{err}");
    assert!(
        out.contains("valid") && out.contains("failure_mode: closed"),
        "{out}"
    );

    let (ok, _, err) = tollgate(&["check-config", "/nonexistent/tollgate.yaml"]);
    assert!(!ok);
    assert!(
        err.contains("cannot read config file") && err.contains("hint"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn run_without_privileges_says_what_to_do() {
    if !require_privileged("run_without_privileges_says_what_to_do") {
        return;
    }
    // Drop to nobody with no capabilities.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(agent_bin())
        .arg("run")
        .output()
        .expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("needs privileges") && err.contains("CAP_BPF") && err.contains("hint"),
        "{err}"
    );
}

#[test]
fn run_with_missing_cgroup_root_says_what_to_do() {
    if !require_privileged("run_with_missing_cgroup_root_says_what_to_do") {
        return;
    }
    let d = tmpdir("cg");
    let cfg = write(
        &d,
        "c.yaml",
        "cgroup_root: no-such-subtree.slice\nmetrics:\n  listen: \"\"\n",
    );
    let (ok, _, err) = tollgate(&["run", "--config", &cfg]);
    assert!(!ok);
    assert!(
        err.contains("does not exist") && err.contains("hint"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn detach_with_nothing_pinned_is_harmless() {
    let d = tmpdir("detach");
    let (ok, out, _) = tollgate(&["detach", "--bpffs-dir", d.to_str().unwrap()]);
    assert!(ok);
    assert!(out.contains("removed 0"), "{out}");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn policy_schema_is_json_schema_of_the_config() {
    let (ok, out, err) = tollgate(&["policy", "schema"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert!(
        v["$schema"].as_str().unwrap().contains("json-schema.org"),
        "{v}"
    );
    assert!(v["properties"]["policy"].is_object());
    let rule = &v["$defs"]["Rule"];
    assert_eq!(
        rule["additionalProperties"], false,
        "unknown keys are errors: {rule}"
    );
    assert!(rule["properties"]["action"].is_object());
    assert!(
        rule["required"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == "action")
    );
}

/// Every YAML example in the README is a valid configuration: the docs
/// cannot drift from the types.
#[test]
fn readme_yaml_examples_pass_check_config() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let d = tmpdir("readme");
    let mut n = 0;
    for (i, block) in readme.split("```yaml\n").skip(1).enumerate() {
        let yaml = block.split("```").next().unwrap();
        let f = write(&d, &format!("example{i}.yaml"), yaml);
        let (ok, _, err) = tollgate(&["check-config", &f]);
        assert!(
            ok,
            "README YAML example {i} is invalid:\n{err}\n---\n{yaml}"
        );
        n += 1;
    }
    assert!(
        n >= 2,
        "the README has its configuration and policy examples"
    );
}
