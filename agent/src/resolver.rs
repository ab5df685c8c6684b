//! Provider addresses from DNS, kept fresh in the kernel's provider map.
//!
//! Each configured host is resolved (A and AAAA) and re-resolved when its
//! answer's TTL runs out (clamped to `dns.min_ttl..=dns.max_ttl`). An address
//! stays in the map until its own TTL has passed plus `dns.stale_grace`:
//! providers rotate addresses between answers, and an application may still
//! connect to an address it resolved a moment before our latest answer dropped
//! it; removing it at once would let that connection bypass governance.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use hickory_resolver::{
    Resolver, TokioResolver,
    config::{ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
};
use tollgate_common::ProviderKey;

use crate::{
    bpf::maps::provider_key,
    config::{Config, DnsConfig, parse_dns_server},
};

/// Addresses known for every provider, with when each stops being trusted.
#[derive(Debug, Default)]
pub struct AddressBook {
    /// (provider id, ip) → expiry.
    entries: HashMap<(u32, IpAddr), Option<Instant>>,
}

impl AddressBook {
    /// Addresses from the config never expire.
    pub fn add_static(&mut self, provider: u32, ip: IpAddr) {
        self.entries.insert((provider, ip), None);
    }

    /// Record a DNS answer seen at `now`, valid for `ttl`, kept `grace` beyond.
    pub fn observe(
        &mut self,
        provider: u32,
        ip: IpAddr,
        now: Instant,
        ttl: Duration,
        grace: Duration,
    ) {
        let until = now + ttl + grace;
        let slot = self.entries.entry((provider, ip)).or_insert(Some(until));
        if let Some(t) = slot
            && *t < until
        {
            *t = until;
        }
    }

    /// Drop what expired before `now`; returns how many went.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.entries.len();
        self.entries
            .retain(|_, until| until.is_none_or(|t| t > now));
        before - self.entries.len()
    }

    /// The provider map's desired content for the configured ports. An
    /// address two providers share (one CDN) maps to the first in config
    /// order; TLS termination still attributes each call by its server name.
    pub fn desired(&self, ports: &[Vec<u16>]) -> HashMap<ProviderKey, u32> {
        let mut entries: Vec<&(u32, IpAddr)> = self.entries.keys().collect();
        entries.sort();
        let mut out = HashMap::new();
        for &(provider, ip) in entries {
            for &port in ports
                .get(provider as usize)
                .map(Vec::as_slice)
                .unwrap_or(&[])
            {
                out.entry(provider_key(ip, port)).or_insert(provider);
            }
        }
        out
    }

    pub fn addresses_of(&self, provider: u32) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self
            .entries
            .keys()
            .filter(|(p, _)| *p == provider)
            .map(|(_, ip)| *ip)
            .collect();
        v.sort();
        v
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    #[error(
        "cannot set up DNS resolution: {0}\nhint: check /etc/resolv.conf, or list servers under dns.servers"
    )]
    Setup(String),
}

pub fn build_resolver(dns: &DnsConfig) -> Result<TokioResolver, ResolverError> {
    let mut builder = if dns.servers.is_empty() {
        Resolver::builder_tokio().map_err(|e| ResolverError::Setup(e.to_string()))?
    } else {
        let servers = dns
            .servers
            .iter()
            .filter_map(|s| parse_dns_server(s))
            .map(|sa: SocketAddr| {
                let mut udp = ConnectionConfig::udp();
                udp.port = sa.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = sa.port();
                NameServerConfig::new(sa.ip(), true, vec![udp, tcp])
            })
            .collect();
        Resolver::builder_with_config(
            ResolverConfig::from_name_servers(servers),
            TokioRuntimeProvider::default(),
        )
    };
    let opts = builder.options_mut();
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    // The agent schedules its own refreshes from the TTL; a resolver cache
    // would hand back the same answer and hide address changes.
    opts.cache_size = 0;
    opts.timeout = Duration::from_secs(3);
    opts.attempts = 2;
    builder
        .build()
        .map_err(|e| ResolverError::Setup(e.to_string()))
}

/// One host to keep resolved.
struct Host {
    provider: u32,
    name: String,
    next: Instant,
    failures: u32,
}

/// Resolve all configured hosts once and schedule the next round; returns
/// when the earliest next lookup is due.
pub struct Refresher {
    resolver: TokioResolver,
    hosts: Vec<Host>,
    dns: DnsConfig,
    pub book: AddressBook,
    pub ports: Vec<Vec<u16>>,
}

impl Refresher {
    pub fn new(config: &Config) -> Result<Self, ResolverError> {
        let resolver = build_resolver(&config.dns)?;
        let mut book = AddressBook::default();
        let mut hosts = Vec::new();
        let now = Instant::now();
        for (i, p) in config.providers.iter().enumerate() {
            for ip in &p.addresses {
                book.add_static(i as u32, *ip);
            }
            for h in &p.hosts {
                // Trailing dot: the name is absolute, never completed with search domains.
                let name = if h.ends_with('.') {
                    h.clone()
                } else {
                    format!("{h}.")
                };
                hosts.push(Host {
                    provider: i as u32,
                    name,
                    next: now,
                    failures: 0,
                });
            }
        }
        let ports = config.providers.iter().map(|p| p.ports.clone()).collect();
        Ok(Self {
            resolver,
            hosts,
            dns: config.dns.clone(),
            book,
            ports,
        })
    }

