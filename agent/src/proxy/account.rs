//! The end of every terminated request: its cost, its audit record, its
//! metrics; and the provider-shaped error answers the proxy gives itself.
use std::time::{Duration, Instant};

use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

use super::{terminate::Call, upstream::ProxyBody};
use crate::{
    policy::{budgets::Exhausted, limits::Limited},
    providers::Api,
    telemetry::events::RequestRecord,
};

/// Price, log and count one finished request.
pub(super) fn account(
    call: &Call,
    mut record: RequestRecord,
    started: Instant,
    ttft: Option<Duration>,
) {
    let m = &call.metrics;
    // The model that answered is what is billed; the requested one otherwise.
    let billed_model = record
        .response_model
        .as_deref()
        .or(record.model.as_deref())
        .unwrap_or_default();
    record.cost_usd = call
        .tls
        .live
        .load()
        .prices
        .cost(&record.provider, billed_model, &record.usage)
        .map(round_nano);
    let [ns, workload, pod] = record.workload.metric_labels();
    let model = m.model_label(
        &record.provider,
        Some(billed_model).filter(|s| !s.is_empty()),
    );
    let labels = [
        ns.as_str(),
        workload.as_str(),
        pod.as_str(),
        record.provider.as_str(),
        model.as_str(),
    ];
    let class = format!("{}xx", record.status / 100);
    m.requests
        .with_label_values(&[
            &ns,
            &workload,
            &pod,
            &record.provider,
            &model,
            &class,
            record.result,
        ])
        .inc();
    m.decisions
        .with_label_values(&[&record.provider, record.decision, &record.reason])
        .inc();
    if let Some(kind) = upstream_error_kind(&record) {
        m.upstream_errors
            .with_label_values(&[&record.provider, kind])
            .inc();
    }
    m.operation_duration
        .with_label_values(&labels)
        .observe(started.elapsed().as_secs_f64());
    if let (true, Some(t)) = (record.stream, ttft) {
        m.time_to_first_token
            .with_label_values(&labels)
            .observe(t.as_secs_f64());
    }
    if let Some(c) = record.cost_usd {
        m.cost.with_label_values(&labels).inc_by(c);
        if let Some(b) = &record.budget {
            let counter = m.budget_soft_reached.clone();
            call.tls
                .budgets
                .charge(b, c, time::OffsetDateTime::now_utc(), move |b, soft| {
                    tracing::warn!(rule = %b.rule, key = %b.key, period = soft.period,
                        spent_usd = soft.spent, limit_usd = soft.limit,
                        "budget soft limit reached ({}% of the {} budget)", b.config.soft_percent, soft.period);
                    counter.with_label_values(&[&b.rule, soft.period]).inc();
                });
        }
    }
    let u = &record.usage;
    if u.input_tokens + u.output_tokens > 0 {
        for (kind, n) in [("input", u.input_tokens), ("output", u.output_tokens)] {
            m.token_usage
                .with_label_values(&[&ns, &workload, &pod, &record.provider, &model, kind])
                .observe(n as f64);
        }
        for (kind, n) in [
            ("input", u.input_tokens),
            ("output", u.output_tokens),
            ("cached_input", u.cached_input_tokens),
            ("cache_write_input", u.cache_write_input_tokens),
            ("reasoning", u.reasoning_tokens),
        ] {
            m.tokens
                .with_label_values(&[&ns, &workload, &pod, &record.provider, &model, kind])
                .inc_by(n);
        }
    }
    call.events.record(&record);
}

/// Dollars to a tenth of a nano-dollar (a single cheap token costs ~1e-8):
/// float noise out of the audit log, every real digit kept.
fn round_nano(usd: f64) -> f64 {
    (usd * 1e10).round() / 1e10
}

/// How the provider leg failed, for `tollgate_upstream_errors_total`:
/// transport failures by result, and provider error statuses (429, 5xx).
fn upstream_error_kind(r: &RequestRecord) -> Option<&'static str> {
    match r.result {
        "upstream_error" | "upstream_timeout" | "upstream_idle_timeout" => Some(r.result),
        _ if r.decision != "allow" => None,
        _ if r.status == 429 => Some("status_429"),
        _ if r.status >= 500 => Some("status_5xx"),
        _ => None,
    }
}

/// An error the proxy itself answers, shaped like the provider's errors
/// (`providers::errors`).
pub(super) fn error_response(
    call: &Call,
    status: StatusCode,
    message: &str,
    record: RequestRecord,
    started: Instant,
) -> Response<ProxyBody> {
    refuse(call, status, message, record, started, None, Vec::new())
}

