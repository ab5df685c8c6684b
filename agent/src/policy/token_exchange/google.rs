//! Google Cloud access tokens (the cloud-platform scope, for Vertex AI)
//! from three sources:
//! * a service-account key (`"type": "service_account"`): a JWT signed
//!   with the key, exchanged by the JWT bearer grant (RFC 7523);
//! * workload identity federation (`"type": "external_account"`, the file
//!   `gcloud iam workload-identity-pools create-cred-config` writes): a
//!   token from a file or a URL (a projected Kubernetes service-account
//!   token, for example) exchanged at Google's STS (RFC 8693), then, when
//!   the file names a service account to impersonate, for that account's
//!   token at IAM Credentials' `generateAccessToken`;
//! * the metadata server (`"type": "metadata_server"`, Tollgate's own
//!   shape: GCE and GKE nodes): the token of the node's service account.
use std::{collections::BTreeMap, path::PathBuf, time::SystemTime};

use base64::Engine;
use ring::{rand::SystemRandom, signature};
use serde::Deserialize;
use zeroize::Zeroizing;

use super::{ExchangeError, OAuthToken, TokenExchange, read_token_file, until};

/// The scope Vertex AI (and every Google Cloud API) accepts.
const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";

#[derive(Deserialize)]
pub(super) struct ServiceAccount {
    pub client_email: String,
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

/// A service account's token by the JWT bearer grant at its `token_uri`.
pub(super) async fn service_account(
    ex: &TokenExchange,
    sa: &ServiceAccount,
) -> Result<OAuthToken, ExchangeError> {
    let jwt = Zeroizing::new(assertion(sa, SystemTime::now())?);
    let form = [
        ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
        ("assertion", jwt.as_str()),
    ];
    ex.oauth_token(&sa.token_uri, &form).await
}

/// Workload identity federation's credential configuration (Google's
/// "external account" file), for its file and URL sources.
#[derive(Deserialize)]
pub(super) struct ExternalAccount {
    pub audience: String,
    subject_token_type: String,
    #[serde(default = "default_sts")]
    token_url: String,
    #[serde(default)]
    service_account_impersonation_url: Option<String>,
    #[serde(default)]
    service_account_impersonation: Option<Impersonation>,
    credential_source: CredentialSource,
}

fn default_sts() -> String {
    "https://sts.googleapis.com/v1/token".into()
}

#[derive(Deserialize)]
struct Impersonation {
    #[serde(default)]
    token_lifetime_seconds: Option<u32>,
}

#[derive(Deserialize)]
struct CredentialSource {
    #[serde(default)]
    file: Option<PathBuf>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    format: Option<SourceFormat>,
    /// AWS (`aws1`) sources: not supported.
    #[serde(default)]
    environment_id: Option<String>,
    /// Executable sources: not supported.
    #[serde(default)]
    executable: Option<serde_json::Value>,
}

/// How the subject token is held: the whole text, or a JSON field of it.
#[derive(Deserialize)]
struct SourceFormat {
    #[serde(rename = "type", default = "text")]
    kind: String,
    #[serde(default)]
    subject_token_field_name: Option<String>,
}

fn text() -> String {
    "text".into()
}

impl ExternalAccount {
    /// Where the subject token comes from, checked before any exchange.
    pub fn check(&self) -> Result<(), ExchangeError> {
        let s = &self.credential_source;
        if s.environment_id.is_some() || s.executable.is_some() {
            return Err(ExchangeError::Key(
                "credential_source: only `file` and `url` sources are supported (not AWS or executable sources)".into(),
            ));
        }
        if s.file.is_some() == s.url.is_some() {
            return Err(ExchangeError::Key(
                "credential_source needs exactly one of `file` and `url`".into(),
            ));
        }
        if let Some(f) = &s.format {
            match f.kind.as_str() {
                "text" => {}
                "json" if f.subject_token_field_name.is_some() => {}
                "json" => {
                    return Err(ExchangeError::Key(
                        "credential_source.format: `json` needs `subject_token_field_name`".into(),
                    ));
                }
                other => {
                    return Err(ExchangeError::Key(format!(
                        "credential_source.format.type `{other}` is not `text` or `json`"
                    )));
                }
            }
        }
        Ok(())
    }

