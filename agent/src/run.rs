//! `tollgate run`: attach, keep the kernel's view fresh, relay, shut down cleanly.
//!
//! Tasks, each with one job:
//! * heartbeat — tells the kernel programs the agent is alive;
//! * dns — keeps the provider map equal to what the provider names resolve to;
//! * scan — finds workload namespaces (listeners), opted-out cgroups, identities;
//! * accept loops — one per listener, relaying redirected connections, on
//!   the proxy threads (`workers`);
//! * metrics — `/metrics`, `/healthz`, `/readyz`.
use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use tollgate_common::{Counter, Settings};

use crate::{
    bpf::{Attached, LoadOptions, Maps, monotonic_ns},
    cgroup::{self, CgroupRoot},
    config::{Config, FailureMode},
    egress::Egress,
    identity::IdentityCache,
    namespaces::{self, Scanner},
    policy::{Enforcer, budgets::Budgets},
    preflight,
    proxy::{
        context::{
            self, KnownProvider, ProviderAddresses, ProviderEndpoint, ProxyContext, Termination,
            Upstreams,
        },
        dial::Dialer,
        trust::Distrust,
        upstream::{self, UpstreamPool},
    },
    resolver::Refresher,
    telemetry::{events::EventLog, metrics::Metrics},
    tls::{LeafCache, NodeCa},
    workers::Workers,
};

/// How long shutdown waits for in-flight connections before detaching anyway.
/// Short enough for a Kubernetes default terminationGracePeriodSeconds (30 s).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often budget spend is written to `budget_state_file` (when changed).
const BUDGET_SAVE_INTERVAL: Duration = Duration::from_secs(5);

