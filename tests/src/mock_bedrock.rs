//! The mock provider's AWS Bedrock runtime: `/model/{modelId}/converse`,
//! `converse-stream`, `invoke` and `invoke-with-response-stream`, answering
//! in Bedrock's own shapes (JSON; the AWS event-stream framing for the
//! streamed calls, which the AWS SDK's own reader checks frame by frame),
//! and verifying each request's **SigV4 signature** as AWS would: the
//! canonical request rebuilt from what arrived (the path double-encoded,
//! the signed headers with the h2 `:authority` standing in for `host`, the
//! body's hash), signed again with the secret of the access key it names.
//! A request whose signature does not hold is refused 403
//! `InvalidSignatureException`, so a proxy that changes a signed request
//! is caught by the provider, not by the proxy's own account.
//!
//! This verifier is written here, apart from any signing code, from AWS's
//! published algorithm (Signature Version 4, "Create a canonical request"),
//! so that it checks the SDKs' and Tollgate's signatures independently.
use base64::Engine;
use ring::{digest, hmac};

/// The test credentials the mock knows: (access key id, secret).
pub const KEYS: [(&str, &str); 2] = [
    ("AKIDTOLLGATEWORKLOAD", "workload-secret-not-real"),
    ("AKIDTOLLGATENODE", "node-held-secret-not-real"),
];
pub const REGION: &str = "us-east-1";
/// A second region's runtime (failover between regions).
pub const WEST_HOST: &str = "bedrock-runtime.us-west-2.amazonaws.com";
/// A model id this runtime always throttles (429 `ThrottlingException`).
pub const THROTTLED: &str = "mock.throttled-v1";

/// The web identity STS accepts (`sts`), and the role it lets assume.
pub const WEB_IDENTITY_TOKEN: &str = "eyJ-projected-service-account-token";
pub const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/tollgate-bedrock";
/// How long STS's temporary keys last here (short: tests see them renewed).
pub const TEMPORARY_LIFETIME: std::time::Duration = std::time::Duration::from_secs(3);

/// Temporary keys STS issued: (access key, secret, session token, until).
type Temporary = (String, String, String, std::time::Instant);
static TEMPORARY: std::sync::Mutex<Vec<Temporary>> = std::sync::Mutex::new(Vec::new());

/// The mock STS (`AssumeRoleWithWebIdentity`, form-encoded): XML with new
/// temporary keys when the web identity and role are the ones it knows.
pub fn sts(form: &[u8]) -> (u16, String, Option<String>) {
    let pairs: std::collections::HashMap<String, String> =
        form_urlencoded::parse(form).into_owned().collect();
    let get = |k: &str| pairs.get(k).map(String::as_str);
    if get("Action") != Some("AssumeRoleWithWebIdentity")
        || get("WebIdentityToken") != Some(WEB_IDENTITY_TOKEN)
        || get("RoleArn") != Some(ROLE_ARN)
    {
        let err = "<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>Not authorized to perform sts:AssumeRoleWithWebIdentity</Message></Error></ErrorResponse>";
        return (403, err.to_string(), None);
    }
    let mut t = TEMPORARY.lock().unwrap_or_else(|e| e.into_inner());
    let n = t.len() + 1;
    let key = format!("ASIATOLLGATE{n:04}");
    let secret = format!("temporary-secret-{n}");
    let token = format!("temporary-session-{n}");
    t.push((
        key.clone(),
        secret.clone(),
        token.clone(),
        std::time::Instant::now() + TEMPORARY_LIFETIME,
    ));
    let expiration = (time::OffsetDateTime::now_utc() + TEMPORARY_LIFETIME)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let xml = format!(
        "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleWithWebIdentityResult><Credentials><SessionToken>{token}</SessionToken><SecretAccessKey>{secret}</SecretAccessKey><Expiration>{expiration}</Expiration><AccessKeyId>{key}</AccessKeyId></Credentials><Provider>oidc.eks.test</Provider></AssumeRoleWithWebIdentityResult><ResponseMetadata><RequestId>mock-sts-{n}</RequestId></ResponseMetadata></AssumeRoleWithWebIdentityResponse>"
    );
    (200, xml, Some(key))
}

/// The secret of `key_id`: a fixed test key, or temporary keys still valid
/// and presented with their session token.
fn secret_of(key_id: &str, session_token: Option<&str>) -> Result<String, String> {
    if let Some((_, s)) = KEYS.iter().find(|(k, _)| *k == key_id) {
        return Ok(s.to_string());
    }
    let t = TEMPORARY.lock().unwrap_or_else(|e| e.into_inner());
    let (_, secret, token, until) = t
        .iter()
        .find(|(k, ..)| k == key_id)
        .ok_or(format!("unknown access key {key_id}"))?;
    if session_token != Some(token.as_str()) {
        return Err("the security token included in the request is invalid".into());
    }
    if std::time::Instant::now() >= *until {
        return Err("ExpiredToken: the security token included in the request is expired".into());
    }
    Ok(secret.clone())
}
pub const HOST: &str = "bedrock-runtime.us-east-1.amazonaws.com";
/// Model ids the tests call.
pub const HAIKU: &str = "anthropic.claude-3-5-haiku-20241022-v1:0";
pub const HAIKU_US: &str = "us.anthropic.claude-3-5-haiku-20241022-v1:0";

