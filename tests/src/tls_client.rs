//! The TLS client side of the test programs that play a workload or a
//! bench client: rustls with ring, trusting only the CA file it is given.
use std::{path::Path, sync::Arc};

use rustls::pki_types::{CertificateDer, pem::PemObject};
use tokio_rustls::TlsConnector;

/// A connector trusting the certificates of the PEM file `ca` (and nothing
/// else), offering `alpn` (in order of preference). A test program's
/// inputs are the test's own: a bad file is a test bug, so it panics.
pub fn connector(ca: impl AsRef<Path>, alpn: &[&[u8]]) -> TlsConnector {
    let ca = ca.as_ref();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap_or_else(|e| panic!("{}: {e}", ca.display())) {
        roots.add(c.expect("CA PEM")).expect("CA certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsConnector::from(Arc::new(cfg))
}
