//! Provider API adapters: what a request asks for (operation, model, stream)
//! and what the response reports (usage), for each API family.
//!
//! * `openai` — OpenAI and every OpenAI-compatible API (Azure OpenAI, Mistral,
//!   Groq, DeepSeek, OpenRouter, …): chat completions, responses, completions,
//!   embeddings.
//! * `anthropic` — messages.
//! * `gemini` — generateContent / streamGenerateContent.
//! * `bedrock` — AWS Bedrock runtime: Converse, InvokeModel and their streams.
//! * `vertex` — Google Vertex AI publisher models (Gemini; Anthropic's Messages).
//! * `mcp` — MCP servers' JSON-RPC (tools, resources, prompts).
//!
//! Responses are parsed as they are relayed (`ResponseParser::feed` per
//! chunk): SSE and AWS event-stream frames incrementally, JSON bodies once
//! complete (bounded).
pub mod adapter;
pub mod anthropic;
pub mod batch_input;
pub mod bedrock;
pub mod event_stream;
pub mod gemini;
pub mod mcp;
pub mod mcp_response;
pub mod openai;
mod openai_stream;
pub mod operation;
pub mod realtime;
pub mod rewrite;
pub mod sse;
pub mod stream_usage;
pub mod tokenizer;
pub mod vertex;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use adapter::{Adapter, RateLimitHint, Upstream};
pub use operation::Operation;

/// API family of a provider.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    #[default]
    Openai,
    Anthropic,
    Gemini,
    /// AWS Bedrock runtime (`bedrock-runtime.<region>.amazonaws.com`).
    Bedrock,
    /// Google Vertex AI (`<region>-aiplatform.googleapis.com`).
    Vertex,
    /// An MCP server (`mcp_servers`): JSON-RPC over streamable HTTP.
    Mcp,
}

impl Api {
    /// The family a built-in provider name implies; anything else is OpenAI-compatible.
    pub fn for_provider_name(name: &str) -> Api {
        match name {
            "anthropic" => Api::Anthropic,
            "gemini" => Api::Gemini,
            "bedrock" => Api::Bedrock,
            "vertex" => Api::Vertex,
            _ => Api::Openai,
        }
    }
}

/// The registry: the adapter for an API family.
pub fn adapter(api: Api) -> &'static dyn Adapter {
    match api {
        Api::Openai => &openai::OpenAi,
        Api::Anthropic => &anthropic::Anthropic,
        Api::Gemini => &gemini::Gemini,
        Api::Bedrock => &bedrock::Bedrock,
        Api::Vertex => &vertex::Vertex,
        Api::Mcp => &mcp::Mcp,
    }
}

/// What the request asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RequestInfo {
    pub operation: Operation,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub stream: bool,
}

/// Token usage of one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Input tokens served from the provider's prompt cache (part of input_tokens
    /// for OpenAI and Gemini; reported separately by Anthropic, added here).
    pub cached_input_tokens: u64,
    /// Input tokens written to the prompt cache (Anthropic's
    /// `cache_creation_input_tokens`, priced apart), part of input_tokens.
    #[serde(skip_serializing_if = "is_zero")]
    pub cache_write_input_tokens: u64,
    /// Reasoning ("thinking") tokens, part of output_tokens.
    pub reasoning_tokens: u64,
    /// Audio input tokens not served from the cache, part of input_tokens
    /// (priced apart: `pricing.models[].audio_input`).
    #[serde(skip_serializing_if = "is_zero")]
    pub audio_input_tokens: u64,
    /// Image input tokens, part of input_tokens (`image_input`).
    #[serde(skip_serializing_if = "is_zero")]
    pub image_input_tokens: u64,
    /// Audio output tokens, part of output_tokens (`audio_output`).
    #[serde(skip_serializing_if = "is_zero")]
    pub audio_output_tokens: u64,
    /// True when the provider sent no usage and these are estimated from the text seen.
    pub estimated: bool,
    /// The encoding an estimate was counted with (`o200k_base`, see
    /// `tokenizer`); absent for an estimate of four characters a token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_with: Option<&'static str>,
}

