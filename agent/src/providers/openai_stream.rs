//! One event of an OpenAI-style stream (chat and completions chunks, the
//! Responses API's events), read for what accounting needs: the model,
//! generated text (for estimates), usage, the end.
//!
//! A stream is hundreds of events, each read as it passes: building a
//! `serde_json::Value` of every one cost some 35 allocations per chunk.
//! Events are read into `Event`, which borrows its strings from the event
//! and skips every other member unbuilt. An event that does not fit that
//! shape (a member of another type, a repeated key) is read as a `Value`
//! instead, by the same rules: the two readings account an event alike
//! (`tests::both_readings_account_alike`).
use std::borrow::Cow;

use serde::{Deserialize, Deserializer};
use serde_json::Value;

use super::{ParseState, model_and_usage, string};

/// The members read, each where a chunk or an event puts it.
#[derive(Deserialize)]
struct Event<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    choices: Option<Vec<Choice<'a>>>,
    #[serde(default)]
    usage: Option<Value>,
    /// The Responses API's text delta.
    #[serde(borrow, default)]
    delta: Present<Cow<'a, str>>,
    /// The Responses API's final response object.
    #[serde(default)]
    response: Option<Value>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(borrow, default)]
    delta: Option<Delta<'a>>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    /// Absent and null differ: a null `delta.content` stops the reading of
    /// `text`, as `/delta/content` found does.
    #[serde(borrow, default)]
    content: Present<Cow<'a, str>>,
    #[serde(borrow, default)]
    tool_calls: Option<Vec<ToolCall<'a>>>,
}

#[derive(Deserialize)]
struct ToolCall<'a> {
    #[serde(borrow, default)]
    function: Option<Function<'a>>,
}

#[derive(Deserialize)]
struct Function<'a> {
    #[serde(borrow, default)]
    arguments: Option<Cow<'a, str>>,
}

/// A member that may be absent, null, or a `T`.
#[derive(Default)]
enum Present<T> {
    #[default]
    Absent,
    Null,
    Is(T),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Present<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Option::<T>::deserialize(d)? {
            None => Present::Null,
            Some(t) => Present::Is(t),
        })
    }
}

impl<T> Present<T> {
    fn found(&self) -> bool {
        !matches!(self, Present::Absent)
    }

    fn value(&self) -> Option<&T> {
        match self {
            Present::Is(t) => Some(t),
            _ => None,
        }
    }
}

/// Account one event's data (`[DONE]` already handled).
pub(super) fn on_event(state: &mut ParseState, data: &str) {
    match serde_json::from_str::<Event>(data) {
        Ok(e) => on_typed(state, e),
        Err(_) => {
            if let Ok(v) = serde_json::from_str::<Value>(data) {
                on_value(state, &v);
            }
        }
    }
}

fn on_typed(state: &mut ParseState, e: Event<'_>) {
    match e.kind.as_deref() {
        // Responses API stream.
        Some("response.output_text.delta")
        | Some("response.reasoning_summary_text.delta")
        | Some("response.function_call_arguments.delta") => {
            if let Some(d) = e.delta.value() {
                state.saw_text(d);
            }
        }
        Some("response.completed") | Some("response.incomplete") | Some("response.failed") => {
            state.complete = true;
            if let Some(r) = &e.response {
                model_and_usage(state, r, super::openai::usage);
            }
        }
        Some(_) => {}
        // Chat / completions chunks.
        None => {
            if let Some(m) = e.model {
                // Every chunk names it: kept once, not copied per chunk.
                if state.response_model.as_deref() != Some(&*m) {
                    state.response_model = Some(m.into_owned());
                }
            }
            for c in e.choices.iter().flatten() {
                let content = c.delta.as_ref().map(|d| &d.content);
                let text = match content {
                    Some(found) if found.found() => found.value(),
                    _ => c.text.as_ref(),
                };
                if let Some(t) = text {
                    state.saw_text(t);
                }
                // Tool calls are billed output too (for estimates).
                let calls = c.delta.as_ref().and_then(|d| d.tool_calls.as_ref());
                for t in calls.into_iter().flatten() {
                    if let Some(a) = t.function.as_ref().and_then(|f| f.arguments.as_ref()) {
                        state.saw_text(a);
                    }
                }
            }
            // include_usage: the last chunk carries usage (null before).
            if let Some(u) = e.usage.as_ref().filter(|u| u.is_object()) {
                state.usage = Some(super::openai::usage(u));
                state.saw_usage(u);
            }
        }
    }
}

