//! Node-held credentials that are exchanged for short-lived tokens, held
//! in a rule's `credential_file` and told apart by their JSON shape
//! (`exchanged`):
//! * Google (`google`), for Vertex AI: a service-account key file (`"type":
//!   "service_account"`), a workload identity federation configuration
//!   (`"type": "external_account"`) or the node's metadata server (`"type":
//!   "metadata_server"`);
//! * Entra ID (`entra`), for Azure OpenAI: an application's client secret
//!   (`{"tenant", "appId", "password"}` as `az ad sp create-for-rbac`
//!   prints it, or `tenantId`, `clientId`, `clientSecret`) or its
//!   federated token (`federatedTokenFile`, AKS workload identity);
//! * AWS (`aws`), for Bedrock: a web identity (`{"RoleArn",
//!   "WebIdentityTokenFile"}`, what EKS projects for IRSA) exchanged at
//!   STS for temporary keys, which then sign each call (`sigv4`).
//!
//! Token files (projected service-account tokens) are read again for each
//! exchange: the kubelet rotates them. Each call the rule allows carries
//! the current token. Tokens are cached per file and fetched again once
//! 80 % of their lifetime has passed, so a call never carries an expired
//! one; the fetch is shared by the calls that need it at once (one request
//! to the token endpoint).
//!
//! The token endpoints are called from the agent's own network (not a
//! pod's), trusting the agent's roots (`tls.system_roots`,
//! `tls.extra_roots`), without following redirects.
mod aws;
mod entra;
mod google;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Deserialize;
use zeroize::Zeroizing;

use super::credentials::Secret;

/// Fetch again once this share of a token's lifetime has passed.
const REFRESH_AT: f64 = 0.8;

#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("the credential is not usable: {0}")]
    Key(String),
    #[error("the token endpoint {uri} failed: {message}")]
    Endpoint { uri: String, message: String },
    #[error("no token client: the agent was started without one (tests only)")]
    NoClient,
}

/// A token and how long it lasts.
type OAuthToken = (Zeroizing<String>, Duration);

/// What a credential file exchanged for tokens is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exchanged {
    GoogleServiceAccount,
    GoogleExternalAccount,
    GoogleMetadataServer,
    EntraApplication,
    /// The token is AWS keys as JSON (`sigv4::parse` reads it).
    AwsWebIdentity,
}

/// How a call carries an exchanged token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenUse {
    /// Where the provider's own key goes (Google: `Authorization: Bearer`).
    ProviderKey,
    /// `Authorization: Bearer`, also where the provider's key would go in
    /// another header (Entra tokens for Azure OpenAI's `api-key`).
    Bearer,
    /// Temporary AWS keys that sign the call.
    AwsKeys,
}

impl Exchanged {
    pub fn token_use(self) -> TokenUse {
        match self {
            Exchanged::GoogleServiceAccount
            | Exchanged::GoogleExternalAccount
            | Exchanged::GoogleMetadataServer => TokenUse::ProviderKey,
            Exchanged::EntraApplication => TokenUse::Bearer,
            Exchanged::AwsWebIdentity => TokenUse::AwsKeys,
        }
    }
}

/// Whether a credential file's text is one exchanged for tokens, and which.
pub fn exchanged(text: &str) -> Option<Exchanged> {
    if !text.trim_start().starts_with('{') {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    match v["type"].as_str() {
        Some("service_account") => return Some(Exchanged::GoogleServiceAccount),
        Some("external_account") => return Some(Exchanged::GoogleExternalAccount),
        Some("metadata_server") => return Some(Exchanged::GoogleMetadataServer),
        _ => {}
    }
    if v["RoleArn"].is_string() && v["WebIdentityTokenFile"].is_string() {
        return Some(Exchanged::AwsWebIdentity);
    }
    let has = |names: &[&str]| names.iter().any(|n| v[*n].is_string());
    (has(&["tenant", "tenantId"])
        && has(&["appId", "clientId"])
        && has(&[
            "password",
            "clientSecret",
            "federatedTokenFile",
            "tokenFile",
        ]))
    .then_some(Exchanged::EntraApplication)
}

/// A token file's text, trimmed (projected tokens end with no newline,
/// hand-written ones often with one).
fn read_token_file(path: &Path) -> Result<Zeroizing<String>, ExchangeError> {
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
        ExchangeError::Key(format!(
            "cannot read the token file {}: {e}",
            path.display()
        ))
    })?);
    let token = text.trim();
    if token.is_empty() {
        return Err(ExchangeError::Key(format!(
            "the token file {} is empty",
            path.display()
        )));
    }
    Ok(Zeroizing::new(token.to_string()))
}

