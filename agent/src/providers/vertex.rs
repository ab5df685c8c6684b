//! Google Vertex AI (`aiplatform.googleapis.com`,
//! `<region>-aiplatform.googleapis.com`): publisher models addressed by the
//! path, `/v1/projects/{p}/locations/{l}/publishers/{publisher}/models/{model}:{method}`.
//! Google's own models (`publishers/google`) speak the Gemini API
//! (`generateContent`, `streamGenerateContent`, `embedContent`); Anthropic's
//! (`publishers/anthropic`) the Messages API (`rawPredict`,
//! `streamRawPredict`, the model in the path instead of the body). Each
//! answer is read by the family's own parser, told apart by its shape (a
//! Messages object or event has a `type`; Gemini's have `candidates` and
//! `usageMetadata`).
use std::time::Duration;

use serde_json::{Map, Value};

use super::{
    Api, Operation, ParseState, RequestInfo,
    adapter::{Adapter, RateLimitHint, Upstream, cap_fields},
    anthropic::Anthropic,
    gemini::Gemini,
    sse::SseEvent,
};

#[derive(Debug)]
pub struct Vertex;

/// (publisher, model, method) of a publisher-model path.
fn publisher_model(path: &str) -> Option<(&str, &str, &str)> {
    let (_, rest) = path.split_once("/publishers/")?;
    let (publisher, rest) = rest.split_once("/models/")?;
    let (model, method) = rest.split_once(':')?;
    (!publisher.contains('/') && !model.is_empty() && !model.contains('/'))
        .then_some((publisher, model, method))
}

impl Adapter for Vertex {
    fn api(&self) -> Api {
        Api::Vertex
    }

    fn request(&self, path: &str, _query: &str, _body: Option<&Value>) -> RequestInfo {
        let Some((publisher, model, method)) = publisher_model(path) else {
            let operation = if path.contains("/batchPredictionJobs") {
                Operation::Batch
            } else {
                Operation::Other
            };
            return RequestInfo {
                operation,
                model: None,
                stream: false,
            };
        };
        let operation = match (publisher, method) {
            (_, "generateContent" | "streamGenerateContent") => Operation::GenerateContent,
            (_, "embedContent" | "batchEmbedContents") => Operation::Embeddings,
            ("anthropic", "rawPredict" | "streamRawPredict") => Operation::Messages,
            _ => Operation::Other,
        };
        RequestInfo {
            operation,
            model: Some(model.to_string()),
            stream: matches!(method, "streamGenerateContent" | "streamRawPredict"),
        }
    }

    fn on_json(&self, state: &mut ParseState, v: &Value) {
        if is_messages(v) {
            Anthropic.on_json(state, v)
        } else {
            Gemini.on_json(state, v)
        }
    }

    fn on_event(&self, state: &mut ParseState, e: &SseEvent) {
        // A Messages stream names its events (`event: message_start`) and
        // each data object has a `type`; Gemini's SSE events do neither.
        let messages = !e.event.is_empty()
            || serde_json::from_str::<Value>(&e.data).is_ok_and(|v| is_messages(&v));
        if messages {
            Anthropic.on_event(state, e)
        } else {
            Gemini.on_event(state, e)
        }
    }

    /// The model is in the path, for both publishers.
    fn set_model(&self, path: &mut String, body: &mut Map<String, Value>, model: &str) -> bool {
        Gemini.set_model(path, body, model)
    }

    fn cap_output(
        &self,
        to: Upstream<'_>,
        path: &str,
        body: &mut Map<String, Value>,
        cap: u64,
    ) -> bool {
        match publisher_model(path) {
            Some(("anthropic", _, "rawPredict" | "streamRawPredict")) => {
                cap_fields(body, &["max_tokens"], Some("max_tokens"), cap)
            }
            Some((_, _, "generateContent" | "streamGenerateContent")) => {
                // Gemini's cap reads the method off the path's end.
                Gemini.cap_output(to, path, body, cap)
            }
            _ => false,
        }
    }

    /// A Google OAuth access token (what `gcloud auth print-access-token`
    /// or a service account's token grant gives).
    fn credential(&self, _: Upstream<'_>, key: &str) -> (&'static str, String) {
        ("authorization", format!("Bearer {key}"))
    }

    /// Vertex answers errors as google.rpc.Status, for every publisher.
    fn error_body(
        &self,
        status: u16,
        message: &str,
        code: &str,
        retry: Option<Duration>,
    ) -> String {
        Gemini.error_body(status, message, code, retry)
    }

