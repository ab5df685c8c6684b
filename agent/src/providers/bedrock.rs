//! AWS Bedrock runtime (`bedrock-runtime.<region>.amazonaws.com`):
//! `Converse`, `ConverseStream`, `InvokeModel`,
//! `InvokeModelWithResponseStream`. The model is in the path
//! (`/model/{modelId}/{action}`, percent-encoded: ids have `:`, inference
//! profile ARNs `/`); usage comes from Converse's `usage`, from the model's
//! own body under InvokeModel (Anthropic, Amazon Nova and Titan, Meta), from
//! the `x-amzn-bedrock-*-token-count` headers Bedrock adds to InvokeModel
//! answers, and from the event-stream frames of the streamed calls
//! (ConverseStream's `metadata` event, the `amazon-bedrock-invocationMetrics`
//! of InvokeModelWithResponseStream's last chunk).
use std::time::Duration;

use base64::Engine;
use http::HeaderMap;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use serde_json::{Map, Value, json};

use super::{
    Api, Operation, ParseState, RequestInfo, Usage,
    adapter::{Adapter, RateLimitHint, Upstream, cap_fields, lower},
    event_stream::Event,
    num,
    sse::SseEvent,
};

#[derive(Debug)]
pub struct Bedrock;

/// What a path segment keeps unencoded when a model id is written back
/// (RFC 3986 unreserved), as the AWS SDKs encode a label.
const LABEL: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `/model/{modelId}/{action}` → (the id as sent, still encoded; action).
fn model_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/model/")?;
    let (id, action) = rest.split_once('/')?;
    (!id.is_empty() && !action.contains('/')).then_some((id, action))
}

/// The model a path's id names: percent-decoded, and for a foundation
/// model's or an inference profile's ARN the id it ends in
/// (`arn:aws:bedrock:us-east-1:1:inference-profile/us.anthropic.claude-…`
/// → `us.anthropic.claude-…`). Other ARNs (application inference profiles,
/// provisioned or custom models) are opaque and stay whole.
pub fn model_id(raw: &str) -> String {
    let id = percent_decode_str(raw).decode_utf8_lossy();
    if id.starts_with("arn:") && id.contains(":bedrock:") {
        for kind in ["foundation-model/", "inference-profile/"] {
            if let Some(i) = id.find(kind).filter(|i| id[..*i].ends_with(':')) {
                return id[i + kind.len()..].to_string();
            }
        }
    }
    id.into_owned()
}

/// The headers a workload's AWS SigV4 signature covers (lowercase, from
/// its `Authorization: AWS4-HMAC-SHA256 …, SignedHeaders=a;b, …`), or None
/// when the request is not SigV4-signed (a Bedrock API key, nothing).
pub fn signed_headers(headers: &HeaderMap) -> Option<Vec<String>> {
    let auth = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let rest = auth.strip_prefix("AWS4-HMAC-SHA256")?;
    let list = rest
        .split(',')
        .find_map(|p| p.trim().strip_prefix("SignedHeaders="))
        .unwrap_or("");
    Some(
        list.split(';')
            .filter(|h| !h.is_empty())
            .map(str::to_ascii_lowercase)
            .collect(),
    )
}

fn is_embedding(model: &str) -> bool {
    model.contains("embed")
}

impl Adapter for Bedrock {
    fn api(&self) -> Api {
        Api::Bedrock
    }

