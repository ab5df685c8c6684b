//! The workload network namespaces the agent serves: found from the
//! governed cgroup tree, each given the proxy's listeners (opened inside the
//! namespace, `netns`), closed when the namespace goes, and drained at
//! shutdown — waiting on the connection tasks themselves. A namespace's
//! listeners are served one per proxy thread (`workers`).
//!
//! One scan also keeps the kernel's opted-out cgroups and the identity
//! cache in step with the tree.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::task::TaskTracker;

use crate::{
    cgroup::{self, CgroupRoot},
    config::Config,
    identity::IdentityCache,
    netns::{self, NetnsId},
    proxy::{
        accept::{Namespace, accept_loop},
        context::ProxyContext,
    },
    telemetry::series::GonePods,
    workers::Workers,
};

/// Keeps listeners, opt-outs and identities in step with the cgroup tree.
pub struct Scanner {
    root: CgroupRoot,
    port: u16,
    opt_out: globset::GlobSet,
    ctx: Arc<ProxyContext>,
    identity: Arc<IdentityCache>,
    /// The namespaces served: accept loops and netns cookie.
    namespaces: HashMap<NetnsId, Served>,
    /// `dns.workload_resolvers`: learned from in every namespace.
    workload_resolvers: Vec<IpAddr>,
    /// Namespaces where binding failed, and when to try again.
    failed: HashMap<NetnsId, Instant>,
    /// Every connection task, for the drain at shutdown.
    connections: TaskTracker,
    /// The proxy threads: each namespace's listeners are served one per thread.
    workers: Arc<Workers>,
    /// Pods gone from the node, whose metric series go after `series_grace`.
    gone: GonePods,
    series_grace: Duration,
    last_sweep: Option<Instant>,
}

/// A namespace with the proxy's listeners.
struct Served {
    accept: Vec<JoinHandle<()>>,
    cookie: u64,
    /// Its nameservers, as last read from its /etc/resolv.conf (kept when a
    /// read fails: the process read may just have exited).
    nameservers: Vec<IpAddr>,
}

/// Retry binding in a namespace where it failed (port taken) this often;
/// not every scan, to keep a broken pod from flooding the log.
const BIND_RETRY: Duration = Duration::from_secs(30);

impl Scanner {
    /// `connections`: where connection tasks are tracked (see `drain`);
    /// `workers`: the proxy threads that serve the listeners.
    pub fn new(
        config: &Config,
        root: CgroupRoot,
        ctx: Arc<ProxyContext>,
        identity: Arc<IdentityCache>,
        connections: TaskTracker,
        workers: Arc<Workers>,
    ) -> Result<Self, globset::Error> {
        let mut b = globset::GlobSetBuilder::new();
        for g in &config.opt_out.cgroups {
            b.add(globset::Glob::new(g)?);
        }
        Ok(Self {
            root,
            port: config.proxy.port,
            opt_out: b.build()?,
            ctx,
            identity,
            namespaces: HashMap::new(),
            workload_resolvers: config.dns.workload_resolvers.clone(),
            failed: HashMap::new(),
            connections,
            workers,
            gone: GonePods::default(),
            series_grace: config.metrics.pod_series_grace,
            last_sweep: None,
        })
    }

