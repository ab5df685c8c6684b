//! Entra ID: access tokens for `https://cognitiveservices.azure.com/.default`
//! (Azure OpenAI) by the client credentials grant, with an application's
//! client secret or with a federated token (AKS workload identity: the
//! projected service-account token the application trusts, presented as
//! the client assertion).
use std::path::PathBuf;

use serde::Deserialize;
use zeroize::Zeroizing;

use super::{ExchangeError, OAuthToken, TokenExchange, read_token_file};

/// The scope Azure OpenAI accepts.
const COGNITIVE_SERVICES: &str = "https://cognitiveservices.azure.com/.default";
const ENTRA_AUTHORITY: &str = "https://login.microsoftonline.com";
const JWT_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// An Entra ID application: `az ad sp create-for-rbac`'s output (`tenant`,
/// `appId`, `password`), or AKS workload identity's names (`tenantId`,
/// `clientId`, `federatedTokenFile`, `authorityHost`: its `AZURE_*`
/// variables).
#[derive(Deserialize)]
pub(super) struct EntraApp {
    #[serde(alias = "tenantId")]
    tenant: String,
    #[serde(rename = "appId", alias = "clientId")]
    pub app_id: String,
    #[serde(default, alias = "clientSecret")]
    password: Option<Zeroizing<String>>,
    #[serde(default, rename = "federatedTokenFile", alias = "tokenFile")]
    federated_token_file: Option<PathBuf>,
    /// The token service (a sovereign cloud's, a test's); default Entra's.
    #[serde(default = "default_authority", alias = "authorityHost")]
    authority: String,
}

fn default_authority() -> String {
    ENTRA_AUTHORITY.into()
}

/// A token for `app`, by its federated token when it has one (read again
/// for each grant: the kubelet rotates it), else by its secret.
pub(super) async fn grant(ex: &TokenExchange, app: &EntraApp) -> Result<OAuthToken, ExchangeError> {
    let uri = format!(
        "{}/{}/oauth2/v2.0/token",
        app.authority.trim_end_matches('/'),
        app.tenant
    );
    let mut form = vec![
        ("grant_type", "client_credentials"),
        ("client_id", app.app_id.as_str()),
        ("scope", COGNITIVE_SERVICES),
    ];
    let assertion;
    match (&app.federated_token_file, &app.password) {
        (Some(file), _) => {
            assertion = read_token_file(file)?;
            form.push(("client_assertion_type", JWT_ASSERTION));
            form.push(("client_assertion", assertion.as_str()));
        }
        (None, Some(secret)) => form.push(("client_secret", secret.as_str())),
        (None, None) => {
            return Err(ExchangeError::Key(
                "an Entra application needs `password` (its client secret) or `federatedTokenFile`"
                    .into(),
            ));
        }
    }
    ex.oauth_token(&uri, &form).await
}