    fn request(&self, path: &str, _query: &str, _body: Option<&Value>) -> RequestInfo {
        let Some((raw, action)) = model_path(path) else {
            let operation = if path.starts_with("/async-invoke") {
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
        let model = model_id(raw);
        let operation = match action {
            "converse" | "converse-stream" => Operation::Chat,
            "invoke" | "invoke-with-response-stream" if is_embedding(&model) => {
                Operation::Embeddings
            }
            "invoke" | "invoke-with-response-stream" => Operation::Chat,
            _ => Operation::Other,
        };
        RequestInfo {
            operation,
            stream: matches!(action, "converse-stream" | "invoke-with-response-stream"),
            model: Some(model),
        }
    }

    fn on_json(&self, state: &mut ParseState, v: &Value) {
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            state.saw_usage(u);
            state.usage = Some(if u.get("inputTokens").is_some() {
                converse_usage(u)
            } else {
                super::anthropic::usage(u)
            });
        } else if v.get("prompt_token_count").is_some() {
            // Meta Llama.
            state.usage = Some(Usage {
                input_tokens: num(v, &["prompt_token_count"]),
                output_tokens: num(v, &["generation_token_count"]),
                ..Default::default()
            });
        } else if v.get("inputTextTokenCount").is_some() {
            // Amazon Titan (text: results[].tokenCount; embeddings: input only).
            let output = v
                .get("results")
                .and_then(Value::as_array)
                .map_or(0, |r| r.iter().map(|x| num(x, &["tokenCount"])).sum());
            state.usage = Some(Usage {
                input_tokens: num(v, &["inputTextTokenCount"]),
                output_tokens: output,
                ..Default::default()
            });
        }
        if let Some(t) = v
            .pointer("/output/message/content")
            .and_then(Value::as_array)
        {
            for block in t {
                if let Some(s) = block.get("text").and_then(Value::as_str) {
                    state.saw_text(s);
                }
            }
        }
    }

    fn on_event(&self, _state: &mut ParseState, _e: &SseEvent) {}

    fn on_binary_event(&self, state: &mut ParseState, e: &Event<'_>) {
        if e.message_type != "event" {
            return;
        }
        let Ok(v) = serde_json::from_slice::<Value>(e.payload) else {
            return;
        };
        match e.event_type {
            // ConverseStream.
            "contentBlockDelta" => {
                let d = v.get("delta");
                let text = d
                    .and_then(|d| {
                        d.get("text")
                            .or_else(|| d.pointer("/reasoningContent/text"))
                            .or_else(|| d.pointer("/toolUse/input"))
                    })
                    .and_then(Value::as_str);
                if let Some(t) = text {
                    state.saw_text(t);
                }
            }
            "metadata" => {
                if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                    state.saw_usage(u);
                    state.usage = Some(converse_usage(u));
                    state.complete = true;
                }
            }
            // InvokeModelWithResponseStream: the model's own chunk, base64.
            "chunk" => {
                let Some(chunk) = v
                    .get("bytes")
                    .and_then(Value::as_str)
                    .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                else {
                    return;
                };
                on_model_chunk(state, &chunk);
            }
            _ => {}
        }
    }

    fn usage_from_headers(&self, headers: &HeaderMap) -> Option<Usage> {
        let count = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let input = count("x-amzn-bedrock-input-token-count")?;
        let cache_read = count("x-amzn-bedrock-cache-read-input-token-count").unwrap_or(0);
        let cache_write = count("x-amzn-bedrock-cache-write-input-token-count").unwrap_or(0);
        Some(Usage {
            input_tokens: input.saturating_add(cache_read).saturating_add(cache_write),
            output_tokens: count("x-amzn-bedrock-output-token-count").unwrap_or(0),
            cached_input_tokens: cache_read,
            cache_write_input_tokens: cache_write,
            ..Default::default()
        })
    }

    /// The model is the path's label: written back percent-encoded.
    fn set_model(&self, path: &mut String, _: &mut Map<String, Value>, model: &str) -> bool {
        let Some((_, action)) = model_path(path.split('?').next().unwrap_or("")) else {
            return false;
        };
        let query = path.split_once('?').map(|(_, q)| format!("?{q}"));
        *path = format!(
            "/model/{}/{action}{}",
            utf8_percent_encode(model, LABEL),
            query.unwrap_or_default()
        );
        true
    }

