//! Accept redirected connections, find out who and where they are, plan
//! them (`plan`) and execute the plan: terminate (`terminate`), relay
//! (`relay`), or refuse.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::net::{TcpListener, TcpStream};

use super::{
    client_hello::peek_hello,
    context::{CallMeta, ProxyContext, Who},
    plan::{Facts, Plan, plan},
    relay::{self, Closing},
    terminate,
};
use crate::{
    netns::WorkloadNetns,
    policy::Subject,
    telemetry::{
        events::now_rfc3339,
        metrics::Metrics,
        records::{ConnectionResult, Decision},
    },
    uprobe::Begun,
};

/// One workload namespace as its listeners serve it.
pub struct Namespace {
    pub netns: Arc<WorkloadNetns>,
    pub cookie: u64,
    /// Its connections open now (both listeners), against
    /// `proxy.max_connections_per_namespace`.
    pub open: AtomicUsize,
}

/// Accept on one namespace's listener until the task is aborted. Each
/// connection's task is spawned on `tasks`, so shutdown can wait for them.
/// Past `proxy.max_connections_per_namespace` open connections a new one is
/// closed at once (counted as `over_capacity`): one pod cannot take the
/// proxy's file descriptors and memory from the others.
pub async fn accept_loop(
    ctx: Arc<ProxyContext>,
    listener: TcpListener,
    ns: Arc<Namespace>,
    tasks: tokio_util::task::TaskTracker,
) {
    let mut warned: Option<std::time::Instant> = None;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let Some(slot) = Slot::take(&ns, ctx.max_connections_per_namespace) else {
                    over_capacity(&ctx, &ns, &mut warned);
                    drop(stream);
                    continue;
                };
                let ctx = ctx.clone();
                tasks.spawn(async move { handle(ctx, stream, peer, slot).await });
            }
            Err(e) => {
                // EMFILE/ENFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serve one connection; `slot` (its namespace, and its place under the
/// namespace's cap) is held until it ends.
async fn handle(ctx: Arc<ProxyContext>, client: TcpStream, peer: SocketAddr, slot: Slot) {
    let ns = &slot.0;
    let Some(orig) = ctx.maps.take_orig_dst(ns.cookie, peer) else {
        // Nobody redirected this connection here: someone dialled the port
        // directly. The proxy has no destination to offer; close.
        tracing::debug!(%peer, "connection without a redirect record; closing");
        let result = ConnectionResult::NoRecord.as_str();
        ctx.metrics
            .connections
            .with_label_values(&["", "unknown", "", "unknown", result])
            .inc();
        return;
    };
    if orig.tgid == std::process::id() {
        // The agent's own provider connection came back: the kernel did not
        // recognise its cgroup (see `cgroup::own_cgroup`). Serving it would
        // loop; close it and say so.
        tracing::error!(%peer, dest = %orig.dest, "the agent's own connection was redirected to itself; closing it (is the agent's cgroup readable under cgroup_root?)");
        return;
    }
    let started = std::time::Instant::now();
    let time = now_rfc3339();
    let workload = ctx.identity.resolve(orig.cgroup_id).await;
    let dialled = ctx
        .providers
        .get(orig.provider_id as usize)
        .map(|p| p.name.clone())
        .unwrap_or_else(|| format!("provider-{}", orig.provider_id));
    let _active = ActiveGuard::new(&ctx.metrics);
    let _ = client.set_nodelay(true);

    let hello = peek_hello(&client, ctx.hello_timeout).await;
    let facts = Facts {
        subject: Subject {
            workload: &workload,
            comm: &orig.comm,
        },
        dialled: &dialled,
        hello: &hello,
        providers: &ctx.providers,
        trust: ctx.tls.as_deref().map(|t| &t.distrust),
    };
    let plan = plan(&facts, &ctx.live.load().policy);
    let (provider, decision, reason) = match plan {
        Plan::Terminate { provider, host } => {
            let Some(tls) = ctx.tls.clone() else {
                return; // planned only with termination configured
            };
            let who = Who {
                workload: workload.clone(),
                identity: ctx.identity.clone(),
                pid: orig.tgid,
                comm: orig.comm.clone(),
                netns: ns.netns.clone(),
            };
            let meta = CallMeta::new(&provider, host, orig.dest, who);
            let result =
                terminate::serve(tls, ctx.events.clone(), ctx.metrics.clone(), client, meta).await;
            let [ns, name, pod] = workload.metric_labels();
            ctx.metrics
                .connections
                .with_label_values(&[&ns, &name, &pod, &provider.name, result.as_str()])
                .inc();
            return;
        }
        Plan::Refuse { provider, reason } => {
            tracing::info!(workload = %workload.label(), %provider, %reason, "provider connection denied by policy");
            (provider, Decision::Deny, reason)
        }
        Plan::Relay {
            provider,
            decision,
            reason,
        } => (provider, decision, reason),
    };
    ctx.metrics
        .decisions
        .with_label_values(&[&provider, decision.as_str(), &reason])
        .inc();
    let closing = Closing {
        time,
        workload,
        orig,
        provider,
        peer,
        started,
        decision,
        reason,
        netns: ns.netns.clone(),
    };
    if decision == Decision::Deny {
        relay::refuse(&ctx, client, closing, hello);
        return;
    }
    let Some(capture) = ctx.tls_capture.clone() else {
        relay::relay_to_provider(&ctx, client, closing, None).await;
        return;
    };
    let cookie = closing.orig.socket_cookie;
    let session = crate::uprobe::Session {
        workload: closing.workload.clone(),
        pid: closing.orig.tgid,
        comm: closing.orig.comm.clone(),
        provider: closing.provider.clone(),
        api: ctx
            .providers
            .get(closing.orig.provider_id as usize)
            .map(|p| p.api)
            .unwrap_or_default(),
        upstream: closing.orig.dest,
        decision: closing.decision,
        reason: closing.reason.clone(),
        cgroup: closing.orig.cgroup_id,
    };
    match capture.begin(cookie, session).await {
        Begun::Refused => {
            let closing = Closing {
                decision: Decision::Deny,
                reason: "quota_spent".into(),
                ..closing
            };
            relay::refuse(&ctx, client, closing, hello);
        }
        Begun::Uncaptured => relay::relay_to_provider(&ctx, client, closing, None).await,
        Begun::Captured(stop) => {
            relay::relay_to_provider(&ctx, client, closing, Some(stop)).await;
            capture.end(cookie);
        }
    }
}

/// One open connection of a namespace; freed when dropped.
struct Slot(Arc<Namespace>);

impl Slot {
    fn take(ns: &Arc<Namespace>, max: usize) -> Option<Self> {
        ns.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(ns.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Count a connection closed over the namespace's cap; say so at most once a minute.
fn over_capacity(ctx: &ProxyContext, ns: &Namespace, warned: &mut Option<std::time::Instant>) {
    ctx.metrics
        .connections
        .with_label_values(&[
            "",
            "unknown",
            "",
            "unknown",
            ConnectionResult::OverCapacity.as_str(),
        ])
        .inc();
    if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
        *warned = Some(std::time::Instant::now());
        tracing::warn!(
            netns = ns.netns.id.ino,
            max = ctx.max_connections_per_namespace,
            "a workload namespace holds the most connections it may (proxy.max_connections_per_namespace); new ones are closed"
        );
    }
}

struct ActiveGuard<'a>(&'a Metrics);
impl<'a> ActiveGuard<'a> {
    fn new(m: &'a Metrics) -> Self {
        m.active_connections.inc();
        Self(m)
    }
}
impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active_connections.dec();
    }
}