    /// The subject token, read afresh (a projected token is rotated).
    async fn subject_token(&self, ex: &TokenExchange) -> Result<Zeroizing<String>, ExchangeError> {
        let s = &self.credential_source;
        let raw = match (&s.file, &s.url) {
            (Some(file), _) => read_token_file(file)?,
            (None, Some(url)) => {
                let headers: Vec<(&str, &str)> = s
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let (body, _) = ex.get(url, &headers).await?;
                Zeroizing::new(String::from_utf8_lossy(&body).trim().to_string())
            }
            (None, None) => return Err(ExchangeError::Key("no credential_source".into())),
        };
        match s.format.as_ref().and_then(|f| {
            (f.kind == "json").then_some(f.subject_token_field_name.as_deref().unwrap_or(""))
        }) {
            None => Ok(raw),
            Some(field) => {
                let v: serde_json::Value = serde_json::from_str(&raw).map_err(|e| {
                    ExchangeError::Key(format!("the subject token source is not JSON: {e}"))
                })?;
                v[field]
                    .as_str()
                    .map(|t| Zeroizing::new(t.to_string()))
                    .ok_or_else(|| {
                        ExchangeError::Key(format!(
                            "the subject token source has no string field `{field}`"
                        ))
                    })
            }
        }
    }
}

/// Workload identity federation: the subject token exchanged at STS, then
/// for the impersonated service account's token when there is one.
pub(super) async fn external_account(
    ex: &TokenExchange,
    ea: &ExternalAccount,
) -> Result<OAuthToken, ExchangeError> {
    ea.check()?;
    let subject = ea.subject_token(ex).await?;
    let form = [
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("audience", ea.audience.as_str()),
        ("scope", CLOUD_PLATFORM),
        (
            "requested_token_type",
            "urn:ietf:params:oauth:token-type:access_token",
        ),
        ("subject_token_type", ea.subject_token_type.as_str()),
        ("subject_token", subject.as_str()),
    ];
    let federated = ex.oauth_token(&ea.token_url, &form).await?;
    let Some(url) = &ea.service_account_impersonation_url else {
        return Ok(federated);
    };
    let lifetime = ea
        .service_account_impersonation
        .as_ref()
        .and_then(|i| i.token_lifetime_seconds)
        .unwrap_or(3600);
    let request =
        serde_json::json!({"scope": [CLOUD_PLATFORM], "lifetime": format!("{lifetime}s")});
    let body = ex.post_json(url, &federated.0, request.to_string()).await?;
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Impersonated {
        access_token: Zeroizing<String>,
        expire_time: String,
    }
    let endpoint = |message: String| ExchangeError::Endpoint {
        uri: url.clone(),
        message,
    };
    let a: Impersonated = serde_json::from_slice(&body)
        .map_err(|e| endpoint(format!("the answer is not an access token: {e}")))?;
    let left = until(&a.expire_time).map_err(|e| endpoint(format!("expireTime: {e}")))?;
    Ok((a.access_token, left))
}

/// The metadata server of a GCE or GKE node.
#[derive(Deserialize)]
pub(super) struct MetadataServer {
    /// `metadata.google.internal`'s address, or `GCE_METADATA_HOST`'s value.
    #[serde(default = "default_metadata_host")]
    host: String,
    #[serde(default = "default_account")]
    pub service_account: String,
}

fn default_metadata_host() -> String {
    "169.254.169.254".into()
}

fn default_account() -> String {
    "default".into()
}

/// The node's service-account token from its metadata server (plain HTTP,
/// as the server speaks; the answer must carry `Metadata-Flavor: Google`,
/// so that something else at the address is not taken for it).
pub(super) async fn metadata_server(
    ex: &TokenExchange,
    m: &MetadataServer,
) -> Result<OAuthToken, ExchangeError> {
    let uri = format!(
        "http://{}/computeMetadata/v1/instance/service-accounts/{}/token",
        m.host, m.service_account
    );
    let (body, flavor) = ex.get(&uri, &[("Metadata-Flavor", "Google")]).await?;
    if flavor.as_deref() != Some("Google") {
        return Err(ExchangeError::Endpoint {
            uri,
            message: "the answer is not the metadata server's (no `Metadata-Flavor: Google`)"
                .into(),
        });
    }
    super::oauth_answer(&uri, &body)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// The configuration `gcloud iam workload-identity-pools
    /// create-cred-config` writes for a file source, and the sources this
    /// exchange refuses, each with its reason.
    #[test]
    fn external_account_sources_are_checked() {
        let base = serde_json::json!({
            "universe_domain": "googleapis.com",
            "type": "external_account",
            "audience": "//iam.googleapis.com/projects/123/locations/global/workloadIdentityPools/k8s/providers/cluster",
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "token_url": "https://sts.googleapis.com/v1/token",
            "credential_source": {"file": "/var/run/service-account/token", "format": {"type": "text"}},
            "service_account_impersonation_url": "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/vertex@p.iam.gserviceaccount.com:generateAccessToken",
        });
        let parse = |source: serde_json::Value| {
            let mut v = base.clone();
            v["credential_source"] = source;
            let ea: ExternalAccount = serde_json::from_value(v).unwrap();
            ea.check().map_err(|e| e.to_string())
        };
        assert!(parse(base["credential_source"].clone()).is_ok());
        assert!(
            parse(serde_json::json!({"url": "http://localhost:5000/token",
                "headers": {"Metadata": "True"},
                "format": {"type": "json", "subject_token_field_name": "access_token"}}))
            .is_ok()
        );
        for (source, why) in [
            (
                serde_json::json!({"environment_id": "aws1", "region_url": "http://169.254.169.254"}),
                "only `file` and `url`",
            ),
            (
                serde_json::json!({"executable": {"command": "/bin/token"}}),
                "only `file` and `url`",
            ),
            (serde_json::json!({}), "exactly one"),
            (
                serde_json::json!({"file": "/t", "format": {"type": "json"}}),
                "subject_token_field_name",
            ),
            (
                serde_json::json!({"file": "/t", "format": {"type": "yaml"}}),
                "not `text` or `json`",
            ),
        ] {
            let e = parse(source.clone()).unwrap_err();
            assert!(e.contains(why), "{source}: {e}");
        }
    }
}
