//! Leaf certificates for provider host names, minted on first use and cached.
//!
//! The proxy only ever presents a certificate for a host the configuration
//! names as a provider: a ClientHello for anything else gets no certificate
//! (the handshake fails), so Tollgate never impersonates arbitrary sites.
use std::{
    collections::HashSet,
    num::NonZeroUsize,
    sync::{Arc, Mutex},
    time::{Duration as StdDuration, Instant},
};

use lru::LruCache;
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

use super::ca::{CaError, NodeCa};

/// Leaf validity. Short, so a leaked leaf key is useful briefly; renewed a
/// day before it runs out, so a long-lived connection's certificate is fine.
const LEAF_VALIDITY: time::Duration = time::Duration::days(7);
const RENEW_BEFORE: StdDuration = StdDuration::from_secs(24 * 3600);
/// One entry per provider host name; 1,024 covers a config with hundreds of
/// Azure OpenAI resources. Beyond it the least recently used is re-minted.
const CACHE_ENTRIES: usize = 1024;

pub struct LeafCache {
    ca: Arc<NodeCa>,
    allowed: HashSet<String>,
    cache: Mutex<LruCache<String, (Arc<CertifiedKey>, Instant)>>,
}

impl std::fmt::Debug for LeafCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafCache")
            .field("allowed", &self.allowed.len())
            .finish_non_exhaustive()
    }
}

impl LeafCache {
    /// `allowed`: the provider host names certificates may be minted for.
    pub fn new(ca: Arc<NodeCa>, allowed: impl IntoIterator<Item = String>) -> Self {
        Self {
            ca,
            allowed: allowed
                .into_iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            cache: Mutex::new(LruCache::new(
                NonZeroUsize::new(CACHE_ENTRIES).expect("non-zero"),
            )),
        }
    }

    pub fn is_allowed(&self, host: &str) -> bool {
        self.allowed.contains(&host.to_ascii_lowercase())
    }

    /// The certificate for `host`, minting it if needed. None when `host` is
    /// not a configured provider host.
    pub fn get(&self, host: &str) -> Result<Option<Arc<CertifiedKey>>, CaError> {
        let host = host.to_ascii_lowercase();
        if !self.allowed.contains(&host) {
            return Ok(None);
        }
        if let Some((key, renew_at)) = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&host)
            && Instant::now() < *renew_at
        {
            return Ok(Some(key.clone()));
        }
        // Minting (key generation + signature, ~0.1 ms) happens outside the
        // lock; two first handshakes for one host may both mint, harmlessly.
        let (cert, key_der) = self.ca.issue(&host, LEAF_VALIDITY)?;
        let key = rustls::crypto::ring::sign::any_supported_type(
            &rustls::pki_types::PrivateKeyDer::Pkcs8(key_der.into()),
        )
        .map_err(|e| CaError::Issue {
            host: host.clone(),
            message: e.to_string(),
        })?;
        let certified = Arc::new(CertifiedKey::new(vec![cert], key));
        let renew_at = Instant::now() + (LEAF_VALIDITY.unsigned_abs() - RENEW_BEFORE);
        self.cache
            .lock()
            .unwrap()
            .put(host, (certified.clone(), renew_at));
        Ok(Some(certified))
    }
}

impl ResolvesServerCert for LeafCache {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name()?;
        match self.get(sni) {
            Ok(key) => key,
            Err(e) => {
                tracing::error!(host = sni, error = %e, "minting a leaf certificate failed");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::{
        ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection,
        pki_types::ServerName,
    };

    use super::*;

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// Run a TLS handshake in memory; Ok when both sides complete it.
    fn handshake(ca: &NodeCa, leaves: Arc<LeafCache>, sni: &str) -> Result<(), String> {
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der().clone()).unwrap();
        let client_cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_cfg = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(leaves);
        let mut c = ClientConnection::new(
            Arc::new(client_cfg),
            ServerName::try_from(sni.to_string()).unwrap(),
        )
        .unwrap();
        let mut s = ServerConnection::new(Arc::new(server_cfg)).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).map_err(|e| e.to_string())?;
            s.read_tls(&mut &buf[..]).map_err(|e| e.to_string())?;
            s.process_new_packets()
                .map_err(|e| format!("server: {e}"))?;
            let mut buf = Vec::new();
            s.write_tls(&mut buf).map_err(|e| e.to_string())?;
            c.read_tls(&mut &buf[..]).map_err(|e| e.to_string())?;
            c.process_new_packets()
                .map_err(|e| format!("client: {e}"))?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
        }
        Err("handshake did not finish".into())
    }

    #[test]
    fn minted_leaf_verifies_against_the_ca_for_exact_host_only() {
        let (ca, _key) = NodeCa::generate("test CA").unwrap();
        let ca = Arc::new(ca);
        let leaves = Arc::new(LeafCache::new(ca.clone(), ["api.openai.com".to_string()]));
        handshake(&ca, leaves.clone(), "api.openai.com").expect("trusted handshake");
        handshake(&ca, leaves.clone(), "API.OpenAI.com").expect("host names are case-insensitive");
        let e = handshake(&ca, leaves, "evil.example.com").unwrap_err();
        assert!(
            e.contains("server"),
            "no certificate for a host that is not a provider: {e}"
        );
    }

    #[test]
    fn leaves_are_cached_and_bounded_to_allowed_hosts() {
        let (ca, _key) = NodeCa::generate("test CA").unwrap();
        let leaves = LeafCache::new(Arc::new(ca), ["api.anthropic.com".to_string()]);
        let a = leaves.get("api.anthropic.com").unwrap().unwrap();
        let b = leaves.get("api.anthropic.com").unwrap().unwrap();
        assert!(
            Arc::ptr_eq(&a, &b),
            "second handshake reuses the minted leaf"
        );
        assert!(leaves.get("example.com").unwrap().is_none());
        assert!(leaves.is_allowed("API.ANTHROPIC.COM"));
    }

    #[test]
    fn a_different_ca_does_not_verify() {
        let (ca, _) = NodeCa::generate("real").unwrap();
        let (other, _) = NodeCa::generate("other").unwrap();
        let leaves = Arc::new(LeafCache::new(Arc::new(ca), ["api.openai.com".to_string()]));
        let e = handshake(&other, leaves, "api.openai.com").unwrap_err();
        assert!(e.contains("client"), "{e}");
    }
}
