//! Gemini API: generateContent and streamGenerateContent.
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::{
    Api, Operation, ParseState, RequestInfo, Usage,
    adapter::{Adapter, RateLimitHint, Upstream, lower},
    num,
    sse::SseEvent,
    string,
};

#[derive(Debug)]
pub struct Gemini;

impl Adapter for Gemini {
    fn api(&self) -> Api {
        Api::Gemini
    }

    fn request(&self, path: &str, _query: &str, _body: Option<&Value>) -> RequestInfo {
        let (model, method) = model_and_method(path).unzip();
        let operation = match method {
            Some("generateContent") | Some("streamGenerateContent") => Operation::GenerateContent,
            Some("embedContent") | Some("batchEmbedContents") => Operation::Embeddings,
            Some("batchGenerateContent") => Operation::Batch,
            _ if path.contains("/batches") => Operation::Batch,
            _ if path.contains("/files") => Operation::Files,
            _ => Operation::Other,
        };
        RequestInfo {
            operation,
            model: model.map(str::to_owned),
            stream: method == Some("streamGenerateContent"),
        }
    }

    fn on_json(&self, state: &mut ParseState, v: &Value) {
        match v {
            // streamGenerateContent without alt=sse answers a JSON array of chunks.
            Value::Array(chunks) => chunks.iter().for_each(|c| on_chunk(state, c)),
            other => on_chunk(state, other),
        }
    }

    fn on_event(&self, state: &mut ParseState, e: &SseEvent) {
        if let Ok(v) = serde_json::from_str::<Value>(&e.data) {
            on_chunk(state, &v);
        }
    }

    /// The model is in the path: `…/models/{model}:{method}`.
    fn set_model(&self, path: &mut String, _: &mut Map<String, Value>, model: &str) -> bool {
        let Some(start) = path.find("/models/").map(|i| i + "/models/".len()) else {
            return false;
        };
        let Some(end) = path[start..].find(':').map(|i| start + i) else {
            return false;
        };
        *path = format!("{}{}{}", &path[..start], model, &path[end..]);
        true
    }

    fn cap_output(
        &self,
        _: Upstream<'_>,
        path: &str,
        body: &mut Map<String, Value>,
        cap: u64,
    ) -> bool {
        if !(path.ends_with(":generateContent") || path.ends_with(":streamGenerateContent")) {
            return false;
        }
        let gc = body
            .entry("generationConfig")
            .or_insert_with(|| Value::Object(Default::default()));
        gc.as_object_mut()
            .is_some_and(|gc| lower(gc, "maxOutputTokens", cap, true))
    }

    fn credential(&self, _: Upstream<'_>, key: &str) -> (&'static str, String) {
        ("x-goog-api-key", key.to_string())
    }

    /// google.rpc.Status, as the Gemini API returns it; a retry hint as RetryInfo.
    fn error_body(
        &self,
        status: u16,
        message: &str,
        _code: &str,
        retry: Option<Duration>,
    ) -> String {
        let s = match status {
            400 | 413 => "INVALID_ARGUMENT",
            401 => "UNAUTHENTICATED",
            403 => "PERMISSION_DENIED",
            404 => "NOT_FOUND",
            429 => "RESOURCE_EXHAUSTED",
            504 => "DEADLINE_EXCEEDED",
            503 | 502 => "UNAVAILABLE",
            _ => "INTERNAL",
        };
        let mut e = json!({"error": {"code": status, "message": message, "status": s}});
        if let Some(r) = retry {
            e["error"]["details"] = json!([{
                "@type": "type.googleapis.com/google.rpc.RetryInfo",
                "retryDelay": format!("{}s", r.as_secs_f64().ceil() as u64)
            }]);
        }
        e.to_string()
    }

