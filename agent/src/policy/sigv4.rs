//! Node-held AWS keys for Bedrock: a rule's `credential_file` that holds
//! AWS keys (JSON, the `credential_process` shape: `AccessKeyId`,
//! `SecretAccessKey`, optional `SessionToken`) re-signs each call it allows
//! with AWS Signature Version 4 (the AWS SDK's own signer, `aws-sigv4`),
//! after the rule's rewrites: the workload's signature and session token
//! are removed, so pods hold no AWS keys, and a rerouted or capped call is
//! signed as it is sent.
use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::{
    http_request::{SignableBody, SignableRequest, SigningParams, SigningSettings, sign},
    sign::v4,
};
use aws_smithy_runtime_api::client::identity::Identity;
use http::{HeaderMap, HeaderName, HeaderValue, header};
use serde::Deserialize;
use zeroize::Zeroizing;

/// AWS keys as read from a credential file.
pub struct AwsKeys {
    access_key_id: String,
    secret_access_key: Zeroizing<String>,
    session_token: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for AwsKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AwsKeys({}, [REDACTED])", self.access_key_id)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct KeysFile {
    access_key_id: String,
    secret_access_key: String,
    #[serde(default)]
    session_token: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error(
        "the credential file is not AWS keys as JSON ({{\"AccessKeyId\": …, \"SecretAccessKey\": …, \"SessionToken\": …}}): {0}"
    )]
    Keys(String),
    #[error(
        "`{0}` names no AWS region (bedrock-runtime.<region>.amazonaws.com): Tollgate cannot scope a signature for it"
    )]
    NoRegion(String),
    #[error("signing failed: {0}")]
    Sign(String),
}

/// Whether a credential file's text is AWS keys (a JSON object) rather
/// than a bearer key.
pub fn is_aws_keys(text: &str) -> bool {
    text.trim_start().starts_with('{')
}

pub fn parse(text: &str) -> Result<AwsKeys, SigningError> {
    // serde_json's messages name positions, never the values.
    let f: KeysFile = serde_json::from_str(text).map_err(|e| SigningError::Keys(e.to_string()))?;
    let secret = Zeroizing::new(f.secret_access_key);
    if f.access_key_id.is_empty() || secret.is_empty() {
        return Err(SigningError::Keys(
            "AccessKeyId and SecretAccessKey must not be empty".into(),
        ));
    }
    Ok(AwsKeys {
        access_key_id: f.access_key_id,
        secret_access_key: secret,
        session_token: f.session_token.map(Zeroizing::new),
    })
}

/// The region of a Bedrock runtime host (`bedrock-runtime.us-east-1.amazonaws.com`,
/// `bedrock-runtime-fips.us-gov-west-1.amazonaws.com`).
pub fn region_of(host: &str) -> Option<&str> {
    let rest = host
        .strip_prefix("bedrock-runtime.")
        .or_else(|| host.strip_prefix("bedrock-runtime-fips."))?;
    let region = rest
        .strip_suffix(".amazonaws.com")
        .or_else(|| rest.strip_suffix(".amazonaws.com.cn"))?;
    crate::config::valid_region(region).then_some(region)
}

/// The workload's own signature, removed before Tollgate signs.
const WORKLOAD_SIGNATURE: [&str; 4] = [
    "authorization",
    "x-amz-date",
    "x-amz-security-token",
    "x-amz-content-sha256",
];

