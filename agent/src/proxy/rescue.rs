//! The answers the proxy gives itself: every `Refusal` and every failed
//! provider leg becomes one provider-shaped HTTP response, in one place (as
//! linkerd2-proxy's `ServerRescue::rescue` does), and its record is
//! completed and accounted.
use std::time::{Duration, Instant};

use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

use super::{account::account, context::Call, upstream::ProxyBody};
use crate::{
    policy::Refusal,
    providers::{Adapter, RateLimitHint, mcp},
    telemetry::records::{Decision, Outcome, RequestRecord},
};

/// What the workload is told, and what its record says.
#[derive(Debug, PartialEq)]
pub(super) struct Answer {
    pub status: StatusCode,
    pub decision: Decision,
    pub outcome: Outcome,
    /// The record's reason (`rule:x`, `rule:x:requests`, `request_too_large`).
    pub reason: String,
    pub message: String,
    /// When the workload may try again (also in the body where the
    /// provider's errors say it there).
    pub retry: Option<Duration>,
    /// For the record: the wait the workload was told in `retry-after-ms`.
    pub retry_after_ms: Option<u64>,
    pub headers: Vec<(String, String)>,
}

/// The answer to `refusal` of a request whose deciding rule is `rule`
/// (empty when refused before a rule was consulted).
pub(super) fn answer(refusal: &Refusal, rule: &str, adapter: &dyn Adapter) -> Answer {
    let simple = |status, decision, outcome, reason: String, message: String| Answer {
        status,
        decision,
        outcome,
        reason,
        message,
        retry: None,
        retry_after_ms: None,
        headers: Vec::new(),
    };
    match refusal {
        Refusal::BodyTooLarge { limit } => simple(
            StatusCode::PAYLOAD_TOO_LARGE,
            Decision::Deny,
            Outcome::RequestTooLarge,
            "request_too_large".into(),
            format!("request body exceeds {limit} bytes (tls.max_request_body)"),
        ),
        Refusal::BodyUnreadable { error } => simple(
            StatusCode::BAD_REQUEST,
            Decision::Allow,
            Outcome::ClientError,
            rule.into(),
            format!("reading the request body failed: {error}"),
        ),
        Refusal::BodyTimeout { after } => simple(
            StatusCode::REQUEST_TIMEOUT,
            Decision::Allow,
            Outcome::ClientError,
            "request_body_timeout".into(),
            format!(
                "the request body did not arrive within {}s (tls.request_body_timeout)",
                after.as_secs()
            ),
        ),
        Refusal::Overloaded { limit } => {
            let wait = Duration::from_secs(1);
            Answer {
                headers: vec![("retry-after".into(), "1".into())],
                retry: Some(wait),
                ..simple(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Decision::Allow,
                    Outcome::Overloaded,
                    "overloaded".into(),
                    format!(
                        "the proxy already holds {limit} bytes of request bodies on this node (tls.max_buffered_bytes); retry shortly"
                    ),
                )
            }
        }
        Refusal::NotJson { empty } => simple(
            StatusCode::BAD_REQUEST,
            Decision::Allow,
            Outcome::ClientError,
            rule.into(),
            if *empty {
                "the request declares a JSON body but sent none (or reset its stream); not forwarded"
            } else {
                "the request body is not valid JSON (cut short?); not forwarded"
            }
            .into(),
        ),
        Refusal::Denied { rule, message } => simple(
            StatusCode::FORBIDDEN,
            Decision::Deny,
            Outcome::Denied,
            rule.clone(),
            message.clone(),
        ),
        Refusal::OverRuleSize { rule, size, max } => simple(
            StatusCode::PAYLOAD_TOO_LARGE,
            Decision::Deny,
            Outcome::RequestTooLarge,
            format!("{rule}:request_too_large"),
            format!("request body of {size} bytes exceeds the {max} bytes policy {rule} allows"),
        ),
        Refusal::CredentialUnavailable { rule } => simple(
            StatusCode::SERVICE_UNAVAILABLE,
            Decision::Allow,
            Outcome::CredentialUnavailable,
            rule.clone(),
            format!("the provider credential of policy {rule} is unavailable"),
        ),
        Refusal::BudgetSpent { rule, spent } => {
            let (wait, message) = if spent.spent_for_the_period() {
                let wait: Duration = (spent.resets_at - time::OffsetDateTime::now_utc())
                    .try_into()
                    .unwrap_or_default();
                let reset = spent
                    .resets_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default();
                let message = format!(
                    "the {} budget of policy {rule} is spent ({} of {}); it resets at {reset}",
                    spent.period,
                    usd(spent.spent),
                    usd(spent.limit)
                );
                (wait, message)
            } else {
                // Committed to calls in flight, which may settle for less.
                let message = format!(
                    "the {} budget of policy {rule} is committed to calls in flight ({} spent and {} reserved of {}); retry shortly",
                    spent.period,
                    usd(spent.spent),
                    usd(spent.reserved),
                    usd(spent.limit)
                );
                (Duration::from_secs(1), message)
            };
            Answer {
                headers: vec![("retry-after".into(), wait.as_secs().max(1).to_string())],
                retry: Some(wait),
                ..simple(
                    StatusCode::TOO_MANY_REQUESTS,
                    Decision::Deny,
                    Outcome::BudgetExhausted,
                    format!("{rule}:budget_{}", spent.period),
                    message,
                )
            }
        }
        Refusal::Unpriced {
            rule,
            provider,
            model,
        } => simple(
            StatusCode::FORBIDDEN,
            Decision::Deny,
            Outcome::Denied,
            format!("{rule}:unpriced_model"),
            match model {
                Some(m) => format!(
                    "policy {rule} has a budget, and the price table has no price for model `{m}` of provider {provider}: the call would spend uncounted. Add a price under `pricing.models` in the agent config (`tollgate pricing {m}` shows what matches)"
                ),
                None => format!(
                    "policy {rule} has a budget, and this request names no model to price: the call would spend uncounted"
                ),
            },
        ),
        Refusal::Unsignable { rule, change } => simple(
            StatusCode::FORBIDDEN,
            Decision::Deny,
            Outcome::Denied,
            format!("{rule}:unsignable"),
            format!(
                "policy {rule} {change}, and this call is signed with the workload's AWS SigV4 credentials, which the change would invalidate: give the rule a `credential_file` with a Bedrock API key (Tollgate then sends it in place of the signature), or take the rewrite off the rule"
            ),
        ),
        Refusal::RateLimited { rule, limited } => {
            let wait = limited.retry_after;
            let secs = wait.as_secs_f64();
            let ms = (wait.as_millis() as u64).max(1);
            let which = limited.which;
            let reason = format!("{rule}:{which}");
            let per = if which == "concurrency" {
                "time"
            } else {
                "minute"
            };
            let message = format!(
                "rate limit of policy {reason} reached: {} {} per {per}; retry in {secs:.1}s",
                limited.limit,
                which.replace('_', " "),
            );
            // The retry hints SDKs honour: `retry-after` (and `-ms`), and
            // the rate-limit headers in the provider's own naming.
            let mut headers = vec![
                (
                    "retry-after".to_string(),
                    (secs.ceil() as u64).max(1).to_string(),
                ),
                ("retry-after-ms".to_string(), ms.to_string()),
            ];
            headers.extend(adapter.rate_limit_headers(&RateLimitHint {
                which,
                limit: limited.limit,
                remaining: limited.remaining,
                retry_after: wait,
            }));
            Answer {
                headers,
                retry: Some(wait),
                retry_after_ms: Some(ms),
                ..simple(
                    StatusCode::TOO_MANY_REQUESTS,
                    Decision::Deny,
                    Outcome::RateLimited,
                    reason,
                    message,
                )
            }
        }
    }
}

