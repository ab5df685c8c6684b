//! The ring buffer's consumer: captured plaintext to calls, calls to
//! records and metrics, exactly as terminated calls are accounted.
use std::{collections::HashMap, os::fd::AsRawFd, sync::Arc, time::Instant};

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::mpsc};
use tollgate_common::{
    TlsChunkHeader,
    tls::{DIR_READ, DIR_WRITE},
};

use super::{
    Control, Session,
    exchange::{Dir, Exchange, Finished},
    spend::{LimitKey, Spending},
};
use crate::{
    identity::{IdentityCache, Workload},
    live::LiveRules,
    policy::{BudgetKey, Enforcer, RequestDecision, Subject},
    proxy::account,
    telemetry::{
        events::{EventLog, now_rfc3339},
        metrics::Metrics,
        records::{Outcome, RequestRecord},
        redact,
    },
};

/// How often the ring is read when no wake-up came.
const TICK: std::time::Duration = std::time::Duration::from_millis(20);

/// Where the reader writes calls down.
pub struct Books {
    pub metrics: Arc<Metrics>,
    pub events: EventLog,
    pub live: LiveRules,
    pub identity: Arc<IdentityCache>,
    /// What the calls are charged to.
    pub spending: Arc<Spending>,
}

struct Open {
    session: Session,
    exchange: Exchange,
    /// Bytes lost before, by direction, as the last record said.
    lost: [u64; 2],
}

pub(super) struct Reader {
    ring: AsyncFd<RingFd>,
    books: Books,
    open: HashMap<u64, Open>,
}

/// The ring buffer, pollable (its fd becomes readable when records wait).
struct RingFd(RingBuf<MapData>);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl Reader {
    pub(super) fn new(ring: RingBuf<MapData>, books: Books) -> std::io::Result<Self> {
        // SAFETY: the fd is the ring buffer map's, owned by the RingBuf
        // inside RingFd for the AsyncFd's whole life, and never changes.
        let ring = unsafe { AsyncFd::register(RingFd(ring)) }.map_err(|e| e.into_parts().1)?;
        Ok(Self {
            ring,
            books,
            open: HashMap::new(),
        })
    }

    pub(super) async fn run(mut self, mut control: mpsc::UnboundedReceiver<Control>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = control.recv() => {
                    let Some(msg) = msg else { return };
                    // Begins first, then the records, then ends: a
                    // connection's records are in the ring before its end
                    // is sent (the workload read them before it closed).
                    let mut ends = Vec::new();
                    let mut next = Some(msg);
                    while let Some(m) = next {
                        match m {
                            Control::Begin(cookie, session) => self.begin(cookie, session),
                            Control::End(cookie, state) => ends.push((cookie, state)),
                        }
                        next = control.try_recv().ok();
                    }
                    self.drain();
                    for (cookie, state) in ends {
                        self.end(cookie, state);
                    }
                }
                ready = self.ring.readable_mut() => {
                    let Ok(mut guard) = ready else { return };
                    guard.clear_ready();
                    self.drain();
                }
                // The programs wake the reader only when much is waiting
                // (a wake-up per record would cost the workload): the rest
                // is read on this tick.
                _ = tick.tick() => self.drain(),
            }
        }
    }

    fn begin(&mut self, cookie: u64, session: Session) {
        let exchange = Exchange::new(session.api);
        self.open.insert(
            cookie,
            Open {
                session,
                exchange,
                lost: [0; 2],
            },
        );
    }

    fn end(&mut self, cookie: u64, state: tollgate_common::CaptureState) {
        let Some(mut open) = self.open.remove(&cookie) else {
            return;
        };
        let mut done = Vec::new();
        if state.lost != open.lost {
            open.exchange.hole(Instant::now(), &mut done);
        }
        open.exchange.end(Instant::now(), &mut done);
        self.account(&open.session, done);
    }

    /// Every record waiting in the ring.
    fn drain(&mut self) {
        let mut finished: Vec<(u64, Vec<Finished>)> = Vec::new();
        let now = Instant::now();
        {
            let ring = &mut self.ring.get_mut().0;
            while let Some(item) = ring.next() {
                let Some((hdr, data)) = parse(&item) else {
                    continue;
                };
                let Some(open) = self.open.get_mut(&hdr.cookie) else {
                    continue; // ended already, or not ours
                };
                let dir = usize::from(hdr.dir == DIR_READ);
                let mut done = Vec::new();
                if hdr.lost_before != open.lost[dir] {
                    open.lost[dir] = hdr.lost_before;
                    open.exchange.hole(now, &mut done);
                }
                let d = if hdr.dir == DIR_WRITE {
                    Dir::Write
                } else {
                    Dir::Read
                };
                open.exchange.feed(d, data, now, &mut done);
                if !done.is_empty() {
                    finished.push((hdr.cookie, done));
                }
            }
        }
        for (cookie, done) in finished {
            if let Some(open) = self.open.get(&cookie) {
                let session = open.session.clone();
                self.account(&session, done);
            }
        }
    }

    fn account(&self, s: &Session, done: Vec<Finished>) {
        let books = account::Books {
            metrics: &self.books.metrics,
            events: &self.books.events,
            live: &self.books.live,
        };
        for f in done {
            let mut workload = s.workload.clone();
            if workload.kubernetes.is_none() {
                workload.kubernetes = self.books.identity.pod_meta(&workload);
            }
            let (budget, limits) = self.quotas(s, &workload, &f);
            let (duration, ttft) = (f.duration, f.ttft);
            let record = record(s, workload, f);
            let (id, usage) = (record.id.clone(), record.usage);
            let label = record.workload.label().to_string();
            let cost = account::account_in(&books, record, None, duration, ttft);
            let spending = &self.books.spending;
            if let Some(key) = limits {
                let (i, o) = (usage.input_tokens, usage.output_tokens);
                spending.count(s.cgroup, label.clone(), key, i, o);
            }
            if let (Some(key), Some(usd)) = (budget, cost) {
                spending.charge(s.cgroup, label, key, id, usd);
            }
        }
    }

    /// The budget and the limits the call counts against: those of the
    /// rule that decides such a call (as admission would have, had it been
    /// terminated).
    fn quotas(
        &self,
        s: &Session,
        workload: &Workload,
        f: &Finished,
    ) -> (Option<BudgetKey>, Option<LimitKey>) {
        let live = self.books.live.load();
        let subject = Subject {
            workload,
            comm: &s.comm,
        };
        let decision = live.policy.request(
            subject,
            &s.provider,
            f.request.operation,
            f.request.model.as_deref(),
        );
        let RequestDecision::Allow { reason, caps } = decision else {
            return (None, None);
        };
        let limits = caps.limits.map(|limits| LimitKey {
            rule: reason.clone(),
            key: Enforcer::key_for(workload, limits.per),
            limits,
        });
        let budget = caps.budget.map(|config| BudgetKey {
            rule: reason,
            key: Enforcer::key_for(workload, config.per),
            config,
        });
        (budget, limits)
    }
}