    /// Scan every `every` until the task is aborted (its Drop closes every
    /// listener).
    pub async fn run(mut self, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.scan_once().await;
        }
    }

    async fn scan_once(&mut self) {
        let root = self.root.path.clone();
        let entries = tokio::task::spawn_blocking(move || cgroup::walk(&root))
            .await
            .unwrap_or_default();
        self.identity.refresh(&entries);

        let opted: HashSet<u64> = entries
            .iter()
            .filter(|e| self.opt_out.is_match(self.root.relative(&e.path)))
            .map(|e| e.id)
            .collect();
        if let Err(e) = self.ctx.maps.sync_opt_out(&opted) {
            tracing::error!(error = %e, "updating opted-out cgroups failed");
        }

        let found = netns::scan(&entries);
        let pool = self.ctx.tls.as_ref().map(|t| &t.upstreams.pool);
        self.namespaces.retain(|id, served| {
            let keep = found.namespaces.contains_key(id);
            if !keep {
                served.accept.iter().for_each(JoinHandle::abort);
                // Its provider connections go too, and with them the last
                // handle that kept the namespace alive.
                let pooled = pool.map_or(0, |p| p.forget(*id));
                tracing::info!(
                    netns = id.ino,
                    pooled,
                    "workload namespace gone; listener and provider connections closed"
                );
            }
            keep
        });
        if let Some(pool) = pool {
            pool.prune(crate::proxy::pooled::IDLE_TIMEOUT);
        }
        let now = Instant::now();
        self.failed
            .retain(|id, until| found.namespaces.contains_key(id) && *until > now);
        for (&id, f) in &found.namespaces {
            if self.namespaces.contains_key(&id) || self.failed.contains_key(&id) {
                continue;
            }
            let pid = f.pid;
            let port = self.port;
            let threads = self.workers.len();
            let bound =
                tokio::task::spawn_blocking(move || netns::bind_in_netns_of(pid, port, threads))
                    .await;
            match bound {
                Ok(Ok(l)) => {
                    let mut handles = Vec::new();
                    let ns = Arc::new(Namespace {
                        netns: l.netns.clone(),
                        cookie: l.cookie,
                        open: Default::default(),
                    });
                    // Listener i of each family is served by proxy thread i.
                    let per_thread =
                        l.v4.into_iter()
                            .enumerate()
                            .chain(l.v6.into_iter().enumerate());
                    for (thread, std_l) in per_thread {
                        let (ctx, ns, tracker) =
                            (self.ctx.clone(), ns.clone(), self.connections.clone());
                        handles.push(self.workers.spawn(thread, async move {
                            // Registered with the IO driver of the thread that serves it.
                            match TcpListener::from_std(std_l) {
                                Ok(tl) => accept_loop(ctx, tl, ns, tracker).await,
                                Err(e) => {
                                    tracing::error!(error = %e, "registering listener failed")
                                }
                            }
                        }));
                    }
                    let cgroup = f.cgroups.first().map(|c| c.1.display().to_string());
                    tracing::info!(
                        netns = id.ino,
                        pid,
                        cgroup,
                        port,
                        "listening in workload namespace"
                    );
                    self.namespaces.insert(
                        id,
                        Served {
                            accept: handles,
                            cookie: l.cookie,
                            nameservers: Vec::new(),
                        },
                    );
                }
                Ok(Err(e)) => {
                    tracing::warn!(netns = id.ino, pid, error = %e, "cannot open proxy listener; connections there follow the failure mode");
                    self.failed.insert(id, now + BIND_RETRY);
                }
                Err(e) => tracing::error!(error = %e, "bind task failed"),
            }
        }
        self.scope_dns_learning(&found);
        self.forget_gone_pods(&found);
        self.ctx
            .metrics
            .namespaces
            .set(self.namespaces.len() as i64);
    }

    /// Drop the metric series of pods gone for the grace, checked about once
    /// a minute (a scan's cost stays a walk of the tree).
    fn forget_gone_pods(&mut self, found: &netns::ScanResult) {
        let every = self.series_grace.min(Duration::from_secs(60));
        if self.last_sweep.is_some_and(|at| at.elapsed() < every) {
            return;
        }
        self.last_sweep = Some(Instant::now());
        let mut live = HashSet::new();
        for f in found.namespaces.values() {
            for (id, _) in &f.cgroups {
                // Series are labelled by pod UID until the pod's metadata
                // arrives and by its name after: both are alive.
                let mut w = self.identity.lookup(*id);
                live.insert(w.pod().to_string());
                if w.kubernetes.is_none() {
                    w.kubernetes = self.identity.pod_meta(&w);
                }
                live.insert(w.pod().to_string());
            }
        }
        let forgotten = self.gone.sweep(&self.ctx.metrics, &live, self.series_grace);
        if forgotten > 0 {
            tracing::debug!(
                forgotten,
                "metric series of pods gone from the node dropped"
            );
        }
    }

    /// Tell the kernel which namespace each governed cgroup is in and which
    /// resolvers each namespace learns from, so a DNS answer teaches only
    /// the namespace that asked, and only when its resolver sent it.
    fn scope_dns_learning(&mut self, found: &netns::ScanResult) {
        let mut cgroup_netns = HashMap::new();
        let mut resolvers: HashSet<(u64, IpAddr)> =
            self.workload_resolvers.iter().map(|ip| (0, *ip)).collect();
        for (id, f) in &found.namespaces {
            let Some(served) = self.namespaces.get_mut(id) else {
                continue;
            };
            for (cgroup, _) in &f.cgroups {
                cgroup_netns.insert(*cgroup, served.cookie);
            }
            if self.workload_resolvers.is_empty() {
                let path = format!("/proc/{}/root/etc/resolv.conf", f.pid);
                if let Ok(conf) = std::fs::read_to_string(path) {
                    served.nameservers = nameservers(&conf);
                }
                resolvers.extend(served.nameservers.iter().map(|ip| (served.cookie, *ip)));
            }
        }
        if let Err(e) = self.ctx.maps.sync_cgroup_netns(&cgroup_netns) {
            tracing::error!(error = %e, "updating the kernel's cgroup namespaces failed; DNS learning may lag");
        }
        if let Err(e) = self.ctx.maps.sync_resolvers(&resolvers) {
            tracing::error!(error = %e, "updating the kernel's resolver list failed; DNS learning may lag");
        }
    }
}

/// The `nameserver` addresses of a resolv.conf (an IPv6 zone is dropped).
fn nameservers(conf: &str) -> Vec<IpAddr> {
    conf.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next())?
        })
        .filter_map(|ip| ip.split('%').next()?.parse().ok())
        .collect()
}

impl Drop for Scanner {
    fn drop(&mut self) {
        for served in self.namespaces.values() {
            served.accept.iter().for_each(JoinHandle::abort);
        }
    }
}

/// Wait until every connection task in `connections` has ended, at most
/// `timeout`. Returns how many were still running when it gave up.
pub async fn drain(connections: &TaskTracker, timeout: Duration) -> usize {
    connections.close();
    match tokio::time::timeout(timeout, connections.wait()).await {
        Ok(()) => 0,
        Err(_) => connections.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::nameservers;

    #[test]
    fn nameservers_of_a_resolv_conf() {
        let conf = "# kubelet\nsearch ns.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\n\
                    nameserver fe80::1%eth0\n  nameserver   169.254.20.10  \nnameserver bogus\noptions ndots:5\n#nameserver 1.1.1.1\n";
        let got: Vec<String> = nameservers(conf).iter().map(|ip| ip.to_string()).collect();
        assert_eq!(got, ["10.96.0.10", "fe80::1", "169.254.20.10"]);
        assert!(nameservers("").is_empty());
    }
}
