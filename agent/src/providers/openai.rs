//! OpenAI and OpenAI-compatible APIs (Azure OpenAI, Mistral, Groq, DeepSeek,
//! OpenRouter, …): chat completions, responses, completions, embeddings.
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::{
    Api, Operation, ParseState, RequestInfo, Usage,
    adapter::{Adapter, RateLimitHint, Upstream, cap_fields, set_body_model},
    model_and_usage, num,
    sse::SseEvent,
    stream_flag,
    stream_usage::Ask,
    string,
};

/// The OpenAI-compatible family.
#[derive(Debug)]
pub struct OpenAi;

/// Azure OpenAI: an OpenAI-compatible API with its own key header and
/// deployment paths.
pub fn is_azure(host: &str) -> bool {
    host.ends_with(".openai.azure.com")
}

/// Azure OpenAI accepts `stream_options` from api-version 2024-09-01
/// (dated versions compare as strings; `preview`/`latest` are current).
fn azure_knows_stream_options(query: &str) -> bool {
    let version = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("api-version="))
        .unwrap_or("");
    match version.get(..10) {
        Some(date) if date.as_bytes()[0].is_ascii_digit() => date >= "2024-09-01",
        _ => matches!(version, "preview" | "latest" | "v1"),
    }
}

/// OpenAI itself or Azure OpenAI, whose chat API wants
/// `max_completion_tokens` (reasoning models reject `max_tokens`); other
/// OpenAI-compatible servers get `max_tokens`.
fn native(to: Upstream<'_>) -> bool {
    to.provider == "openai" || is_azure(to.host)
}

impl Adapter for OpenAi {
    fn api(&self) -> Api {
        Api::Openai
    }

