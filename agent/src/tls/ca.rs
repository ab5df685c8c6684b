//! The node CA: created once (`tollgate ca init`) or mounted from a Secret,
//! it signs the per-host leaf certificates the proxy presents to workloads.
//!
//! The private key is written 0600, refused when group- or world-readable,
//! and never formatted into a log or error (NodeCa's Debug omits it).
use std::{
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

pub const CERT_FILE: &str = "ca.crt";
pub const KEY_FILE: &str = "ca.key";

/// CA validity. Long, because replacing it means re-distributing trust to
/// every workload; rotate deliberately with `ca init --force`.
const CA_VALIDITY: Duration = Duration::days(3650);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(
        "{path} already exists\nhint: keep the existing CA (workloads already trust it), or pass --force to replace it"
    )]
    Exists { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot read {path}: {source}\nhint: create a CA with `tollgate ca init --dir <dir>`, or mount the CA Secret there"
    )]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "CA key {path} is readable by group or others (mode {mode:o})\n\
         hint: chmod 600 {path} (for a Kubernetes Secret volume set defaultMode: 0400)"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("{path} is not a valid {what}: {message}")]
    Invalid {
        path: PathBuf,
        what: &'static str,
        message: String,
    },
    #[error("cannot issue a certificate for {host}: {message}")]
    Issue { host: String, message: String },
}

pub struct NodeCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for NodeCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("NodeCa")
            .field("cert_der_len", &self.cert_der.len())
            .finish_non_exhaustive()
    }
}

impl NodeCa {
    /// A new CA. Returns it and its key in PEM (for writing once, 0600).
    pub fn generate(common_name: &str) -> Result<(Self, String), CaError> {
        let issue_err = |e: rcgen::Error| CaError::Issue {
            host: common_name.into(),
            message: e.to_string(),
        };
        let key = KeyPair::generate().map_err(issue_err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "Tollgate");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + CA_VALIDITY;
        let cert = params.self_signed(&key).map_err(issue_err)?;
        let key_pem = key.serialize_pem();
        let ca = NodeCa {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        };
        Ok((ca, key_pem))
    }

    /// `tollgate ca init`: create `dir/ca.crt` (0644) and `dir/ca.key` (0600).
    pub fn init(dir: &Path, common_name: &str, force: bool) -> Result<Self, CaError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        if !force {
            for p in [&cert_path, &key_path] {
                if p.exists() {
                    return Err(CaError::Exists { path: p.clone() });
                }
            }
        }
        fs::create_dir_all(dir).map_err(|source| CaError::Write {
            path: dir.into(),
            source,
        })?;
        let (ca, key_pem) = Self::generate(common_name)?;
        write_file(&key_path, key_pem.as_bytes(), 0o600)?;
        write_file(&cert_path, ca.cert_pem.as_bytes(), 0o644)?;
        Ok(ca)
    }

    /// Load `dir/ca.crt` and `dir/ca.key`, refusing a key others can read.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        // metadata() follows symlinks: a Secret volume's ..data links are judged by their target.
        let meta = fs::metadata(&key_path).map_err(|source| CaError::Read {
            path: key_path.clone(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CaError::KeyPermissions {
                path: key_path,
                mode,
            });
        }
        let cert_pem = fs::read_to_string(&cert_path).map_err(|source| CaError::Read {
            path: cert_path.clone(),
            source,
        })?;
        let key_pem = zeroize::Zeroizing::new(fs::read_to_string(&key_path).map_err(|source| {
            CaError::Read {
                path: key_path.clone(),
                source,
            }
        })?);
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Invalid {
            path: key_path.clone(),
            what: "PEM private key",
            message: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| CaError::Invalid {
            path: cert_path.clone(),
            what: "PEM CA certificate",
            message: e.to_string(),
        })?;
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes()).map_err(
            |e| CaError::Invalid {
                path: cert_path.clone(),
                what: "PEM CA certificate",
                message: format!("{e:?}"),
            },
        )?;
        Ok(NodeCa {
            cert_pem,
            cert_der: der,
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Issue a leaf for exactly `host`, valid `validity` from now. Returns
    /// (certificate DER, PKCS#8 key DER).
    pub fn issue(
        &self,
        host: &str,
        validity: Duration,
    ) -> Result<(CertificateDer<'static>, Vec<u8>), CaError> {
        let issue_err = |e: rcgen::Error| CaError::Issue {
            host: host.into(),
            message: e.to_string(),
        };
        let key = KeyPair::generate().map_err(issue_err)?;
        let mut params = CertificateParams::new(vec![host.to_string()]).map_err(issue_err)?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, host);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        // An hour back: a workload whose clock runs a little behind still accepts it.
        params.not_before = now - Duration::hours(1);
        params.not_after = now + validity;
        let cert = params.signed_by(&key, &self.issuer).map_err(issue_err)?;
        Ok((cert.der().clone(), key.serialize_der()))
    }
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let err = |source| CaError::Write {
        path: path.into(),
        source,
    };
    // Remove first: with --force the old file may have a wider mode, and
    // OpenOptions' mode only applies when creating.
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn init_writes_key_0600_and_refuses_overwrite() {
        let d = tmp();
        let ca = NodeCa::init(d.path(), "Tollgate test CA", false).unwrap();
        let key_mode = fs::metadata(d.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(key_mode, 0o600);
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let e = NodeCa::init(d.path(), "x", false).unwrap_err();
        assert!(matches!(e, CaError::Exists { .. }), "{e}");
        NodeCa::init(d.path(), "x", true).expect("--force replaces");
        let loaded = NodeCa::load(d.path()).unwrap();
        assert!(loaded.cert_pem().contains("BEGIN CERTIFICATE"));
        assert!(
            !format!("{loaded:?}").contains("PRIVATE"),
            "Debug must not show the key"
        );
    }

    #[test]
    fn load_refuses_readable_key() {
        let d = tmp();
        NodeCa::init(d.path(), "t", false).unwrap();
        let key = d.path().join(KEY_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let e = NodeCa::load(d.path()).unwrap_err().to_string();
        assert!(
            e.contains("readable by group or others") && e.contains("chmod 600"),
            "{e}"
        );
        assert!(!e.contains("PRIVATE KEY"));
    }

    #[test]
    fn load_reports_missing_and_garbage() {
        let d = tmp();
        let e = NodeCa::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("ca init"), "{e}");
        write_file(&d.path().join(KEY_FILE), b"not a key", 0o600).unwrap();
        write_file(&d.path().join(CERT_FILE), b"not a cert", 0o644).unwrap();
        let e = NodeCa::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("not a valid PEM private key"), "{e}");
    }
}
