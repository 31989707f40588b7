//! The server's long-lived secrets in its data dir: the TLS identity (given or generated on
//! first start), the Ed25519 key that signs passwordless tokens, and the QUIC stateless-reset and
//! token keys, kept so a restarted server resets old connections at once.

use crate::fsutil;
use crate::tls::{self, KeyIdentity};
use anyhow::{Context, Result};
use ring::signature::Ed25519KeyPair;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};

/// The server's keys.
pub struct ServerKeys {
    /// TLS certificate chain (API and tunnel).
    pub certs: Vec<CertificateDer<'static>>,
    /// TLS private key.
    pub key: PrivateKeyDer<'static>,
    /// SHA-256 of the TLS key's SubjectPublicKeyInfo (`pin_sha256`).
    pub pin: [u8; 32],
    /// Passwordless token signing key.
    pub signing: Ed25519KeyPair,
    /// QUIC stateless-reset key.
    pub reset_key: [u8; 32],
    /// QUIC address-validation token key.
    pub token_key: [u8; 32],
    /// Key of the connection-id generator: a restarted server must accept old CIDs as its own
    /// to answer them with a stateless reset instead of dropping them.
    pub cid_key: u64,
}

/// Where the TLS identity comes from.
#[derive(Debug, Clone, Default)]
pub struct TlsSource {
    /// Certificate and key files given by the operator.
    pub files: Option<(PathBuf, PathBuf)>,
    /// Extra names for a generated certificate.
    pub names: Vec<String>,
}

impl ServerKeys {
    /// Loads the keys from `data_dir`, generating what is missing.
    pub fn load_or_create(data_dir: &Path, source: &TlsSource) -> Result<ServerKeys> {
        fsutil::ensure_private_dir(data_dir)?;
        let (certs, key) = match &source.files {
            Some((cert, key)) => (tls::load_certs(cert)?, tls::load_private_key(key)?),
            None => generated_tls(data_dir, &source.names)?,
        };
        let pin = tls::spki_sha256(&certs[0])?;
        let signing = tls::load_or_create_ed25519(&data_dir.join("signing.key"))?;
        let quic_path = data_dir.join("quic.keys");
        let quic = match fsutil::read_private(&quic_path)? {
            Some(k) if k.len() == 72 => k,
            _ => {
                let k = crate::crypto::random_bytes::<72>().to_vec();
                fsutil::write_private(&quic_path, &k)?;
                k
            }
        };
        let mut reset_key = [0u8; 32];
        let mut token_key = [0u8; 32];
        reset_key.copy_from_slice(&quic[..32]);
        token_key.copy_from_slice(&quic[32..64]);
        let mut cid = [0u8; 8];
        cid.copy_from_slice(&quic[64..72]);
        Ok(ServerKeys {
            certs,
            key,
            pin,
            signing,
            reset_key,
            token_key,
            cid_key: u64::from_le_bytes(cid),
        })
    }

    /// The pin as agents write it in `server.pin_sha256`.
    pub fn pin_hex(&self) -> String {
        hex::encode(self.pin)
    }
}

fn generated_tls(
    data_dir: &Path,
    names: &[String],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let key_path = data_dir.join("tls.key");
    let cert_path = data_dir.join("tls.crt");
    let mut all_names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    all_names.extend(names.iter().cloned());
    let id = match fsutil::read_private(&key_path)? {
        Some(pem) => KeyIdentity::from_pem(
            &String::from_utf8(pem).context("tls.key is not PEM")?,
            &all_names,
        )?,
        None => {
            let id = KeyIdentity::generate(&all_names)?;
            fsutil::write_private(&key_path, id.key.serialize_pem().as_bytes())?;
            id
        }
    };
    let pem = pem_cert(&id.cert);
    fsutil::write_atomic(&cert_path, pem.as_bytes(), 0o644)?;
    Ok((vec![id.cert.clone()], id.private_key()))
}

fn pem_cert(cert: &CertificateDer<'_>) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}