    fn rate_limit_headers(&self, _: &RateLimitHint<'_>) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// An Anthropic Messages object or stream event (they carry `type`).
fn is_messages(v: &Value) -> bool {
    v.get("type").and_then(Value::as_str).is_some()
}

#[cfg(test)]
mod tests {
    use super::super::{ResponseParser, Usage, parse_request};
    use super::*;

    const GEMINI: &str = "/v1/projects/p-1/locations/us-central1/publishers/google/models/gemini-2.5-flash:streamGenerateContent";
    const CLAUDE: &str = "/v1/projects/p-1/locations/us-east5/publishers/anthropic/models/claude-sonnet-4-5@20250929:rawPredict";

    #[test]
    fn model_and_operation_from_the_path() {
        let cases = [
            (
                GEMINI,
                Operation::GenerateContent,
                Some("gemini-2.5-flash"),
                true,
            ),
            (
                "/v1beta1/projects/p/locations/global/publishers/google/models/gemini-2.5-pro:generateContent",
                Operation::GenerateContent,
                Some("gemini-2.5-pro"),
                false,
            ),
            (
                CLAUDE,
                Operation::Messages,
                Some("claude-sonnet-4-5@20250929"),
                false,
            ),
            (
                "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-haiku-4-5@20251001:streamRawPredict",
                Operation::Messages,
                Some("claude-haiku-4-5@20251001"),
                true,
            ),
            (
                "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-embedding-001:embedContent",
                Operation::Embeddings,
                Some("gemini-embedding-001"),
                false,
            ),
            (
                "/v1/projects/p/locations/us-central1/batchPredictionJobs",
                Operation::Batch,
                None,
                false,
            ),
            (
                "/v1/projects/p/locations/l/endpoints/123:predict",
                Operation::Other,
                None,
                false,
            ),
        ];
        for (path, op, model, stream) in cases {
            let r = parse_request(Api::Vertex, path, b"{}");
            assert_eq!(
                (r.operation, r.model.as_deref(), r.stream),
                (op, model, stream),
                "{path}"
            );
        }
    }

    #[test]
    fn rewrites_and_caps_per_publisher() {
        let mut p = CLAUDE.to_string();
        assert!(Vertex.set_model(&mut p, &mut Map::new(), "claude-haiku-4-5@20251001"));
        assert!(
            p.ends_with("/publishers/anthropic/models/claude-haiku-4-5@20251001:rawPredict"),
            "{p}"
        );
        let up = Upstream {
            provider: "vertex",
            host: "us-east5-aiplatform.googleapis.com",
        };
        let mut body =
            serde_json::json!({"anthropic_version": "vertex-2023-10-16", "max_tokens": 4096})
                .as_object()
                .unwrap()
                .clone();
        assert!(Vertex.cap_output(up, CLAUDE, &mut body, 100));
        assert_eq!(body["max_tokens"], 100);
        let mut body = Map::new();
        let gemini = GEMINI.replace(":streamGenerateContent", ":generateContent");
        assert!(Vertex.cap_output(up, &gemini, &mut body, 50));
        assert_eq!(body["generationConfig"]["maxOutputTokens"], 50);
    }

    fn parse(ct: &str, body: &str) -> Usage {
        let mut p = ResponseParser::new(Api::Vertex, ct, 0);
        for c in body.as_bytes().chunks(9) {
            p.feed(c);
        }
        p.finish().usage
    }

    #[test]
    fn answers_are_read_by_their_familys_parser() {
        let gemini = r#"{"candidates":[{"content":{"parts":[{"text":"hi"}]}}],"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":3,"totalTokenCount":11}}"#;
        let u = parse("application/json", gemini);
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.estimated),
            (8, 3, false)
        );
        let sse = format!("data: {gemini}\r\n\r\n");
        let u = parse("text/event-stream", &sse);
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.estimated),
            (8, 3, false)
        );
        let claude = r#"{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":12,"cache_read_input_tokens":2,"output_tokens":5}}"#;
        let u = parse("application/json", claude);
        assert_eq!(
            (u.input_tokens, u.cached_input_tokens, u.output_tokens),
            (14, 2, 5)
        );
        let stream = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\n\
                      event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":9}}\n\n\
                      event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        let u = parse("text/event-stream", stream);
        assert_eq!(
            (u.input_tokens, u.output_tokens, u.estimated),
            (12, 9, false)
        );
    }
}
