//! Changing a request as policy says, in each API's own terms: cap the
//! output length and send another model.
use serde_json::Value;

use super::Api;

/// What a rewrite changed, for the audit record.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rewritten {
    /// The model now sent (when it changed).
    pub model: Option<String>,
    /// The cap, when it lowered or set the request's output limit.
    pub capped_output_tokens: Option<u64>,
}

/// Apply `model` and `max_output_tokens` to a request of `api` at `path`
/// (path and query). `openai_native`: the provider is OpenAI or Azure
/// OpenAI, whose chat API wants `max_completion_tokens` (reasoning models
/// reject `max_tokens`); other OpenAI-compatible servers get `max_tokens`.
/// Returns the new path, the new body (None when unchanged) and what changed.
pub fn apply(
    api: Api,
    path: &str,
    body: &[u8],
    model: Option<&str>,
    max_output_tokens: Option<u64>,
    openai_native: bool,
) -> (String, Option<Vec<u8>>, Rewritten) {
    let mut out = Rewritten::default();
    let mut path = path.to_string();
    if model.is_none() && max_output_tokens.is_none() {
        return (path, None, out);
    }
    let Ok(mut v) = serde_json::from_slice::<Value>(body) else {
        return (path, None, out); // not JSON: nothing we can change
    };
    let Some(obj) = v.as_object_mut() else {
        return (path, None, out);
    };
    let p = path
        .split_once('?')
        .map_or(path.as_str(), |(p, _)| p)
        .to_string();
    if let Some(m) = model {
        match api {
            Api::Gemini => {
                // The model is in the path: …/models/{model}:{method}
                if let Some(new) = gemini_path_with_model(&path, m) {
                    path = new;
                    out.model = Some(m.to_string());
                }
            }
            Api::Openai | Api::Anthropic => {
                if obj.contains_key("model") {
                    obj.insert("model".into(), Value::String(m.to_string()));
                    out.model = Some(m.to_string());
                }
            }
        }
    }
    if let Some(cap) = max_output_tokens {
        let (fields, default): (&[&str], Option<&str>) = match api {
            Api::Openai if p.ends_with("/chat/completions") => (
                &["max_completion_tokens", "max_tokens"],
                Some(if openai_native {
                    "max_completion_tokens"
                } else {
                    "max_tokens"
                }),
            ),
            Api::Openai if p.ends_with("/responses") => {
                (&["max_output_tokens"], Some("max_output_tokens"))
            }
            Api::Openai if p.ends_with("/completions") => (&["max_tokens"], Some("max_tokens")),
            Api::Openai => (&[], None),
            Api::Anthropic => (&["max_tokens"], Some("max_tokens")),
            Api::Gemini => (&[], None),
        };
        if api == Api::Gemini {
            if p.ends_with(":generateContent") || p.ends_with(":streamGenerateContent") {
                let gc = obj
                    .entry("generationConfig")
                    .or_insert_with(|| Value::Object(Default::default()));
                if let Some(gc) = gc.as_object_mut() {
                    if lower(gc, "maxOutputTokens", cap, true) {
                        out.capped_output_tokens = Some(cap);
                    }
                }
            }
        } else {
            let present: Vec<&str> = fields
                .iter()
                .copied()
                .filter(|f| obj.get(*f).is_some_and(|v| !v.is_null()))
                .collect();
            if present.is_empty() {
                if let Some(d) = default {
                    lower(obj, d, cap, true);
                    out.capped_output_tokens = Some(cap);
                }
            }
            for f in present {
                if lower(obj, f, cap, false) {
                    out.capped_output_tokens = Some(cap);
                }
            }
        }
    }
    if out == Rewritten::default() {
        return (path, None, out);
    }
    (
        path,
        Some(serde_json::to_vec(&v).expect("JSON re-serialises")),
        out,
    )
}

/// Set `key` to min(current, cap) (or to cap when absent and `set`).
/// True when the value changed.
fn lower(obj: &mut serde_json::Map<String, Value>, key: &str, cap: u64, set: bool) -> bool {
    match obj.get(key).and_then(Value::as_u64) {
        Some(n) if n <= cap => false,
        None if !set && obj.contains_key(key) => false,
        _ => {
            obj.insert(key.into(), cap.into());
            true
        }
    }
}

fn gemini_path_with_model(path: &str, model: &str) -> Option<String> {
    let start = path.find("/models/")? + "/models/".len();
    let end = start + path[start..].find(':')?;
    Some(format!("{}{}{}", &path[..start], model, &path[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

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