/// Answer a refused request and account its record.
pub(super) fn refused(
    call: &Call,
    refusal: &Refusal,
    record: RequestRecord,
    started: Instant,
) -> Response<ProxyBody> {
    let answer = answer(refusal, &record.reason, call.meta.adapter);
    respond(call, answer, record, started)
}

/// Answer a refused message to an MCP server, as the JSON-RPC error of
/// each request in it (`ids`), so the client raises it as the call's
/// error. What the policy decided (a rule, a limit) is answered with HTTP
/// 200, as a server answers a call it refuses; what the proxy could not
/// do keeps its HTTP status. With `stream` (the HTTP+SSE transport's
/// event stream the message was POSTed for), the error goes down that
/// stream as a `message` event, and the POST is answered 202 as the
/// server would.
pub(super) fn refused_mcp(
    call: &Call,
    refusal: &Refusal,
    record: RequestRecord,
    started: Instant,
    ids: &[serde_json::Value],
    stream: Option<tokio::sync::mpsc::Sender<Bytes>>,
) -> Response<ProxyBody> {
    let mut answer = answer(refusal, &record.reason, call.meta.adapter);
    if ids.is_empty() {
        return respond(call, answer, record, started);
    }
    let code = match refusal {
        Refusal::Denied { .. } => Some(mcp::DENIED),
        Refusal::RateLimited { .. } => Some(mcp::RATE_LIMITED),
        _ => None,
    };
    if code.is_some() {
        answer.status = StatusCode::OK;
    }
    if stream.is_some() {
        answer.status = StatusCode::ACCEPTED;
    }
    let ids = ids.to_vec();
    let body = move |message: &str, reason: &str, retry| {
        let error = mcp::error_response(&ids, code.unwrap_or(mcp::REFUSED), message, reason, retry);
        match &stream {
            Some(events) => {
                let event = format!("event: message\ndata: {error}\n\n");
                match events.try_send(Bytes::from(event)) {
                    Ok(()) => String::new(),
                    // The stream is gone or far behind: the POST says it.
                    Err(_) => error,
                }
            }
            None => error,
        }
    };
    respond_shaped(call, answer, record, started, &body)
}

