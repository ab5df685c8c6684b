//! One trait for everything the proxy must know about an API family, and the
//! registry that picks the adapter for a provider's `api`.
//!
//! Each family (`openai`, `anthropic`, `gemini`) implements `Adapter` in its
//! own file: how its requests name the model and the stream flag, how its
//! responses report usage, how its model and output limit are rewritten,
//! which header carries its key, and how its errors and rate-limit headers
//! look. Adding an API family is one new file and one line in the registry,
//! `providers::adapter` (the model is Envoy AI Gateway's translator per API).
use std::time::Duration;

use serde_json::{Map, Value};

use super::{
    Api, ParseState, RequestInfo, Usage, event_stream::Event, sse::SseEvent, stream_usage::Ask,
};

/// Where a request goes, as far as an adapter cares: OpenAI and Azure
/// OpenAI name some things their own way within the OpenAI family.
#[derive(Debug, Clone, Copy)]
pub struct Upstream<'a> {
    /// The configured provider name (`openai`, `azure`, …).
    pub provider: &'a str,
    /// The TLS server name the request goes to.
    pub host: &'a str,
}

/// What a 429 the proxy answers itself says about the limit, for the
/// provider's own rate-limit headers.
#[derive(Debug, Clone, Copy)]
pub struct RateLimitHint<'a> {
    /// `requests`, `input_tokens`, `output_tokens` or `concurrency`.
    pub which: &'a str,
    pub limit: u64,
    pub remaining: u64,
    pub retry_after: Duration,
}

pub trait Adapter: Send + Sync + std::fmt::Debug {
    fn api(&self) -> Api;

    /// What the request asks for. `path` has no query; `body` is None when
    /// the body is not JSON.
    fn request(&self, path: &str, query: &str, body: Option<&Value>) -> RequestInfo;

    /// A complete JSON response body.
    fn on_json(&self, state: &mut ParseState, v: &Value);

