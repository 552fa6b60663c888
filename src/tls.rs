//! TLS termination: loads every certificate of a listener and serves the one whose names match
//! the client's SNI (wildcards included), falling back to the first. The certificates sit in
//! a [`CertificateStore`] that a reload replaces whole, so new handshakes get new
//! certificates while established connections keep theirs.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::listeners::tls::TlsSettings as PingoraTls;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, CryptoProvider, ResolvesServerCert, ServerName};

use crate::config::ConfigError;

/// TLS termination for a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Served by SNI; the first is the default for clients that send no matching name.
    pub certificates: Vec<CertificateFiles>,
    /// Offer `h2` through ALPN.
    pub http2: bool,
}

/// One certificate chain and key, with the YAML path for errors while loading them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    /// PEM chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// `listeners[i].tls.certificates[j]`.
    pub yaml_path: String,
}

/// The certificates a TLS listener serves now.
pub type Certificates = Vec<Arc<CertifiedKey>>;

/// A listener's certificates, replaced whole by a reload.
#[derive(Debug)]
pub struct CertificateStore(ArcSwap<Certificates>);

impl CertificateStore {
    /// A store serving `certs`.
    pub fn new(certs: Certificates) -> Self {
        Self(ArcSwap::from_pointee(certs))
    }

    /// New handshakes get `certs` from now on.
    pub fn replace(&self, certs: Certificates) {
        self.0.store(Arc::new(certs));
    }
}

/// Reads and checks every certificate and key of a listener; errors name the YAML path.
pub fn load_all(tls: &TlsSettings) -> Result<Certificates, Vec<ConfigError>> {
    pingora::tls::install_default_crypto_provider();
    let mut certs = Vec::new();
    let mut errors = Vec::new();
    for files in &tls.certificates {
        match load(files) {
            Ok(cert) => certs.push(Arc::new(cert)),
            Err(message) => errors.push(ConfigError {
                path: files.yaml_path.clone(),
                line: None,
                message,
            }),
        }
    }
    if errors.is_empty() {
        Ok(certs)
    } else {
        Err(errors)
    }
}

/// Builds Pingora's listener settings: an SNI resolver over `store` plus ALPN (`h2` and
/// `http/1.1` when HTTP/2 is on).
pub fn listener_settings(
    tls: &TlsSettings,
    store: Arc<CertificateStore>,
) -> Result<PingoraTls, Vec<ConfigError>> {
    pingora::tls::install_default_crypto_provider();
    // The paths are ignored once a resolver is set.
    let mut settings = PingoraTls::intermediate("", "").map_err(|e| {
        vec![ConfigError {
            path: String::new(),
            line: None,
            message: e.to_string(),
        }]
    })?;
    settings.set_cert_resolver(Arc::new(SniResolver { store }));
    if tls.http2 {
        settings.enable_h2();
    }
    Ok(settings)
}

/// Whether the certificate and key load (for `check`); the error says why not.
pub fn check_certificate(files: &CertificateFiles) -> Result<(), String> {
    pingora::tls::install_default_crypto_provider();
    load(files).map(|_| ())
}

fn load(files: &CertificateFiles) -> Result<CertifiedKey, String> {
    for path in [&files.cert, &files.key] {
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    }
    let (cert, key) = (files.cert.display(), files.key.display());
    let (chain, private_key) =
        pingora::tls::load_certs_and_key_files(&cert.to_string(), &key.to_string())
            .map_err(|e| format!("cannot read {cert} or {key}: {e}"))?
            .ok_or_else(|| format!("{cert} holds no certificate or {key} holds no private key"))?;
    let provider = CryptoProvider::get_default()
        .ok_or_else(|| "no TLS crypto provider is installed".to_string())?;
    CertifiedKey::from_der(chain, private_key, provider)
        .map_err(|e| format!("{cert} and {key} do not form a usable pair: {e}"))
}

/// Chooses a certificate by SNI.
#[derive(Debug)]
struct SniResolver {
    store: Arc<CertificateStore>,
}

impl SniResolver {
    fn for_name(certs: &Certificates, sni: &str) -> Option<Arc<CertifiedKey>> {
        let name = ServerName::try_from(sni).ok()?;
        certs
            .iter()
            .find(|ck| {
                ck.end_entity_cert()
                    .ok()
                    .and_then(|der| webpki::EndEntityCert::try_from(der).ok())
                    .is_some_and(|ee| ee.verify_is_valid_for_subject_name(&name).is_ok())
            })
            .cloned()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let certs = self.store.0.load();
        hello
            .server_name()
            .and_then(|sni| Self::for_name(&certs, sni))
            .or_else(|| certs.first().cloned())
    }
}
