//! Node-held credentials that are exchanged for short-lived tokens, held
//! in a rule's `credential_file`:
//! * a Google service-account key (the JSON key file, `"type":
//!   "service_account"`): OAuth access tokens by the JWT bearer grant
//!   (RFC 7523) at the key's `token_uri`, for Vertex AI;
//! * an Entra ID application's client secret (`{"tenant", "appId",
//!   "password"}` as `az ad sp create-for-rbac` prints it, or `tenantId`,
//!   `clientId`, `clientSecret`): access tokens for
//!   `https://cognitiveservices.azure.com/.default` by the client
//!   credentials grant, for Azure OpenAI;
//! * an AWS web identity (`{"RoleArn", "WebIdentityTokenFile"}`, what EKS
//!   projects for IRSA as `AWS_ROLE_ARN` and `AWS_WEB_IDENTITY_TOKEN_FILE`):
//!   temporary AWS keys by STS `AssumeRoleWithWebIdentity`, the token file
//!   read again for each exchange (the kubelet rotates it), for Bedrock
//!   (the keys then sign each call, `sigv4`).
//!
//! Each call the rule allows carries the current token. Tokens are cached
//! per file and fetched again once 80 % of their lifetime has passed, so a
//! call never carries an expired one; the fetch is shared by the calls
//! that need it at once (one request to the token endpoint).
//!
//! The token endpoint is called from the agent's own network (not a
//! pod's), trusting the agent's roots (`tls.system_roots`,
//! `tls.extra_roots`).
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use base64::Engine;
use ring::{rand::SystemRandom, signature};
use serde::Deserialize;
use zeroize::Zeroizing;

use super::credentials::Secret;

/// The scope Vertex AI (and every Google Cloud API) accepts.
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
/// Fetch again once this share of a token's lifetime has passed.
const REFRESH_AT: f64 = 0.8;

#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("the service-account key is not usable: {0}")]
    Key(String),
    #[error("the token endpoint {uri} failed: {message}")]
    Endpoint { uri: String, message: String },
    #[error("no token client: the agent was started without one (tests only)")]
    NoClient,
}

/// The scope Azure OpenAI accepts.
const COGNITIVE_SERVICES: &str = "https://cognitiveservices.azure.com/.default";
const ENTRA_AUTHORITY: &str = "https://login.microsoftonline.com";

/// What a credential file exchanged for tokens is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exchanged {
    GoogleServiceAccount,
    EntraClientSecret,
    /// The token is AWS keys as JSON (`sigv4::parse` reads it).
    AwsWebIdentity,
}

/// Whether a credential file's text is one exchanged for tokens, and which.
pub fn exchanged(text: &str) -> Option<Exchanged> {
    if !text.trim_start().starts_with('{') {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    if v["type"] == "service_account" {
        return Some(Exchanged::GoogleServiceAccount);
    }
    if v["RoleArn"].is_string() && v["WebIdentityTokenFile"].is_string() {
        return Some(Exchanged::AwsWebIdentity);
    }
    let has = |a: &str, b: &str| v.get(a).or_else(|| v.get(b)).is_some_and(|x| x.is_string());
    (has("tenant", "tenantId") && has("appId", "clientId") && has("password", "clientSecret"))
        .then_some(Exchanged::EntraClientSecret)
}

/// An Entra ID application's client secret.
#[derive(Deserialize)]
struct EntraApp {
    #[serde(alias = "tenantId")]
    tenant: String,
    #[serde(rename = "appId", alias = "clientId")]
    app_id: String,
    #[serde(alias = "clientSecret")]
    password: Zeroizing<String>,
    /// The token service (a sovereign cloud's, a test's); default Entra's.
    #[serde(default = "default_authority", alias = "authorityHost")]
    authority: String,
}

fn default_authority() -> String {
    ENTRA_AUTHORITY.into()
}

/// An AWS role assumed with a web identity token.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct WebIdentity {
    role_arn: String,
    web_identity_token_file: PathBuf,
    #[serde(default = "default_session_name")]
    role_session_name: String,
    /// STS's endpoint; a regional one (`https://sts.us-east-1.amazonaws.com`)
    /// keeps the exchange in the region.
    #[serde(default = "default_sts")]
    sts_endpoint: String,
    #[serde(default)]
    duration_seconds: Option<u32>,
}

fn default_session_name() -> String {
    "tollgate".into()
}

fn default_sts() -> String {
    "https://sts.amazonaws.com/".into()
}

