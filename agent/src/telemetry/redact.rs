//! Keeping secrets out of the audit log: credentials in headers, API keys in
//! query strings (Gemini's `?key=`), secret-looking fields in JSON bodies.
//! Bodies are also truncated: a record is a log line, not an archive.
use std::collections::BTreeMap;

use http::HeaderMap;
use serde_json::Value;

/// What replaces a secret.
pub const REDACTED: &str = "[REDACTED]";

/// Headers that carry credentials or session state.
const SECRET_HEADERS: [&str; 7] = [
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "x-goog-api-key",
    "cookie",
    "set-cookie",
];

/// Query parameters that carry credentials (Gemini and Google APIs: `key`).
const SECRET_PARAMS: [&str; 4] = ["key", "api_key", "api-key", "access_token"];

/// JSON field names whose values are never logged (compared lowercased,
/// `-` taken as `_`).
const SECRET_FIELDS: [&str; 8] = [
    "api_key",
    "apikey",
    "authorization",
    "password",
    "secret",
    "client_secret",
    "access_token",
    "refresh_token",
];

/// A path with credential query parameters' values replaced.
pub fn path(path_and_query: &str) -> String {
    let Some((p, q)) = path_and_query.split_once('?') else {
        return path_and_query.to_string();
    };
    let q: Vec<String> = q
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if SECRET_PARAMS.contains(&k.to_ascii_lowercase().as_str()) => {
                format!("{k}={REDACTED}")
            }
            _ => pair.to_string(),
        })
        .collect();
    format!("{p}?{}", q.join("&"))
}

/// Headers as a map for the record (name → values joined by `, `), credentials redacted.
pub fn headers(h: &HeaderMap) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in h {
        let v = if SECRET_HEADERS.contains(&name.as_str()) {
            REDACTED.to_string()
        } else {
            String::from_utf8_lossy(value.as_bytes()).into_owned()
        };
        out.entry(name.as_str().to_string())
            .and_modify(|e| {
                if v != REDACTED {
                    e.push_str(", ");
                    e.push_str(&v)
                }
            })
            .or_insert(v);
    }
    out
}

/// A body for the record: JSON with secret fields redacted (re-serialised),
/// other text as is, then cut to `max` bytes on a character boundary with a
/// marker saying how much was dropped. Binary bodies are summarised.
pub fn body(bytes: &[u8], max: usize) -> String {
    let text = match serde_json::from_slice::<Value>(bytes) {
        Ok(mut v) => {
            redact_json(&mut v);
            v.to_string()
        }
        Err(_) => match std::str::from_utf8(bytes) {
            Ok(t) => t.to_string(),
            // A truncated capture may end inside a character: keep the valid part.
            Err(e) if e.error_len().is_none() => {
                String::from_utf8_lossy(&bytes[..e.valid_up_to()]).into_owned()
            }
            Err(_) => return format!("[{} bytes of binary data]", bytes.len()),
        },
    };
    truncate(text, max)
}

/// A body of `total` bytes of which only `prefix` was kept (see `body`).
pub fn body_prefix(prefix: &[u8], total: u64, max: usize) -> String {
    let mut s = body(prefix, max);
    let cut = total.saturating_sub(prefix.len() as u64);
    if cut > 0 && !s.ends_with("bytes]") {
        s.push_str(&format!("…[truncated {cut} bytes]"));
    }
    s
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let dropped = text.len() - cut;
    text.truncate(cut);
    text.push_str(&format!("…[truncated {dropped} bytes]"));
    text
}

fn redact_json(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, val) in map.iter_mut() {
                let key = k.to_ascii_lowercase().replace('-', "_");
                if SECRET_FIELDS.contains(&key.as_str()) && !val.is_null() {
                    *val = Value::String(REDACTED.into());
                } else {
                    redact_json(val);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact_json),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn query_keys_are_redacted_other_params_kept() {
        assert_eq!(
            path("/v1beta/models/gemini-2.5-flash:generateContent?key=AIzaSECRET&alt=sse"),
            "/v1beta/models/gemini-2.5-flash:generateContent?key=[REDACTED]&alt=sse"
        );
        assert_eq!(
            path("/openai/deployments/d/chat/completions?api-version=2024-10-21"),
            "/openai/deployments/d/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(path("/v1/messages"), "/v1/messages");
        assert_eq!(path("/x?KEY=s"), "/x?KEY=[REDACTED]");
    }

    #[test]
    fn credential_headers_are_redacted() {
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_static("Bearer sk-secret"),
        );
        h.insert("x-api-key", HeaderValue::from_static("sk-ant-secret"));
        h.insert("api-key", HeaderValue::from_static("azure-secret"));
        h.insert("x-goog-api-key", HeaderValue::from_static("AIza-secret"));
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.append("accept", HeaderValue::from_static("a"));
        h.append("accept", HeaderValue::from_static("b"));
        let out = headers(&h);
        let dump = format!("{out:?}");
        assert!(!dump.contains("secret"), "{dump}");
        assert_eq!(out["authorization"], REDACTED);
        assert_eq!(out["content-type"], "application/json");
        assert_eq!(out["accept"], "a, b");
    }

    #[test]
    fn json_secrets_are_redacted_and_bodies_truncated() {
        let b = br#"{"model":"m","api_key":"sk-1","nested":[{"Client-Secret":"x","keep":"y"}]}"#;
        let out = body(b, 1000);
        assert!(!out.contains("sk-1") && !out.contains("\"x\""), "{out}");
        assert!(out.contains("\"keep\":\"y\""));
        let long = format!("{{\"messages\":\"{}\"}}", "é".repeat(100));
        let out = body(long.as_bytes(), 21);
        assert!(out.starts_with("{\"messages\":\"éééé"), "{out}");
        assert!(out.ends_with("bytes]"), "{out}");
        // Cut inside a UTF-8 sequence: valid prefix kept.
        let s = "ab€".as_bytes();
        assert_eq!(body(&s[..3], 100), "ab");
        assert_eq!(body(&[0xff, 0xfe, 0], 100), "[3 bytes of binary data]");
    }
}