/// Sign `method target` to `host` with `keys` at `now`: the workload's
/// signature goes, Tollgate's takes its place (`authorization`,
/// `x-amz-date`, and `x-amz-security-token` for temporary keys). Signed:
/// `host`, `content-type` and the `x-amz-*` headers the signer adds, so
/// the headers the proxy sets on the way (content length, h2's) do not
/// matter to the signature.
pub fn sign_request(
    keys: &AwsKeys,
    host: &str,
    method: &str,
    target: &str,
    headers: &mut HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> Result<(), SigningError> {
    let region = region_of(host).ok_or_else(|| SigningError::NoRegion(host.to_string()))?;
    for h in WORKLOAD_SIGNATURE {
        headers.remove(h);
    }
    let identity: Identity = Credentials::new(
        keys.access_key_id.clone(),
        keys.secret_access_key.as_str(),
        keys.session_token.as_ref().map(|t| t.to_string()),
        None,
        "tollgate-credential-file",
    )
    .into();
    let params: SigningParams<'_> = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name("bedrock")
        .time(now)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| SigningError::Sign(e.to_string()))?
        .into();
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // The Host the request carries is what AWS checks (with its port when
    // it is not 443); without one, the endpoint's name, which then goes.
    let host_value = match headers.get(header::HOST).and_then(|v| v.to_str().ok()) {
        Some(h) => h.to_string(),
        None => {
            let v = HeaderValue::from_str(host).map_err(|e| SigningError::Sign(e.to_string()))?;
            headers.insert(header::HOST, v);
            host.to_string()
        }
    };
    let mut signed: Vec<(&str, &str)> = vec![("host", host_value.as_str())];
    if let Some(ct) = content_type.as_deref() {
        signed.push(("content-type", ct));
    }
    let url = format!("https://{host}{target}");
    let req = SignableRequest::new(method, url, signed.into_iter(), SignableBody::Bytes(body))
        .map_err(|e| SigningError::Sign(e.to_string()))?;
    let (instructions, _) = sign(req, &params)
        .map_err(|e| SigningError::Sign(e.to_string()))?
        .into_parts();
    for (name, value) in instructions.headers() {
        if let (Ok(n), Ok(mut v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            v.set_sensitive(true);
            headers.insert(n, v);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_files_and_regions() {
        assert!(is_aws_keys(" {\"AccessKeyId\": \"A\"}"));
        assert!(!is_aws_keys("ABSKbedrockapikey"));
        let k = parse(r#"{"Version": 1, "AccessKeyId": "AKID", "SecretAccessKey": "s3cr3t", "SessionToken": "tok"}"#).unwrap();
        assert_eq!(format!("{k:?}"), "AwsKeys(AKID, [REDACTED])");
        let e = parse(r#"{"AccessKeyId": "AKID", "SecretAccessKey": "s3cr3t-not-shown""#)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s3cr3t"), "{e}");
        assert!(parse(r#"{"AccessKeyId": "", "SecretAccessKey": "x"}"#).is_err());
        for (host, region) in [
            ("bedrock-runtime.us-east-1.amazonaws.com", Some("us-east-1")),
            (
                "bedrock-runtime-fips.us-gov-west-1.amazonaws.com",
                Some("us-gov-west-1"),
            ),
            (
                "bedrock-runtime.cn-north-1.amazonaws.com.cn",
                Some("cn-north-1"),
            ),
            ("bedrock.us-east-1.amazonaws.com", None),
            ("bedrock-runtime.example.com", None),
        ] {
            assert_eq!(region_of(host), region, "{host}");
        }
    }

    /// Tollgate's signature replaces the workload's, with the signed
    /// headers and scope AWS expects. (That AWS would accept it is shown
    /// end to end: the mock runtime verifies it with its own verifier.)
    #[test]
    fn the_workloads_signature_is_replaced() {
        let keys = parse(r#"{"AccessKeyId": "AKIDNODE", "SecretAccessKey": "secret", "SessionToken": "node-session"}"#).unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=AKIDPOD/x, SignedHeaders=host, Signature=00"
                .parse()
                .unwrap(),
        );
        h.insert("x-amz-security-token", "pod-session".parse().unwrap());
        h.insert("x-amz-date", "20200101T000000Z".parse().unwrap());
        h.insert("content-type", "application/json".parse().unwrap());
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_796_300_000);
        sign_request(
            &keys,
            "bedrock-runtime.us-east-1.amazonaws.com",
            "POST",
            "/model/m%3A0/converse",
            &mut h,
            b"{}",
            now,
        )
        .unwrap();
        let auth = h["authorization"].to_str().unwrap();
        assert!(
            auth.starts_with(
                "AWS4-HMAC-SHA256 Credential=AKIDNODE/20261203/us-east-1/bedrock/aws4_request"
            ),
            "{auth}"
        );
        assert!(
            auth.contains("SignedHeaders=content-type;host;x-amz-date;x-amz-security-token"),
            "{auth}"
        );
        assert_eq!(h["x-amz-security-token"], "node-session");
        assert_eq!(h["x-amz-date"], "20261203T121320Z");
        assert!(h["authorization"].is_sensitive());
        let e = sign_request(&keys, "example.com", "POST", "/", &mut h, b"", now).unwrap_err();
        assert!(e.to_string().contains("names no AWS region"), "{e}");
    }

    /// The signature covers the Host the request carries (a port and all),
    /// and a request without one gets the endpoint's, which it signed.
    #[test]
    fn the_host_sent_is_the_host_signed() {
        let keys = parse(r#"{"AccessKeyId": "AKIDNODE", "SecretAccessKey": "secret"}"#).unwrap();
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_796_300_000);
        let host = "bedrock-runtime.us-west-2.amazonaws.com";
        let signature = |h: &mut HeaderMap| {
            sign_request(&keys, host, "POST", "/model/m/converse", h, b"{}", now).unwrap();
            h["authorization"].to_str().unwrap().to_string()
        };
        let mut without = HeaderMap::new();
        let a = signature(&mut without);
        assert_eq!(without["host"], host);
        assert!(a.contains("/us-west-2/bedrock/"), "{a}");
        let mut same = HeaderMap::new();
        same.insert("host", host.parse().unwrap());
        assert_eq!(signature(&mut same), a);
        let mut port = HeaderMap::new();
        port.insert("host", format!("{host}:8443").parse().unwrap());
        assert_ne!(signature(&mut port), a);
    }
}