/// Run the agent until SIGTERM. `config_path`: the file `config` came from,
/// watched for policy and price changes (None: built-in defaults, no reload).
pub async fn run(config: Config, config_path: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    preflight::check_privileges()?;
    preflight::raise_nofile_limit();
    let root_hint = std::path::Path::new(&config.cgroup_root);
    let mount = cgroup::cgroup2_mount(root_hint.is_absolute().then_some(root_hint))?;
    let root = CgroupRoot::resolve(&config.cgroup_root, &mount)?;
    tracing::info!(cgroup = %root.path.display(), host_mode = root.host_mode, "governing cgroup subtree");

    let pin_dir =
        (config.failure_mode == FailureMode::Closed).then_some(config.bpffs_dir.as_path());
    let mut attached = Attached::load(LoadOptions {
        cgroup: &root.path,
        pin_dir,
        tls_uprobes: config.tls_uprobes.enabled,
    })?;
    let maps = attached.maps.clone();
    // Our programs are in place: programs of an earlier run can go without a gap.
    let removed = attached.remove_stale_pins(&config.bpffs_dir);
    if removed > 0 {
        tracing::info!(removed, "detached programs pinned by an earlier run");
    }

    let agent_cgroup = cgroup::own_cgroup(&root.path, std::process::id());
    match &agent_cgroup {
        Some(own) => {
            tracing::info!(cgroup = %own.path.display(), "the agent runs inside the governed subtree; its own connections are recognised by its cgroup")
        }
        None => tracing::debug!(
            "the agent runs outside the governed subtree; its connections never meet the hooks"
        ),
    }
    let settings = Settings {
        heartbeat_ns: monotonic_ns(),
        heartbeat_timeout_ns: config.heartbeat.timeout.as_nanos() as u64,
        agent_cgroup_id: agent_cgroup.map_or(0, |c| c.id),
        proxy_port: config.proxy.port,
        fail_closed: u8::from(config.failure_mode == FailureMode::Closed),
        tls_uprobes: u8::from(config.tls_uprobes.enabled),
        dns_min_ttl_s: config.dns.min_ttl.as_secs_f64().ceil() as u32,
        dns_grace_s: config.dns.stale_grace.as_secs_f64().ceil() as u32,
        dns_max_ttl_s: config.dns.max_ttl.as_secs_f64().ceil() as u32,
    };
    maps.write_settings(settings)
        .context("writing settings to the kernel")?;
    maps.set_dns_names(&crate::resolver::learned_names(&config))
        .context("writing provider names to learn from DNS answers to the kernel")?;

    let metrics = Metrics::new();
    let (journal, unfinished) = match config.audit.journal.as_str() {
        "" => (None, Vec::new()),
        path => {
            let (j, u) = crate::journal::Journal::open(std::path::Path::new(path))?;
            (Some(j), u)
        }
    };
    let spans = match config.otlp.enabled() {
        false => None,
        true => {
            // An https collector is verified as providers are: the system's
            // roots, or `otlp.ca_file` alone.
            let ca: Vec<std::path::PathBuf> = (!config.otlp.ca_file.is_empty())
                .then(|| config.otlp.ca_file.clone().into())
                .into_iter()
                .collect();
            let tls = upstream::client_config(ca.is_empty(), &ca)
                .context("otlp.ca_file: the collector's CA")?;
            Some(crate::telemetry::otlp::Spans::start(
                &config.otlp,
                &config.node_name(),
                (*tls).clone(),
            )?)
        }
    };
    let events = EventLog::open(&config.audit, &config.node_name(), journal.clone())?
        .with_spans(spans.clone());
    let pods = Arc::new(crate::pods::PodDirectory::new());
    let mut identity = IdentityCache::new(&root.path, &mount);
    let kube_on = config.kubernetes.enabled();
    let kube_client = if kube_on {
        identity = identity.with_pods(pods.clone(), config.kubernetes.metadata_wait);
        Some(crate::pods::watch::client(&config.kubernetes).await?)
    } else {
        None
    };
    let identity = Arc::new(identity);
    let live = crate::live::Rules::live(&config);
    for (field, message) in config.policy.warnings() {
        tracing::warn!(field = %format!("policy.{field}"), "{message}");
    }
    let addresses: ProviderAddresses = Arc::default();
    let budget_file = (!config.budget_state_file.is_empty())
        .then(|| std::path::PathBuf::from(&config.budget_state_file));
    let enforcer = enforcer(&config, budget_file.as_deref(), &metrics)?;
    let budgets = enforcer.budgets.clone();
    let limits = enforcer.limits.clone();
    if let Some(j) = &journal {
        let recorded = crate::proxy::restart::account_unfinished(
            unfinished,
            j,
            &events,
            &live.load().prices,
            &budgets,
            &config.audit.path,
            || crate::proxy::account::soft_warn(&metrics),
        );
        if recorded > 0 {
            tracing::warn!(
                calls = recorded,
                "calls begun before the agent stopped were recorded as agent_restarted and charged (usage estimated)"
            );
        }
    }
    let dialer = Arc::new(Dialer::new(
        Egress::start().context("starting the egress thread")?,
        config.proxy.socket_mark,
        config.proxy.upstream_connect_timeout,
    ));
    let tls_capture = match attached.tls.as_mut() {
        Some((probes, ring)) => {
            let ring = ring.take().context("the TLS uprobes' ring buffer")?;
            let books = crate::uprobe::reader::Books {
                metrics: metrics.clone(),
                events: events.clone(),
                live: live.clone(),
                identity: identity.clone(),
                spending: crate::uprobe::spend::Spending::new(
                    budgets.clone(),
                    limits.clone(),
                    maps.clone(),
                    metrics.clone(),
                ),
            };
            tracing::info!(
                "TLS uprobes on: relayed provider calls are read at the workload's TLS library (tls_uprobes.enabled)"
            );
            Some(
                crate::uprobe::TlsCapture::start(probes.clone(), ring, books)
                    .context("starting the TLS uprobes' reader")?,
            )
        }
        None => None,
    };
    let ctx = Arc::new(ProxyContext {
        tls_capture,
        live: live.clone(),
        maps: maps.clone(),
        identity: identity.clone(),
        metrics: metrics.clone(),
        events,
        providers: config
            .providers
            .iter()
            .map(|p| KnownProvider {
                name: p.name.clone(),
                hosts: p.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
                api: p.api(),
                asks_stream_usage: p.asks_stream_usage(),
            })
            .collect(),
        hello_timeout: config.tls.client_hello_timeout,
        dialer: dialer.clone(),
        max_connections_per_namespace: config.proxy.max_connections_per_namespace,
        tls: termination(&config, live.clone(), enforcer, addresses.clone(), dialer)?,
    });

    let mut tasks: Vec<JoinHandle<()>> = Vec::new();
    if let Some(path) = config_path {
        tasks.push(tokio::spawn(crate::live::watch(
            path,
            config.clone(),
            live.clone(),
            metrics.clone(),
        )));
    }
    tasks.push(tokio::spawn(heartbeat(
        maps.clone(),
        settings,
        config.heartbeat.interval,
    )));

    if let Some(client) = kube_client {
        let node = config.node_name();
        tracing::info!(node = %node, "watching this node's pods for workload metadata");
        tasks.push(tokio::spawn(crate::pods::watch::run(
            client,
            config.kubernetes.clone(),
            node,
            pods.clone(),
            metrics.kubernetes_watch_errors.clone(),
        )));
    }

    let mut refresher = Refresher::new(&config)?;
    // First round before we call ourselves ready, so `/readyz` means "governing".
    refresh_providers(&mut refresher, &maps, &metrics, &addresses).await;
    tasks.push(tokio::spawn(dns_loop(
        refresher,
        maps.clone(),
        metrics.clone(),
        addresses.clone(),
    )));

    let connections = TaskTracker::new();
    let workers =
        Arc::new(Workers::start(config.proxy.threads()).context("starting the proxy threads")?);
    let scanner = Scanner::new(
        &config,
        root.clone(),
        ctx.clone(),
        identity.clone(),
        connections.clone(),
        workers.clone(),
    )?;
    tasks.push(tokio::spawn(scanner.run(config.discovery.scan_interval)));

    if !config.metrics.listen.is_empty() {
        let addr: std::net::SocketAddr = config.metrics.listen.parse().expect("validated at load");
        let token = (!config.metrics.bearer_token_file.as_os_str().is_empty())
            .then(|| crate::telemetry::token::BearerToken::load(&config.metrics.bearer_token_file))
            .transpose()?;
        if token.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(%addr, "metrics.listen is not loopback and metrics.bearer_token_file is empty: anyone who reaches this address (pods too) reads every workload's usage and spend");
        }
        let m = maps.clone();
        let mt = metrics.clone();
        let ev = ctx.events.clone();
        let (b1, b2, live2) = (budgets.clone(), budgets.clone(), live.clone());
        let (pods1, pods2) = (pods.clone(), pods.clone());
        let hooks = Arc::new(crate::telemetry::metrics::Hooks {
            before_scrape: Box::new(move || {
                mt.audit_dropped.set(ev.dropped() as i64);
                if let Some(s) = ev.spans() {
                    for (result, n) in [
                        ("exported", &s.counts.exported),
                        ("failed", &s.counts.failed),
                        ("dropped", &s.counts.dropped),
                    ] {
                        mt.otlp_spans
                            .with_label_values(&[result])
                            .set(n.load(Ordering::Relaxed) as i64);
                    }
                }
                mt.kubernetes_pods.set(pods1.len() as i64);
                mt.dns_learned
                    .set(m.learned(crate::bpf::monotonic_ns()).len() as i64);
                for c in Counter::ALL {
                    mt.kernel_events
                        .with_label_values(&[c.label()])
                        .set(m.counter(c) as i64);
                }
                // Only the keys with spend this month: forgotten ones leave the metrics too.
                mt.budget_spent.reset();
                for r in b1.local.rows(time::OffsetDateTime::now_utc()) {
                    for (period, usd) in [("daily", r.day_usd), ("monthly", r.month_usd)] {
                        mt.budget_spent
                            .with_label_values(&[&r.rule, &r.key, period])
                            .set(usd);
                    }
                }
            }),
            status: Box::new(move || {
                serde_json::json!({
                    "policy_rules": live2.load().policy.rule_count(),
                    "budgets": b2.local.rows(time::OffsetDateTime::now_utc()),
                    "kubernetes": kube_on.then(|| serde_json::json!({
                        "synced": pods2.synced(),
                        "pods": pods2.len(),
                    })),
                })
                .to_string()
            }),
            token,
        });
        let metrics = metrics.clone();
        // Bind now so a taken port is a startup error, not a log line.
        let listener = std::net::TcpListener::bind(addr).with_context(|| {
            format!("cannot listen on metrics.listen {addr}: is the port taken?")
        })?;
        drop(listener);
        tasks.push(tokio::spawn(async move {
            if let Err(e) = crate::telemetry::metrics::serve(addr, metrics, hooks).await {
                tracing::error!(error = %e, "metrics endpoint stopped");
            }
        }));
    }

    if let Some(path) = budget_file.clone() {
        let b = budgets.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::time::sleep(BUDGET_SAVE_INTERVAL).await;
                if let Err(e) = b.local.save(&path) {
                    tracing::error!(path = %path.display(), error = %e, "saving budget spend failed");
                }
            }
        }));
    }

    metrics.ready.store(true, Ordering::Relaxed);
    tracing::info!(
        port = config.proxy.port,
        proxy_threads = workers.len(),
        failure_mode = ?config.failure_mode,
        provider_entries = maps.provider_count(),
        "tollgate is running"
    );

    shutdown_signal().await;
    tracing::info!("shutting down");
    metrics.ready.store(false, Ordering::Relaxed);
    if config.failure_mode == FailureMode::Open {
        // Stop redirecting before the listeners go, so no new connection is
        // sent to a port about to close.
        let mut off = settings;
        off.proxy_port = 0;
        let _ = maps.write_settings(off);
    }
    for t in &tasks {
        t.abort(); // the scanner's Drop closes every listener.
    }
    for t in tasks {
        let _ = t.await;
    }
    let left = namespaces::drain(&connections, DRAIN_TIMEOUT).await;
    if left > 0 {
        tracing::warn!(connections = left, after = ?DRAIN_TIMEOUT, "connections still open at shutdown; detaching anyway");
    }
    // The proxy threads stop (what is left on them is dropped there, each
    // call recorded as it goes) and are joined, off this thread.
    let _ = tokio::task::spawn_blocking(move || drop(workers)).await;
    if let Some(s) = spans {
        // Export what is queued (bounded by otlp.timeout); blocking, so off the runtime.
        let _ = tokio::task::spawn_blocking(move || s.shutdown()).await;
    }
    if let Some(path) = &budget_file
        && let Err(e) = budgets.local.save(path)
    {
        tracing::error!(path = %path.display(), error = %e, "saving budget spend failed");
    }
    if attached.is_pinned() {
        tracing::info!(
            "fail-closed: programs stay pinned and refuse provider connections until an agent is back \
             (`tollgate detach` removes them)"
        );
        drop(attached);
    } else {
        attached.detach();
        tracing::info!("programs detached");
    }
    Ok(())
}