impl Usage {
    /// Add another call's (or response's) tokens to these.
    pub fn add(&mut self, other: &Usage) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cached_input_tokens += other.cached_input_tokens;
        self.cache_write_input_tokens += other.cache_write_input_tokens;
        self.reasoning_tokens += other.reasoning_tokens;
        self.audio_input_tokens += other.audio_input_tokens;
        self.image_input_tokens += other.image_input_tokens;
        self.audio_output_tokens += other.audio_output_tokens;
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Largest JSON response body kept for parsing usage (embeddings of a large
/// batch can be several MiB). Beyond it the body still passes; usage is estimated.
pub(crate) const MAX_JSON_BODY: usize = 16 * 1024 * 1024;
/// Characters per token for estimates (the common rule of thumb for English text).
const CHARS_PER_TOKEN: u64 = 4;

/// Tokens estimated for `chars` characters of text, where no provider has
/// counted them (before a call, or when its usage never came).
pub fn estimated_tokens(chars: u64) -> u64 {
    chars.div_ceil(CHARS_PER_TOKEN)
}

/// Parse the request: path (and query) plus the JSON body when there is one.
pub fn parse_request(api: Api, path: &str, body: &[u8]) -> RequestInfo {
    let json: Option<Value> = serde_json::from_slice(body).ok();
    parse_request_json(api, path, json.as_ref())
}

/// `parse_request` for a body already parsed (None: not JSON).
pub fn parse_request_json(api: Api, path: &str, json: Option<&Value>) -> RequestInfo {
    let (p, query) = path.split_once('?').unwrap_or((path, ""));
    adapter(api).request(p, query, json)
}

/// Accumulates what a response says as its bytes go by.
#[derive(Debug)]
pub struct ResponseParser {
    adapter: &'static dyn Adapter,
    sse: Option<sse::SseParser>,
    /// AWS event-stream framing (Bedrock's streamed answers).
    frames: Option<event_stream::EventStreamReader>,
    json: Vec<u8>,
    /// The body is not kept for parsing: not JSON, or over MAX_JSON_BODY.
    skip_json: bool,
    state: ParseState,
}

/// What adapters fill in while parsing.
#[derive(Debug, Default)]
pub struct ParseState {
    pub usage: Option<Usage>,
    /// The provider's usage objects as they came, merged (Anthropic splits
    /// usage over `message_start` and `message_delta`; the later wins).
    pub raw_usage: Option<serde_json::Map<String, Value>>,
    pub response_model: Option<String>,
    /// Characters of generated text seen (for estimates).
    pub text_chars: u64,
    /// The generated text's first `tokenizer::SAMPLE_BYTES`, when kept (see
    /// `ResponseParser::keep_text`).
    pub text: Option<String>,
    /// Characters of input text (from the request, for estimates).
    pub input_chars: u64,
    /// The response's own end marker was seen (`[DONE]`, `message_stop`,
    /// a final candidate, a complete JSON body): the call completed even if
    /// the client closes before the transport's end of body.
    pub complete: bool,
    /// What the response's headers said of usage (`Adapter::usage_from_headers`).
    pub header_usage: Option<Usage>,
}

/// The outcome of parsing one response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ResponseInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_model: Option<String>,
    pub usage: Usage,
    /// The provider's own usage object, when its numbers are not the
    /// normalised `usage` (see `RequestRecord::provider_usage`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_usage: Option<Value>,
    /// See `ParseState::complete`.
    #[serde(skip)]
    pub complete: bool,
    /// The sample of generated text kept for a tokenizer estimate, when the
    /// usage is estimated (see `ResponseParser::keep_text`).
    #[serde(skip)]
    pub text: Option<String>,
    /// Characters of generated text seen.
    #[serde(skip)]
    pub text_chars: u64,
}

impl ResponseParser {
    /// `content_type` of the response; `input_chars` of the request's text.
    pub fn new(api: Api, content_type: &str, input_chars: u64) -> Self {
        let sse = content_type
            .starts_with("text/event-stream")
            .then(sse::SseParser::default);
        // Only a JSON body (or one that does not say) is kept for parsing:
        // audio, images and file downloads pass without a copy.
        let frames = content_type
            .starts_with("application/vnd.amazon.eventstream")
            .then(event_stream::EventStreamReader::default);
        let json = sse.is_none()
            && frames.is_none()
            && (content_type.is_empty() || content_type.contains("json"));
        Self {
            adapter: adapter(api),
            sse,
            frames,
            json: Vec::new(),
            skip_json: !json,
            state: ParseState {
                input_chars,
                ..Default::default()
            },
        }
    }

    /// Keep a sample of the generated text, for a tokenizer's estimate if
    /// no usage comes (`tokenizer::estimate`).
    pub fn keep_text(mut self) -> Self {
        self.state.text = Some(String::new());
        self
    }

    /// Usage the response's headers state (Bedrock's token counts), taken
    /// when its body reports none.
    pub fn with_headers(mut self, headers: &http::HeaderMap) -> Self {
        self.state.header_usage = self.adapter.usage_from_headers(headers);
        self
    }

    pub fn feed(&mut self, chunk: &[u8]) {
        let (adapter, state) = (self.adapter, &mut self.state);
        if let Some(frames) = &mut self.frames {
            frames.feed(chunk, |e| adapter.on_binary_event(state, &e));
            return;
        }
        match &mut self.sse {
            Some(sse) => sse.feed(chunk, |e| adapter.on_event(state, e)),
            None => {
                if self.json.len() + chunk.len() > MAX_JSON_BODY {
                    self.skip_json = true;
                    self.json = Vec::new();
                } else if !self.skip_json {
                    self.json.extend_from_slice(chunk);
                }
            }
        }
    }

