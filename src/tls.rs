//! TLS termination: loads every certificate of a listener and serves the one whose names match
//! the client's SNI (wildcards included), falling back to the first.

use std::sync::Arc;

use pingora::listeners::tls::TlsSettings as PingoraTls;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, CryptoProvider, ResolvesServerCert, ServerName};

use crate::config::ConfigError;
use crate::snapshot::{CertificateFiles, TlsSettings};

/// Builds Pingora's listener settings: SNI resolver plus ALPN (`h2` and `http/1.1` when
/// HTTP/2 is on). Reads the certificate files; errors name the YAML path.
pub fn listener_settings(tls: &TlsSettings) -> Result<PingoraTls, Vec<ConfigError>> {
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
    if !errors.is_empty() {
        return Err(errors);
    }
    // The paths are ignored once a resolver is set.
    let mut settings = PingoraTls::intermediate("", "").map_err(|e| {
        vec![ConfigError {
            path: String::new(),
            line: None,
            message: e.to_string(),
        }]
    })?;
    settings.set_cert_resolver(Arc::new(SniResolver { certs }));
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
    certs: Vec<Arc<CertifiedKey>>,
}

impl SniResolver {
    fn for_name(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        let name = ServerName::try_from(sni).ok()?;
        self.certs
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
        hello
            .server_name()
            .and_then(|sni| self.for_name(sni))
            .or_else(|| self.certs.first().cloned())
    }
}
