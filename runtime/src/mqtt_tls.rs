//! MQTT over TLS for the broker's clients (the gateway and the robot nodes): the broker's
//! certificate is checked against one CA file, and its name against the host the client
//! connects to.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rumqttc::{TlsConfiguration, Transport};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the CA file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// A TLS client configuration that trusts one CA (a PEM file with one or more
/// certificates). Cheap to clone: every connection of a process shares it.
#[derive(Clone)]
pub struct MqttTls(Arc<ClientConfig>);

impl std::fmt::Debug for MqttTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MqttTls")
    }
}

impl MqttTls {
    pub fn from_ca_file(path: &Path) -> Result<Self, TlsError> {
        let pem = std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_ca_pem(&pem).map_err(|e| match e {
            TlsError::NoCertificate { .. } => TlsError::NoCertificate {
                path: path.to_owned(),
            },
            TlsError::Invalid { message, .. } => TlsError::Invalid {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    pub fn from_ca_pem(pem: &[u8]) -> Result<Self, TlsError> {
        let invalid = |message: String| TlsError::Invalid {
            path: PathBuf::from("(CA)"),
            message,
        };
        let mut roots = RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(pem) {
            let certificate = certificate.map_err(|e| invalid(format!("bad PEM: {e}")))?;
            roots
                .add(certificate)
                .map_err(|e| invalid(format!("not a usable CA certificate: {e}")))?;
        }
        if roots.is_empty() {
            return Err(TlsError::NoCertificate {
                path: PathBuf::from("(CA)"),
            });
        }
        // One provider chosen here: other crates in the build enable more than one, and
        // rustls will not pick between them on its own.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self(Arc::new(config)))
    }

    /// The transport for rumqttc's `MqttOptions::set_transport`.
    pub fn transport(&self) -> Transport {
        Transport::tls_with_config(TlsConfiguration::Rustls(self.0.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_files_without_a_certificate() {
        assert!(matches!(
            MqttTls::from_ca_pem(b"not a certificate"),
            Err(TlsError::NoCertificate { .. })
        ));
        let garbage = b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n";
        assert!(MqttTls::from_ca_pem(garbage).is_err());
        let missing = MqttTls::from_ca_file(Path::new("/nonexistent/ca.pem"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("/nonexistent/ca.pem"), "{missing}");
    }
}