/// How long until the RFC 3339 time `at` (at least a second, so a token
/// that arrives about to expire is fetched again at once, not in a loop).
fn until(at: &str) -> Result<Duration, String> {
    let t = time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("`{at}` is not an RFC 3339 time: {e}"))?;
    let ms = (t - time::OffsetDateTime::now_utc())
        .whole_milliseconds()
        .max(1000);
    Ok(Duration::from_millis(ms as u64))
}

/// An OAuth token endpoint's answer (`access_token`, `expires_in`).
fn oauth_answer(uri: &str, body: &[u8]) -> Result<OAuthToken, ExchangeError> {
    #[derive(Deserialize)]
    struct Answer {
        access_token: Zeroizing<String>,
        #[serde(default)]
        expires_in: Option<u64>,
    }
    let a: Answer = serde_json::from_slice(body).map_err(|e| ExchangeError::Endpoint {
        uri: uri.to_string(),
        message: format!("the answer is not a token: {e}"),
    })?;
    let lifetime = Duration::from_secs(a.expires_in.unwrap_or(3600).max(1));
    Ok((a.access_token, lifetime))
}

struct Cached {
    token: Arc<Secret>,
    fetched: Instant,
    lifetime: Duration,
}

impl Cached {
    fn fresh(&self) -> bool {
        self.fetched.elapsed() < self.lifetime.mul_f64(REFRESH_AT)
    }
}

/// Tokens by credential file, and the client that fetches them.
#[derive(Default)]
pub struct TokenExchange {
    client: Option<reqwest::Client>,
    cache: Mutex<HashMap<PathBuf, Cached>>,
    /// One fetch at a time per file; the others wait for its token.
    fetching: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
}

