//! TLS building blocks shared by agent and server: the ring provider, SPKI pins, the device key
//! and its throw-away certificate, and the verifiers for pinned servers and key-identified
//! devices. No option anywhere disables certificate or signature checks.

use anyhow::{anyhow, Context, Result};
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::DistinguishedName;
use std::path::Path;
use std::sync::Arc;

use crate::crypto::{ct_eq, sha256};

/// The handshake-signature half of a rustls certificate verifier, checked with `self.provider`'s
/// algorithms: every verifier here checks signatures the same way and differs only in which
/// certificate it accepts.
macro_rules! verify_handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}
pub(crate) use verify_handshake_signatures;

/// The one crypto provider (ring) used everywhere.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process default; called once in each `main`.
pub fn install_default_provider() {
    // An error only means a provider is already installed, which is the goal.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// SHA-256 of the SubjectPublicKeyInfo inside a certificate.
pub fn spki_sha256(cert: &CertificateDer<'_>) -> Result<[u8; 32]> {
    let ee = webpki::EndEntityCert::try_from(cert)
        .map_err(|e| anyhow!("cannot parse certificate: {e}"))?;
    Ok(sha256(ee.subject_public_key_info().as_ref()))
}

/// The Ed25519 key kept (PKCS#8, 0600) at `path`, generated there on first use.
pub fn load_or_create_ed25519(path: &Path) -> Result<ring::signature::Ed25519KeyPair> {
    use ring::signature::Ed25519KeyPair;
    let doc = match crate::fsutil::read_private(path)? {
        Some(d) => d,
        None => {
            let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                .map_err(|_| anyhow!("cannot generate {}", path.display()))?;
            crate::fsutil::write_private(path, doc.as_ref())?;
            doc.as_ref().to_vec()
        }
    };
    Ed25519KeyPair::from_pkcs8(&doc)
        .map_err(|_| anyhow!("{}: not an Ed25519 PKCS#8 key", path.display()))
}

/// A private key and the self-signed certificate that carries it in TLS. Identity is the key;
/// the certificate's names and dates mean nothing to the peer.
pub struct KeyIdentity {
    /// The key pair.
    pub key: rcgen::KeyPair,
    /// A certificate for that key.
    pub cert: CertificateDer<'static>,
}

impl KeyIdentity {
    /// Generates a new ECDSA P-256 key (on this machine; the private key never leaves it).
    pub fn generate(names: &[String]) -> Result<KeyIdentity> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .context("generating a key")?;
        Self::from_key(key, names)
    }

    /// Loads a PKCS#8 PEM key and makes a certificate for it.
    pub fn from_pem(pem: &str, names: &[String]) -> Result<KeyIdentity> {
        let key = rcgen::KeyPair::from_pem(pem).context("parsing the private key")?;
        Self::from_key(key, names)
    }

    fn from_key(key: rcgen::KeyPair, names: &[String]) -> Result<KeyIdentity> {
        let params =
            rcgen::CertificateParams::new(names.to_vec()).context("certificate parameters")?;
        let cert = params.self_signed(&key).context("self-signing")?;
        Ok(KeyIdentity {
            cert: cert.der().clone(),
            key,
        })
    }

    /// The private key in the form rustls takes.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }

    /// SubjectPublicKeyInfo, DER.
    pub fn spki_der(&self) -> Vec<u8> {
        self.key.public_key_der()
    }

    /// SHA-256 of the SubjectPublicKeyInfo: the pin value.
    pub fn spki_sha256(&self) -> [u8; 32] {
        sha256(&self.spki_der())
    }
}

/// How the agent decides to trust the server.
#[derive(Debug, Clone)]
pub enum ServerTrust {
    /// SHA-256 of the server's SubjectPublicKeyInfo.
    Pin([u8; 32]),
    /// A private CA (PEM file).
    CaFile(std::path::PathBuf),
    /// The system's roots.
    System,
}

/// A rustls client config for talking to the CM, with `alpn` and an optional client identity.
pub fn client_config(
    trust: &ServerTrust,
    alpn: &[&[u8]],
    identity: Option<&KeyIdentity>,
) -> Result<rustls::ClientConfig> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS versions")?;
    let builder = match trust {
        ServerTrust::Pin(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinVerifier {
                pin: *pin,
                provider,
            })),
        ServerTrust::CaFile(path) => {
            let roots = load_roots(path)?;
            builder.with_root_certificates(roots)
        }
        ServerTrust::System => {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                // Individual unparsable system roots are skipped, as browsers do.
                let _ = roots.add(cert);
            }
            anyhow::ensure!(
                !roots.is_empty(),
                "no system CA certificates found; set server.ca_file or server.pin_sha256"
            );
            builder.with_root_certificates(roots)
        }
    };
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(vec![id.cert.clone()], id.private_key())
            .context("device key")?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(config)
}

/// Reads PEM certificates into a root store; errors name the file.
pub fn load_roots(path: &Path) -> Result<rustls::RootCertStore> {
    let certs = load_certs(path)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots
            .add(c)
            .with_context(|| format!("{}: not a usable CA certificate", path.display()))?;
    }
    Ok(roots)
}

/// Reads all PEM certificates from a file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: invalid PEM certificate", path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "{}: no certificate found",
        path.display()
    );
    Ok(certs)
}

/// Reads a PEM private key.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("{}: cannot read a PEM private key", path.display()))
}

/// Trusts exactly one server key, and still verifies that the server holds it.
#[derive(Debug)]
pub struct PinVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl PinVerifier {
    /// Pins `pin` (SHA-256 of the SubjectPublicKeyInfo).
    pub fn new(pin: [u8; 32]) -> PinVerifier {
        PinVerifier {
            pin,
            provider: provider(),
        }
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = spki_sha256(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        if ct_eq(&got, &self.pin) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    verify_handshake_signatures!();
}

/// Server side: requires a client certificate and proof of its key, ignoring names and dates;
/// the registry decides after the handshake whether that key is a device.
#[derive(Debug)]
pub struct DeviceKeyVerifier {
    provider: Arc<CryptoProvider>,
}

impl DeviceKeyVerifier {
    /// A verifier using the ring provider.
    pub fn new() -> DeviceKeyVerifier {
        DeviceKeyVerifier {
            provider: provider(),
        }
    }
}

impl Default for DeviceKeyVerifier {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientCertVerifier for DeviceKeyVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Parsable is all we ask here; the key is looked up after the handshake.
        spki_sha256(end_entity)
            .map(|_| ClientCertVerified::assertion())
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))
    }

    verify_handshake_signatures!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spki_hash_of_cert_matches_key() {
        let id = KeyIdentity::generate(&["localhost".into()]).unwrap();
        assert_eq!(spki_sha256(&id.cert).unwrap(), id.spki_sha256());
        let pem = id.key.serialize_pem();
        let again = KeyIdentity::from_pem(&pem, &[]).unwrap();
        assert_eq!(again.spki_sha256(), id.spki_sha256());
    }
}
