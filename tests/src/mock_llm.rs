//! The mock provider's LLM answers, in the providers' real wire formats
//! (OpenAI chat completions JSON and SSE with `include_usage`, Anthropic
//! messages JSON and SSE, Gemini generateContent JSON and SSE). The usage numbers are constants here so the tests
//! assert that what Tollgate recorded equals what the provider reported.

/// Usage the mock reports, in the provider's own terms.
pub struct MockUsage {
    pub input: u64,
    pub output: u64,
    pub cached: u64,
}

pub const OPENAI_MODEL: &str = "gpt-4o-mini-2024-07-18";
/// prompt_tokens 23 (5 of them cached), completion_tokens 7.
pub const OPENAI_USAGE: MockUsage = MockUsage {
    input: 23,
    output: 7,
    cached: 5,
};
pub const ANTHROPIC_MODEL: &str = "claude-sonnet-4-5-20250929";
/// input_tokens 27 + cache_read_input_tokens 4 (Tollgate records 31 input, 4 cached), output_tokens 9.
pub const ANTHROPIC_USAGE: MockUsage = MockUsage {
    input: 27,
    output: 9,
    cached: 4,
};
pub const GEMINI_MODEL: &str = "gemini-2.5-flash";
/// promptTokenCount 19 (3 cached), candidatesTokenCount 11 + thoughtsTokenCount 6
/// (Tollgate records 17 output, 6 of them reasoning).
pub const GEMINI_USAGE: MockUsage = MockUsage {
    input: 19,
    output: 11,
    cached: 3,
};
pub const GEMINI_THOUGHTS: u64 = 6;
/// The streamed text, one SSE event per word.
pub const STREAM_WORDS: [&str; 4] = ["Hello", " from", " the", " mock"];

/// Provider misbehaviour the tests ask for through the request's `model`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// `mock-cut`: two stream events, then the connection closes abruptly
    /// (no TLS close_notify, no end of stream); `mock-cut-early`: the same
    /// right after the response headers.
    Cut,
    /// `mock-stall`: two stream events, then silence (bounded at 30 s).
    Stall,
    /// `mock-late`: the response headers come only after 30 s.
    LateHeaders,
    /// `mock-think`: a whole JSON answer (with usage) whose headers come
    /// after THINK, as a slow non-streamed completion's do.
    Think,
}

/// How long `mock-think` takes before its response headers.
pub const THINK: std::time::Duration = std::time::Duration::from_millis(1500);

/// Replaced in each `mock-timed` piece by the time it is sent (`monotonic_ns`).
pub const SENT_NS: &str = "{SENT_NS}";
/// Pieces of a `mock-timed` stream (`mock-timed-<pieces>x<ms>` chooses).
pub const TIMED_CHUNKS: usize = 20;

/// `mock-timed` (TIMED_CHUNKS pieces 1 ms apart) or `mock-timed-<N>x<ms>`:
/// pieces and the pause between them.
fn timed(model: &str) -> Option<(usize, std::time::Duration)> {
    let rest = model.strip_prefix("mock-timed")?;
    if rest.is_empty() {
        return Some((TIMED_CHUNKS, std::time::Duration::from_millis(1)));
    }
    let (n, ms) = rest.strip_prefix('-')?.split_once('x')?;
    Some((
        n.parse::<usize>().ok()?.min(10_000),
        std::time::Duration::from_millis(ms.parse::<u64>().ok()?.min(10_000)),
    ))
}

/// The benchmarks' chat completion: a realistic size (~1 KiB); `mock-2k` answers ~2 KiB.
pub const BENCH_CHAT: &str = concat!(
    r#"{"model":"mock-2k","temperature":0.2,"max_tokens":400,"messages":["#,
    r#"{"role":"system","content":"You are a support assistant for an online shop. Answer in two or three short paragraphs, cite the order number when the customer gives one, never invent tracking numbers, and hand over to a human when the customer asks for a refund above the automatic limit or mentions a legal complaint. Keep a friendly, plain tone."},"#,
    r#"{"role":"user","content":"Hello, I ordered a pair of running shoes last Tuesday (order 4471-2290) and the tracking page still says label created. The confirmation mail promised delivery within three working days. Could you tell me whether the parcel has left the warehouse, and if it has not, whether I can still change the size from 42 to 43 before it ships? I also noticed that the invoice lists the grey model while I picked the blue one, so please check which colour is actually packed. If the size change is no longer possible, what is the easiest way to exchange them after delivery? Thanks a lot."}"#,
    r#"]}"#
);