/// Usage the mock reports for every call: 21 fresh + 4 cached input, 7 output.
pub const INPUT_TOKENS: u64 = 21;
pub const CACHED_TOKENS: u64 = 4;
pub const OUTPUT_TOKENS: u64 = 7;
pub const WORDS: [&str; 3] = ["Hello", " from", " Bedrock"];

/// What a request to the runtime is.
pub struct Call<'a> {
    pub model: String,
    pub action: &'a str,
}

/// `/model/{id}/{action}` with the id percent-decoded.
pub fn call(path: &str) -> Option<Call<'_>> {
    let rest = path.split('?').next()?.strip_prefix("/model/")?;
    let (id, action) = rest.split_once('/')?;
    let model = percent_decode(id);
    Some(Call { model, action })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        match (
            b[i],
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push(h * 16 + l);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// RFC 3986 encoding as SigV4 wants it: everything but the unreserved
/// characters (and `/` in a path).
fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        let unreserved = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~');
        if unreserved || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sign(key: &[u8], data: &str) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data.as_bytes())
        .as_ref()
        .to_vec()
}

/// The access key a valid signature was made with, or why it is not valid.
pub fn verify(
    method: &str,
    path_and_query: &str,
    headers: &hyper::HeaderMap,
    authority: Option<&str>,
    body: &[u8],
) -> Result<String, String> {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or("no Authorization header")?;
    let rest = auth
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or("not an AWS4-HMAC-SHA256 signature")?;
    let field = |name: &str| {
        rest.split(',')
            .find_map(|p| p.trim().strip_prefix(name))
            .map(str::to_owned)
            .ok_or(format!("no {name} in the Authorization header"))
    };
    let credential = field("Credential=")?;
    let signed = field("SignedHeaders=")?;
    let signature = field("Signature=")?;
    let (key_id, scope) = credential.split_once('/').ok_or("bad Credential")?;
    let session = headers
        .get("x-amz-security-token")
        .and_then(|v| v.to_str().ok());
    let secret = secret_of(key_id, session)?;
    let mut parts = scope.split('/');
    let (date, region, service) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    // The endpoint's region, as AWS checks it: the host the request went to.
    let host = headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .or(authority)
        .unwrap_or("");
    let endpoint_region = host
        .strip_prefix("bedrock-runtime.")
        .and_then(|h| h.split('.').next())
        .unwrap_or(REGION);
    if region != endpoint_region || service != "bedrock" {
        return Err(format!(
            "scope {scope} is not {endpoint_region}/bedrock, the region of {host}"
        ));
    }
    let amz_date = headers
        .get("x-amz-date")
        .and_then(|v| v.to_str().ok())
        .ok_or("no X-Amz-Date")?;
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                uri_encode(&percent_decode(k), false),
                uri_encode(&percent_decode(v), false),
            )
        })
        .collect();
    pairs.sort();
    let canonical_query: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut canonical_headers = String::new();
    for name in signed.split(';') {
        let value = match (name, headers.get(name)) {
            (_, Some(v)) => v
                .to_str()
                .map_err(|_| format!("header {name} is not text"))?
                .to_string(),
            // Over h2 the host is the request's :authority.
            ("host", None) => authority.ok_or("no host")?.to_string(),
            (_, None) => return Err(format!("signed header `{name}` did not arrive")),
        };
        let value = value.split_whitespace().collect::<Vec<_>>().join(" ");
        canonical_headers.push_str(&format!("{name}:{value}\n"));
    }
    let payload_hash = hex(digest::digest(&digest::SHA256, body).as_ref());
    if let Some(claimed) = headers
        .get("x-amz-content-sha256")
        .and_then(|v| v.to_str().ok())
        && claimed != "UNSIGNED-PAYLOAD"
        && claimed != payload_hash
    {
        return Err("x-amz-content-sha256 is not the body's hash".into());
    }
    let canonical_request = format!(
        "{method}\n{}\n{}\n{canonical_headers}\n{signed}\n{payload_hash}",
        uri_encode(path, true),
        canonical_query.join("&"),
    );
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(digest::digest(&digest::SHA256, canonical_request.as_bytes()).as_ref())
    );
    let k_date = sign(format!("AWS4{secret}").as_bytes(), date);
    let k_region = sign(&k_date, region);
    let k_service = sign(&k_region, service);
    let k_signing = sign(&k_service, "aws4_request");
    let expected = hex(&sign(&k_signing, &string_to_sign));
    if expected != signature {
        return Err(format!(
            "the request signature does not match (signed headers {signed}; canonical request {canonical_request:?})"
        ));
    }
    Ok(key_id.to_string())
}