/// Answer an MCP message that cannot be decided (not JSON-RPC, or routing
/// headers that say otherwise than its body): 400, a JSON-RPC error.
pub(super) fn unreadable_mcp(
    call: &Call,
    why: &mcp::Unreadable,
    record: RequestRecord,
    started: Instant,
) -> Response<ProxyBody> {
    let answer = Answer {
        status: StatusCode::BAD_REQUEST,
        decision: Decision::Deny,
        outcome: Outcome::ClientError,
        reason: "mcp_unreadable".into(),
        message: format!("{why}: an MCP message the policy cannot read is not forwarded"),
        retry: None,
        retry_after_ms: None,
        headers: Vec::new(),
    };
    let code = match why {
        mcp::Unreadable::NotJson => mcp::PARSE_ERROR,
        _ => mcp::INVALID_REQUEST,
    };
    let body = move |message: &str, reason: &str, retry| {
        mcp::error_response(&[serde_json::Value::Null], code, message, reason, retry)
    };
    respond_shaped(call, answer, record, started, &body)
}

/// Answer a request whose provider leg failed (no response to relay).
pub(super) fn failed(
    call: &Call,
    status: StatusCode,
    outcome: Outcome,
    message: String,
    record: RequestRecord,
    started: Instant,
) -> Response<ProxyBody> {
    let answer = Answer {
        status,
        decision: record.decision,
        outcome,
        reason: record.reason.clone(),
        message,
        retry: None,
        retry_after_ms: None,
        headers: Vec::new(),
    };
    respond(call, answer, record, started)
}

/// The one place an answer becomes a response: the provider's error shape,
/// Tollgate's reason and request id in headers, the record accounted.
fn respond(
    call: &Call,
    answer: Answer,
    record: RequestRecord,
    started: Instant,
) -> Response<ProxyBody> {
    let adapter = call.meta.adapter;
    let status = answer.status.as_u16();
    let body =
        move |message: &str, code: &str, retry| adapter.error_body(status, message, code, retry);
    respond_shaped(call, answer, record, started, &body)
}