/// Prose repeated into the `mock-2k` answer.
const BENCH_ANSWER: &str = "The mock provider answers this benchmark call with ordinary prose. ";

/// CLOCK_MONOTONIC in ns: one clock for every process and namespace here.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Pause between streamed pieces; `mock-slow` streams at SLOW_CHUNK_DELAY.
pub const CHUNK_DELAY: std::time::Duration = std::time::Duration::from_millis(5);
pub const SLOW_CHUNK_DELAY: std::time::Duration = std::time::Duration::from_millis(300);

pub struct MockResponse {
    pub status: u16,
    pub fault: Fault,
    pub content_type: &'static str,
    /// Body pieces, written (and flushed) one at a time, like a provider streams.
    pub chunks: Vec<String>,
    /// Pause between pieces.
    pub chunk_delay: std::time::Duration,
}

/// The answer to `path` with request `body`, or None when it is not an LLM call.
pub fn respond(path: &str, body: &[u8]) -> Option<MockResponse> {
    let req: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let stream = req["stream"].as_bool().unwrap_or(false);
    let model = req["model"].as_str().unwrap_or("");
    if model == "mock-500" {
        let body = serde_json::json!({"error": {"message": "The server had an error while processing your request.", "type": "server_error", "param": null, "code": null}});
        return Some(MockResponse {
            status: 500,
            fault: Fault::None,
            content_type: "application/json",
            chunks: vec![body.to_string()],
            chunk_delay: CHUNK_DELAY,
        });
    }
    if let Some((chunks, delay)) = timed(model) {
        // Content events stamped with their send time, then stop and usage.
        // The stamp is in the content too (`t<ns>`), so it survives gateways
        // that re-serialise chunks and drop unknown fields.
        let mut r = openai_stream(true);
        let stamped = |_| {
            format!(
                "data: {{\"id\":\"chatcmpl-timed\",\"object\":\"chat.completion.chunk\",\"created\":1741570283,\"model\":\"{OPENAI_MODEL}\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{SENT_NS} \"}},\"finish_reason\":null}}],\"sent_ns\":{SENT_NS}}}\n\n"
            )
        };
        let tail = r.chunks.split_off(r.chunks.len() - 3); // stop, usage, [DONE]
        r.chunks = (0..chunks).map(stamped).chain(tail).collect();
        r.chunk_delay = delay;
        return Some(r);
    }
    if model == "mock-2k" && !stream {
        // A realistic answer size (~2 KiB of JSON) for the benchmarks.
        let mut r = openai_json();
        let mut body: serde_json::Value = serde_json::from_str(&r.chunks[0]).unwrap();
        body["choices"][0]["message"]["content"] = BENCH_ANSWER.repeat(22).into();
        r.chunks = vec![body.to_string()];
        return Some(r);
    }
    if model == "mock-slow" {
        // A full OpenAI stream with usage, one piece every SLOW_CHUNK_DELAY.
        let mut r = openai_stream(true);
        r.chunk_delay = SLOW_CHUNK_DELAY;
        return Some(r);
    }
    if model == "mock-think" {
        let mut r = openai_json();
        r.fault = Fault::Think;
        return Some(r);
    }
    let fault = match model {
        "mock-cut" | "mock-cut-early" => Fault::Cut,
        "mock-stall" => Fault::Stall,
        "mock-late" => Fault::LateHeaders,
        _ => Fault::None,
    };
    if fault != Fault::None {
        let mut r = openai_stream(false);
        // role chunk + two words; `mock-cut-early`: nothing after the headers
        r.chunks
            .truncate(if model == "mock-cut-early" { 0 } else { 3 });
        r.fault = fault;
        return Some(r);
    }
    // Azure OpenAI: `/openai/deployments/{deployment}/chat/completions`.
    if path.starts_with("/v1/chat/completions")
        || (path.starts_with("/openai/deployments/") && path.contains("/chat/completions"))
    {
        let include_usage = req["stream_options"]["include_usage"]
            .as_bool()
            .unwrap_or(false);
        return Some(if stream {
            openai_stream(include_usage)
        } else {
            openai_json()
        });
    }
    if path.starts_with("/v1/messages") {
        return Some(if stream {
            anthropic_stream()
        } else {
            anthropic_json()
        });
    }
    if path.starts_with("/v1beta/models/") {
        let path = path.split('?').next().unwrap_or_default();
        if path.ends_with(":streamGenerateContent") {
            return Some(gemini_stream());
        }
        if path.ends_with(":generateContent") {
            return Some(gemini_json());
        }
    }
    // Vertex AI publisher models: Gemini's API for Google's, the Messages
    // API (`rawPredict`) for Anthropic's.
    if let Some((_, rest)) = path.split_once("/publishers/") {
        let method = rest
            .split('?')
            .next()
            .unwrap_or_default()
            .rsplit(':')
            .next();
        return match method {
            Some("generateContent") => Some(gemini_json()),
            Some("streamGenerateContent") => Some(gemini_stream()),
            Some("rawPredict") => Some(anthropic_json()),
            Some("streamRawPredict") => Some(anthropic_stream()),
            _ => None,
        };
    }
    None
}