    /// Everything learned; estimates usage when the provider sent none
    /// (e.g. the client went away before the final event).
    pub fn finish(mut self) -> ResponseInfo {
        if self.sse.is_none()
            && self.frames.is_none()
            && !self.skip_json
            && let Some(v) = self
                .adapter
                .json_members()
                .and_then(|keys| members(&self.json, keys))
                .or_else(|| serde_json::from_slice::<Value>(&self.json).ok())
        {
            self.state.complete = true;
            self.adapter.on_json(&mut self.state, &v);
        }
        let usage = self
            .state
            .usage
            .or(self.state.header_usage)
            .unwrap_or(Usage {
                input_tokens: estimated_tokens(self.state.input_chars),
                output_tokens: estimated_tokens(self.state.text_chars),
                estimated: true,
                ..Default::default()
            });
        ResponseInfo {
            response_model: self.state.response_model,
            provider_usage: self
                .state
                .raw_usage
                .filter(|raw| !usage.estimated && !names_the_same(raw, &usage))
                .map(Value::Object),
            text: self.state.text.filter(|_| usage.estimated),
            text_chars: self.state.text_chars,
            usage,
            complete: self.state.complete,
        }
    }
}

/// The members `keys` of the JSON object `json`, parsed; the others are
/// skipped without being built. None when `json` is not one object (or
/// has a key with escapes, which no provider sends): parse it whole then.
fn members(json: &[u8], keys: &[&str]) -> Option<Value> {
    use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
    struct Pick<'k>(&'k [&'k str]);
    impl<'de> Visitor<'de> for Pick<'_> {
        type Value = serde_json::Map<String, Value>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut out = serde_json::Map::new();
            while let Some(k) = m.next_key::<&'de str>()? {
                if self.0.contains(&k) {
                    out.insert(k.to_string(), m.next_value::<Value>()?);
                } else {
                    m.next_value::<IgnoredAny>()?;
                }
            }
            Ok(out)
        }
    }
    impl<'de> DeserializeSeed<'de> for Pick<'_> {
        type Value = serde_json::Map<String, Value>;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    let picked = Pick(keys).deserialize(&mut de).ok()?;
    de.end().ok()?;
    Some(Value::Object(picked))
}

/// Whether the provider's usage object states the normalised input and
/// output counts as they are (OpenAI's do; Anthropic's with cache reads and
/// Gemini's with thoughts do not): only then is it left out of the record.
fn names_the_same(raw: &serde_json::Map<String, Value>, u: &Usage) -> bool {
    let has = |n: u64| raw.values().any(|v| v.as_u64() == Some(n));
    has(u.input_tokens) && has(u.output_tokens)
}

impl ParseState {
    /// Generated text (or tool-call arguments) seen in a response, for estimates.
    pub fn saw_text(&mut self, s: &str) {
        self.text_chars += s.chars().count() as u64;
        if let Some(t) = self.text.as_mut() {
            tokenizer::push_sample(t, s);
        }
    }