/// The body of an answer: from its message, reason code and retry.
type Shape<'a> = &'a dyn Fn(&str, &str, Option<Duration>) -> String;

/// `respond`, with the body shaped by `shape`.
fn respond_shaped(
    call: &Call,
    answer: Answer,
    mut record: RequestRecord,
    started: Instant,
    shape: Shape<'_>,
) -> Response<ProxyBody> {
    record.decision = answer.decision;
    record.result = answer.outcome;
    record.reason = answer.reason;
    record.retry_after_ms = answer.retry_after_ms;
    record.status = answer.status.as_u16();
    record.duration_ms = started.elapsed().as_millis() as u64;
    let code = match record.decision {
        Decision::Deny => record.reason.clone(),
        _ => record.result.as_str().to_string(),
    };
    let message = format!("tollgate: {}", answer.message);
    let body = shape(&message, &code, answer.retry);
    record.error = Some(answer.message);
    let mut response = Response::builder()
        .status(answer.status)
        .header(header::CONTENT_TYPE, "application/json")
        .header("x-tollgate-reason", code.as_str())
        .header("x-tollgate-request-id", record.id.as_str());
    for (k, v) in answer.headers {
        response = response.header(k, v);
    }
    account(call, record, None, started, None);
    let body = Full::new(Bytes::from(body))
        .map_err(|never| match never {})
        .boxed();
    response.body(body).unwrap_or_else(|e| {
        // Only a header value could be invalid (a reason with bytes HTTP
        // refuses); answer without the extras rather than not at all.
        tracing::warn!(error = %e, "an error response could not be built; answering a bare 500");
        let mut r = Response::new(
            Full::new(Bytes::from_static(b"{}"))
                .map_err(|never| match never {})
                .boxed(),
        );
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        r
    })
}