    /// The members of a JSON response object `on_json` reads, when it reads
    /// only some: the others are skipped unparsed (an answer's text is most
    /// of its bytes). None: the whole body is parsed.
    fn json_members(&self) -> Option<&'static [&'static str]> {
        None
    }

    /// One server-sent event of a streamed response.
    fn on_event(&self, state: &mut ParseState, e: &SseEvent);

    /// One AWS event-stream message of a streamed response (Bedrock).
    fn on_binary_event(&self, _state: &mut ParseState, _e: &Event<'_>) {}

    /// Usage the response headers state, for a body that reports none.
    fn usage_from_headers(&self, _headers: &http::HeaderMap) -> Option<Usage> {
        None
    }

    /// How to make a streamed request report its usage when, as sent, it
    /// would not (OpenAI's `stream_options.include_usage`). None when usage
    /// comes anyway or cannot be asked for. `path` has no query.
    fn stream_usage(
        &self,
        _to: Upstream<'_>,
        _path: &str,
        _query: &str,
        _body: &Value,
    ) -> Option<Ask> {
        None
    }

    /// Ask for `model` instead of the request's: in the body, or in the path
    /// (`path` has its query). True when something changed.
    fn set_model(&self, path: &mut String, body: &mut Map<String, Value>, model: &str) -> bool;

    /// Lower the request's output limit to `cap`, or set it when the request
    /// leaves it open. `path` has no query. True when something changed.
    fn cap_output(
        &self,
        to: Upstream<'_>,
        path: &str,
        body: &mut Map<String, Value>,
        cap: u64,
    ) -> bool;

    /// The header that carries the provider key, and its value for `key`.
    fn credential(&self, to: Upstream<'_>, key: &str) -> (&'static str, String);

    /// The JSON error body for an error the proxy answers itself, shaped
    /// like the provider's, so the workload's SDK raises the same exception
    /// class it would for the provider (a 403 becomes
    /// `PermissionDeniedError`, a 429 `RateLimitError`, …) and shows the
    /// message. `code` is Tollgate's reason; `retry` when the client should
    /// try again later.
    fn error_body(&self, status: u16, message: &str, code: &str, retry: Option<Duration>)
    -> String;

    /// Rate-limit headers in the provider's own naming (beyond `retry-after`,
    /// which every answer gets).
    fn rate_limit_headers(&self, hint: &RateLimitHint<'_>) -> Vec<(String, String)>;
}

/// Set `key` to min(current, cap), or to cap when absent and `set`. A
/// present value that is not a number within the cap — `4096.0`, `1e6`, a
/// string — is replaced too: a cap must hold for every form a provider
/// might accept. True when the value changed.
pub(super) fn lower(obj: &mut Map<String, Value>, key: &str, cap: u64, set: bool) -> bool {
    match obj.get(key) {
        Some(v) if v.as_f64().is_some_and(|n| n <= cap as f64) => false,
        None if !set => false,
        _ => {
            obj.insert(key.into(), cap.into());
            true
        }
    }
}

/// Cap the output limit a request names in one of `fields`; when it names
/// none, set `default` (if the operation has an output limit at all).
pub(super) fn cap_fields(
    obj: &mut Map<String, Value>,
    fields: &[&str],
    default: Option<&str>,
    cap: u64,
) -> bool {
    let present: Vec<&str> = fields
        .iter()
        .copied()
        .filter(|f| obj.get(*f).is_some_and(|v| !v.is_null()))
        .collect();
    if present.is_empty() {
        return default.is_some_and(|d| {
            lower(obj, d, cap, true);
            true
        });
    }
    let mut changed = false;
    for f in present {
        changed |= lower(obj, f, cap, false);
    }
    changed
}

/// Set the body's `model` if it has one (OpenAI-compatible, Anthropic).
pub(super) fn set_body_model(body: &mut Map<String, Value>, model: &str) -> bool {
    if !body.contains_key("model") {
        return false;
    }
    body.insert("model".into(), Value::String(model.to_string()));
    true
}

#[cfg(test)]
mod tests {
    use super::super::adapter;
    use super::*;

    fn error(api: Api, status: u16, code: &str, retry: Option<Duration>) -> Value {
        serde_json::from_str(&adapter(api).error_body(status, "tollgate: no", code, retry)).unwrap()
    }

    #[test]
    fn each_api_gets_its_own_error_shape() {
        let v = error(Api::Anthropic, 403, "rule:x", None);
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "permission_error");
        assert_eq!(v["error"]["message"], "tollgate: no");
        let v = error(
            Api::Gemini,
            429,
            "rule:x",
            Some(Duration::from_millis(1500)),
        );
        assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
        assert_eq!(v["error"]["code"], 429);
        assert_eq!(v["error"]["details"][0]["retryDelay"], "2s");
        let v = error(Api::Openai, 502, "upstream_error", None);
        assert_eq!(v["error"]["type"], "server_error");
        assert_eq!(v["error"]["code"], "upstream_error");
    }

    #[test]
    fn registry_knows_every_family() {
        for api in [Api::Openai, Api::Anthropic, Api::Gemini] {
            assert_eq!(adapter(api).api(), api);
        }
    }

    #[test]
    fn credential_headers_per_family() {
        let openai = Upstream {
            provider: "openai",
            host: "api.openai.com",
        };
        let azure = Upstream {
            provider: "azure",
            host: "res.openai.azure.com",
        };
        assert_eq!(
            adapter(Api::Openai).credential(openai, "k"),
            ("authorization", "Bearer k".to_string())
        );
        assert_eq!(
            adapter(Api::Openai).credential(azure, "k"),
            ("api-key", "k".to_string())
        );
        assert_eq!(
            adapter(Api::Anthropic).credential(openai, "k").0,
            "x-api-key"
        );
        assert_eq!(
            adapter(Api::Gemini).credential(openai, "k").0,
            "x-goog-api-key"
        );
    }

    #[test]
    fn rate_limit_headers_in_each_providers_naming() {
        let hint = RateLimitHint {
            which: "input_tokens",
            limit: 100,
            remaining: 0,
            retry_after: Duration::from_millis(2500),
        };
        let names = |api| -> Vec<String> {
            adapter(api)
                .rate_limit_headers(&hint)
                .into_iter()
                .map(|(k, _)| k)
                .collect()
        };
        assert_eq!(
            names(Api::Openai),
            [
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens"
            ]
        );
        assert_eq!(
            names(Api::Anthropic),
            [
                "anthropic-ratelimit-input-tokens-limit",
                "anthropic-ratelimit-input-tokens-remaining",
                "anthropic-ratelimit-input-tokens-reset"
            ]
        );
        assert!(names(Api::Gemini).is_empty());
    }
}
