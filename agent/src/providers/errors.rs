//! Errors the proxy answers itself, in the provider's own shape, so the
//! workload's SDK raises the same exception class it would for the provider
//! (a 403 becomes `PermissionDeniedError`, a 429 `RateLimitError`, …) and
//! shows the message.
use serde_json::json;

use super::Api;

/// The JSON error body for `status` with `message`; `code` is Tollgate's
/// reason (`rule:<name>`, `request_too_large`, …); `retry` when the client
/// should try again later (Gemini says so in the body).
pub fn body(
    api: Api,
    status: u16,
    message: &str,
    code: &str,
    retry: Option<std::time::Duration>,
) -> String {
    let message = format!("tollgate: {message}");
    match api {
        // https://docs.anthropic.com/en/api/errors
        Api::Anthropic => {
            let kind = match status {
                400 => "invalid_request_error",
                401 => "authentication_error",
                403 => "permission_error",
                404 => "not_found_error",
                413 => "request_too_large",
                429 => "rate_limit_error",
                529 => "overloaded_error",
                _ => "api_error",
            };
            json!({"type": "error", "error": {"type": kind, "message": message}})
        }
        // google.rpc.Status, as the Gemini API returns it.
        Api::Gemini => {
            let s = match status {
                400 | 413 => "INVALID_ARGUMENT",
                401 => "UNAUTHENTICATED",
                403 => "PERMISSION_DENIED",
                404 => "NOT_FOUND",
                429 => "RESOURCE_EXHAUSTED",
                504 => "DEADLINE_EXCEEDED",
                503 | 502 => "UNAVAILABLE",
                _ => "INTERNAL",
            };
            let mut e = json!({"error": {"code": status, "message": message, "status": s}});
            if let Some(r) = retry {
                e["error"]["details"] = json!([{
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": format!("{}s", r.as_secs_f64().ceil() as u64)
                }]);
            }
            e
        }
        // OpenAI and compatible APIs.
        Api::Openai => {
            let kind = match status {
                400..=499 => "invalid_request_error",
                _ => "server_error",
            };
            json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
        }
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_api_gets_its_own_shape() {
        let v: serde_json::Value =
            serde_json::from_str(&body(Api::Anthropic, 403, "no", "rule:x", None)).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "permission_error");
        assert_eq!(v["error"]["message"], "tollgate: no");
        let v: serde_json::Value = serde_json::from_str(&body(
            Api::Gemini,
            429,
            "no",
            "rule:x",
            Some(std::time::Duration::from_millis(1500)),
        ))
        .unwrap();
        assert_eq!(v["error"]["status"], "RESOURCE_EXHAUSTED");
        assert_eq!(v["error"]["code"], 429);
        assert_eq!(v["error"]["details"][0]["retryDelay"], "2s");
        let v: serde_json::Value =
            serde_json::from_str(&body(Api::Openai, 502, "down", "upstream_error", None)).unwrap();
        assert_eq!(v["error"]["type"], "server_error");
        assert_eq!(v["error"]["code"], "upstream_error");
    }
}