/// What admission keeps: budget spend (from `budget_state_file` when set),
/// limit buckets, and both in Redis with `state.backend: redis`.
fn enforcer(
    config: &Config,
    budget_file: Option<&std::path::Path>,
    metrics: &Metrics,
) -> anyhow::Result<Enforcer> {
    use crate::policy::{gate::LimitStore, shared, spend::BudgetStore};
    let local = match budget_file {
        Some(p) => Budgets::load(p).map_err(|e| {
            anyhow::anyhow!(
                "budget_state_file: {e}\nhint: fix or remove the file (spend then starts at 0)"
            )
        })?,
        None => Budgets::default(),
    };
    let redis = config.state.backend == shared::Backend::Redis;
    if redis {
        tracing::info!(url = %config.state.redis_url, "budgets are shared through Redis");
    }
    let shared_budgets = redis
        .then(|| shared::SharedBudgets::new(&config.state))
        .transpose()?;
    let shared_limits = redis
        .then(|| shared::SharedLimits::new(&config.state))
        .transpose()?;
    let errors = metrics.state_errors.clone();
    let mut enforcer = Enforcer::new(
        Arc::new(LimitStore::new(shared_limits, errors.clone())),
        Arc::new(BudgetStore::new(local, shared_budgets, errors)),
    );
    // Token endpoints (service-account keys) are verified with the roots
    // providers are; without any, such credential files fail with a reason.
    match upstream::client_config(config.tls.system_roots, &config.tls.extra_roots) {
        Ok(tls) => match crate::policy::token_exchange::TokenExchange::new((*tls).clone()) {
            Ok(t) => enforcer.tokens = Arc::new(t),
            Err(e) => {
                tracing::warn!(error = %e, "no client for token endpoints; service-account credential files will fail")
            }
        },
        Err(e) => tracing::debug!(error = %e, "no roots for token endpoints"),
    }
    Ok(enforcer)
}

