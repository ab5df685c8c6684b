//! The Realtime API's events (OpenAI and Azure `/realtime` over WebSocket),
//! as far as governing a session needs them: the model a session runs, and
//! the usage of each response.
//!
//! Only text frames are looked at, and only those that can matter are
//! parsed: audio deltas (most of a voice session's bytes) are recognised by
//! their `type` without decoding their payload.
use serde_json::Value;

use super::{Usage, openai};

/// What one server event means to Tollgate.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerEvent {
    /// `session.created` / `session.updated`: the model the session runs.
    Session {
        model: Option<String>,
    },
    /// `response.done`: one response finished, with its usage.
    ResponseDone {
        usage: Usage,
        /// `completed`, `cancelled`, `failed`, `incomplete`.
        status: Option<String>,
    },
    /// `error`: the server refused something of the client's.
    Error,
    Other,
}

/// The event types worth a parse (the rest are relayed unread).
const READ: [&str; 4] = [
    "\"response.done\"",
    "\"session.created\"",
    "\"session.updated\"",
    "\"error\"",
];

/// Classify one server text frame.
pub fn server_event(text: &str) -> ServerEvent {
    // A cheap look before a parse: deltas carry large base64 payloads.
    if !READ.iter().any(|t| text.contains(t)) {
        return ServerEvent::Other;
    }
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return ServerEvent::Other;
    };
    match v.get("type").and_then(Value::as_str) {
        Some("response.done") => {
            let r = &v["response"];
            ServerEvent::ResponseDone {
                usage: r.get("usage").map(openai::usage).unwrap_or_default(),
                status: r.get("status").and_then(Value::as_str).map(str::to_owned),
            }
        }
        Some("session.created" | "session.updated") => ServerEvent::Session {
            model: v["session"]["model"].as_str().map(str::to_owned),
        },
        Some("error") => ServerEvent::Error,
        _ => ServerEvent::Other,
    }
}

/// The model a session URL names: OpenAI's `?model=`, Azure's
/// `?deployment=`.
pub fn model_in_query(query: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "model" || k == "deployment")
        .map(|(_, v)| v.into_owned())
        .filter(|m| !m.is_empty())
}

/// The Realtime `error` event that tells a client why Tollgate ends its
/// session (sent before the close frame).
pub fn error_event(code: &str, message: &str) -> String {
    serde_json::json!({
        "type": "error",
        "event_id": format!("event_tollgate_{}", uuid::Uuid::now_v7().simple()),
        "error": {
            "type": "invalid_request_error",
            "code": code,
            "message": message,
            "param": null,
            "event_id": null,
        }
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_read_for_their_model_and_usage() {
        let done = r#"{"type":"response.done","event_id":"e1","response":{"object":"realtime.response","id":"resp_1","status":"completed","output":[],"usage":{"total_tokens":253,"input_tokens":180,"output_tokens":73,"input_token_details":{"text_tokens":60,"audio_tokens":120,"image_tokens":0,"cached_tokens":64,"cached_tokens_details":{"text_tokens":0,"audio_tokens":64,"image_tokens":0}},"output_token_details":{"text_tokens":13,"audio_tokens":60}}}}"#;
        match server_event(done) {
            ServerEvent::ResponseDone { usage, status } => {
                assert_eq!(status.as_deref(), Some("completed"));
                assert_eq!((usage.input_tokens, usage.output_tokens), (180, 73));
                assert_eq!(usage.cached_input_tokens, 64);
                // Audio input not served from the cache, priced apart.
                assert_eq!(usage.audio_input_tokens, 120 - 64);
                assert_eq!(usage.audio_output_tokens, 60);
            }
            e => panic!("{e:?}"),
        }
        for (text, want) in [
            (
                r#"{"type":"session.created","event_id":"e0","session":{"type":"realtime","object":"realtime.session","id":"sess_1","model":"gpt-realtime-2025-08-28"}}"#,
                ServerEvent::Session {
                    model: Some("gpt-realtime-2025-08-28".into()),
                },
            ),
            (
                r#"{"type":"error","event_id":"e2","error":{"type":"invalid_request_error","message":"x"}}"#,
                ServerEvent::Error,
            ),
            // An audio delta is never parsed, even when its payload is not JSON-clean.
            (
                r#"{"type":"response.output_audio.delta","delta":"AAAA"#,
                ServerEvent::Other,
            ),
            (
                r#"{"type":"response.created","response":{}}"#,
                ServerEvent::Other,
            ),
            ("not json \"response.done\"", ServerEvent::Other),
            // A done without usage counts nothing (and is still a response).
            (
                r#"{"type":"response.done","response":{"status":"cancelled"}}"#,
                ServerEvent::ResponseDone {
                    usage: Usage::default(),
                    status: Some("cancelled".into()),
                },
            ),
        ] {
            assert_eq!(server_event(text), want, "{text}");
        }
    }

    #[test]
    fn the_model_is_read_from_the_session_url() {
        for (query, want) in [
            ("model=gpt-realtime", Some("gpt-realtime")),
            (
                "api-version=2025-04-01-preview&deployment=gpt-4o-realtime",
                Some("gpt-4o-realtime"),
            ),
            ("model=gpt%2Drealtime%2Dmini", Some("gpt-realtime-mini")),
            ("call_id=rtc_1", None),
            ("model=", None),
            ("", None),
        ] {
            assert_eq!(model_in_query(query).as_deref(), want, "{query}");
        }
    }

    #[test]
    fn the_error_event_has_the_realtime_shape() {
        let e: Value = serde_json::from_str(&error_event("budget_exhausted", "spent")).unwrap();
        assert_eq!(e["type"], "error");
        assert_eq!(e["error"]["code"], "budget_exhausted");
        assert_eq!(e["error"]["message"], "spent");
        assert!(e["event_id"].as_str().unwrap().starts_with("event_"));
    }
}
