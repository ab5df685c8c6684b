//! OpenAI and OpenAI-compatible APIs (Azure OpenAI, Mistral, Groq, DeepSeek,
//! OpenRouter, …): chat completions, responses, completions, embeddings.
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::{
    Api, ParseState, RequestInfo, Usage,
    adapter::{Adapter, RateLimitHint, Upstream, cap_fields, set_body_model},
    model_and_usage, num,
    sse::SseEvent,
    stream_flag, string,
};

/// The OpenAI-compatible family.
#[derive(Debug)]
pub struct OpenAi;

/// Azure OpenAI: an OpenAI-compatible API with its own key header and
/// deployment paths.
pub fn is_azure(host: &str) -> bool {
    host.ends_with(".openai.azure.com")
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

    fn request(&self, path: &str, _query: &str, body: Option<&Value>) -> RequestInfo {
        let operation = if path.ends_with("/chat/completions") {
            "chat"
        } else if path.ends_with("/responses") {
            "responses"
        } else if path.ends_with("/completions") {
            "completions"
        } else if path.ends_with("/embeddings") {
            "embeddings"
        } else {
            "other"
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
            model: body.and_then(|b| string(b, "model")).or(azure_deployment),
            stream: stream_flag(body),
        }
    }

    fn on_json(&self, state: &mut ParseState, v: &Value) {
        model_and_usage(state, v, usage)
    }

    fn on_event(&self, state: &mut ParseState, e: &SseEvent) {
        if e.data == "[DONE]" {
            state.complete = true;
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(&e.data) else {
            return;
        };
        match v.get("type").and_then(Value::as_str) {
            // Responses API stream.
            Some("response.output_text.delta") | Some("response.reasoning_summary_text.delta") => {
                state.text_chars += v
                    .get("delta")
                    .and_then(Value::as_str)
                    .map_or(0, |d| d.chars().count() as u64);
            }
            Some("response.completed") | Some("response.incomplete") | Some("response.failed") => {
                state.complete = true;
                if let Some(r) = v.get("response") {
                    self.on_json(state, r);
                }
            }
            Some(_) => {}
            // Chat / completions chunks.
            None => {
                if let Some(m) = string(&v, "model") {
                    state.response_model = Some(m);
                }
                for c in v
                    .get("choices")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let text = c
                        .pointer("/delta/content")
                        .or_else(|| c.get("text"))
                        .and_then(Value::as_str);
                    state.text_chars += text.map_or(0, |t| t.chars().count() as u64);
                }
                // include_usage: the last chunk carries usage (null before).
                if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                    state.usage = Some(usage(u));
                }
            }
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

/// `usage` of chat/completions/embeddings (prompt_/completion_) or of the
/// responses API (input_/output_).
fn usage(u: &Value) -> Usage {
    if u.get("input_tokens").is_some() {
        Usage {
            input_tokens: num(u, &["input_tokens"]),
            output_tokens: num(u, &["output_tokens"]),
            cached_input_tokens: num(u, &["input_tokens_details", "cached_tokens"]),
            reasoning_tokens: num(u, &["output_tokens_details", "reasoning_tokens"]),
            ..Default::default()
        }
    } else {
        Usage {
            input_tokens: num(u, &["prompt_tokens"]),
            output_tokens: num(u, &["completion_tokens"]),
            cached_input_tokens: num(u, &["prompt_tokens_details", "cached_tokens"]),
            reasoning_tokens: num(u, &["completion_tokens_details", "reasoning_tokens"]),
            ..Default::default()
        }
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
                operation: "chat",
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
                operation: "chat",
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
    }
}
