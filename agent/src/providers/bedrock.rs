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
        // Cohere Command R (`text`), Command (`generations`), AI21 Jamba
        // and Mistral's chat models (OpenAI's chunk shape).
        .or_else(|| c.get("text"))
        .or_else(|| c.pointer("/generations/0/text"))
        .or_else(|| c.pointer("/choices/0/delta/content"))
        .or_else(|| c.pointer("/choices/0/message/content"))
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
#[path = "bedrock_tests.rs"]
mod tests;
