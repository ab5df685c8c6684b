//! The end of every terminated request: its cost, its charge to its
//! budget, its metrics and its audit record.
use std::time::{Duration, Instant};

use super::context::Call;
use crate::{
    live::LiveRules,
    policy::BudgetHold,
    providers::{Operation, mcp, mcp_response},
    telemetry::records::{Decision, Outcome, RequestRecord},
    telemetry::{events::EventLog, metrics::Metrics},
};

/// Where a finished call is written down: its metrics, its record, the
/// prices it is costed with.
pub struct Books<'a> {
    pub metrics: &'a Metrics,
    pub events: &'a EventLog,
    pub live: &'a LiveRules,
}

/// Price, charge, count and log one finished request. `budget`: what its
/// cost is charged to.
pub(super) fn account(
    call: &Call,
    record: RequestRecord,
    budget: Option<BudgetHold>,
    started: Instant,
    ttft: Option<Duration>,
) {
    if record.operation == Operation::Mcp {
        return account_mcp(call, record, started);
    }
    let books = Books {
        metrics: &call.metrics,
        events: &call.events,
        live: &call.tls.live,
    };
    account_in(&books, record, budget, started.elapsed(), ttft);
}

/// `account` for a call that was not terminated (its duration measured by
/// whoever saw it). Returns the call's cost, when priced.
pub fn account_in(
    books: &Books<'_>,
    mut record: RequestRecord,
    budget: Option<BudgetHold>,
    duration: Duration,
    ttft: Option<Duration>,
) -> Option<f64> {
    let m = books.metrics;
    // The model that answered is what is billed; the requested one otherwise.
    let billed_model = record
        .response_model
        .as_deref()
        .or(record.model.as_deref())
        .unwrap_or_default();
    let live = books.live.load();
    record.cost_usd = live
        .prices
        .cost(&record.provider, billed_model, &record.usage)
        .map(round_nano);
    let [ns, workload, pod] = record.workload.metric_labels();
    let model = model_label(
        m,
        &live.prices,
        &record.provider,
        record.response_model.as_deref(),
        record.model.as_deref(),
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
            record.result.as_str(),
        ])
        .inc();
    m.decisions
        .with_label_values(&[&record.provider, record.decision.as_str(), &record.reason])
        .inc();
    if let Some(kind) = upstream_error_kind(&record) {
        m.upstream_errors
            .with_label_values(&[&record.provider, kind])
            .inc();
    }
    m.operation_duration
        .with_label_values(&labels)
        .observe(duration.as_secs_f64());
    if let (true, Some(t)) = (record.stream, ttft) {
        m.time_to_first_token
            .with_label_values(&labels)
            .observe(t.as_secs_f64());
    }
    if let Some(c) = record.cost_usd {
        m.cost.with_label_values(&labels).inc_by(c);
    }
    if let Some(b) = budget {
        b.settle(record.cost_usd, soft_warn(m));
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
            ("audio_input", u.audio_input_tokens),
            ("image_input", u.image_input_tokens),
            ("audio_output", u.audio_output_tokens),
        ] {
            // Modalities most calls never use get a series only once one does.
            if n == 0 && matches!(kind, "audio_input" | "image_input" | "audio_output") {
                continue;
            }
            m.tokens
                .with_label_values(&[&ns, &workload, &pod, &record.provider, &model, kind])
                .inc_by(n);
        }
    }
    books.events.record_request(&record);
    record.cost_usd
}

/// The end of a message to an MCP server: its metrics and its record (it
/// has no price and no tokens).
fn account_mcp(call: &Call, record: RequestRecord, started: Instant) {
    let m = &call.metrics;
    let [ns, workload, pod] = record.workload.metric_labels();
    let exchange = record.mcp.as_ref();
    let method = mcp::method_label(exchange.and_then(|x| x.method.as_deref()), &record.method);
    // Tool names are the workload's to choose: bounded per server like models.
    let tool = exchange
        .and_then(|x| x.tool.as_deref())
        .map(|t| m.model_label(&format!("mcp:{}", record.provider), Some(t)))
        .unwrap_or_default();
    let result = match (record.result, exchange.and_then(|x| x.answered.outcome)) {
        (Outcome::Ok, _) if record.status >= 400 => "http_error",
        (Outcome::Ok, Some(mcp_response::Outcome::Error)) => "error",
        (Outcome::Ok, Some(mcp_response::Outcome::ToolError)) => "tool_error",
        (o, _) => o.as_str(),
    };
    let server = record.provider.as_str();
    m.mcp_calls
        .with_label_values(&[&ns, &workload, &pod, server, method, &tool, result])
        .inc();
    m.mcp_call_duration
        .with_label_values(&[&ns, &workload, &pod, server, method])
        .observe(started.elapsed().as_secs_f64());
    m.decisions
        .with_label_values(&[server, record.decision.as_str(), &record.reason])
        .inc();
    if let Some(kind) = upstream_error_kind(&record) {
        m.upstream_errors.with_label_values(&[server, kind]).inc();
    }
    call.events.record_request(&record);
}