/// The same accounting, read from a `Value`: for events `Event` cannot
/// hold.
fn on_value(state: &mut ParseState, v: &Value) {
    match v.get("type").and_then(Value::as_str) {
        Some("response.output_text.delta")
        | Some("response.reasoning_summary_text.delta")
        | Some("response.function_call_arguments.delta") => {
            if let Some(d) = v.get("delta").and_then(Value::as_str) {
                state.saw_text(d);
            }
        }
        Some("response.completed") | Some("response.incomplete") | Some("response.failed") => {
            state.complete = true;
            if let Some(r) = v.get("response") {
                model_and_usage(state, r, super::openai::usage);
            }
        }
        Some(_) => {}
        None => {
            if let Some(m) = string(v, "model") {
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
                if let Some(t) = text {
                    state.saw_text(t);
                }
                for t in c
                    .pointer("/delta/tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let Some(a) = t.pointer("/function/arguments").and_then(Value::as_str) {
                        state.saw_text(a);
                    }
                }
            }
            if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                state.usage = Some(super::openai::usage(u));
                state.saw_usage(u);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an event left in the state, comparable.
    fn accounted(read: impl Fn(&mut ParseState)) -> String {
        let mut s = ParseState {
            text: Some(String::new()),
            ..Default::default()
        };
        read(&mut s);
        format!(
            "{:?} {:?} {:?} {} {:?} {}",
            s.usage, s.raw_usage, s.response_model, s.text_chars, s.text, s.complete
        )
    }

    /// Events as providers send them, and shapes they do not.
    const EVENTS: &[&str] = &[
        r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"},"finish_reason":null}],"usage":null}"#,
        r#"{"model":"m","choices":[{"index":0,"delta":{"content":"lo \u00e9\"q\""},"finish_reason":null}]}"#,
        r#"{"model":"m","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"name":"f","arguments":"{\"a\":1}"}}]}}]}"#,
        r#"{"model":"m","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens":21,"prompt_tokens_details":{"cached_tokens":2}}}"#,
        r#"{"model":"m","choices":[{"text":"completion text","index":0}]}"#,
        r#"{"choices":[{"delta":{"content":null},"text":"not read"}]}"#,
        r#"{"choices":[{"delta":{},"text":"read"}]}"#,
        r#"{"type":"response.output_text.delta","delta":"Hi","item_id":"x"}"#,
        r#"{"type":"response.function_call_arguments.delta","delta":"{\"q\""}"#,
        r#"{"type":"response.completed","response":{"model":"gpt-5","usage":{"input_tokens":5,"output_tokens":7,"input_tokens_details":{"cached_tokens":1}}}}"#,
        r#"{"type":"response.created","response":{"model":"gpt-5"}}"#,
        // Shapes `Event` does not hold: read as a Value.
        r#"{"type":"response.audio.delta","delta":{"not":"text"}}"#,
        r#"{"model":42,"choices":[{"delta":{"content":"x"}}]}"#,
        r#"{"model":"a","model":"b","choices":[]}"#,
        r#"{"choices":{"not":"an array"},"usage":{"prompt_tokens":1,"completion_tokens":2}}"#,
        r#"{"choices":[{"delta":{"content":7}}]}"#,
        r#"{"usage":5}"#,
        r#"[1,2]"#,
        r#"not json"#,
    ];

    #[test]
    fn both_readings_account_alike() {
        for e in EVENTS {
            let typed = accounted(|s| on_event(s, e));
            let valued = accounted(|s| {
                if let Ok(v) = serde_json::from_str::<Value>(e) {
                    on_value(s, &v);
                }
            });
            assert_eq!(typed, valued, "{e}");
        }
    }

    #[test]
    fn a_stream_is_accounted_event_by_event() {
        let all = accounted(|s| EVENTS.iter().take(5).for_each(|e| on_event(s, e)));
        assert!(all.contains("input_tokens: 9"), "{all}");
        assert!(all.contains("output_tokens: 12"), "{all}");
        assert!(all.contains(r#"Some("m")"#), "{all}");
        assert!(
            all.contains("Hello é\\\"q\\\""),
            "the text, unescaped: {all}"
        );
    }

    #[test]
    fn events_that_hold_are_read_without_a_value() {
        // The fast reading takes what providers send.
        for e in EVENTS.iter().take(11) {
            assert!(serde_json::from_str::<Event>(e).is_ok(), "{e}");
        }
    }
}