    /// Converse's `inferenceConfig.maxTokens`; under InvokeModel the field
    /// of the model's own body (Anthropic `max_tokens`, Meta `max_gen_len`,
    /// Nova `inferenceConfig.max_new_tokens`, Titan
    /// `textGenerationConfig.maxTokenCount`), set when absent only for an
    /// Anthropic body (the one family that requires it).
    fn cap_output(
        &self,
        _: Upstream<'_>,
        path: &str,
        body: &mut Map<String, Value>,
        cap: u64,
    ) -> bool {
        let Some((_, action)) = model_path(path) else {
            return false;
        };
        let nested = |body: &mut Map<String, Value>, outer: &str, key: &str, set: bool| {
            let o = body
                .entry(outer)
                .or_insert_with(|| Value::Object(Default::default()));
            o.as_object_mut().is_some_and(|o| lower(o, key, cap, set))
        };
        match action {
            "converse" | "converse-stream" => nested(body, "inferenceConfig", "maxTokens", true),
            "invoke" | "invoke-with-response-stream" => {
                if body.contains_key("anthropic_version") {
                    cap_fields(body, &["max_tokens"], Some("max_tokens"), cap)
                } else if body.contains_key("inferenceConfig") {
                    nested(body, "inferenceConfig", "max_new_tokens", false)
                } else if body.contains_key("textGenerationConfig") {
                    nested(body, "textGenerationConfig", "maxTokenCount", false)
                } else {
                    cap_fields(body, &["max_gen_len", "max_tokens"], None, cap)
                }
            }
            _ => false,
        }
    }

    /// A Bedrock API key (`AWS_BEARER_TOKEN_BEDROCK`) is a bearer token.
    fn credential(&self, _: Upstream<'_>, key: &str) -> (&'static str, String) {
        ("authorization", format!("Bearer {key}"))
    }

    /// AWS's JSON error shape: the SDKs take the error code from `__type`
    /// (boto3 raises `ClientError` with it, `AccessDeniedException` for a
    /// 403, `ThrottlingException` for a 429) and show `message`.
    fn error_body(&self, status: u16, message: &str, _code: &str, _: Option<Duration>) -> String {
        let kind = match status {
            400 | 413 => "ValidationException",
            401 | 403 => "AccessDeniedException",
            404 => "ResourceNotFoundException",
            429 => "ThrottlingException",
            503 => "ServiceUnavailableException",
            504 => "ModelTimeoutException",
            _ => "InternalServerException",
        };
        json!({"__type": kind, "message": message}).to_string()
    }