/// How a budget's soft limit crossed is reported: a warning and a counter.
pub fn soft_warn(m: &crate::telemetry::metrics::Metrics) -> crate::policy::SoftWarn {
    let counter = m.budget_soft_reached.clone();
    Box::new(move |b, soft| {
        tracing::warn!(rule = %b.rule, key = %b.key, period = soft.period,
            spent_usd = soft.spent, limit_usd = soft.limit,
            "budget soft limit reached ({}% of the {} budget)", b.config.soft_percent, soft.period);
        counter.with_label_values(&[&b.rule, soft.period]).inc();
    })
}

/// Dollars to a tenth of a nano-dollar (a single cheap token costs ~1e-8):
/// float noise out of the audit log, every real digit kept.
pub(super) fn round_nano(usd: f64) -> f64 {
    (usd * 1e10).round() / 1e10
}

/// How the provider leg failed, for `tollgate_upstream_errors_total`:
/// transport failures by result, and provider error statuses (429, 5xx).
fn upstream_error_kind(r: &RequestRecord) -> Option<&'static str> {
    match r.result {
        o if o.is_upstream_failure() => Some(o.as_str()),
        _ if r.decision != Decision::Allow => None,
        _ if r.status == 429 => Some("status_429"),
        _ if r.status >= 500 => Some("status_5xx"),
        _ => None,
    }
}

/// The `model` label: the name the provider answered with; for a call no
/// provider answered (refused, failed), the price table's family of the
/// requested name (`gpt-4o-mini*` → `gpt-4o-mini`) or `unconfirmed`. A
/// workload's made-up names never become labels, so they cannot crowd out
/// the real models of other tenants (labels are bounded per provider).
fn model_label(
    m: &crate::telemetry::metrics::Metrics,
    prices: &crate::pricing::PriceTable,
    provider: &str,
    named: Option<&str>,
    requested: Option<&str>,
) -> String {
    let named = named.filter(|s| !s.is_empty());
    let requested = requested.filter(|s| !s.is_empty());
    match (named, requested) {
        (Some(model), _) => m.model_label(provider, Some(model)),
        (None, Some(model)) => match prices.family(provider, model) {
            Some(family) => m.model_label(provider, Some(family.trim_end_matches('*'))),
            None => "unconfirmed".into(),
        },
        (None, None) => m.model_label(provider, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{pricing::PriceTable, telemetry::metrics::Metrics};

    #[test]
    fn only_confirmed_or_priced_names_become_labels() {
        let m = Metrics::new();
        let prices = PriceTable::new(&Default::default()).unwrap();
        for (named, requested, want) in [
            (
                Some("gpt-4o-mini-2024-07-18"),
                Some("gpt-4o-mini"),
                "gpt-4o-mini-2024-07-18",
            ),
            (None, Some("gpt-4o-mini"), "gpt-4o-mini"),
            (None, Some("gpt-4o-mini-made-up-17"), "gpt-4o-mini"),
            (None, Some("totally-bogus-1"), "unconfirmed"),
            (Some(""), Some("totally-bogus-2"), "unconfirmed"),
            (None, None, "unknown"),
        ] {
            assert_eq!(
                model_label(&m, &prices, "openai", named, requested),
                want,
                "{named:?} / {requested:?}"
            );
        }
        // A flood of made-up names takes no label slot: a real model that
        // comes later still gets its own.
        for i in 0..200 {
            model_label(&m, &prices, "openai", None, Some(&format!("bogus-{i}")));
        }
        assert_eq!(
            model_label(&m, &prices, "openai", Some("o3-2025-04-16"), None),
            "o3-2025-04-16"
        );
    }
}