/// TLS termination, when `tls.ca_dir` is set: the CA must load (a broken CA
/// is a startup error, not a silent fall-back to relaying).
fn termination(
    config: &Config,
    live: crate::live::LiveRules,
    enforcer: Enforcer,
    addresses: ProviderAddresses,
    dialer: Arc<Dialer>,
) -> anyhow::Result<Option<Arc<Termination>>> {
    if config.tls.ca_dir.is_empty() {
        tracing::info!("tls.ca_dir is not set: provider connections are relayed, not terminated");
        return Ok(None);
    }
    let ca = Arc::new(NodeCa::load(std::path::Path::new(&config.tls.ca_dir))?);
    let leaves = Arc::new(LeafCache::new(
        ca,
        config.providers.iter().flat_map(|p| p.hosts.clone()),
    ));
    let client = upstream::client_config(config.tls.system_roots, &config.tls.extra_roots)?;
    let pool = UpstreamPool::new(client, dialer);
    let endpoints = config
        .providers
        .iter()
        .map(|p| ProviderEndpoint {
            name: p.name.clone(),
            host: p.hosts.first().cloned().unwrap_or_default(),
            ports: p.ports.clone(),
        })
        .collect();
    tracing::info!(ca = %config.tls.ca_dir, "TLS termination enabled for provider hosts");
    Ok(Some(Arc::new(Termination {
        acceptor: context::acceptor(leaves, config.tls.session_tickets)
            .context("building the TLS server configuration")?,
        settings: config.tls.clone(),
        capture: config.audit.capture.clone(),
        distrust: Distrust::new(config.tls.ca_rejected_retry),
        live,
        enforcer,
        bodies: crate::proxy::buffered::BodyBudget::new(config.tls.max_buffered_bytes),
        abandoned: Arc::new(tokio::sync::Semaphore::new(config.tls.max_abandoned_calls)),
        mcp_streams: Default::default(),
        upstreams: Upstreams {
            pool,
            endpoints,
            addresses,
        },
    })))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

async fn heartbeat(maps: Arc<Maps>, mut settings: Settings, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        settings.heartbeat_ns = monotonic_ns();
        if let Err(e) = maps.write_settings(settings) {
            tracing::error!(error = %e, "heartbeat write failed");
        }
    }
}