    /// A usage object from the provider: kept (merged over earlier ones)
    /// for the record.
    pub fn saw_usage(&mut self, u: &Value) {
        if let Some(o) = u.as_object() {
            let raw = self.raw_usage.get_or_insert_with(Default::default);
            for (k, v) in o {
                raw.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Number at `path` in a JSON value, 0 when absent. Saturates absurd values
/// (negative, fractional, > u64) instead of failing.
pub(crate) fn num(v: &Value, path: &[&str]) -> u64 {
    let mut cur = v;
    for p in path {
        match cur.get(p) {
            Some(next) => cur = next,
            None => return 0,
        }
    }
    cur.as_u64()
        .or_else(|| {
            cur.as_f64()
                .filter(|f| *f > 0.0)
                .map(|f| f.min(u64::MAX as f64) as u64)
        })
        .unwrap_or(0)
}

/// The `stream` flag of an OpenAI-style or Anthropic request body.
pub(crate) fn stream_flag(body: Option<&Value>) -> bool {
    body.and_then(|b| b.get("stream"))
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// A response object's `model` and `usage` (read by `usage`), where the
/// OpenAI-compatible and Anthropic APIs put them.
pub(crate) fn model_and_usage(state: &mut ParseState, v: &Value, usage: fn(&Value) -> Usage) {
    if let Some(m) = string(v, "model") {
        state.response_model = Some(m);
    }
    if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
        state.usage = Some(usage(u));
        state.saw_usage(u);
    }
}

/// Whether `/`-separated `path` has the segment `segment` (`/v1/files/f-1`
/// has `files`; `/v1/profiles` has not).
pub(crate) fn has_segment(path: &str, segment: &str) -> bool {
    path.split('/').any(|s| s == segment)
}

pub(crate) fn string(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_owned)
}

/// The output limit a request asks for (`max_completion_tokens`,
/// `max_tokens`, `max_output_tokens`, Gemini's `maxOutputTokens`), if any.
/// Any numeric form counts (`4096.0` asks for as much as `4096`).
pub fn output_limit(body: &Value) -> Option<u64> {
    let tokens = |v: &Value| v.as_f64().filter(|n| *n >= 0.0).map(|n| n.ceil() as u64);
    ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .find_map(|k| body.get(*k).and_then(tokens))
        .or_else(|| tokens(body.pointer("/generationConfig/maxOutputTokens")?))
}

/// Characters of text content in a request body, for estimates: every
/// string value under the keys providers use for text.
pub fn input_chars(body: &Value) -> u64 {
    let mut n = 0;
    walk_text(body, &mut |s| n += s.chars().count() as u64);
    n
}

/// Calls `f` with each string of a request's text, in order: every string
/// value under the keys providers use for text.
pub fn walk_text(v: &Value, f: &mut impl FnMut(&str)) {
    match v {
        Value::String(s) => f(s),
        Value::Array(a) => a.iter().for_each(|x| walk_text(x, f)),
        Value::Object(o) => {
            for (k, x) in o {
                if matches!(
                    k.as_str(),
                    "content"
                        | "text"
                        | "input"
                        | "prompt"
                        | "messages"
                        | "contents"
                        | "parts"
                        | "system"
                        | "instructions"
                ) {
                    walk_text(x, f);
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_saturate_instead_of_failing() {
        let v: Value = serde_json::json!({"a": {"b": 12}, "neg": -5, "big": 1e30, "s": "7"});
        assert_eq!(num(&v, &["a", "b"]), 12);
        assert_eq!(num(&v, &["neg"]), 0);
        assert_eq!(num(&v, &["big"]), u64::MAX);
        assert_eq!(num(&v, &["s"]), 0);
        assert_eq!(num(&v, &["missing", "x"]), 0);
    }

    #[test]
    fn only_the_members_read_are_parsed() {
        let body = br#"{"id":"x","choices":[{"message":{"content":"long \" text"}}],"model":"m","usage":{"prompt_tokens":3}}"#;
        assert_eq!(
            members(body, &["model", "usage"]),
            Some(serde_json::json!({"model": "m", "usage": {"prompt_tokens": 3}}))
        );
        // Not one object, or broken: the caller parses it whole (and fails).
        assert_eq!(members(b"[1,2]", &["model"]), None);
        assert_eq!(members(br#"{"model":"m"} trailing"#, &["model"]), None);
        assert_eq!(members(br#"{"mo\u0064el":"m"}"#, &["model"]), None);
    }

    #[test]
    fn estimates_when_no_usage_arrives() {
        let mut p = ResponseParser::new(Api::Openai, "text/event-stream", 40);
        p.feed(b"data: {\"model\":\"gpt-4o\",\"choices\":[{\"delta\":{\"content\":\"Hello there\"}}]}\n\n");
        let r = p.finish();
        assert!(r.usage.estimated);
        assert_eq!(r.usage.input_tokens, 10);
        assert_eq!(r.usage.output_tokens, 3);
        assert_eq!(r.response_model.as_deref(), Some("gpt-4o"));
    }

    #[test]
    fn bodies_that_are_not_json_are_not_kept() {
        let mut p = ResponseParser::new(Api::Openai, "audio/mpeg", 10);
        p.feed(&[0u8; 4096]);
        assert!(p.json.is_empty(), "no copy of an audio body");
        assert!(p.finish().usage.estimated);
        let mut p = ResponseParser::new(Api::Openai, "", 0);
        p.feed(br#"{"usage":{"prompt_tokens":3,"completion_tokens":4}}"#);
        assert_eq!(
            p.finish().usage.output_tokens,
            4,
            "no content type: still parsed"
        );
    }

    #[test]
    fn input_text_is_counted() {
        let v = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "abcd"}, {"role": "user", "content": [{"type": "text", "text": "efgh"}]}]});
        assert_eq!(
            input_chars(&v),
            8,
            "text only: roles and model names are not input text"
        );
    }

    #[test]
    fn garbage_bodies_never_panic() {
        for api in [Api::Openai, Api::Anthropic, Api::Gemini] {
            for ct in ["application/json", "text/event-stream"] {
                let mut p = ResponseParser::new(api, ct, 0);
                p.feed(b"\x00\xff{not json\n\ndata: {\"usage\": 5}\n\ndata: [1,2\n\n");
                let _ = p.finish();
            }
            let _ = parse_request(api, "/v1/x?y", b"\xff\xfe");
        }
    }
}
