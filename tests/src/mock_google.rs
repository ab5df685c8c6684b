//! The mock provider's Google token services — the OAuth token endpoint
//! (`POST /token`, the JWT bearer grant a service account uses), STS and
//! IAM Credentials (workload identity federation) and the metadata server —
//! and the check of the tokens they issued. The grant's assertion must be an RS256 JWT signed with the test
//! service account's key (RSA PKCS#1 v1.5 is deterministic, so the mock
//! verifies by signing the same input with the key and comparing), for the
//! cloud-platform scope, addressed to this endpoint, unexpired. Tokens live
//! `TOKEN_LIFETIME` (short, so tests see them refreshed), and a Vertex call
//! with one that expired is refused 401 as Google would.
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use base64::Engine;
use ring::{rand::SystemRandom, signature};

pub const TOKEN_LIFETIME: Duration = Duration::from_secs(3);
pub const ACCOUNT: &str = "tollgate-test@tollgate-test.iam.gserviceaccount.com";
const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

static ISSUED: Mutex<Option<HashMap<String, Instant>>> = Mutex::new(None);

/// Workload identity federation: the pool provider STS knows, and the
/// only subject token (a Kubernetes service-account token) it accepts.
pub const POOL_AUDIENCE: &str = "//iam.googleapis.com/projects/123456789/locations/global/workloadIdentityPools/tollgate-test/providers/cluster";
pub const SUBJECT_TOKEN: &str = "eyJ-kubernetes-token-for-google-sts";

/// Federated tokens STS issued: good for impersonation only (Vertex takes
/// the impersonated account's tokens, `ISSUED`).
static FEDERATED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// A new access token of the service account, valid for TOKEN_LIFETIME.
fn issue() -> String {
    let mut issued = ISSUED.lock().unwrap_or_else(|e| e.into_inner());
    let map = issued.get_or_insert_with(HashMap::new);
    let token = format!("ya29.mock-{}", map.len() + 1);
    map.insert(token.clone(), Instant::now());
    token
}

fn oauth_error(error: &str, why: impl Into<String>) -> (u16, serde_json::Value) {
    (
        400,
        serde_json::json!({"error": error, "error_description": why.into()}),
    )
}

/// Answer a token request: (status, JSON body, what to log).
pub fn grant(form: &[u8], key_pem: Option<&[u8]>, audience: &str) -> (u16, serde_json::Value) {
    match check(form, key_pem, audience) {
        Ok(account) => (
            200,
            serde_json::json!({"access_token": issue(), "expires_in": TOKEN_LIFETIME.as_secs(),
                               "token_type": "Bearer", "account": account}),
        ),
        Err(why) => oauth_error("invalid_grant", why),
    }
}

/// Google's STS (`POST /v1/token`, RFC 8693 token exchange): a federated
/// token for the subject token it knows, from the pool provider it knows.
pub fn sts_exchange(form: &[u8]) -> (u16, serde_json::Value) {
    let pairs: HashMap<String, String> = form_urlencoded::parse(form).into_owned().collect();
    let get = |k: &str| pairs.get(k).map(String::as_str);
    if get("grant_type") != Some("urn:ietf:params:oauth:grant-type:token-exchange")
        || get("requested_token_type") != Some("urn:ietf:params:oauth:token-type:access_token")
        || get("subject_token_type") != Some("urn:ietf:params:oauth:token-type:jwt")
        || get("scope") != Some(SCOPE)
    {
        return oauth_error(
            "invalid_request",
            format!("not a token exchange: {pairs:?}"),
        );
    }
    if get("audience") != Some(POOL_AUDIENCE) {
        return oauth_error("invalid_target", "unknown workload identity pool provider");
    }
    if get("subject_token") != Some(SUBJECT_TOKEN) {
        return oauth_error("invalid_grant", "the subject token is not valid");
    }
    let mut f = FEDERATED.lock().unwrap_or_else(|e| e.into_inner());
    let token = format!("ya29.mock-federated-{}", f.len() + 1);
    f.push(token.clone());
    (
        200,
        serde_json::json!({"access_token": token, "expires_in": 3600, "token_type": "Bearer",
            "issued_token_type": "urn:ietf:params:oauth:token-type:access_token"}),
    )
}