    fn rate_limit_headers(&self, _: &RateLimitHint<'_>) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// Converse's usage (and Nova's under InvokeModel): cache reads and writes
/// apart from `inputTokens`, normalised into it.
fn converse_usage(u: &Value) -> Usage {
    let cache_read = num(u, &["cacheReadInputTokens"]);
    let cache_write = num(u, &["cacheWriteInputTokens"]);
    Usage {
        input_tokens: num(u, &["inputTokens"])
            .saturating_add(cache_read)
            .saturating_add(cache_write),
        output_tokens: num(u, &["outputTokens"]),
        cached_input_tokens: cache_read,
        cache_write_input_tokens: cache_write,
        ..Default::default()
    }
}

/// One chunk of InvokeModelWithResponseStream, in the model's own shape:
/// its text for estimates, and the usage Bedrock appends to the last one.
fn on_model_chunk(state: &mut ParseState, c: &Value) {
    let text = c
        .pointer("/delta/text")
        .or_else(|| c.pointer("/delta/partial_json"))
        .or_else(|| c.get("generation"))
        .or_else(|| c.get("outputText"))
        .or_else(|| c.pointer("/contentBlockDelta/delta/text"))
        .or_else(|| c.pointer("/outputs/0/text"))
        .and_then(Value::as_str);
    if let Some(t) = text {
        state.saw_text(t);
    }
    if let Some(m) = c
        .get("amazon-bedrock-invocationMetrics")
        .filter(|m| m.is_object())
    {
        state.saw_usage(m);
        let cache_read = num(m, &["cacheReadInputTokenCount"]);
        let cache_write = num(m, &["cacheWriteInputTokenCount"]);
        state.usage = Some(Usage {
            input_tokens: num(m, &["inputTokenCount"])
                .saturating_add(cache_read)
                .saturating_add(cache_write),
            output_tokens: num(m, &["outputTokenCount"]),
            cached_input_tokens: cache_read,
            cache_write_input_tokens: cache_write,
            ..Default::default()
        });
        state.complete = true;
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ResponseParser, event_stream::encode, parse_request};
    use super::*;

    #[test]
    fn model_and_operation_from_the_path() {
        let cases = [
            (
                "/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/converse",
                Operation::Chat,
                Some("anthropic.claude-3-5-haiku-20241022-v1:0"),
                false,
            ),
            (
                "/model/us.anthropic.claude-sonnet-4-5-20250929-v1:0/converse-stream",
                Operation::Chat,
                Some("us.anthropic.claude-sonnet-4-5-20250929-v1:0"),
                true,
            ),
            (
                "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile%2Fus.amazon.nova-pro-v1%3A0/invoke",
                Operation::Chat,
                Some("us.amazon.nova-pro-v1:0"),
                false,
            ),
            (
                "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A%3Afoundation-model%2Fmeta.llama3-1-8b-instruct-v1%3A0/invoke-with-response-stream",
                Operation::Chat,
                Some("meta.llama3-1-8b-instruct-v1:0"),
                true,
            ),
            (
                // An application inference profile is opaque: the ARN stays.
                "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Aapplication-inference-profile%2Fabc123/converse",
                Operation::Chat,
                Some("arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc123"),
                false,
            ),
            (
                "/model/amazon.titan-embed-text-v2%3A0/invoke",
                Operation::Embeddings,
                Some("amazon.titan-embed-text-v2:0"),
                false,
            ),
            ("/model/x/count-tokens", Operation::Other, Some("x"), false),
            ("/async-invoke", Operation::Batch, None, false),
            (
                "/guardrail/g1/version/1/apply",
                Operation::Other,
                None,
                false,
            ),
            ("/model//converse", Operation::Other, None, false),
        ];
        for (path, op, model, stream) in cases {
            let r = parse_request(Api::Bedrock, path, b"{}");
            assert_eq!(r.operation, op, "{path}");
            assert_eq!(r.model.as_deref(), model, "{path}");
            assert_eq!(r.stream, stream, "{path}");
        }
    }

    #[test]
    fn a_rewritten_model_is_written_back_encoded() {
        let mut path = "/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse".to_string();
        assert!(Bedrock.set_model(
            &mut path,
            &mut Map::new(),
            "us.anthropic.claude-haiku-4-5-20251001-v1:0"
        ));
        assert_eq!(
            path,
            "/model/us.anthropic.claude-haiku-4-5-20251001-v1%3A0/converse"
        );
        let r = parse_request(Api::Bedrock, &path, b"");
        assert_eq!(
            r.model.as_deref(),
            Some("us.anthropic.claude-haiku-4-5-20251001-v1:0")
        );
        let mut other = "/guardrail/g".to_string();
        assert!(!Bedrock.set_model(&mut other, &mut Map::new(), "m"));
    }

    fn up() -> Upstream<'static> {
        Upstream {
            provider: "bedrock",
            host: "bedrock-runtime.us-east-1.amazonaws.com",
        }
    }

    #[test]
    fn output_caps_per_action_and_body() {
        let cap = |path: &str, body: Value| {
            let mut b = body.as_object().unwrap().clone();
            let changed = Bedrock.cap_output(up(), path, &mut b, 100);
            (changed, Value::Object(b))
        };
        let (c, b) = cap("/model/m/converse", json!({"messages": []}));
        assert!(c);
        assert_eq!(b["inferenceConfig"]["maxTokens"], 100);
        let (c, b) = cap(
            "/model/m/converse-stream",
            json!({"inferenceConfig": {"maxTokens": 50}}),
        );
        assert!(!c);
        assert_eq!(b["inferenceConfig"]["maxTokens"], 50);
        let (c, b) = cap(
            "/model/m/invoke",
            json!({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 4096}),
        );
        assert!(c);
        assert_eq!(b["max_tokens"], 100);
        let (c, b) = cap(
            "/model/m/invoke",
            json!({"anthropic_version": "bedrock-2023-05-31"}),
        );
        assert!(c);
        assert_eq!(b["max_tokens"], 100);
        let (c, b) = cap(
            "/model/m/invoke",
            json!({"prompt": "x", "max_gen_len": 512}),
        );
        assert!(c);
        assert_eq!(b["max_gen_len"], 100);
        let (c, b) = cap(
            "/model/m/invoke",
            json!({"inferenceConfig": {"max_new_tokens": 900}}),
        );
        assert!(c);
        assert_eq!(b["inferenceConfig"]["max_new_tokens"], 100);
        let (c, b) = cap(
            "/model/m/invoke",
            json!({"textGenerationConfig": {"maxTokenCount": 10}}),
        );
        assert!(!c);
        assert_eq!(b["textGenerationConfig"]["maxTokenCount"], 10);
        let (c, _) = cap("/model/m/invoke", json!({"inputText": "embed me"}));
        assert!(!c, "nothing to cap, nothing set");
    }

    fn parse(ct: &str, body: &[u8], headers: &HeaderMap) -> super::super::ResponseInfo {
        let mut p = ResponseParser::new(Api::Bedrock, ct, 0).with_headers(headers);
        for c in body.chunks(7) {
            p.feed(c);
        }
        p.finish()
    }

    #[test]
    fn usage_of_converse_and_invoke_bodies() {
        let none = HeaderMap::new();
        let converse = json!({
            "output": {"message": {"role": "assistant", "content": [{"text": "Hello"}]}},
            "stopReason": "end_turn",
            "usage": {"inputTokens": 12, "outputTokens": 5, "totalTokens": 17,
                      "cacheReadInputTokens": 100, "cacheWriteInputTokens": 3},
            "metrics": {"latencyMs": 300}
        });
        let r = parse("application/json", converse.to_string().as_bytes(), &none);
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 115,
                output_tokens: 5,
                cached_input_tokens: 100,
                cache_write_input_tokens: 3,
                ..Default::default()
            }
        );
        let cases = [
            (
                json!({"type": "message", "usage": {"input_tokens": 9, "output_tokens": 4}}),
                (9, 4),
            ),
            (
                json!({"output": {}, "usage": {"inputTokens": 7, "outputTokens": 2}}),
                (7, 2),
            ),
            (
                json!({"generation": "hi", "prompt_token_count": 11, "generation_token_count": 3}),
                (11, 3),
            ),
            (
                json!({"inputTextTokenCount": 6, "results": [{"tokenCount": 8}, {"tokenCount": 1}]}),
                (6, 9),
            ),
            (
                json!({"embedding": [0.1], "inputTextTokenCount": 4}),
                (4, 0),
            ),
        ];
        for (body, (i, o)) in cases {
            let r = parse("application/json", body.to_string().as_bytes(), &none);
            assert_eq!(
                (
                    r.usage.input_tokens,
                    r.usage.output_tokens,
                    r.usage.estimated
                ),
                (i, o, false),
                "{body}"
            );
        }
        // A body without usage (Mistral): Bedrock's headers count it.
        let mut h = HeaderMap::new();
        h.insert("x-amzn-bedrock-input-token-count", "21".parse().unwrap());
        h.insert("x-amzn-bedrock-output-token-count", "13".parse().unwrap());
        let r = parse("application/json", br#"{"outputs":[{"text":"hi"}]}"#, &h);
        assert_eq!(
            (
                r.usage.input_tokens,
                r.usage.output_tokens,
                r.usage.estimated
            ),
            (21, 13, false)
        );
        // The body's own usage wins over the headers.
        let r = parse(
            "application/json",
            br#"{"usage":{"inputTokens":1,"outputTokens":2}}"#,
            &h,
        );
        assert_eq!((r.usage.input_tokens, r.usage.output_tokens), (1, 2));
    }

    const ES: &str = "application/vnd.amazon.eventstream";

    #[test]
    fn converse_stream_usage_from_its_metadata_event() {
        let mut s = encode("event", "messageStart", br#"{"role":"assistant"}"#);
        s.extend(encode(
            "event",
            "contentBlockDelta",
            br#"{"contentBlockIndex":0,"delta":{"text":"Hel"}}"#,
        ));
        s.extend(encode(
            "event",
            "contentBlockDelta",
            br#"{"contentBlockIndex":0,"delta":{"text":"lo"}}"#,
        ));
        s.extend(encode(
            "event",
            "messageStop",
            br#"{"stopReason":"end_turn"}"#,
        ));
        s.extend(encode("event", "metadata", br#"{"usage":{"inputTokens":25,"outputTokens":2,"totalTokens":27},"metrics":{"latencyMs":80}}"#));
        let r = parse(ES, &s, &HeaderMap::new());
        assert_eq!(
            (
                r.usage.input_tokens,
                r.usage.output_tokens,
                r.usage.estimated
            ),
            (25, 2, false)
        );
        assert!(r.complete);
        assert_eq!(r.text_chars, 5);
        // Cut before metadata: estimated from the text seen.
        let cut = &s[..s.len() - 40];
        let r = parse(ES, cut, &HeaderMap::new());
        assert!(r.usage.estimated && !r.complete);
    }

    #[test]
    fn invoke_stream_usage_from_the_invocation_metrics() {
        let chunk = |v: Value| {
            let b = base64::engine::general_purpose::STANDARD.encode(v.to_string());
            encode("event", "chunk", json!({"bytes": b}).to_string().as_bytes())
        };
        let mut s = chunk(
            json!({"type": "message_start", "message": {"usage": {"input_tokens": 30, "output_tokens": 1}}}),
        );
        s.extend(chunk(json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi there"}})));
        s.extend(chunk(json!({"type": "message_stop", "amazon-bedrock-invocationMetrics":
            {"inputTokenCount": 30, "outputTokenCount": 9, "invocationLatency": 500, "firstByteLatency": 100}})));
        let r = parse(ES, &s, &HeaderMap::new());
        assert_eq!(
            (
                r.usage.input_tokens,
                r.usage.output_tokens,
                r.usage.estimated
            ),
            (30, 9, false)
        );
        assert_eq!(r.text_chars, 8);
        // A mid-stream exception is not usage.
        let mut e = chunk(json!({"generation": "ab"}));
        e.extend(encode(
            "exception",
            "throttlingException",
            br#"{"message":"Too many requests"}"#,
        ));
        let r = parse(ES, &e, &HeaderMap::new());
        assert!(r.usage.estimated);
        assert_eq!(r.text_chars, 2);
    }

    #[test]
    fn the_signed_headers_of_a_sigv4_request() {
        let mut h = HeaderMap::new();
        assert_eq!(signed_headers(&h), None);
        h.insert("authorization", "Bearer ABSKbedrockkey".parse().unwrap());
        assert_eq!(
            signed_headers(&h),
            None,
            "a Bedrock API key is no signature"
        );
        h.insert(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20251203/us-east-1/bedrock/aws4_request, SignedHeaders=Content-Type;host;x-amz-date, Signature=abc"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            signed_headers(&h).unwrap(),
            ["content-type", "host", "x-amz-date"]
        );
    }

    #[test]
    fn refusals_have_the_aws_error_shape() {
        let v: Value =
            serde_json::from_str(&Bedrock.error_body(403, "denied by tollgate", "rule:x", None))
                .unwrap();
        assert_eq!(v["__type"], "AccessDeniedException");
        assert_eq!(v["message"], "denied by tollgate");
        let v: Value = serde_json::from_str(&Bedrock.error_body(
            429,
            "slow",
            "r",
            Some(Duration::from_secs(1)),
        ))
        .unwrap();
        assert_eq!(v["__type"], "ThrottlingException");
    }
}