/// The Converse answer.
pub fn converse_json() -> serde_json::Value {
    serde_json::json!({
        "output": {"message": {"role": "assistant", "content": [{"text": WORDS.concat()}]}},
        "stopReason": "end_turn",
        "usage": {"inputTokens": INPUT_TOKENS, "outputTokens": OUTPUT_TOKENS,
                  "totalTokens": INPUT_TOKENS + CACHED_TOKENS + OUTPUT_TOKENS,
                  "cacheReadInputTokens": CACHED_TOKENS, "cacheWriteInputTokens": 0},
        "metrics": {"latencyMs": 12}
    })
}

/// InvokeModel's answer for an Anthropic body (the Messages shape).
pub fn invoke_json(model: &str) -> serde_json::Value {
    serde_json::json!({
        "id": "msg_bdrk_mock", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": WORDS.concat()}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": INPUT_TOKENS, "cache_read_input_tokens": CACHED_TOKENS,
                  "cache_creation_input_tokens": 0, "output_tokens": OUTPUT_TOKENS}
    })
}

fn frame(event: &str, payload: serde_json::Value) -> Vec<u8> {
    tollgate_agent::providers::event_stream::encode("event", event, payload.to_string().as_bytes())
}

/// ConverseStream's frames, one event each.
pub fn converse_stream() -> Vec<Vec<u8>> {
    let mut out = vec![frame(
        "messageStart",
        serde_json::json!({"role": "assistant"}),
    )];
    for w in WORDS {
        out.push(frame(
            "contentBlockDelta",
            serde_json::json!({"contentBlockIndex": 0, "delta": {"text": w}}),
        ));
    }
    out.push(frame(
        "contentBlockStop",
        serde_json::json!({"contentBlockIndex": 0}),
    ));
    out.push(frame(
        "messageStop",
        serde_json::json!({"stopReason": "end_turn"}),
    ));
    out.push(frame(
        "metadata",
        serde_json::json!({
            "usage": {"inputTokens": INPUT_TOKENS, "outputTokens": OUTPUT_TOKENS,
                      "totalTokens": INPUT_TOKENS + CACHED_TOKENS + OUTPUT_TOKENS,
                      "cacheReadInputTokens": CACHED_TOKENS},
            "metrics": {"latencyMs": 40}
        }),
    ));
    out
}

/// InvokeModelWithResponseStream's frames for an Anthropic body: each the
/// model's own stream event, base64 in a `chunk`, Bedrock's invocation
/// metrics appended to the last.
pub fn invoke_stream(model: &str) -> Vec<Vec<u8>> {
    let chunk = |v: serde_json::Value| {
        let b = base64::engine::general_purpose::STANDARD.encode(v.to_string());
        frame("chunk", serde_json::json!({"bytes": b}))
    };
    let mut out = vec![chunk(serde_json::json!({
        "type": "message_start",
        "message": {"id": "msg_bdrk_mock", "type": "message", "role": "assistant", "model": model,
                    "content": [], "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": 1}}
    }))];
    out.push(chunk(
        serde_json::json!({"type": "content_block_start", "index": 0,
        "content_block": {"type": "text", "text": ""}}),
    ));
    for w in WORDS {
        out.push(chunk(
            serde_json::json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": w}}),
        ));
    }
    out.push(chunk(
        serde_json::json!({"type": "content_block_stop", "index": 0}),
    ));
    out.push(chunk(serde_json::json!({"type": "message_delta",
        "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": OUTPUT_TOKENS}})));
    out.push(chunk(serde_json::json!({"type": "message_stop",
        "amazon-bedrock-invocationMetrics": {
            "inputTokenCount": INPUT_TOKENS, "outputTokenCount": OUTPUT_TOKENS,
            "cacheReadInputTokenCount": CACHED_TOKENS, "cacheWriteInputTokenCount": 0,
            "invocationLatency": 60, "firstByteLatency": 20}})));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The verifier's pieces against AWS's documented values (a request
    /// signed here by the same code would prove nothing): the path's double
    /// encoding, and the signing key of the documentation's example.
    #[test]
    fn the_verifiers_pieces_follow_the_published_algorithm() {
        assert_eq!(
            uri_encode("/model/a%3A0/converse", true),
            "/model/a%253A0/converse"
        );
        assert_eq!(uri_encode("a b+c", false), "a%20b%2Bc");
        assert_eq!(
            percent_decode("anthropic.claude-v2%3A1"),
            "anthropic.claude-v2:1"
        );
        // The signing key derivation of AWS's documentation example
        // (secret wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY, 20120215,
        // us-east-1, iam).
        let k = sign(b"AWS4wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20120215");
        let k = sign(&k, "us-east-1");
        let k = sign(&k, "iam");
        let k = sign(&k, "aws4_request");
        assert_eq!(
            hex(&k),
            "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"
        );
    }
}
