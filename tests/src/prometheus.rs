//! A real Prometheus (Debian's `prometheus`) started inside a test node's
//! network namespace, scraping the agent there, and queried over its HTTP
//! API with curl from the same namespace.
use std::{path::Path, time::Duration};

use crate::{
    netns::Netns,
    process::{Proc, wait_until},
};

pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";
pub const PROMTOOL_BIN: &str = "/usr/bin/promtool";
/// Where Prometheus listens, inside the node's namespace.
const LISTEN: &str = "127.0.0.1:9090";

pub struct Prometheus<'a> {
    pub proc: Proc,
    netns: &'a Netns,
}

impl<'a> Prometheus<'a> {
    /// Start Prometheus in `netns` with its data under `dir`, scraping
    /// `target` as job `tollgate` every second and evaluating `rule_files`
    /// every second. Waits until its API answers.
    pub fn start(netns: &'a Netns, dir: &Path, target: &str, rule_files: &[&Path]) -> Self {
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let rules: Vec<String> = rule_files
            .iter()
            .map(|p| format!("  - {}", p.display()))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n{}\n\
             scrape_configs:\n  - job_name: tollgate\n    static_configs:\n      - targets: [\"{target}\"]\n",
            rules.join("\n")
        );
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let proc = Proc::spawn(
            "prometheus",
            netns
                .command(PROMETHEUS_BIN)
                .arg(format!("--config.file={}", config_file.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address={LISTEN}"))
                .stdout(std::process::Stdio::null())
                .stderr(log),
        );
        let p = Prometheus { proc, netns };
        let up = wait_until(Duration::from_secs(30), || {
            p.api("/api/v1/status/buildinfo", &[])
                .filter(|v| v["status"] == "success")
        });
        assert!(
            up.is_some(),
            "prometheus did not start:\n{}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        p
    }

    /// GET `path` of the API with form parameters; the JSON answer, or None
    /// when Prometheus does not answer (yet).
    pub fn api(&self, path: &str, params: &[(&str, &str)]) -> Option<serde_json::Value> {
        let mut cmd = self.netns.command("curl");
        cmd.args(["-sS", "-m", "5", "-G"]);
        for (k, v) in params {
            cmd.arg("--data-urlencode").arg(format!("{k}={v}"));
        }
        let out = cmd.arg(format!("http://{LISTEN}{path}")).output().ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// An instant query: the result vector (empty when no series matched).
    /// Panics with Prometheus's error when the query is invalid.
    pub fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let v = self
            .api("/api/v1/query", &[("query", expr)])
            .unwrap_or_else(|| panic!("prometheus did not answer `{expr}`"));
        assert_eq!(v["status"], "success", "query `{expr}` failed: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// Names of every metric Prometheus holds.
    pub fn metric_names(&self) -> Vec<String> {
        let v = self
            .api("/api/v1/label/__name__/values", &[])
            .expect("prometheus answers");
        v["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|n| n.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The alerts Prometheus holds now: (name, state) pairs.
    pub fn alerts(&self) -> Vec<(String, String)> {
        let v = self.api("/api/v1/alerts", &[]).expect("prometheus answers");
        v["data"]["alerts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| {
                        (
                            x["labels"]["alertname"].as_str().unwrap_or("").to_string(),
                            x["state"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Metric names (`tollgate_…`, `gen_ai_…`) a PromQL expression reads,
/// outside label values in quotes.
pub fn metric_names_in(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    let mut quoted = false;
    while i < bytes.len() {
        if bytes[i] == b'"' && (i == 0 || bytes[i - 1] != b'\\') {
            quoted = !quoted;
            i += 1;
            continue;
        }
        if quoted {
            i += 1;
            continue;
        }
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let rest = &expr[i..];
        if starts_word && (rest.starts_with("tollgate_") || rest.starts_with("gen_ai_")) {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            names.push(rest[..end].to_string());
            i += end;
        } else {
            i += 1;
        }
    }
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_the_metrics_an_expression_reads() {
        assert_eq!(
            super::metric_names_in(
                "histogram_quantile(0.5, sum by (le) (rate(gen_ai_x_bucket{a=\"tollgate_no\"}[1m]))) / my_tollgate_y + tollgate_z"
            ),
            vec!["gen_ai_x_bucket", "tollgate_z"]
        );
    }
}