/// STS's answer, as far as it matters here.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsAnswer {
    assume_role_with_web_identity_result: StsResult,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsResult {
    credentials: StsCredentials,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StsCredentials {
    access_key_id: String,
    secret_access_key: Zeroizing<String>,
    session_token: Zeroizing<String>,
    expiration: String,
}

#[derive(Deserialize)]
struct ServiceAccount {
    client_email: String,
    private_key: Zeroizing<String>,
    #[serde(default)]
    private_key_id: String,
    #[serde(default = "default_token_uri")]
    token_uri: String,
}

fn default_token_uri() -> String {
    "https://oauth2.googleapis.com/token".into()
}

/// The signed JWT a service account presents (RS256), valid for an hour.
fn assertion(sa: &ServiceAccount, now: SystemTime) -> Result<String, ExchangeError> {
    use rustls::pki_types::{PrivatePkcs8KeyDer, pem::PemObject};
    let der = PrivatePkcs8KeyDer::from_pem_slice(sa.private_key.as_bytes())
        .map_err(|e| ExchangeError::Key(format!("private_key is not a PKCS#8 PEM key ({e:?})")))?;
    let key = signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der())
        .map_err(|e| ExchangeError::Key(format!("private_key is not an RSA key ({e})")))?;
    let iat = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": sa.private_key_id});
    let claims = serde_json::json!({
        "iss": sa.client_email, "sub": sa.client_email, "aud": sa.token_uri,
        "scope": CLOUD_PLATFORM, "iat": iat, "exp": iat + 3600,
    });
    let signing_input = format!("{}.{}", b64(&header), b64(&claims));
    let mut sig = vec![0; key.public().modulus_len()];
    key.sign(
        &signature::RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        signing_input.as_bytes(),
        &mut sig,
    )
    .map_err(|_| ExchangeError::Key("signing the assertion failed".into()))?;
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig);
    Ok(format!("{signing_input}.{sig}"))
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
        let (token, lifetime, who) = match kind {
            Exchanged::GoogleServiceAccount => {
                let sa: ServiceAccount = serde_json::from_str(text).map_err(|e| {
                    ExchangeError::Key(format!("not a service-account key file: {e}"))
                })?;
                let jwt = Zeroizing::new(assertion(&sa, SystemTime::now())?);
                let form = [
                    ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                    ("assertion", jwt.as_str()),
                ];
                let (t, l) = self.fetch(&sa.token_uri, &form).await?;
                (t, l, sa.client_email)
            }
            Exchanged::EntraClientSecret => {
                let app: EntraApp = serde_json::from_str(text).map_err(|e| {
                    ExchangeError::Key(format!("not an Entra application's secret: {e}"))
                })?;
                let uri = format!(
                    "{}/{}/oauth2/v2.0/token",
                    app.authority.trim_end_matches('/'),
                    app.tenant
                );
                let form = [
                    ("grant_type", "client_credentials"),
                    ("client_id", app.app_id.as_str()),
                    ("client_secret", app.password.as_str()),
                    ("scope", COGNITIVE_SERVICES),
                ];
                let (t, l) = self.fetch(&uri, &form).await?;
                (t, l, app.app_id)
            }
            Exchanged::AwsWebIdentity => {
                let w: WebIdentity = serde_json::from_str(text).map_err(|e| {
                    ExchangeError::Key(format!(
                        "not a web identity (RoleArn, WebIdentityTokenFile): {e}"
                    ))
                })?;
                let (t, l) = self.assume_role(&w).await?;
                (t, l, w.role_arn)
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

    /// STS `AssumeRoleWithWebIdentity` with the current token of `w`'s file:
    /// the temporary keys as JSON (the credential_process shape) and how
    /// long they last.
    async fn assume_role(
        &self,
        w: &WebIdentity,
    ) -> Result<(Zeroizing<String>, Duration), ExchangeError> {
        let endpoint = |message: String| ExchangeError::Endpoint {
            uri: w.sts_endpoint.clone(),
            message,
        };
        let token = Zeroizing::new(std::fs::read_to_string(&w.web_identity_token_file).map_err(
            |e| {
                ExchangeError::Key(format!(
                    "cannot read {}: {e}",
                    w.web_identity_token_file.display()
                ))
            },
        )?);
        let duration = w.duration_seconds.unwrap_or(3600).to_string();
        let form = [
            ("Action", "AssumeRoleWithWebIdentity"),
            ("Version", "2011-06-15"),
            ("RoleArn", w.role_arn.as_str()),
            ("RoleSessionName", w.role_session_name.as_str()),
            ("DurationSeconds", duration.as_str()),
            ("WebIdentityToken", token.trim()),
        ];
        let body = self.post_form(&w.sts_endpoint, &form).await?;
        let text = String::from_utf8_lossy(&body);
        let a: StsAnswer = quick_xml::de::from_str(&text)
            .map_err(|e| endpoint(format!("the answer is not STS credentials: {e}")))?;
        let c = a.assume_role_with_web_identity_result.credentials;
        let expires = time::OffsetDateTime::parse(
            &c.expiration,
            &time::format_description::well_known::Rfc3339,
        )
        .map_err(|e| endpoint(format!("Expiration `{}`: {e}", c.expiration)))?;
        let left = (expires - time::OffsetDateTime::now_utc())
            .whole_milliseconds()
            .max(1000);
        let keys = serde_json::json!({
            "Version": 1, "AccessKeyId": c.access_key_id,
            "SecretAccessKey": c.secret_access_key.as_str(), "SessionToken": c.session_token.as_str(),
        });
        Ok((
            Zeroizing::new(keys.to_string()),
            Duration::from_millis(left as u64),
        ))
    }

    /// POST `form` (form-encoded) to the token endpoint `uri`: the body of
    /// a successful answer, or what failed.
    async fn post_form(&self, uri: &str, form: &[(&str, &str)]) -> Result<Vec<u8>, ExchangeError> {
        let client = self.client.as_ref().ok_or(ExchangeError::NoClient)?;
        let endpoint = |message: String| ExchangeError::Endpoint {
            uri: uri.to_string(),
            message,
        };
        let form = Zeroizing::new(
            form_urlencoded::Serializer::new(String::new())
                .extend_pairs(form)
                .finish(),
        );
        let resp = client
            .post(uri)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.to_string())
            .send()
            .await
            .map_err(|e| endpoint(e.to_string()))?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| endpoint(e.to_string()))?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
            return Err(endpoint(format!("HTTP {status}: {text}")));
        }
        Ok(body.to_vec())
    }

    /// POST `form` to the token endpoint `uri`: the token and its lifetime.
    async fn fetch(
        &self,
        uri: &str,
        form: &[(&str, &str)],
    ) -> Result<(Zeroizing<String>, Duration), ExchangeError> {
        let body = self.post_form(uri, form).await?;
        #[derive(Deserialize)]
        struct Answer {
            access_token: Zeroizing<String>,
            #[serde(default)]
            expires_in: Option<u64>,
        }
        let a: Answer = serde_json::from_slice(&body).map_err(|e| ExchangeError::Endpoint {
            uri: uri.to_string(),
            message: format!("the answer is not a token: {e}"),
        })?;
        let lifetime = Duration::from_secs(a.expires_in.unwrap_or(3600).max(1));
        Ok((a.access_token, lifetime))
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
                r#"{"appId": "a", "password": "p", "tenant": "t", "displayName": "x"}"#,
                Some(EntraClientSecret),
            ),
            (
                r#"{"clientId": "a", "clientSecret": "p", "tenantId": "t"}"#,
                Some(EntraClientSecret),
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

    /// STS's answer as AWS documents it (AssumeRoleWithWebIdentity,
    /// "Example"), namespace and all.
    #[test]
    fn the_sts_answer_is_read_for_its_credentials() {
        let xml = r#"<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>amzn1.account.AF6RHO7KZU5XRVQJGXK6HB56KR2A</SubjectFromWebIdentityToken>
    <Audience>client.5498841531868486423.1548@apps.example.com</Audience>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/FederatedWebIdentityRole/app1</Arn>
      <AssumedRoleId>AROACLKWSDQRAOEXAMPLE:app1</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <SessionToken>AQoDYXdzEE0a8ANXXXXXXXXNO1ewxE5TijQyp+IEXAMPLE</SessionToken>
      <SecretAccessKey>wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY</SecretAccessKey>
      <Expiration>2014-10-24T23:00:23Z</Expiration>
      <AccessKeyId>ASgeIAIOSFODNN7EXAMPLE</AccessKeyId>
    </Credentials>
    <SourceIdentity>SourceIdentityValue</SourceIdentity>
    <Provider>www.amazon.com</Provider>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata>
    <RequestId>ad4156e9-bce1-11e2-82e6-6b6efEXAMPLE</RequestId>
  </ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>"#;
        let a: StsAnswer = quick_xml::de::from_str(xml).unwrap();
        let c = a.assume_role_with_web_identity_result.credentials;
        assert_eq!(c.access_key_id, "ASgeIAIOSFODNN7EXAMPLE");
        assert_eq!(
            c.session_token.as_str(),
            "AQoDYXdzEE0a8ANXXXXXXXXNO1ewxE5TijQyp+IEXAMPLE"
        );
        assert_eq!(c.expiration, "2014-10-24T23:00:23Z");
    }

    #[test]
    fn a_key_that_is_not_rsa_says_so() {
        let sa = ServiceAccount {
            client_email: "sa@p.iam.gserviceaccount.com".into(),
            private_key: Zeroizing::new(
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into(),
            ),
            private_key_id: "k1".into(),
            token_uri: default_token_uri(),
        };
        let e = assertion(&sa, SystemTime::now()).unwrap_err().to_string();
        assert!(e.contains("not usable"), "{e}");
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
}