    /// Resolve every host that is due. Returns the number of lookups that failed.
    pub async fn refresh_due(&mut self) -> usize {
        let now = Instant::now();
        let due: Vec<usize> = (0..self.hosts.len())
            .filter(|&i| self.hosts[i].next <= now)
            .collect();
        let lookups = due.iter().map(|&i| {
            let r = self.resolver.clone();
            let name = self.hosts[i].name.clone();
            async move { (i, r.lookup_ip(name.as_str()).await) }
        });
        let results = futures_join_all(lookups).await;
        let mut failed = 0;
        for (i, result) in results {
            let host = &mut self.hosts[i];
            let now = Instant::now();
            match result {
                Ok(answer) => {
                    let ttl = answer
                        .valid_until()
                        .saturating_duration_since(now)
                        .clamp(self.dns.min_ttl, self.dns.max_ttl);
                    for ip in answer.iter() {
                        self.book
                            .observe(host.provider, ip, now, ttl, self.dns.stale_grace);
                    }
                    host.next = now + ttl;
                    host.failures = 0;
                }
                Err(e) => {
                    failed += 1;
                    host.failures += 1;
                    // Known addresses stay until they expire; retry sooner than a TTL.
                    host.next = now + self.dns.retry;
                    if host.failures == 1 || host.failures.is_multiple_of(10) {
                        tracing::warn!(host = %host.name, failures = host.failures, error = %e,
                            "resolving provider host failed; keeping known addresses until they expire");
                    }
                }
            }
        }
        failed
    }

    /// When the next host is due.
    pub fn next_due(&self) -> Instant {
        self.hosts
            .iter()
            .map(|h| h.next)
            .min()
            .unwrap_or_else(|| Instant::now() + self.dns.max_ttl)
    }
}

/// Await a set of futures concurrently (a dozen lookups; no extra crate needed).
async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

pub type SharedRefresher = Arc<tokio::sync::Mutex<Refresher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_expire_after_ttl_plus_grace() {
        let mut b = AddressBook::default();
        let t0 = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let s: IpAddr = "10.0.0.9".parse().unwrap();
        b.add_static(1, s);
        b.observe(0, a, t0, Duration::from_secs(30), Duration::from_secs(10));
        assert_eq!(b.expire(t0 + Duration::from_secs(39)), 0);
        // Seen again later: lifetime extends.
        b.observe(
            0,
            a,
            t0 + Duration::from_secs(20),
            Duration::from_secs(30),
            Duration::from_secs(10),
        );
        assert_eq!(b.expire(t0 + Duration::from_secs(55)), 0);
        assert_eq!(b.expire(t0 + Duration::from_secs(61)), 1);
        assert_eq!(b.addresses_of(0), Vec::<IpAddr>::new());
        assert_eq!(b.addresses_of(1), vec![s], "static addresses never expire");
    }

    #[test]
    fn desired_crosses_addresses_with_ports() {
        let mut b = AddressBook::default();
        b.add_static(0, "10.0.0.1".parse().unwrap());
        b.add_static(1, "fd00::1".parse().unwrap());
        let d = b.desired(&[vec![443, 8443], vec![443]]);
        assert_eq!(d.len(), 3);
        assert_eq!(d[&provider_key("10.0.0.1".parse().unwrap(), 8443)], 0);
        assert_eq!(d[&provider_key("fd00::1".parse().unwrap(), 443)], 1);
    }

    #[test]
    fn shared_addresses_go_to_the_first_provider() {
        let mut b = AddressBook::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        b.add_static(1, ip);
        b.add_static(0, ip);
        for _ in 0..10 {
            assert_eq!(
                b.desired(&[vec![443], vec![443]])[&provider_key(ip, 443)],
                0
            );
        }
    }
}

/// The provider names whose DNS answers the kernel learns from (the
/// `DNS_NAMES` map): every configured host, with its provider's first
/// [`MAX_LEARNED_PORTS`](tollgate_common::MAX_LEARNED_PORTS) ports. Empty
/// when `dns.learn_from_workloads` is off.
pub fn learned_names(
    config: &Config,
) -> Vec<(tollgate_common::dns::DnsName, tollgate_common::DnsNameValue)> {
    use tollgate_common::{DnsNameValue, MAX_LEARNED_PORTS, dns::DnsName};
    if !config.dns.learn_from_workloads {
        return Vec::new();
    }
    let mut out = Vec::new();
    for (id, p) in config.providers.iter().enumerate() {
        let mut v = DnsNameValue {
            provider_id: id as u32,
            ..Default::default()
        };
        for (i, port) in p.ports.iter().take(MAX_LEARNED_PORTS).enumerate() {
            v.ports[i] = *port;
            v.port_count = i as u32 + 1;
        }
        for host in &p.hosts {
            match DnsName::encode(host) {
                Some(name) => out.push((name, v)),
                None => {
                    tracing::warn!(%host, "host name too long to learn from DNS answers; it is still resolved by the agent")
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod learned_tests {
    use super::*;

    #[test]
    fn every_host_with_its_providers_ports() {
        let mut c = Config {
            providers: serde_yaml::from_str(
                "[{name: a, hosts: [api.a.test, API.b.test], ports: [443, 8443]}, {name: c, hosts: [c.test]}]",
            )
            .unwrap(),
            ..Config::default()
        };
        let names = learned_names(&c);
        assert_eq!(names.len(), 3);
        assert_eq!(
            names[1].0,
            tollgate_common::dns::DnsName::encode("api.b.test").unwrap()
        );
        assert_eq!(names[1].1.port_count, 2);
        assert_eq!(&names[1].1.ports[..2], &[443, 8443]);
        assert_eq!(names[2].1.provider_id, 1);
        c.dns.learn_from_workloads = false;
        assert!(learned_names(&c).is_empty());
    }
}
