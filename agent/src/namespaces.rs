//! The workload network namespaces the agent serves: found from the
//! governed cgroup tree, each given the proxy's listeners (opened inside the
//! namespace, `netns`), closed when the namespace goes, and drained at
//! shutdown — waiting on the connection tasks themselves.
//!
//! One scan also keeps the kernel's opted-out cgroups and the identity
//! cache in step with the tree.
use std::{
    collections::{HashMap, HashSet},
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
    proxy::{accept::accept_loop, context::ProxyContext},
};

/// Keeps listeners, opt-outs and identities in step with the cgroup tree.
pub struct Scanner {
    root: CgroupRoot,
    port: u16,
    opt_out: globset::GlobSet,
    ctx: Arc<ProxyContext>,
    identity: Arc<IdentityCache>,
    /// Accept loops by namespace.
    namespaces: HashMap<NetnsId, Vec<JoinHandle<()>>>,
    /// Namespaces where binding failed, and when to try again.
    failed: HashMap<NetnsId, Instant>,
    /// Every connection task, for the drain at shutdown.
    connections: TaskTracker,
}

/// Retry binding in a namespace where it failed (port taken) this often;
/// not every scan, to keep a broken pod from flooding the log.
const BIND_RETRY: Duration = Duration::from_secs(30);

/// Provider clients unused this long are dropped: their connections closed
/// after 50 s idle already (`upstream`), only the entry was left.
const POOL_IDLE: Duration = Duration::from_secs(300);

impl Scanner {
    /// `connections`: where connection tasks are tracked (see `drain`).
    pub fn new(
        config: &Config,
        root: CgroupRoot,
        ctx: Arc<ProxyContext>,
        identity: Arc<IdentityCache>,
        connections: TaskTracker,
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
            failed: HashMap::new(),
            connections,
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
        self.namespaces.retain(|id, handles| {
            let keep = found.namespaces.contains_key(id);
            if !keep {
                handles.iter().for_each(JoinHandle::abort);
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
            pool.prune(POOL_IDLE);
        }
        let now = Instant::now();
        self.failed
            .retain(|id, until| found.namespaces.contains_key(id) && *until > now);
        for (id, (pid, cgroups)) in found.namespaces {
            if self.namespaces.contains_key(&id) || self.failed.contains_key(&id) {
                continue;
            }
            let port = self.port;
            let bound =
                tokio::task::spawn_blocking(move || netns::bind_in_netns_of(pid, port)).await;
            match bound {
                Ok(Ok(l)) => {
                    let mut handles = Vec::new();
                    for std_l in std::iter::once(l.v4).chain(l.v6) {
                        match TcpListener::from_std(std_l) {
                            Ok(tl) => handles.push(tokio::spawn(accept_loop(
                                self.ctx.clone(),
                                tl,
                                l.netns.clone(),
                                l.cookie,
                                self.connections.clone(),
                            ))),
                            Err(e) => tracing::error!(error = %e, "registering listener failed"),
                        }
                    }
                    tracing::info!(netns = id.ino, pid, cgroup = %cgroups[0].display(), port, "listening in workload namespace");
                    self.namespaces.insert(id, handles);
                }
                Ok(Err(e)) => {
                    tracing::warn!(netns = id.ino, pid, error = %e, "cannot open proxy listener; connections there follow the failure mode");
                    self.failed.insert(id, now + BIND_RETRY);
                }
                Err(e) => tracing::error!(error = %e, "bind task failed"),
            }
        }
        self.ctx
            .metrics
            .namespaces
            .set(self.namespaces.len() as i64);
    }
}

impl Drop for Scanner {
    fn drop(&mut self) {
        for handles in self.namespaces.values() {
            handles.iter().for_each(JoinHandle::abort);
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
