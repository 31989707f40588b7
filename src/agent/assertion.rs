//! The identity assertion for the portal: a short-lived JWT (EdDSA) naming the remote user, role,
//! CM user and a hash of the session id, signed with a key kept in the state directory. The
//! public key is written (PEM, world-readable) to `[paths].assertion_pubkey` for the portal.

use crate::fsutil;
use anyhow::{Context, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::signature::{Ed25519KeyPair, KeyPair};
use std::path::Path;

/// The signing key's file in the state directory.
pub(crate) const KEY_FILE: &str = "assertion.key";
/// Lifetime of one assertion.
pub const ASSERTION_TTL_SECS: u64 = 60;
/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the 32 key bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Signs assertions for one device.
pub struct Assertions {
    key: Ed25519KeyPair,
    device_id: String,
}

impl Assertions {
    /// Loads (or creates) `state_dir/assertion.key` and publishes the public key at `pubkey`.
    pub fn load_or_create(state_dir: &Path, pubkey: &Path, device_id: &str) -> Result<Assertions> {
        let key = crate::tls::load_or_create_ed25519(&state_dir.join(KEY_FILE))?;
        if let Some(dir) = pubkey.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        fsutil::write_atomic(
            pubkey,
            public_pem(key.public_key().as_ref()).as_bytes(),
            0o644,
        )
        .context("[paths].assertion_pubkey")?;
        Ok(Assertions {
            key,
            device_id: device_id.to_string(),
        })
    }

    /// A signed assertion.
    pub fn mint(&self, user: &str, role: &str, cm_user: &str, session_hash: &str) -> String {
        let now = crate::protocol::now_ms() / 1000;
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"EdDSA","typ":"JWT"}"#);
        let claims = serde_json::json!({
            "iss": "pbx-remote-agent",
            "aud": self.device_id,
            "sub": user,
            "role": role,
            "cm_user": cm_user,
            "sid_hash": session_hash,
            "iat": now,
            "exp": now + ASSERTION_TTL_SECS,
            "jti": crate::crypto::random_token::<12>(),
        });
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signing_input = format!("{header}.{claims}");
        let sig = self.key.sign(signing_input.as_bytes());
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}

/// PEM "PUBLIC KEY" (SubjectPublicKeyInfo) of an Ed25519 public key.
pub fn public_pem(raw: &[u8]) -> String {
    let mut der = ED25519_SPKI_PREFIX.to_vec();
    der.extend_from_slice(raw);
    format!(
        "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(der)
    )
}

/// Verifies an assertion with a PEM public key, as a portal would; returns the claims.
pub fn verify(pem: &str, jwt: &str) -> Result<serde_json::Value> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(b64)?;
    anyhow::ensure!(
        der.len() == 44 && der[..12] == ED25519_SPKI_PREFIX,
        "not an Ed25519 public key"
    );
    let (input, sig) = jwt.rsplit_once('.').context("malformed JWT")?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &der[12..])
        .verify(input.as_bytes(), &URL_SAFE_NO_PAD.decode(sig)?)
        .map_err(|_| anyhow::anyhow!("bad signature"))?;
    let claims = input.split('.').nth(1).context("malformed JWT")?;
    Ok(serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assertions_verify_with_the_published_key() {
        let dir = tempfile::tempdir().unwrap();
        let pubkey = dir.path().join("run/assertion.pub");
        let a = Assertions::load_or_create(dir.path(), &pubkey, "dev1").unwrap();
        let jwt = a.mint("provider", "administrator", "alice", "abcd");
        let pem = std::fs::read_to_string(&pubkey).unwrap();
        let claims = verify(&pem, &jwt).unwrap();
        assert_eq!(claims["aud"], "dev1");
        assert_eq!(claims["role"], "administrator");
        assert_eq!(claims["sid_hash"], "abcd");
        assert!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap() <= 60);
        let tampered = jwt.replacen('.', ".e30", 1);
        assert!(verify(&pem, &tampered).is_err());
        // The same key comes back after a restart.
        let again = Assertions::load_or_create(dir.path(), &pubkey, "dev1").unwrap();
        assert!(verify(&pem, &again.mint("u", "r", "c", "s")).is_ok());
    }
}
