//! Anthropic messages API.
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::{
    Api, Operation, ParseState, RequestInfo, Usage,
    adapter::{Adapter, RateLimitHint, Upstream, cap_fields, set_body_model},
    model_and_usage, num,
    sse::SseEvent,
    stream_flag, string,
};

#[derive(Debug)]
pub struct Anthropic;

impl Adapter for Anthropic {
    fn api(&self) -> Api {
        Api::Anthropic
    }

    fn request(&self, path: &str, _query: &str, body: Option<&Value>) -> RequestInfo {
        RequestInfo {
            operation: if path.ends_with("/v1/messages") {
                Operation::Messages
            } else if path.contains("/v1/messages/batches") {
                Operation::Batch
            } else if path.contains("/v1/files") {
                Operation::Files
            } else {
                Operation::Other
            },
            model: body.and_then(|b| string(b, "model")),
            stream: stream_flag(body),
        }
    }

    fn on_json(&self, state: &mut ParseState, v: &Value) {
        model_and_usage(state, v, usage)
    }

    fn json_members(&self) -> Option<&'static [&'static str]> {
        Some(&["model", "usage"])
    }

    fn on_event(&self, state: &mut ParseState, e: &SseEvent) {
        let Ok(v) = serde_json::from_str::<Value>(&e.data) else {
            return;
        };
        match v.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                if let Some(m) = v.get("message") {
                    self.on_json(state, m);
                }
            }
            Some("message_delta") => {
                // output_tokens here is cumulative for the message.
                if let Some(u) = v.get("usage") {
                    state.saw_usage(u);
                    let usage = state.usage.get_or_insert_with(Usage::default);
                    usage.output_tokens = num(u, &["output_tokens"]);
                    if u.get("input_tokens").is_some() {
                        let fresh = super::anthropic::usage(u);
                        usage.input_tokens = fresh.input_tokens.max(usage.input_tokens);
                        usage.cached_input_tokens =
                            fresh.cached_input_tokens.max(usage.cached_input_tokens);
                        usage.cache_write_input_tokens = fresh
                            .cache_write_input_tokens
                            .max(usage.cache_write_input_tokens);
                    }
                }
            }
            Some("message_stop") => state.complete = true,
            Some("content_block_delta") => {
                let d = v.get("delta");
                // Text, thinking and tool input (`input_json_delta`) are all billed output.
                let text = d
                    .and_then(|d| {
                        d.get("text")
                            .or_else(|| d.get("thinking"))
                            .or_else(|| d.get("partial_json"))
                    })
                    .and_then(Value::as_str);
                if let Some(t) = text {
                    state.saw_text(t);
                }
            }
            _ => {}
        }
    }

    fn set_model(&self, _path: &mut String, body: &mut Map<String, Value>, model: &str) -> bool {
        set_body_model(body, model)
    }

    fn cap_output(
        &self,
        _: Upstream<'_>,
        _: &str,
        body: &mut Map<String, Value>,
        cap: u64,
    ) -> bool {
        cap_fields(body, &["max_tokens"], Some("max_tokens"), cap)
    }

    fn credential(&self, _: Upstream<'_>, key: &str) -> (&'static str, String) {
        ("x-api-key", key.to_string())
    }

    // https://docs.anthropic.com/en/api/errors
    fn error_body(&self, status: u16, message: &str, _code: &str, _: Option<Duration>) -> String {
        let kind = match status {
            400 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            529 => "overloaded_error",
            _ => "api_error",
        };
        json!({"type": "error", "error": {"type": kind, "message": message}}).to_string()
    }

    fn rate_limit_headers(&self, hint: &RateLimitHint<'_>) -> Vec<(String, String)> {
        let kind = hint.which.replace('_', "-");
        let reset = (time::OffsetDateTime::now_utc() + hint.retry_after)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        vec![
            (
                format!("anthropic-ratelimit-{kind}-limit"),
                hint.limit.to_string(),
            ),
            (
                format!("anthropic-ratelimit-{kind}-remaining"),
                hint.remaining.to_string(),
            ),
            (format!("anthropic-ratelimit-{kind}-reset"), reset),
        ]
    }
}

/// Anthropic reports cache reads and writes apart from `input_tokens`;
/// normalised here so `input_tokens` counts every input token.
pub(super) fn usage(u: &Value) -> Usage {
    let cache_read = num(u, &["cache_read_input_tokens"]);
    let cache_write = num(u, &["cache_creation_input_tokens"]);
    Usage {
        input_tokens: num(u, &["input_tokens"])
            .saturating_add(cache_read)
            .saturating_add(cache_write),
        output_tokens: num(u, &["output_tokens"]),
        cached_input_tokens: cache_read,
        cache_write_input_tokens: cache_write,
        // Thinking is not reported apart (it is part of output_tokens), and
        // images are counted as text tokens.
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Api, ResponseParser, parse_request};
    use super::*;

    fn parse(ct: &str, body: &str) -> super::super::ResponseInfo {
        let mut p = ResponseParser::new(Api::Anthropic, ct, 0);
        for c in body.as_bytes().chunks(5) {
            p.feed(c);
        }
        p.finish()
    }

    #[test]
    fn messages_json_usage_counts_cache() {
        let r = parse(
            "application/json",
            include_str!("fixtures/anthropic_messages.json"),
        );
        assert_eq!(
            r.response_model.as_deref(),
            Some("claude-sonnet-4-5-20250929")
        );
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 12 + 100 + 2048,
                output_tokens: 6,
                cached_input_tokens: 2048,
                cache_write_input_tokens: 100,
                ..Default::default()
            }
        );
        // Normalised input adds the cache's; the record keeps the provider's own.
        let raw = r
            .provider_usage
            .expect("the provider's usage differs: kept");
        assert_eq!(raw["input_tokens"], 12);
        assert_eq!(raw["cache_read_input_tokens"], 2048);
    }

    #[test]
    fn messages_stream_usage_from_start_and_delta() {
        let r = parse(
            "text/event-stream",
            include_str!("fixtures/anthropic_messages_stream.sse"),
        );
        assert!(r.complete, "message_stop ends the call");
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 472,
                output_tokens: 89,
                ..Default::default()
            }
        );
        assert!(
            r.provider_usage.is_none(),
            "no cache: the provider's numbers are ours"
        );
    }

    #[test]
    fn stream_cut_after_start_keeps_input_and_initial_output() {
        let full = include_str!("fixtures/anthropic_messages_stream.sse");
        let r = parse(
            "text/event-stream",
            &full[..full.find("event: message_delta").unwrap()],
        );
        assert!(!r.usage.estimated, "message_start carried real usage");
        assert_eq!(r.usage.input_tokens, 472);
        assert_eq!(r.usage.output_tokens, 2);
    }

    #[test]
    fn requests() {
        let r = parse_request(
            Api::Anthropic,
            "/v1/messages",
            br#"{"model":"claude-sonnet-4-5","max_tokens":1024,"stream":true}"#,
        );
        assert_eq!(
            r,
            RequestInfo {
                operation: Operation::Messages,
                model: Some("claude-sonnet-4-5".into()),
                stream: true
            }
        );
        assert_eq!(
            parse_request(Api::Anthropic, "/v1/messages/count_tokens", b"{}").operation,
            "other"
        );
        for (path, op) in [
            ("/v1/messages/batches", "batch"),
            ("/v1/messages/batches/msgbatch_01/results", "batch"),
            ("/v1/files", "files"),
            ("/v1/files/file_011/content", "files"),
        ] {
            assert_eq!(
                parse_request(Api::Anthropic, path, b"").operation,
                op,
                "{path}"
            );
        }
    }
}