fn gemini_chunk(text: &str, last: bool) -> serde_json::Value {
    let u = &GEMINI_USAGE;
    let mut c = serde_json::json!({
        "candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}],
        "modelVersion": GEMINI_MODEL, "responseId": "mock-gemini-1"
    });
    if last {
        c["candidates"][0]["finishReason"] = "STOP".into();
        c["usageMetadata"] = serde_json::json!({
            "promptTokenCount": u.input, "candidatesTokenCount": u.output,
            "cachedContentTokenCount": u.cached, "thoughtsTokenCount": GEMINI_THOUGHTS,
            "totalTokenCount": u.input + u.output + GEMINI_THOUGHTS
        });
    }
    c
}

fn gemini_json() -> MockResponse {
    MockResponse {
        status: 200,
        fault: Fault::None,
        content_type: "application/json; charset=UTF-8",
        chunks: vec![gemini_chunk(&STREAM_WORDS.concat(), true).to_string()],
        chunk_delay: CHUNK_DELAY,
    }
}

/// `streamGenerateContent?alt=sse`: each event a whole response; usage in the last.
fn gemini_stream() -> MockResponse {
    let n = STREAM_WORDS.len();
    MockResponse {
        status: 200,
        fault: Fault::None,
        content_type: "text/event-stream",
        chunks: STREAM_WORDS
            .iter()
            .enumerate()
            .map(|(i, w)| format!("data: {}\r\n\r\n", gemini_chunk(w, i + 1 == n)))
            .collect(),
        chunk_delay: CHUNK_DELAY,
    }
}

fn openai_usage() -> serde_json::Value {
    let u = &OPENAI_USAGE;
    serde_json::json!({
        "prompt_tokens": u.input, "completion_tokens": u.output, "total_tokens": u.input + u.output,
        "prompt_tokens_details": {"cached_tokens": u.cached, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
    })
}

fn openai_json() -> MockResponse {
    let body = serde_json::json!({
        "id": "chatcmpl-mock1", "object": "chat.completion", "created": 1741570283, "model": OPENAI_MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": STREAM_WORDS.concat(), "refusal": null},
                     "logprobs": null, "finish_reason": "stop"}],
        "usage": openai_usage(), "service_tier": "default", "system_fingerprint": "fp_mock"
    });
    MockResponse {
        status: 200,
        fault: Fault::None,
        content_type: "application/json",
        chunks: vec![body.to_string()],
        chunk_delay: CHUNK_DELAY,
    }
}

/// The events of the mock's OpenAI chat stream, as it sends them, with or
/// without `stream_options.include_usage` (as OpenAI does: with it, every
/// chunk has `"usage":null` and a usage-only chunk comes before `[DONE]`).
pub fn openai_stream_events(include_usage: bool) -> Vec<String> {
    openai_stream(include_usage).chunks
}

