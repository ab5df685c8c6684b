//! The Bedrock adapter's tables: paths, rewrites, caps, usage of every
//! body and stream shape, signatures, error shapes.
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

/// Every family's stream ends with Bedrock's invocation metrics, so the
/// families whose chunks carry no usage of their own (Cohere, AI21,
/// Mistral) are counted exactly too; their text is seen for estimates of
/// cut streams.
#[test]
fn every_familys_stream_is_counted_from_the_invocation_metrics() {
    let chunk = |v: Value| {
        let b = base64::engine::general_purpose::STANDARD.encode(v.to_string());
        encode("event", "chunk", json!({"bytes": b}).to_string().as_bytes())
    };
    let metrics = json!({"inputTokenCount": 14, "outputTokenCount": 6,
                         "invocationLatency": 400, "firstByteLatency": 90});
    let families = [
        // Cohere Command R: `text-generation` events, then `stream-end`.
        (
            json!({"is_finished": false, "event_type": "text-generation", "text": "Hola"}),
            json!({"is_finished": true, "event_type": "stream-end", "finish_reason": "COMPLETE",
                   "amazon-bedrock-invocationMetrics": metrics}),
        ),
        // Cohere Command (legacy).
        (
            json!({"generations": [{"text": "Hola", "finish_reason": null}]}),
            json!({"generations": [{"text": "", "finish_reason": "COMPLETE"}],
                   "is_finished": true, "amazon-bedrock-invocationMetrics": metrics}),
        ),
        // AI21 Jamba: OpenAI's chunk shape.
        (
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"content": "Hola"}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                   "amazon-bedrock-invocationMetrics": metrics}),
        ),
        // Mistral text completion.
        (
            json!({"outputs": [{"text": "Hola", "stop_reason": null}]}),
            json!({"outputs": [{"text": "", "stop_reason": "stop"}],
                   "amazon-bedrock-invocationMetrics": metrics}),
        ),
        // Mistral Large chat: whole messages per chunk.
        (
            json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hola"}}]}),
            json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": ""},
                                "stop_reason": "stop"}], "amazon-bedrock-invocationMetrics": metrics}),
        ),
    ];
    for (text, last) in families {
        let mut s = chunk(text.clone());
        s.extend(chunk(last.clone()));
        let r = parse(ES, &s, &HeaderMap::new());
        assert_eq!(
            (
                r.usage.input_tokens,
                r.usage.output_tokens,
                r.usage.estimated,
                r.text_chars
            ),
            (14, 6, false, 4),
            "{text} {last}"
        );
        // Cut before the last chunk: estimated, from the text seen.
        let r = parse(ES, &chunk(text.clone()), &HeaderMap::new());
        assert!(r.usage.estimated && r.text_chars == 4, "{text}");
    }
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
    let v: Value =
        serde_json::from_str(&Bedrock.error_body(429, "slow", "r", Some(Duration::from_secs(1))))
            .unwrap();
    assert_eq!(v["__type"], "ThrottlingException");
}
