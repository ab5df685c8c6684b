//! Changing a request as policy says, in each API's own terms: cap the
//! output length and send another model; and, for exact accounting, ask a
//! stream for its usage (`stream_usage`).
use serde_json::Value;

use super::{
    Adapter, Upstream,
    stream_usage::{self, Ask},
};

/// What a rewrite changed, for the audit record.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rewritten {
    /// The model now sent (when it changed).
    pub model: Option<String>,
    /// The cap, when it lowered or set the request's output limit.
    pub capped_output_tokens: Option<u64>,
    /// The stream now asks for its usage (the response filter takes out
    /// what that adds).
    pub asked_stream_usage: bool,
}

/// Apply `model` and `max_output_tokens` to a request at `path` (path and
/// query) going `to` a provider of `adapter`'s family, and ask for usage
/// when `ask_usage` says how. Returns the new path, the new body (None when
/// unchanged) and what changed.
pub fn apply(
    adapter: &dyn Adapter,
    to: Upstream<'_>,
    path: &str,
    body: &[u8],
    model: Option<&str>,
    max_output_tokens: Option<u64>,
    ask_usage: Option<Ask>,
) -> (String, Option<Vec<u8>>, Rewritten) {
    let mut out = Rewritten::default();
    let mut path = path.to_string();
    if model.is_none() && max_output_tokens.is_none() {
        // Only usage to ask for: edited in place, not re-serialised.
        let asked = ask_usage.and_then(|how| stream_usage::ask(body, how));
        out.asked_stream_usage = asked.is_some();
        return (path, asked, out);
    }
    let Ok(mut v) = serde_json::from_slice::<Value>(body) else {
        return (path, None, out); // not JSON: nothing we can change
    };
    let Some(obj) = v.as_object_mut() else {
        return (path, None, out);
    };
    if let Some(m) = model
        && adapter.set_model(&mut path, obj, m)
    {
        out.model = Some(m.to_string());
    }
    if let Some(cap) = max_output_tokens {
        let p = path.split_once('?').map_or(path.as_str(), |(p, _)| p);
        if adapter.cap_output(to, p, obj, cap) {
            out.capped_output_tokens = Some(cap);
        }
    }
    if out == Rewritten::default() {
        // Nothing else changed: usage, if asked, without re-serialising.
        let asked = ask_usage.and_then(|how| stream_usage::ask(body, how));
        out.asked_stream_usage = asked.is_some();
        return (path, asked, out);
    }
    if ask_usage.is_some() {
        stream_usage::set_include_usage(obj);
        out.asked_stream_usage = true;
    }
    (
        path,
        Some(serde_json::to_vec(&v).expect("JSON re-serialises")),
        out,
    )
}

#[cfg(test)]
mod tests {
    use super::super::{Api, adapter};
    use super::*;

