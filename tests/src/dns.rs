//! The test node's DNS: the node resolver the agent asks (dnsmasq on the
//! node's loopback) and resolvers on pods' gateways (what their resolv.conf
//! names), all dnsmasq in the node namespace.
use std::{fs, process::Stdio, time::Duration};

use crate::{
    TestNode,
    node::{
        ANTHROPIC_HOST, AZURE_HOST, BACKUP_HOST, BEDROCK_HOST, BEDROCK_WEST_HOST, GEMINI_HOST,
        MCP_HOST, PROVIDER_HOST, UPSTREAM_V4_ALT, UPSTREAM_V4_BACKUP, VERTEX_HOSTS,
    },
    process::Proc,
};

impl TestNode {
    /// (Re)start dnsmasq in the node namespace answering `api.openai.com` with `addrs`.
    pub fn set_dns(&mut self, addrs: &[&str]) {
        let hosts = self.dir.join("hosts");
        let body: String = addrs
            .iter()
            .map(|a| {
                let [v1, v2] = VERTEX_HOSTS;
                format!(
                    "{a} {PROVIDER_HOST} {ANTHROPIC_HOST} {GEMINI_HOST} {BEDROCK_HOST} {BEDROCK_WEST_HOST} {AZURE_HOST} {v1} {v2}\n"
                )
            })
            .chain(std::iter::once(format!(
                "{UPSTREAM_V4_BACKUP} {BACKUP_HOST}\n{UPSTREAM_V4_ALT} {MCP_HOST}\n"
            )))
            .collect();
        fs::write(&hosts, body).unwrap();
        if let Some(mut old) = self.dns.take() {
            old.signal(libc::SIGKILL);
            old.wait_for(Duration::from_secs(2));
        }
        let dns = self.dnsmasq(
            "127.0.0.1",
            &[
                format!("--local-ttl={}", self.dns_ttl),
                format!("--addn-hosts={}", hosts.display()),
            ],
        );
        self.dns = Some(dns);
    }

    /// A DNS server on pod `i`'s gateway — the nameserver its resolv.conf
    /// names — answering with dnsmasq's `records` (e.g. `--host-record=…`).
    /// Returns the gateway address and the server (stopped when dropped).
    pub fn pod_resolver(&self, i: usize, records: &[String]) -> (String, Proc) {
        let gateway = self.pods[i].ip4.replace(".2", ".1");
        let dns = self.dnsmasq(&gateway, records);
        (gateway, dns)
    }

    /// dnsmasq in the node namespace on `listen`:53 with `extra` arguments,
    /// started and listening.
    fn dnsmasq(&self, listen: &str, extra: &[String]) -> Proc {
        let dns = Proc::spawn(
            "dnsmasq",
            self.node
                .command("dnsmasq")
                .args([
                    "--keep-in-foreground",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    &format!("--listen-address={listen}"),
                    "--port=53",
                    "--user=root",
                    "--pid-file=",
                ])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        assert!(
            self.node
                .wait_udp_listener(&format!("{listen}:53"), Duration::from_secs(5)),
            "dnsmasq on {listen} did not start"
        );
        dns
    }
}
