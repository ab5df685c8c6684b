//! The mock provider's Google OAuth token endpoint (`POST /token`, the JWT
//! bearer grant a service account uses) and the check of the tokens it
//! issued. The grant's assertion must be an RS256 JWT signed with the test
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

/// Answer a token request: (status, JSON body, what to log).
pub fn grant(form: &[u8], key_pem: Option<&[u8]>, audience: &str) -> (u16, serde_json::Value) {
    match check(form, key_pem, audience) {
        Ok(account) => {
            let mut issued = ISSUED.lock().unwrap_or_else(|e| e.into_inner());
            let map = issued.get_or_insert_with(HashMap::new);
            let token = format!("ya29.mock-{}", map.len() + 1);
            map.insert(token.clone(), Instant::now());
            (
                200,
                serde_json::json!({"access_token": token, "expires_in": TOKEN_LIFETIME.as_secs(),
                                   "token_type": "Bearer", "account": account}),
            )
        }
        Err(why) => (
            400,
            serde_json::json!({"error": "invalid_grant", "error_description": why}),
        ),
    }
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
