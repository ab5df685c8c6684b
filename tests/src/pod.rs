//! A pod of the test node, and the ways a test acts from inside it: curl,
//! HTTPS calls trusting a given CA, and applications with their own /etc/hosts.
use std::{path::PathBuf, process::Command};

use crate::{
    netns::Netns,
    node::{TLS_PORT, UPSTREAM_V4},
    process::Proc,
};

/// curl's `-w` format that prints curl's own end of the connection after
/// the body; `curl_answer` reads it.
pub const CURL_ENDS: &str = "\n%{local_ip} %{local_port}";

/// The mock's JSON answer from the output of a curl run with `-w CURL_ENDS`,
/// with curl's own end of the connection added as `client` (see `node::route`).
pub fn curl_answer(stdout: &[u8]) -> Result<serde_json::Value, String> {
    let text = String::from_utf8_lossy(stdout);
    let (body, client) = text
        .rsplit_once('\n')
        .ok_or_else(|| format!("no connection line from curl: {text}"))?;
    let mut answer: serde_json::Value =
        serde_json::from_str(body).map_err(|e| format!("bad body: {e}: {body}"))?;
    answer["client"] = client.trim().into();
    Ok(answer)
}

pub struct Pod {
    /// Dropped first: the pod's long-lived process.
    pub(crate) _pause: Proc,
    pub index: u32,
    pub uid: String,
    pub container_id: String,
    pub cgroup: PathBuf,
    pub netns: Netns,
    pub ip4: String,
    pub ip6: String,
}

impl Pod {
    /// `curl` from inside this pod (its namespace and container cgroup).
    /// Returns the mock's JSON answer, with curl's own end of the connection
    /// added as `client` (see `node::route`), or curl's error.
    pub fn curl(&self, url: &str) -> Result<serde_json::Value, String> {
        let out = self
            .curl_cmd(url)
            .args(["-w", CURL_ENDS])
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "curl {url}: exit {:?}: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        curl_answer(&out.stdout)
    }

    /// POST `json` to `https://<host>:TLS_PORT<path>` from inside the pod,
    /// trusting `ca` (the node CA), resolving `host` to the provider address
    /// the way the workload's DNS would. Returns curl's output.
    pub fn https_post(
        &self,
        ca: &std::path::Path,
        host: &str,
        path: &str,
        json: &str,
    ) -> std::process::Output {
        self.https_post_command(ca, host, path, json)
            .output()
            .expect("run curl")
    }

    /// POST a chat call (`json`) to the OpenAI provider host from inside the
    /// pod, trusting `ca`, with curl's `-i` and `extra` arguments; returns
    /// what curl printed (status line, headers, body).
    pub fn chat(&self, ca: &std::path::Path, json: &str, extra: &[&str]) -> String {
        let out = self
            .https_post_command(ca, crate::node::PROVIDER_HOST, "/v1/chat/completions", json)
            .arg("-i")
            .args(extra)
            .output()
            .expect("run curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The curl command of `https_post`, to run with other stdio.
    pub fn https_post_command(
        &self,
        ca: &std::path::Path,
        host: &str,
        path: &str,
        json: &str,
    ) -> Command {
        let mut c = self.netns.command_in_cgroup("curl", Some(&self.cgroup));
        c.args(["-sS", "-N", "-m", "10", "--cacert"])
            .arg(ca)
            .args(["--resolve", &format!("{host}:{TLS_PORT}:{UPSTREAM_V4}")])
            .args([
                "-H",
                "content-type: application/json",
                "-H",
                "authorization: Bearer sk-test-secret",
            ])
            .args(["--data-binary", json])
            .arg(format!("https://{host}:{TLS_PORT}{path}"));
        c
    }

    /// Run `program args…` as an application of this pod: in its network
    /// namespace and container cgroup, with its own mount namespace whose
    /// /etc/hosts maps the provider names to the provider address (what the
    /// pod's DNS would answer), so SDKs resolve their default base URLs.
    pub fn app(&self, hosts_file: &std::path::Path, program: &str, args: &[&str]) -> Command {
        self.app_in(&self.cgroup, hosts_file, program, args)
    }

    /// The same, in another cgroup of the pod's namespace (e.g. one outside
    /// the governed subtree).
    pub fn app_in(
        &self,
        cgroup: &std::path::Path,
        hosts_file: &std::path::Path,
        program: &str,
        args: &[&str],
    ) -> Command {
        let mut c = self.netns.command_in_cgroup("unshare", Some(cgroup));
        c.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "mount --bind {} /etc/hosts && exec \"$@\"",
                hosts_file.display()
            ))
            .arg("sh")
            .arg(program)
            .args(args);
        c
    }

    /// Run a Python script (`python3 -c script args…`) from inside this pod
    /// and return its standard output; a failing script fails the test
    /// with its standard error.
    pub fn python(&self, script: &str, args: &[&str]) -> String {
        let out = self
            .netns
            .command_in_cgroup("python3", Some(&self.cgroup))
            .args(["-c", script])
            .args(args)
            .output()
            .expect("run python3");
        assert!(
            out.status.success(),
            "python in pod {}: {}",
            self.index,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn curl_cmd(&self, url: &str) -> Command {
        let mut c = self.netns.command_in_cgroup("curl", Some(&self.cgroup));
        c.args(["-sS", "-g", "-m", "5", "--connect-timeout", "3", url]);
        c
    }
}