async fn refresh_providers(
    refresher: &mut Refresher,
    maps: &Maps,
    metrics: &Metrics,
    addresses: &ProviderAddresses,
) {
    // Expire against the time before this pass's lookups: an address whose
    // TTL ran out by then belongs to a host that was due, so it is looked up
    // again first, and an answer that still lists it keeps it in the map.
    // Against the time after, an address could expire between a host's due
    // time and its lookup: gone from the map for one pass (a connection in
    // that gap would not be redirected) when `dns.stale_grace` is 0.
    let before = Instant::now();
    refresher.refresh_due().await;
    refresher.book.expire(before);
    // Failover targets dial what DNS says now, like the kernel map.
    addresses.store(Arc::new(
        (0..refresher.ports.len() as u32)
            .map(|id| refresher.book.addresses_of(id))
            .collect(),
    ));
    let want = refresher.book.desired(&refresher.ports);
    match maps.sync_providers(&want) {
        Ok((added, removed)) if added + removed > 0 => {
            tracing::info!(added, removed, entries = want.len(), "provider map updated")
        }
        Ok(_) => {}
        Err(e) => tracing::error!(
            error = %e,
            wanted = want.len(),
            capacity = tollgate_common::capacity::PROVIDERS,
            "updating the provider map failed; if the map is full, list fewer provider hosts or ports"
        ),
    }
    metrics.provider_addresses.set(maps.provider_count() as i64);
}

async fn dns_loop(
    mut refresher: Refresher,
    maps: Arc<Maps>,
    metrics: Arc<Metrics>,
    addresses: ProviderAddresses,
) {
    loop {
        // Wake for the next due lookup, and at least every second so expired
        // addresses leave the map on time.
        let wait = refresher
            .next_due()
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(1));
        tokio::time::sleep(wait).await;
        refresh_providers(&mut refresher, &maps, &metrics, &addresses).await;
    }
}