/// Dollars as a person reads them: cents, or three significant digits
/// for budgets below a cent (a test budget, a per-pod one).
fn usd(x: f64) -> String {
    if x == 0.0 || x.abs() >= 0.01 {
        format!("${x:.2}")
    } else {
        format!("${x:.3e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Exhausted, Limited};
    use crate::providers::{Api, adapter};

    fn ans(r: Refusal, rule: &str, api: Api) -> Answer {
        answer(&r, rule, adapter(api))
    }

    #[test]
    fn every_refusal_has_its_answer() {
        let cases = [
            (
                Refusal::BodyTooLarge { limit: 10 },
                "",
                (
                    413,
                    Decision::Deny,
                    Outcome::RequestTooLarge,
                    "request_too_large",
                ),
                "request body exceeds 10 bytes (tls.max_request_body)",
            ),
            (
                Refusal::BodyUnreadable {
                    error: "reset".into(),
                },
                "",
                (400, Decision::Allow, Outcome::ClientError, ""),
                "reading the request body failed: reset",
            ),
            (
                Refusal::BodyTimeout {
                    after: Duration::from_secs(60),
                },
                "",
                (
                    408,
                    Decision::Allow,
                    Outcome::ClientError,
                    "request_body_timeout",
                ),
                "the request body did not arrive within 60s (tls.request_body_timeout)",
            ),
            (
                Refusal::NotJson { empty: true },
                "",
                (400, Decision::Allow, Outcome::ClientError, ""),
                "the request declares a JSON body but sent none (or reset its stream); not forwarded",
            ),
            (
                Refusal::NotJson { empty: false },
                "",
                (400, Decision::Allow, Outcome::ClientError, ""),
                "the request body is not valid JSON (cut short?); not forwarded",
            ),
            (
                Refusal::Denied {
                    rule: "rule:no".into(),
                    message: "not here".into(),
                },
                "rule:no",
                (403, Decision::Deny, Outcome::Denied, "rule:no"),
                "not here",
            ),
            (
                Refusal::OverRuleSize {
                    rule: "rule:small".into(),
                    size: 20,
                    max: 10,
                },
                "rule:small",
                (
                    413,
                    Decision::Deny,
                    Outcome::RequestTooLarge,
                    "rule:small:request_too_large",
                ),
                "request body of 20 bytes exceeds the 10 bytes policy rule:small allows",
            ),
            (
                Refusal::CredentialUnavailable {
                    rule: "rule:key".into(),
                },
                "rule:key",
                (
                    503,
                    Decision::Allow,
                    Outcome::CredentialUnavailable,
                    "rule:key",
                ),
                "the provider credential of policy rule:key is unavailable",
            ),
        ];
        for (refusal, rule, (status, decision, outcome, reason), message) in cases {
            let a = ans(refusal, rule, Api::Openai);
            assert_eq!(
                (a.status.as_u16(), a.decision, a.outcome, a.reason.as_str()),
                (status, decision, outcome, reason)
            );
            assert_eq!(a.message, message);
            assert!(a.headers.is_empty() && a.retry.is_none());
        }
    }

    #[test]
    fn an_overloaded_node_says_retry_shortly() {
        let a = ans(
            Refusal::Overloaded { limit: 1024 },
            "rule:x",
            Api::Anthropic,
        );
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            (a.outcome, a.reason.as_str()),
            (Outcome::Overloaded, "overloaded")
        );
        assert_eq!(a.headers, [("retry-after".to_string(), "1".to_string())]);
        assert_eq!(a.retry, Some(Duration::from_secs(1)));
        assert!(
            a.message.contains("tls.max_buffered_bytes"),
            "{}",
            a.message
        );
    }

    #[test]
    fn a_rate_limit_says_when_to_retry_in_the_providers_terms() {
        let limited = || Refusal::RateLimited {
            rule: "rule:rpm".into(),
            limited: Limited {
                which: "requests",
                limit: 5,
                remaining: 0,
                retry_after: Duration::from_millis(1200),
            },
        };
        let a = ans(limited(), "rule:rpm", Api::Openai);
        assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            (a.decision, a.outcome, a.reason.as_str()),
            (Decision::Deny, Outcome::RateLimited, "rule:rpm:requests")
        );
        assert_eq!(
            a.message,
            "rate limit of policy rule:rpm:requests reached: 5 requests per minute; retry in 1.2s"
        );
        assert_eq!(a.retry_after_ms, Some(1200));
        let h: std::collections::HashMap<_, _> = a.headers.into_iter().collect();
        assert_eq!(h["retry-after"], "2");
        assert_eq!(h["retry-after-ms"], "1200");
        assert_eq!(h["x-ratelimit-limit-requests"], "5");
        assert_eq!(h["x-ratelimit-remaining-requests"], "0");
        let a = ans(limited(), "rule:rpm", Api::Anthropic);
        assert!(
            a.headers
                .iter()
                .any(|(k, _)| k == "anthropic-ratelimit-requests-limit")
        );
        let a = ans(limited(), "rule:rpm", Api::Gemini);
        assert_eq!(
            a.headers.len(),
            2,
            "Gemini: retry-after only, RetryInfo in the body"
        );
    }

    #[test]
    fn a_spent_budget_waits_for_its_reset() {
        let resets_at = time::OffsetDateTime::now_utc() + Duration::from_secs(3600);
        let a = ans(
            Refusal::BudgetSpent {
                rule: "rule:b".into(),
                spent: Exhausted {
                    period: "daily",
                    limit: 5.0,
                    spent: 5.25,
                    reserved: 0.0,
                    resets_at,
                },
            },
            "rule:b",
            Api::Openai,
        );
        assert_eq!(
            (a.status.as_u16(), a.outcome, a.reason.as_str()),
            (429, Outcome::BudgetExhausted, "rule:b:budget_daily")
        );
        assert!(
            a.message
                .starts_with("the daily budget of policy rule:b is spent ($5.25 of $5.00)"),
            "{}",
            a.message
        );
        let wait: u64 = a.headers[0].1.parse().unwrap();
        assert!((3590..=3600).contains(&wait), "{wait}");
        assert_eq!(
            a.retry_after_ms, None,
            "the record keeps retry_after_ms for limits"
        );
    }
}