impl TokenExchange {
    /// An exchange whose token endpoints are verified with `tls`.
    pub fn new(mut tls: rustls::ClientConfig) -> Result<Self, String> {
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(Duration::from_secs(10))
            // A redirect would carry a grant (a secret, an assertion) elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            client: Some(client),
            ..Default::default()
        })
    }

    fn cached(&self, file: &Path) -> Option<Arc<Secret>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(file)
            .filter(|c| c.fresh())
            .map(|c| c.token.clone())
    }

    /// The current access token for the credential `text` (read from
    /// `file`, of kind `kind`), fetched when there is none still fresh.
    pub async fn token(
        &self,
        file: &Path,
        text: &str,
        kind: Exchanged,
    ) -> Result<Arc<Secret>, ExchangeError> {
        if let Some(t) = self.cached(file) {
            return Ok(t);
        }
        let gate = {
            let mut f = self.fetching.lock().unwrap_or_else(|e| e.into_inner());
            f.entry(file.to_owned()).or_default().clone()
        };
        let _one = gate.lock().await;
        // Another call may have fetched it while this one waited.
        if let Some(t) = self.cached(file) {
            return Ok(t);
        }
        fn read<T: serde::de::DeserializeOwned>(
            text: &str,
            what: &str,
        ) -> Result<T, ExchangeError> {
            serde_json::from_str(text).map_err(|e| ExchangeError::Key(format!("not {what}: {e}")))
        }
        let ((token, lifetime), who) = match kind {
            Exchanged::GoogleServiceAccount => {
                let sa: google::ServiceAccount = read(text, "a service-account key file")?;
                (google::service_account(self, &sa).await?, sa.client_email)
            }
            Exchanged::GoogleExternalAccount => {
                let ea: google::ExternalAccount =
                    read(text, "a workload identity federation configuration")?;
                (google::external_account(self, &ea).await?, ea.audience)
            }
            Exchanged::GoogleMetadataServer => {
                let m: google::MetadataServer =
                    read(text, "a metadata server (`host`, `service_account`)")?;
                (google::metadata_server(self, &m).await?, m.service_account)
            }
            Exchanged::EntraApplication => {
                let app: entra::EntraApp = read(text, "an Entra application")?;
                (entra::grant(self, &app).await?, app.app_id)
            }
            Exchanged::AwsWebIdentity => {
                let w: aws::WebIdentity =
                    read(text, "a web identity (RoleArn, WebIdentityTokenFile)")?;
                (aws::assume_role(self, &w).await?, w.role_arn)
            }
        };
        tracing::info!(file = %file.display(), principal = %who, lifetime_s = lifetime.as_secs(),
            "fetched an access token");
        let token = Arc::new(Secret::new(token));
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.insert(
            file.to_owned(),
            Cached {
                token: token.clone(),
                fetched: Instant::now(),
                lifetime,
            },
        );
        Ok(token)
    }

    fn client(&self) -> Result<&reqwest::Client, ExchangeError> {
        self.client.as_ref().ok_or(ExchangeError::NoClient)
    }

    /// Send `req` to `uri`: the body of a successful answer and its
    /// `Metadata-Flavor` header, or what failed.
    async fn send(
        uri: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<(Vec<u8>, Option<String>), ExchangeError> {
        let endpoint = |message: String| ExchangeError::Endpoint {
            uri: uri.to_string(),
            message,
        };
        let resp = req.send().await.map_err(|e| endpoint(e.to_string()))?;
        let status = resp.status();
        let flavor = resp
            .headers()
            .get("metadata-flavor")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp.bytes().await.map_err(|e| endpoint(e.to_string()))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
            return Err(endpoint(format!("HTTP {status}: {text}")));
        }
        Ok((body.to_vec(), flavor))
    }

    /// POST `form` (form-encoded) to `uri`.
    async fn post_form(&self, uri: &str, form: &[(&str, &str)]) -> Result<Vec<u8>, ExchangeError> {
        let form = Zeroizing::new(
            form_urlencoded::Serializer::new(String::new())
                .extend_pairs(form)
                .finish(),
        );
        let req = self
            .client()?
            .post(uri)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.to_string());
        Ok(Self::send(uri, req).await?.0)
    }

    /// POST the JSON `body` to `uri` with `bearer` as the credential.
    async fn post_json(
        &self,
        uri: &str,
        bearer: &str,
        body: String,
    ) -> Result<Vec<u8>, ExchangeError> {
        let req = self
            .client()?
            .post(uri)
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {bearer}"))
            .body(body);
        Ok(Self::send(uri, req).await?.0)
    }

    /// GET `uri` with `headers`.
    async fn get(
        &self,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> Result<(Vec<u8>, Option<String>), ExchangeError> {
        let mut req = self.client()?.get(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Self::send(uri, req).await
    }

    /// POST `form` to the OAuth token endpoint `uri`: the token and its lifetime.
    async fn oauth_token(
        &self,
        uri: &str,
        form: &[(&str, &str)],
    ) -> Result<OAuthToken, ExchangeError> {
        let body = self.post_form(uri, form).await?;
        oauth_answer(uri, &body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchanged_credentials_are_told_from_the_others() {
        use Exchanged::*;
        for (text, kind) in [
            (
                r#"{"type": "service_account", "client_email": "a@b"}"#,
                Some(GoogleServiceAccount),
            ),
            (
                r#"{"type": "external_account", "audience": "//iam.googleapis.com/x"}"#,
                Some(GoogleExternalAccount),
            ),
            (r#"{"type": "metadata_server"}"#, Some(GoogleMetadataServer)),
            (r#"{"type": "authorized_user"}"#, None),
            (
                r#"{"appId": "a", "password": "p", "tenant": "t", "displayName": "x"}"#,
                Some(EntraApplication),
            ),
            (
                r#"{"clientId": "a", "clientSecret": "p", "tenantId": "t"}"#,
                Some(EntraApplication),
            ),
            (
                r#"{"clientId": "a", "tenantId": "t", "federatedTokenFile": "/var/run/secrets/azure/tokens/azure-identity-token"}"#,
                Some(EntraApplication),
            ),
            (r#"{"clientId": "a", "tenantId": "t"}"#, None),
            (
                r#"{"RoleArn": "arn:aws:iam::1:role/r", "WebIdentityTokenFile": "/t"}"#,
                Some(AwsWebIdentity),
            ),
            (r#"{"AccessKeyId": "A", "SecretAccessKey": "s"}"#, None),
            ("ya29.token", None),
        ] {
            assert_eq!(exchanged(text), kind, "{text}");
        }
    }

    #[test]
    fn a_cached_token_is_fresh_for_80_percent_of_its_lifetime() {
        let c = Cached {
            token: Arc::new(Secret::new(Zeroizing::new("t".into()))),
            fetched: Instant::now() - Duration::from_secs(7),
            lifetime: Duration::from_secs(10),
        };
        assert!(c.fresh());
        let c = Cached {
            fetched: Instant::now() - Duration::from_secs(9),
            ..c
        };
        assert!(!c.fresh());
    }

    #[test]
    fn token_files_are_trimmed_and_must_hold_a_token() {
        let dir = std::env::temp_dir().join(format!("tollgate-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "eyJ.token\n").unwrap();
        assert_eq!(read_token_file(&f).unwrap().as_str(), "eyJ.token");
        std::fs::write(&f, " \n").unwrap();
        assert!(
            read_token_file(&f)
                .unwrap_err()
                .to_string()
                .contains("is empty")
        );
        let missing = read_token_file(&dir.join("none")).unwrap_err().to_string();
        assert!(missing.contains("cannot read the token file"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_lifetime_from_an_expiry_time_is_at_least_a_second() {
        assert_eq!(
            until("2014-10-24T23:00:23Z").unwrap(),
            Duration::from_secs(1)
        );
        let soon = (time::OffsetDateTime::now_utc() + time::Duration::minutes(10))
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let d = until(&soon).unwrap();
        assert!(
            d > Duration::from_secs(590) && d <= Duration::from_secs(600),
            "{d:?}"
        );
        assert!(until("tomorrow").unwrap_err().contains("RFC 3339"));
    }
}