    fn request(&self, path: &str, query: &str, body: Option<&Value>) -> RequestInfo {
        let operation = if path.ends_with("/chat/completions") {
            Operation::Chat
        } else if path.ends_with("/responses") {
            Operation::Responses
        } else if path.ends_with("/completions") {
            Operation::Completions
        } else if path.ends_with("/embeddings") {
            Operation::Embeddings
        } else if super::has_segment(path, "batches") {
            Operation::Batch
        } else if super::has_segment(path, "files") || super::has_segment(path, "uploads") {
            Operation::Files
        } else if super::has_segment(path, "realtime") {
            Operation::Realtime
        } else {
            Operation::Other
        };
        // Azure OpenAI names the deployment in the path and omits `model`:
        // /openai/deployments/{deployment}/chat/completions?api-version=…
        let azure_deployment = path
            .split_once("/openai/deployments/")
            .and_then(|(_, rest)| rest.split('/').next())
            .filter(|d| !d.is_empty())
            .map(str::to_owned);
        RequestInfo {
            operation,
            model: body
                .and_then(|b| string(b, "model"))
                .or(azure_deployment)
                // A Realtime session names its model in the URL.
                .or_else(|| {
                    (operation == Operation::Realtime)
                        .then(|| super::realtime::model_in_query(query))
                        .flatten()
                }),
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
        if e.data == "[DONE]" {
            state.complete = true;
            return;
        }
        super::openai_stream::on_event(state, &e.data);
    }

    fn stream_usage(&self, to: Upstream<'_>, path: &str, query: &str, body: &Value) -> Option<Ask> {
        // chat/completions and the legacy completions; the Responses API
        // reports usage in `response.completed` without being asked.
        if !path.ends_with("/completions") || !stream_flag(Some(body)) {
            return None;
        }
        // Azure rejects the option before api-version 2024-09-01.
        if is_azure(to.host) && !azure_knows_stream_options(query) {
            return None;
        }
        match body.get("stream_options") {
            None => Some(Ask::Insert),
            Some(o) if o.get("include_usage").and_then(Value::as_bool) == Some(true) => None,
            Some(_) => Some(Ask::Set),
        }
    }

    fn set_model(&self, _path: &mut String, body: &mut Map<String, Value>, model: &str) -> bool {
        set_body_model(body, model)
    }

    fn cap_output(
        &self,
        to: Upstream<'_>,
        path: &str,
        body: &mut Map<String, Value>,
        cap: u64,
    ) -> bool {
        let (fields, default): (&[&str], Option<&str>) = if path.ends_with("/chat/completions") {
            let default = if native(to) {
                "max_completion_tokens"
            } else {
                "max_tokens"
            };
            (&["max_completion_tokens", "max_tokens"], Some(default))
        } else if path.ends_with("/responses") {
            (&["max_output_tokens"], Some("max_output_tokens"))
        } else if path.ends_with("/completions") {
            (&["max_tokens"], Some("max_tokens"))
        } else {
            return false; // embeddings and the rest have no output to cap
        };
        cap_fields(body, fields, default, cap)
    }

    fn credential(&self, to: Upstream<'_>, key: &str) -> (&'static str, String) {
        if is_azure(to.host) {
            ("api-key", key.to_string())
        } else {
            ("authorization", format!("Bearer {key}"))
        }
    }

    fn error_body(&self, status: u16, message: &str, code: &str, _: Option<Duration>) -> String {
        let kind = match status {
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
            .to_string()
    }

    fn rate_limit_headers(&self, hint: &RateLimitHint<'_>) -> Vec<(String, String)> {
        let kind = if hint.which == "requests" {
            "requests"
        } else {
            "tokens"
        };
        let secs = hint.retry_after.as_secs_f64();
        vec![
            (format!("x-ratelimit-limit-{kind}"), hint.limit.to_string()),
            (
                format!("x-ratelimit-remaining-{kind}"),
                hint.remaining.to_string(),
            ),
            (format!("x-ratelimit-reset-{kind}"), format!("{secs:.3}s")),
        ]
    }
}

/// `usage` of chat/completions/embeddings (prompt_/completion_), of the
/// responses and images APIs (input_/output_, `input_tokens_details`), or
/// of the Realtime API (`input_token_details`, with the cached share of
/// each modality in `cached_tokens_details`).
pub(super) fn usage(u: &Value) -> Usage {
    let (input, output, input_details, output_details) = if u.get("input_tokens").is_some() {
        let details = if u.get("input_token_details").is_some() {
            "input_token_details"
        } else {
            "input_tokens_details"
        };
        let out = if u.get("output_token_details").is_some() {
            "output_token_details"
        } else {
            "output_tokens_details"
        };
        ("input_tokens", "output_tokens", details, out)
    } else {
        (
            "prompt_tokens",
            "completion_tokens",
            "prompt_tokens_details",
            "completion_tokens_details",
        )
    };
    Usage {
        input_tokens: num(u, &[input]),
        output_tokens: num(u, &[output]),
        cached_input_tokens: num(u, &[input_details, "cached_tokens"]),
        reasoning_tokens: num(u, &[output_details, "reasoning_tokens"]),
        audio_input_tokens: num(u, &[input_details, "audio_tokens"]).saturating_sub(num(
            u,
            &[input_details, "cached_tokens_details", "audio_tokens"],
        )),
        image_input_tokens: num(u, &[input_details, "image_tokens"]).saturating_sub(num(
            u,
            &[input_details, "cached_tokens_details", "image_tokens"],
        )),
        audio_output_tokens: num(u, &[output_details, "audio_tokens"]),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Api, ResponseParser, parse_request};
    use super::*;

    fn parse(ct: &str, body: &str) -> super::super::ResponseInfo {
        let mut p = ResponseParser::new(Api::Openai, ct, 0);
        // Uneven chunks, as a network delivers them.
        for c in body.as_bytes().chunks(7) {
            p.feed(c);
        }
        p.finish()
    }

    #[test]
    fn audio_tokens_are_counted_apart() {
        let r = parse(
            "application/json",
            include_str!("fixtures/openai_chat_audio.json"),
        );
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 142,
                output_tokens: 118,
                audio_input_tokens: 126,
                audio_output_tokens: 101,
                ..Default::default()
            }
        );
        // The Realtime API's `response.done` usage: each modality's cached
        // share is priced as cached, not again as audio or image.
        let realtime = serde_json::json!({
            "total_tokens": 1500, "input_tokens": 1200, "output_tokens": 300,
            "input_token_details": {
                "cached_tokens": 320, "text_tokens": 150, "audio_tokens": 1000, "image_tokens": 50,
                "cached_tokens_details": {"text_tokens": 64, "audio_tokens": 256, "image_tokens": 0}
            },
            "output_token_details": {"text_tokens": 60, "audio_tokens": 240}
        });
        assert_eq!(
            usage(&realtime),
            Usage {
                input_tokens: 1200,
                output_tokens: 300,
                cached_input_tokens: 320,
                audio_input_tokens: 1000 - 256,
                image_input_tokens: 50,
                audio_output_tokens: 240,
                ..Default::default()
            }
        );
    }