/// A ring record's header and plaintext.
fn parse(item: &[u8]) -> Option<(TlsChunkHeader, &[u8])> {
    let size = std::mem::size_of::<TlsChunkHeader>();
    let head = item.get(..size)?;
    // SAFETY: TlsChunkHeader is repr(C) plain integers (any bit pattern is
    // valid), and read_unaligned copes with the ring's alignment.
    let hdr: TlsChunkHeader = unsafe { std::ptr::read_unaligned(head.as_ptr().cast()) };
    let data = item.get(size..size + hdr.len as usize)?;
    Some((hdr, data))
}

/// The audit record of one call read at the workload's TLS library.
fn record(s: &Session, workload: Workload, f: Finished) -> RequestRecord {
    let ms = |d: std::time::Duration| d.as_millis() as u64;
    RequestRecord {
        time: now_rfc3339(),
        kind: "request",
        id: uuid::Uuid::now_v7().to_string(),
        decision: s.decision,
        reason: s.reason.clone(),
        routed_model: None,
        capped_output_tokens: None,
        retry_after_ms: None,
        credential_injected: false,
        attempts: Vec::new(),
        served_by: None,
        workload,
        pid: s.pid,
        comm: s.comm.clone(),
        provider: s.provider.clone(),
        host: f.host,
        method: f.method,
        path: redact::path(&f.target),
        operation: f.request.operation,
        model: f.request.model,
        response_model: f.response.response_model,
        stream: f.request.stream,
        stream_usage_asked: false,
        usage: f.response.usage,
        provider_usage: f.response.provider_usage,
        client_http: f.http.into(),
        observed_via: Some("tls_uprobe"),
        upstream: s.upstream,
        status: f.status,
        request_bytes: f.request_bytes,
        response_bytes: f.response_bytes,
        ttfb_ms: ms(f.ttfb),
        ttft_ms: f.ttft.map_or(0, ms),
        duration_ms: ms(f.duration),
        result: if f.complete {
            Outcome::Ok
        } else {
            Outcome::Incomplete
        },
        error: None,
        cost_usd: None,
        provider_request_id: f.provider_request_id,
        request_headers: None,
        request_body: None,
        response_body: None,
        batch_input: None,
        realtime: None,
        mcp: None,
    }
}
