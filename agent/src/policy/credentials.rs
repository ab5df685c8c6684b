//! Credential injection ("virtual keys"): a rule names a file (a Secret
//! mount) holding the real provider key; calls it allows carry that key
//! instead of whatever the workload sent, so workloads run with placeholder
//! keys and the real one never leaves the node agent.
//!
//! Keys are read when first needed and re-read when the file changes
//! (modification time or size; a Secret update swaps a symlink, which the
//! check follows). They are never logged: `Debug` prints `[REDACTED]`, and
//! the memory is zeroed when a key is replaced.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use http::{HeaderMap, HeaderValue};
use zeroize::Zeroizing;

use crate::providers::{Adapter, Upstream};

/// A provider key (or, for Bedrock, AWS keys as JSON).
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub(super) fn new(text: Zeroizing<String>) -> Self {
        Self(text)
    }

    pub(super) fn text(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[REDACTED]")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot read the credential file {path}: {source} (is the Secret mounted?)")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the credential file {path} is empty or not a valid header value")]
    Invalid { path: PathBuf },
}

type Stamp = (SystemTime, u64);

#[derive(Default)]
pub struct Credentials {
    cache: Mutex<HashMap<PathBuf, (Stamp, Arc<Secret>)>>,
}

impl Credentials {
    /// The key in `path`, from the cache while the file is unchanged.
    pub fn get(&self, path: &Path) -> Result<Arc<Secret>, CredentialError> {
        let read = |source| CredentialError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        let stamp = (meta.modified().map_err(read)?, meta.len());
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, key)) = cache.get(path)
            && *s == stamp
        {
            return Ok(key.clone());
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(read)?);
        let key = text.trim();
        // AWS keys (JSON) are read by `sigv4`, never sent as a header.
        let aws = super::sigv4::is_aws_keys(key);
        if key.is_empty()
            || (!aws && (HeaderValue::from_str(key).is_err() || key.contains(char::is_whitespace)))
        {
            return Err(CredentialError::Invalid {
                path: path.to_owned(),
            });
        }
        let secret = Arc::new(Secret(Zeroizing::new(key.to_string())));
        cache.insert(path.to_owned(), (stamp, secret.clone()));
        Ok(secret)
    }
}

/// Headers that carry a workload's own provider credentials (AWS's
/// session token goes with the SigV4 signature in `authorization`).
const CREDENTIAL_HEADERS: [&str; 5] = [
    "authorization",
    "api-key",
    "x-api-key",
    "x-goog-api-key",
    "x-amz-security-token",
];

/// Replace the workload's credentials in `headers` and `path` (Gemini's
/// `?key=`) by `key`, in the header the provider expects (the adapter's
/// `credential`: `Authorization: Bearer`, Azure OpenAI `api-key`, Anthropic
/// `x-api-key`, Gemini `x-goog-api-key`). Returns the new path.
pub fn inject(
    adapter: &dyn Adapter,
    to: Upstream<'_>,
    headers: &mut HeaderMap,
    path: &str,
    key: &Secret,
) -> String {
    strip(headers);
    let (name, value) = adapter.credential(to, key.0.as_str());
    // Valid: `get` refused keys that are not header values.
    if let Ok(mut value) = HeaderValue::from_str(&value) {
        value.set_sensitive(true);
        headers.insert(name, value);
    }
    strip_key_param(path)
}

/// Set `Authorization: Bearer <token>` (sensitive: never logged).
pub fn insert_bearer(headers: &mut HeaderMap, token: &Secret) {
    if let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {}", token.text())) {
        v.set_sensitive(true);
        headers.insert(http::header::AUTHORIZATION, v);
    }
}

/// Remove every credential the workload sent in its headers.
pub fn strip(headers: &mut HeaderMap) {
    for h in CREDENTIAL_HEADERS {
        headers.remove(h);
    }
}

/// Remove every credential from a request: the headers that carry keys and
/// Gemini's `?key=`. Returns the new path.
pub fn remove(headers: &mut HeaderMap, path: &str) -> String {
    strip(headers);
    strip_key_param(path)
}

fn strip_key_param(path: &str) -> String {
    let Some((p, q)) = path.split_once('?') else {
        return path.to_string();
    };
    let kept: Vec<&str> = q
        .split('&')
        .filter(|pair| {
            !pair
                .split('=')
                .next()
                .unwrap_or("")
                .eq_ignore_ascii_case("key")
        })
        .collect();
    if kept.is_empty() {
        p.to_string()
    } else {
        format!("{p}?{}", kept.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::{Api, adapter};

    /// `inject` as the tests call it: by API family and host.
    fn inject(api: Api, host: &str, h: &mut HeaderMap, path: &str, key: &Secret) -> String {
        let to = Upstream {
            provider: "p",
            host,
        };
        super::inject(adapter(api), to, h, path, key)
    }

    #[test]
    fn keys_are_read_cached_reloaded_and_never_printed() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("openai");
        std::fs::write(&f, "sk-real-1\n").unwrap();
        let c = Credentials::default();
        let k = c.get(&f).unwrap();
        assert_eq!(k.0.as_str(), "sk-real-1");
        assert_eq!(format!("{k:?}"), "[REDACTED]");
        std::fs::write(&f, "sk-real-22\n").unwrap(); // new size: reloaded
        assert_eq!(c.get(&f).unwrap().0.as_str(), "sk-real-22");
        std::fs::write(&f, "  \n").unwrap();
        assert!(matches!(c.get(&f), Err(CredentialError::Invalid { .. })));
        assert!(
            c.get(&d.path().join("missing"))
                .unwrap_err()
                .to_string()
                .contains("Secret")
        );
    }

    #[test]
    fn injection_replaces_every_workload_credential() {
        let key = Secret(Zeroizing::new("real".into()));
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_static("Bearer placeholder"),
        );
        h.insert("x-api-key", HeaderValue::from_static("placeholder"));
        let p = inject(Api::Openai, "api.openai.com", &mut h, "/v1/models", &key);
        assert_eq!(p, "/v1/models");
        assert_eq!(h["authorization"], "Bearer real");
        assert!(h.get("x-api-key").is_none());
        assert!(h["authorization"].is_sensitive());

        let mut h = HeaderMap::new();
        let p = inject(
            Api::Openai,
            "res.openai.azure.com",
            &mut h,
            "/x?api-version=1",
            &key,
        );
        assert_eq!(
            (p.as_str(), &h["api-key"]),
            ("/x?api-version=1", &HeaderValue::from_static("real"))
        );

        let mut h = HeaderMap::new();
        let p = inject(
            Api::Gemini,
            "g",
            &mut h,
            "/v1beta/models/m:generateContent?key=AIza&alt=sse",
            &key,
        );
        assert_eq!(p, "/v1beta/models/m:generateContent?alt=sse");
        assert_eq!(h["x-goog-api-key"], "real");

        let mut h = HeaderMap::new();
        inject(Api::Anthropic, "a", &mut h, "/v1/messages", &key);
        assert_eq!(h["x-api-key"], "real");
    }
}