    /// Gemini says when to retry in the body (RetryInfo), not in headers.
    fn rate_limit_headers(&self, _: &RateLimitHint<'_>) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// `/v1beta/models/{model}:{method}` → (model, method).
fn model_and_method(path: &str) -> Option<(&str, &str)> {
    let (_, rest) = path.split_once("/models/")?;
    rest.split_once(':')
}

/// Gemini's candidatesTokenCount excludes thinking; normalised so output
/// counts every generated token and reasoning is the thinking share.
fn usage(u: &Value) -> Usage {
    let thoughts = num(u, &["thoughtsTokenCount"]);
    Usage {
        input_tokens: num(u, &["promptTokenCount"]),
        output_tokens: num(u, &["candidatesTokenCount"]).saturating_add(thoughts),
        cached_input_tokens: num(u, &["cachedContentTokenCount"]),
        reasoning_tokens: thoughts,
        audio_input_tokens: modality(u, "promptTokensDetails", "AUDIO").saturating_sub(modality(
            u,
            "cacheTokensDetails",
            "AUDIO",
        )),
        image_input_tokens: modality(u, "promptTokensDetails", "IMAGE").saturating_sub(modality(
            u,
            "cacheTokensDetails",
            "IMAGE",
        )),
        audio_output_tokens: modality(u, "candidatesTokensDetails", "AUDIO"),
        ..Default::default()
    }
}

/// Tokens of one modality in a `[{modality, tokenCount}]` list of usageMetadata.
fn modality(u: &Value, list: &str, which: &str) -> u64 {
    u.get(list)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|d| d.get("modality").and_then(Value::as_str) == Some(which))
        .map(|d| num(d, &["tokenCount"]))
        .fold(0, u64::saturating_add)
}

fn on_chunk(state: &mut ParseState, v: &Value) {
    if let Some(m) = string(v, "modelVersion") {
        state.response_model = Some(m);
    }
    for c in v
        .get("candidates")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        // The last chunk of a response carries the finish reason.
        if c.get("finishReason").is_some_and(|r| !r.is_null()) {
            state.complete = true;
        }
        for p in c
            .pointer("/content/parts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(t) = p.get("text").and_then(Value::as_str) {
                state.saw_text(t);
            }
        }
    }
    // Each chunk's usageMetadata is cumulative: the last one wins.
    if let Some(u) = v.get("usageMetadata").filter(|u| u.is_object()) {
        state.usage = Some(usage(u));
        state.saw_usage(u);
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Api, ResponseParser, parse_request};
    use super::*;

    fn parse(ct: &str, body: &str) -> super::super::ResponseInfo {
        let mut p = ResponseParser::new(Api::Gemini, ct, 0);
        for c in body.as_bytes().chunks(11) {
            p.feed(c);
        }
        p.finish()
    }

    #[test]
    fn generate_content_json_usage() {
        let r = parse(
            "application/json; charset=UTF-8",
            include_str!("fixtures/gemini_generate.json"),
        );
        assert_eq!(r.response_model.as_deref(), Some("gemini-2.5-flash"));
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 8,
                output_tokens: 7 + 25,
                cached_input_tokens: 4,
                reasoning_tokens: 25,
                ..Default::default()
            }
        );
    }

    #[test]
    fn audio_input_is_counted_apart_of_its_cached_share() {
        let r = parse(
            "application/json",
            include_str!("fixtures/gemini_audio.json"),
        );
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 1210,
                output_tokens: 9,
                cached_input_tokens: 200,
                audio_input_tokens: 1000,
                ..Default::default()
            }
        );
    }

    #[test]
    fn stream_usage_last_chunk_wins() {
        let r = parse(
            "text/event-stream",
            include_str!("fixtures/gemini_stream.sse"),
        );
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 9,
                output_tokens: 5 + 16,
                reasoning_tokens: 16,
                ..Default::default()
            }
        );
    }

    #[test]
    fn json_array_stream_form() {
        let one = include_str!("fixtures/gemini_generate.json");
        let r = parse("application/json", &format!("[{one},{one}]"));
        assert_eq!(r.usage.input_tokens, 8);
    }

    #[test]
    fn requests() {
        let r = parse_request(
            Api::Gemini,
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            b"{}",
        );
        assert_eq!(
            r,
            RequestInfo {
                operation: Operation::GenerateContent,
                model: Some("gemini-2.5-flash".into()),
                stream: true
            }
        );
        let r = parse_request(
            Api::Gemini,
            "/v1beta/models/gemini-2.5-pro:generateContent",
            b"{}",
        );
        assert_eq!(
            r,
            RequestInfo {
                operation: Operation::GenerateContent,
                model: Some("gemini-2.5-pro".into()),
                stream: false
            }
        );
        assert_eq!(
            parse_request(Api::Gemini, "/v1beta/models", b"").operation,
            "other"
        );
        for (path, op) in [
            (
                "/v1beta/models/gemini-2.5-flash:batchGenerateContent",
                "batch",
            ),
            ("/v1beta/batches/abc123", "batch"),
            ("/upload/v1beta/files", "files"),
            ("/v1beta/files/abc-123", "files"),
        ] {
            assert_eq!(
                parse_request(Api::Gemini, path, b"").operation,
                op,
                "{path}"
            );
        }
    }
}
