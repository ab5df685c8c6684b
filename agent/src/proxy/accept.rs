//! Accept redirected connections, find out who and where they are, plan
//! them (`plan`) and execute the plan: terminate (`terminate`), relay
//! (`relay`), or refuse.
use std::{net::SocketAddr, sync::Arc, time::Duration};

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
};

/// Accept on one namespace's listener until the task is aborted. Each
/// connection's task is spawned on `tasks`, so shutdown can wait for them.
pub async fn accept_loop(
    ctx: Arc<ProxyContext>,
    listener: TcpListener,
    netns: Arc<WorkloadNetns>,
    netns_cookie: u64,
    tasks: tokio_util::task::TaskTracker,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let ctx = ctx.clone();
                let netns = netns.clone();
                tasks.spawn(async move { handle(ctx, stream, peer, netns, netns_cookie).await });
            }
            Err(e) => {
                // EMFILE/ENFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(
    ctx: Arc<ProxyContext>,
    client: TcpStream,
    peer: SocketAddr,
    netns: Arc<WorkloadNetns>,
    netns_cookie: u64,
) {
    let Some(orig) = ctx.maps.take_orig_dst(netns_cookie, peer) else {
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
                netns,
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
        netns,
    };
    if decision == Decision::Deny {
        relay::refuse(&ctx, client, closing, hello);
    } else {
        relay::relay_to_provider(&ctx, client, closing).await;
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
