//! The mock provider's Entra ID token endpoint
//! (`POST /{tenant}/oauth2/v2.0/token`, the client credentials grant):
//! it knows one application, its secret and the federated token it trusts
//! (the client assertion of AKS workload identity), and issues tokens for the
//! Cognitive Services scope only; Azure OpenAI calls with a token it did
//! not issue are refused 401 (`valid`).
use std::{collections::HashSet, sync::Mutex};

pub const TENANT: &str = "00000000-0000-4000-8000-00000000e1d0";
pub const APP_ID: &str = "11111111-0000-4000-8000-0000000a5501";
pub const SECRET: &str = "entra-client-secret-not-real";
/// The federated token (AKS workload identity's projected token) the
/// application trusts as its client assertion.
pub const FEDERATED_TOKEN: &str = "eyJ-kubernetes-token-for-entra";
const SCOPE: &str = "https://cognitiveservices.azure.com/.default";

static ISSUED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// Answer a token request to `path`: (status, JSON body).
pub fn grant(path: &str, form: &[u8]) -> (u16, serde_json::Value) {
    let pairs: std::collections::HashMap<String, String> =
        form_urlencoded::parse(form).into_owned().collect();
    let get = |k: &str| pairs.get(k).map(String::as_str);
    let refused = |why: &str| {
        (
            400,
            serde_json::json!({"error": "invalid_client", "error_description": why}),
        )
    };
    if path != format!("/{TENANT}/oauth2/v2.0/token") {
        return refused("unknown tenant");
    }
    if get("grant_type") != Some("client_credentials") || get("scope") != Some(SCOPE) {
        return refused("not a client credentials grant for Cognitive Services");
    }
    if get("client_id") != Some(APP_ID) {
        return refused("AADSTS700016: Application not found in the directory.");
    }
    let federated = get("client_assertion_type")
        == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer");
    match (federated, get("client_secret"), get("client_assertion")) {
        (false, Some(SECRET), None) => {}
        (true, None, Some(FEDERATED_TOKEN)) => {}
        (true, ..) => {
            return refused(
                "AADSTS700211: No matching federated identity record found for presented assertion.",
            );
        }
        _ => return refused("AADSTS7000215: Invalid client secret provided."),
    }
    let mut issued = ISSUED.lock().unwrap_or_else(|e| e.into_inner());
    let set = issued.get_or_insert_with(HashSet::new);
    let token = format!("eyJ0.mock-entra-{}", set.len() + 1);
    set.insert(token.clone());
    (
        200,
        serde_json::json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599,
                           "access_token": token}),
    )
}

/// For a bearer token shaped like this mock's: whether it issued it.
pub fn valid(authorization: &str) -> Option<bool> {
    let token = authorization.strip_prefix("Bearer ")?;
    if !token.starts_with("eyJ0.mock-entra-") {
        return None;
    }
    let issued = ISSUED.lock().unwrap_or_else(|e| e.into_inner());
    Some(issued.as_ref().is_some_and(|s| s.contains(token)))
}
