//! The passwordless token: claims signed with the server's Ed25519 key, minted by the front for
//! one grant and checked by the agent with the key it pinned at activation. Format:
//! `base64url(claims JSON) "." base64url(signature)`.

use anyhow::{anyhow, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

/// Longest lifetime a token may claim.
pub const MAX_TOKEN_LIFETIME_MS: u64 = 60_000;

/// What a passwordless token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Device id it is for.
    pub dev: String,
    /// Grant id of the visit.
    pub grant: String,
    /// CM user behind the visit.
    pub cm_user: String,
    /// Issued at, ms since the epoch (server clock).
    pub iat_ms: u64,
    /// Expires at, ms since the epoch (server clock).
    pub exp_ms: u64,
    /// Single-use nonce.
    pub nonce: String,
}

/// Signs claims.
pub fn sign(key: &Ed25519KeyPair, claims: &Claims) -> Result<String> {
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims)?);
    let sig = key.sign(payload.as_bytes());
    Ok(format!(
        "{payload}.{}",
        URL_SAFE_NO_PAD.encode(sig.as_ref())
    ))
}

/// Verifies the signature with `public_key` (32 bytes) and returns the claims. Expiry, device
/// and nonce are the caller's to check.
pub fn verify(public_key: &[u8], token: &str) -> Result<Claims> {
    let (payload, sig) = token
        .split_once('.')
        .ok_or_else(|| anyhow!("malformed token"))?;
    let sig = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| anyhow!("malformed signature"))?;
    UnparsedPublicKey::new(&signature::ED25519, public_key)
        .verify(payload.as_bytes(), &sig)
        .map_err(|_| anyhow!("bad signature"))?;
    let json = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| anyhow!("malformed payload"))?;
    Ok(serde_json::from_slice(&json)?)
}

/// The public half of a signing key, base64 (as sent at activation).
pub fn public_key_b64(key: &Ed25519KeyPair) -> String {
    base64::engine::general_purpose::STANDARD.encode(key.public_key().as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Ed25519KeyPair {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap()
    }

    #[test]
    fn signed_tokens_verify_and_tampering_fails() {
        let k = key();
        let claims = Claims {
            dev: "d".into(),
            grant: "g".into(),
            cm_user: "alice".into(),
            iat_ms: 1,
            exp_ms: 2,
            nonce: "n".into(),
        };
        let t = sign(&k, &claims).unwrap();
        assert_eq!(verify(k.public_key().as_ref(), &t).unwrap(), claims);
        let other = key();
        assert!(verify(other.public_key().as_ref(), &t).is_err());
        let (p, s) = t.split_once('.').unwrap();
        let forged = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&Claims {
                dev: "x".into(),
                ..claims
            })
            .unwrap(),
        );
        assert!(verify(k.public_key().as_ref(), &format!("{forged}.{s}")).is_err());
        assert!(verify(k.public_key().as_ref(), p).is_err());
    }
}