fn openai_stream(include_usage: bool) -> MockResponse {
    let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
        let mut c = serde_json::json!({
            "id": "chatcmpl-mock2", "object": "chat.completion.chunk", "created": 1741570283, "model": OPENAI_MODEL,
            "system_fingerprint": "fp_mock", "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if include_usage {
            c["usage"] = serde_json::Value::Null;
        }
        format!("data: {c}\n\n")
    };
    let mut chunks = vec![chunk(
        serde_json::json!({"role": "assistant", "content": ""}),
        serde_json::Value::Null,
    )];
    for w in STREAM_WORDS {
        chunks.push(chunk(
            serde_json::json!({"content": w}),
            serde_json::Value::Null,
        ));
    }
    chunks.push(chunk(serde_json::json!({}), serde_json::json!("stop")));
    if include_usage {
        let c = serde_json::json!({
            "id": "chatcmpl-mock2", "object": "chat.completion.chunk", "created": 1741570283, "model": OPENAI_MODEL,
            "system_fingerprint": "fp_mock", "choices": [], "usage": openai_usage()
        });
        chunks.push(format!("data: {c}\n\n"));
    }
    chunks.push("data: [DONE]\n\n".into());
    MockResponse {
        status: 200,
        fault: Fault::None,
        content_type: "text/event-stream; charset=utf-8",
        chunks,
        chunk_delay: CHUNK_DELAY,
    }
}

fn anthropic_json() -> MockResponse {
    let u = &ANTHROPIC_USAGE;
    let body = serde_json::json!({
        "id": "msg_mock1", "type": "message", "role": "assistant", "model": ANTHROPIC_MODEL,
        "content": [{"type": "text", "text": STREAM_WORDS.concat()}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": u.input, "cache_creation_input_tokens": 0, "cache_read_input_tokens": u.cached, "output_tokens": u.output}
    });
    MockResponse {
        status: 200,
        fault: Fault::None,
        content_type: "application/json",
        chunks: vec![body.to_string()],
        chunk_delay: CHUNK_DELAY,
    }
}

fn anthropic_stream() -> MockResponse {
    let u = &ANTHROPIC_USAGE;
    let ev = |name: &str, data: serde_json::Value| format!("event: {name}\ndata: {data}\n\n");
    let mut chunks = vec![
        ev(
            "message_start",
            serde_json::json!({"type": "message_start", "message": {
            "id": "msg_mock2", "type": "message", "role": "assistant", "content": [], "model": ANTHROPIC_MODEL,
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": u.input, "cache_creation_input_tokens": 0, "cache_read_input_tokens": u.cached, "output_tokens": 1}}}),
        ),
        ev(
            "content_block_start",
            serde_json::json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ev("ping", serde_json::json!({"type": "ping"})),
    ];
    for w in STREAM_WORDS {
        chunks.push(ev("content_block_delta", serde_json::json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}})));
    }
    chunks.push(ev(
        "content_block_stop",
        serde_json::json!({"type": "content_block_stop", "index": 0}),
    ));
    chunks.push(ev("message_delta", serde_json::json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": u.output}})));
    chunks.push(ev(
        "message_stop",
        serde_json::json!({"type": "message_stop"}),
    ));
    MockResponse {
        status: 200,
        fault: Fault::None,
        content_type: "text/event-stream; charset=utf-8",
        chunks,
        chunk_delay: CHUNK_DELAY,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timed_streams_are_shaped_by_their_model_name() {
        let ms = std::time::Duration::from_millis;
        assert_eq!(timed("mock-timed"), Some((TIMED_CHUNKS, ms(1))));
        assert_eq!(timed("mock-timed-200x10"), Some((200, ms(10))));
        assert_eq!(timed("mock-timed-x10"), None);
        assert_eq!(timed("gpt-4o"), None);
        let body = br#"{"model":"mock-timed-3x0","stream":true}"#;
        let r = respond("/v1/chat/completions", body).unwrap();
        // 3 stamped pieces, then stop, usage, [DONE]
        assert_eq!(r.chunks.len(), 6);
        assert!(r.chunks[0].contains(&format!("\"content\":\"t{SENT_NS} \"")));
    }

    #[test]
    fn the_benchmark_answer_is_about_two_kib() {
        let r = respond("/v1/chat/completions", br#"{"model":"mock-2k"}"#).unwrap();
        let len = r.chunks[0].len();
        assert!((1800..2600).contains(&len), "{len} bytes");
        assert!(
            (900..1300).contains(&BENCH_CHAT.len()),
            "{} bytes",
            BENCH_CHAT.len()
        );
        let _: serde_json::Value = serde_json::from_str(BENCH_CHAT).unwrap();
    }
}