    /// Where a request goes: OpenAI itself (`native`) or another
    /// OpenAI-compatible server.
    fn to(native: bool) -> Upstream<'static> {
        Upstream {
            provider: if native { "openai" } else { "other" },
            host: if native {
                "api.openai.com"
            } else {
                "llm.example"
            },
        }
    }

    /// `apply` as the tests call it: by API family and nativeness.
    fn apply(
        api: Api,
        path: &str,
        body: &[u8],
        model: Option<&str>,
        max: Option<u64>,
        native: bool,
    ) -> (String, Option<Vec<u8>>, Rewritten) {
        super::apply(adapter(api), to(native), path, body, model, max, None)
    }

    /// Apply only an output cap.
    fn cap(api: Api, path: &str, body: &[u8], max: u64, native: bool) -> Option<Vec<u8>> {
        apply(api, path, body, None, Some(max), native).1
    }

    fn json(b: &Option<Vec<u8>>) -> Value {
        serde_json::from_slice(b.as_ref().expect("body changed")).unwrap()
    }

    #[test]
    fn openai_chat_cap_lowers_or_sets_by_provider() {
        let body = br#"{"model":"fast","max_tokens":4000,"messages":[]}"#;
        let (_, b, r) = apply(
            Api::Openai,
            "/v1/chat/completions",
            body,
            Some("gpt-4o-mini"),
            Some(256),
            true,
        );
        let v = json(&b);
        assert_eq!(v["model"], "gpt-4o-mini");
        assert_eq!(v["max_tokens"], 256);
        assert_eq!(r.model.as_deref(), Some("gpt-4o-mini"));
        assert_eq!(r.capped_output_tokens, Some(256));
        // No limit asked: set, named as the provider wants it.
        let open = br#"{"model":"m","messages":[]}"#;
        let b = cap(Api::Openai, "/v1/chat/completions", open, 64, true);
        assert_eq!(json(&b)["max_completion_tokens"], 64);
        let b = cap(Api::Openai, "/v1/chat/completions", open, 64, false);
        assert_eq!(json(&b)["max_tokens"], 64);
        // Already below the cap: unchanged.
        let low = br#"{"model":"m","max_completion_tokens":10}"#;
        let (_, b, r) = apply(
            Api::Openai,
            "/v1/chat/completions",
            low,
            None,
            Some(64),
            true,
        );
        assert!(b.is_none());
        assert_eq!(r, Rewritten::default());
    }

    #[test]
    fn responses_anthropic_and_gemini_caps() {
        let b = cap(
            Api::Openai,
            "/v1/responses",
            br#"{"model":"m","input":"x"}"#,
            9,
            true,
        );
        assert_eq!(json(&b)["max_output_tokens"], 9);
        let b = cap(
            Api::Anthropic,
            "/v1/messages",
            br#"{"model":"m","max_tokens":1024}"#,
            100,
            false,
        );
        assert_eq!(json(&b)["max_tokens"], 100);
        let b = cap(
            Api::Gemini,
            "/v1beta/models/gemini-2.5-pro:generateContent",
            br#"{"contents":[],"generationConfig":{"maxOutputTokens":9000,"temperature":0.2}}"#,
            512,
            false,
        );
        let v = json(&b);
        assert_eq!(v["generationConfig"]["maxOutputTokens"], 512);
        assert_eq!(v["generationConfig"]["temperature"], 0.2);
        // Embeddings have no output to cap.
        let b = cap(
            Api::Openai,
            "/v1/embeddings",
            br#"{"model":"m","input":"x"}"#,
            9,
            true,
        );
        assert!(b.is_none());
    }

    #[test]
    fn gemini_model_is_rewritten_in_the_path() {
        let (p, b, r) = apply(
            Api::Gemini,
            "/v1beta/models/fast:streamGenerateContent?alt=sse",
            br#"{"contents":[]}"#,
            Some("gemini-2.5-flash"),
            None,
            false,
        );
        assert_eq!(
            p,
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
        );
        assert_eq!(r.model.as_deref(), Some("gemini-2.5-flash"));
        assert!(b.is_some() || r.model.is_some());
    }

    #[test]
    fn caps_hold_for_every_numeric_form() {
        for asked in ["4096.0", "1e6", "\"100000\"", "4096"] {
            let body = format!(r#"{{"model":"m","max_tokens":{asked}}}"#);
            let b = cap(
                Api::Openai,
                "/v1/chat/completions",
                body.as_bytes(),
                256,
                true,
            );
            assert_eq!(json(&b)["max_tokens"], 256, "{asked}");
            let b = cap(Api::Anthropic, "/v1/messages", body.as_bytes(), 256, false);
            assert_eq!(json(&b)["max_tokens"], 256, "{asked}");
        }
        let within = br#"{"model":"m","max_tokens":100.0}"#;
        assert!(cap(Api::Openai, "/v1/chat/completions", within, 256, true).is_none());
        assert_eq!(
            super::super::output_limit(&serde_json::json!({"max_tokens": 4096.0})),
            Some(4096)
        );
    }

    #[test]
    fn non_json_bodies_pass_unchanged() {
        let (p, b, r) = apply(
            Api::Openai,
            "/v1/chat/completions",
            b"not json",
            Some("x"),
            Some(1),
            true,
        );
        assert_eq!(
            (p.as_str(), b, r),
            ("/v1/chat/completions", None, Rewritten::default())
        );
    }
}