/// IAM Credentials' `generateAccessToken` for ACCOUNT
/// (`POST /v1/projects/-/serviceAccounts/{ACCOUNT}:generateAccessToken`),
/// authorised by a federated token STS issued: the account's token, its
/// expiry as an RFC 3339 time (camelCase, as that API answers).
pub fn impersonate(
    path: &str,
    authorization: Option<&str>,
    body: &[u8],
) -> (u16, serde_json::Value) {
    let refused = |status: u16, why: &str| {
        (
            status,
            serde_json::json!({"error": {"code": status, "message": why, "status": "PERMISSION_DENIED"}}),
        )
    };
    if path != format!("/v1/projects/-/serviceAccounts/{ACCOUNT}:generateAccessToken") {
        return refused(404, "unknown service account");
    }
    let federated = authorization.and_then(|a| a.strip_prefix("Bearer "));
    let known = FEDERATED.lock().unwrap_or_else(|e| e.into_inner());
    if !federated.is_some_and(|t| known.contains(&t.to_string())) {
        return refused(401, "the caller has no federated token STS issued");
    }
    drop(known);
    let req: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    if !req["scope"]
        .as_array()
        .is_some_and(|s| s.iter().any(|x| x == SCOPE))
    {
        return refused(400, "scope must include cloud-platform");
    }
    let expire = (time::OffsetDateTime::now_utc() + TOKEN_LIFETIME)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    (
        200,
        serde_json::json!({"accessToken": issue(), "expireTime": expire}),
    )
}

/// The metadata server's token of the node's default service account
/// (`GET /computeMetadata/v1/instance/service-accounts/default/token`),
/// only with `Metadata-Flavor: Google` (as the real one, so a request a
/// page could forge is refused).
pub fn metadata_token(path: &str, flavor: Option<&str>) -> (u16, serde_json::Value) {
    if flavor != Some("Google") {
        return (
            403,
            serde_json::json!({"error": "Missing Metadata-Flavor:Google header"}),
        );
    }
    if path != "/computeMetadata/v1/instance/service-accounts/default/token" {
        return (404, serde_json::json!({"error": "not found"}));
    }
    (
        200,
        serde_json::json!({"access_token": issue(), "expires_in": TOKEN_LIFETIME.as_secs(),
                           "token_type": "Bearer"}),
    )
}

fn check(form: &[u8], key_pem: Option<&[u8]>, audience: &str) -> Result<String, String> {
    let pairs: HashMap<String, String> = form_urlencoded::parse(form).into_owned().collect();
    if pairs.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        return Err("grant_type is not the JWT bearer grant".into());
    }
    let jwt = pairs.get("assertion").ok_or("no assertion")?;
    let (input, sig) = jwt.rsplit_once('.').ok_or("not a JWT")?;
    let pem = key_pem.ok_or("the mock has no service-account key")?;
    use rustls::pki_types::{PrivatePkcs8KeyDer, pem::PemObject};
    let der = PrivatePkcs8KeyDer::from_pem_slice(pem).map_err(|e| format!("{e:?}"))?;
    let key =
        signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).map_err(|e| e.to_string())?;
    let mut expected = vec![0; key.public().modulus_len()];
    key.sign(
        &signature::RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        input.as_bytes(),
        &mut expected,
    )
    .map_err(|_| "signing failed")?;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    if b64.encode(&expected) != sig {
        return Err("the assertion's signature is not the service account's".into());
    }
    let (header, claims) = input.split_once('.').ok_or("not a JWT")?;
    let json = |part: &str| -> Result<serde_json::Value, String> {
        let bytes = b64.decode(part).map_err(|e| e.to_string())?;
        serde_json::from_slice(&bytes).map_err(|e| e.to_string())
    };
    let (header, claims) = (json(header)?, json(claims)?);
    if header["alg"] != "RS256" {
        return Err("alg is not RS256".into());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let exp = claims["exp"].as_u64().unwrap_or(0);
    if claims["aud"] != audience
        || claims["scope"] != SCOPE
        || claims["iss"] != ACCOUNT
        || exp <= now
    {
        return Err(format!("claims not accepted: {claims}"));
    }
    Ok(ACCOUNT.to_string())
}

/// For a bearer token the mock issued: whether it is still valid. None for
/// any other token (other tests' static ones).
pub fn valid(authorization: &str) -> Option<bool> {
    let token = authorization.strip_prefix("Bearer ")?;
    if !token.starts_with("ya29.mock-") {
        return None;
    }
    let issued = ISSUED.lock().unwrap_or_else(|e| e.into_inner());
    Some(
        issued
            .as_ref()
            .and_then(|m| m.get(token))
            .is_some_and(|at| at.elapsed() < TOKEN_LIFETIME),
    )
}