    #[test]
    fn chat_json_usage() {
        let r = parse(
            "application/json",
            include_str!("fixtures/openai_chat.json"),
        );
        assert_eq!(r.response_model.as_deref(), Some("gpt-4o-2024-08-06"));
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 1117,
                output_tokens: 46,
                cached_input_tokens: 1024,
                reasoning_tokens: 12,
                ..Default::default()
            }
        );
    }

    #[test]
    fn chat_stream_usage_from_include_usage_chunk() {
        let r = parse(
            "text/event-stream",
            include_str!("fixtures/openai_chat_stream.sse"),
        );
        assert_eq!(r.response_model.as_deref(), Some("gpt-4o-mini-2024-07-18"));
        assert!(r.complete, "[DONE] ends the call");
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 9,
                output_tokens: 2,
                ..Default::default()
            }
        );
    }

    #[test]
    fn responses_stream_usage_from_completed_event() {
        let r = parse(
            "text/event-stream; charset=utf-8",
            include_str!("fixtures/openai_responses_stream.sse"),
        );
        assert_eq!(r.response_model.as_deref(), Some("o4-mini-2025-04-16"));
        assert!(r.complete, "response.completed ends the call");
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 37,
                output_tokens: 140,
                reasoning_tokens: 128,
                ..Default::default()
            }
        );
    }

    #[test]
    fn reasoning_tokens_seen_only_in_usage_are_counted() {
        // o3 thought 1856 tokens and wrote "42": the text alone would say 1.
        let r = parse(
            "text/event-stream",
            include_str!("fixtures/openai_reasoning_stream.sse"),
        );
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 31,
                output_tokens: 1858,
                reasoning_tokens: 1856,
                ..Default::default()
            }
        );
        assert!(
            r.provider_usage.is_none(),
            "OpenAI's own numbers are the normalised ones"
        );
    }

    #[test]
    fn tool_call_arguments_count_toward_an_estimate() {
        let cut = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"name\":\"get\",\"arguments\":\"{\\\"city\\\": \"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"\\\"Paris\\\"}\"}}]}}]}\n\n",
        );
        let r = parse("text/event-stream", cut);
        assert!(r.usage.estimated);
        // `{"city": ` + `"Paris"}` = 17 characters ≈ 5 tokens.
        assert_eq!(r.usage.output_tokens, 5);
    }

    #[test]
    fn which_streams_are_asked_for_usage() {
        use super::super::adapter;
        let openai = Upstream {
            provider: "openai",
            host: "api.openai.com",
        };
        let azure = Upstream {
            provider: "azure",
            host: "res.openai.azure.com",
        };
        let chat = "/v1/chat/completions";
        let azure_chat = "/openai/deployments/d/chat/completions";
        let cases: &[(Upstream, &str, &str, &str, Option<Ask>)] = &[
            (openai, chat, "", r#"{"stream":true}"#, Some(Ask::Insert)),
            (
                openai,
                "/v1/completions",
                "",
                r#"{"stream":true}"#,
                Some(Ask::Insert),
            ),
            (
                openai,
                chat,
                "",
                r#"{"stream":true,"stream_options":{}}"#,
                Some(Ask::Set),
            ),
            (
                openai,
                chat,
                "",
                r#"{"stream":true,"stream_options":{"include_usage":false}}"#,
                Some(Ask::Set),
            ),
            (
                openai,
                chat,
                "",
                r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
                None,
            ),
            (openai, chat, "", r#"{"stream":false}"#, None),
            (openai, chat, "", r#"{}"#, None),
            (openai, "/v1/responses", "", r#"{"stream":true}"#, None),
            (openai, "/v1/embeddings", "", r#"{"stream":true}"#, None),
            (
                azure,
                azure_chat,
                "api-version=2024-10-21",
                r#"{"stream":true}"#,
                Some(Ask::Insert),
            ),
            (
                azure,
                azure_chat,
                "x=1&api-version=2025-04-01-preview",
                r#"{"stream":true}"#,
                Some(Ask::Insert),
            ),
            (
                azure,
                azure_chat,
                "api-version=2024-06-01",
                r#"{"stream":true}"#,
                None,
            ),
            (azure, azure_chat, "", r#"{"stream":true}"#, None),
            (
                azure,
                "/openai/v1/chat/completions",
                "api-version=preview",
                r#"{"stream":true}"#,
                Some(Ask::Insert),
            ),
        ];
        for (to, path, query, body, want) in cases {
            let v: Value = serde_json::from_str(body).unwrap();
            assert_eq!(
                adapter(Api::Openai).stream_usage(*to, path, query, &v),
                *want,
                "{} {path}?{query} {body}",
                to.host
            );
        }
    }

    #[test]
    fn embeddings_usage() {
        let r = parse(
            "application/json",
            include_str!("fixtures/openai_embeddings.json"),
        );
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 8,
                ..Default::default()
            }
        );
    }

    #[test]
    fn stream_cut_before_usage_is_estimated() {
        let full = include_str!("fixtures/openai_chat_stream.sse");
        let cut = &full[..full.find("\"finish_reason\":\"stop\"").unwrap()];
        let r = parse("text/event-stream", cut);
        assert!(!r.complete);
        assert!(r.usage.estimated);
        assert_eq!(
            r.usage.output_tokens, 3,
            "\"Hello world\" = 11 chars ≈ 3 tokens"
        );
    }

    #[test]
    fn requests() {
        let body = br#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
        let r = parse_request(Api::Openai, "/v1/chat/completions", body);
        assert_eq!(
            r,
            RequestInfo {
                operation: Operation::Chat,
                model: Some("gpt-4o".into()),
                stream: true
            }
        );
        let r = parse_request(
            Api::Openai,
            "/openai/deployments/my-gpt4o/chat/completions?api-version=2024-10-21",
            b"{\"messages\":[]}",
        );
        assert_eq!(
            r,
            RequestInfo {
                operation: Operation::Chat,
                model: Some("my-gpt4o".into()),
                stream: false
            }
        );
        assert_eq!(
            parse_request(Api::Openai, "/v1/responses", br#"{"model":"o4-mini"}"#).operation,
            "responses"
        );
        assert_eq!(
            parse_request(Api::Openai, "/v1/completions", b"{}").operation,
            "completions"
        );
        assert_eq!(
            parse_request(Api::Openai, "/v1/embeddings", b"{}").operation,
            "embeddings"
        );
        assert_eq!(
            parse_request(Api::Openai, "/v1/models", b"").operation,
            "other"
        );
        // Batch, files and Realtime are their own operations (OpenAI and Azure paths).
        for (path, op) in [
            ("/v1/batches", "batch"),
            ("/v1/batches/batch_abc123/cancel", "batch"),
            ("/openai/batches", "batch"),
            ("/v1/files", "files"),
            ("/v1/files/file-abc123/content", "files"),
            ("/v1/uploads/upload_abc/parts", "files"),
            ("/v1/realtime", "realtime"),
            ("/v1/realtime/sessions", "realtime"),
            ("/v1/fine_tuning/jobs", "other"),
            ("/v1/profiles", "other"),
        ] {
            assert_eq!(
                parse_request(Api::Openai, path, b"").operation,
                op,
                "{path}"
            );
        }
    }
}