/// A 429 for a request over one of its rule's limits, with the retry hints
/// the provider's SDKs honour: `retry-after` (and `retry-after-ms`), and the
/// rate-limit headers in the provider's own naming.
pub(super) fn limited_response(
    call: &Call,
    limited: Limited,
    mut record: RequestRecord,
    started: Instant,
) -> Response<ProxyBody> {
    let wait = limited.retry_after;
    let secs = wait.as_secs_f64();
    record.retry_after_ms = Some((wait.as_millis() as u64).max(1));
    let mut headers = vec![
        (
            "retry-after".to_string(),
            (secs.ceil() as u64).max(1).to_string(),
        ),
        (
            "retry-after-ms".to_string(),
            (wait.as_millis() as u64).max(1).to_string(),
        ),
    ];
    let which = limited.which;
    match call.meta.api {
        Api::Openai => {
            let kind = if which == "requests" {
                "requests"
            } else {
                "tokens"
            };
            headers.push((
                format!("x-ratelimit-limit-{kind}"),
                limited.limit.to_string(),
            ));
            headers.push((
                format!("x-ratelimit-remaining-{kind}"),
                limited.remaining.to_string(),
            ));
            headers.push((format!("x-ratelimit-reset-{kind}"), format!("{secs:.3}s")));
        }
        Api::Anthropic => {
            let kind = which.replace('_', "-");
            let reset = time::OffsetDateTime::now_utc() + wait;
            let reset = reset
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            headers.push((
                format!("anthropic-ratelimit-{kind}-limit"),
                limited.limit.to_string(),
            ));
            headers.push((
                format!("anthropic-ratelimit-{kind}-remaining"),
                limited.remaining.to_string(),
            ));
            headers.push((format!("anthropic-ratelimit-{kind}-reset"), reset));
        }
        Api::Gemini => {}
    }
    record.decision = "deny";
    record.result = "rate_limited";
    record.reason = format!("{}:{which}", record.reason);
    let message = format!(
        "rate limit of policy {} reached: {} {} per {}; retry in {secs:.1}s",
        record.reason,
        limited.limit,
        which.replace('_', " "),
        if which == "concurrency" {
            "time"
        } else {
            "minute"
        }
    );
    too_many(call, &message, record, started, wait, headers)
}

/// A 429 for a request whose budget is spent, with `retry-after` at the
/// budget's reset (SDKs give up on waits that long and show the message).
pub(super) fn budget_response(
    call: &Call,
    e: Exhausted,
    mut record: RequestRecord,
    started: Instant,
) -> Response<ProxyBody> {
    let wait = (e.resets_at - time::OffsetDateTime::now_utc())
        .try_into()
        .unwrap_or_default();
    let reset = e
        .resets_at
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let message = format!(
        "the {} budget of policy {} is spent (${:.2} of ${:.2}); it resets at {reset}",
        e.period, record.reason, e.spent, e.limit
    );
    record.decision = "deny";
    record.result = "budget_exhausted";
    record.reason = format!("{}:budget_{}", record.reason, e.period);
    let headers = vec![(
        "retry-after".to_string(),
        (std::time::Duration::as_secs(&wait)).max(1).to_string(),
    )];
    too_many(call, &message, record, started, wait, headers)
}

fn too_many(
    call: &Call,
    message: &str,
    record: RequestRecord,
    started: Instant,
    wait: std::time::Duration,
    headers: Vec<(String, String)>,
) -> Response<ProxyBody> {
    let status = StatusCode::TOO_MANY_REQUESTS;
    refuse(call, status, message, record, started, Some(wait), headers)
}

fn refuse(
    call: &Call,
    status: StatusCode,
    message: &str,
    mut record: RequestRecord,
    started: Instant,
    retry: Option<std::time::Duration>,
    headers: Vec<(String, String)>,
) -> Response<ProxyBody> {
    record.status = status.as_u16();
    record.duration_ms = started.elapsed().as_millis() as u64;
    record.error = Some(message.to_string());
    let code = if record.decision == "deny" {
        record.reason.as_str()
    } else {
        record.result
    };
    let body = crate::providers::errors::body(call.meta.api, status.as_u16(), message, code, retry);
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-tollgate-reason", code)
        .header("x-tollgate-request-id", record.id.as_str());
    for (k, v) in headers {
        response = response.header(k, v);
    }
    account(call, record, started, None);
    response
        .body(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("static response is valid")
}
