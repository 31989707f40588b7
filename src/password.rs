//! Password hashing for the remote account (`hash-password`) and the server's CM accounts:
//! argon2id with OWASP's minimum parameters (19 MiB, t=2, p=1), well under the 64 MiB cap.

use anyhow::{anyhow, Result};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

/// Refuses weak passwords: at least 10 characters with upper case, lower case and a digit.
pub fn check_strength(pw: &str) -> Result<()> {
    let ok = pw.chars().count() >= 10
        && pw.chars().any(|c| c.is_uppercase())
        && pw.chars().any(|c| c.is_lowercase())
        && pw.chars().any(|c| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(anyhow!(
            "password too weak: use at least 10 characters with upper case, lower case and a digit"
        ))
    }
}

fn hasher() -> Argon2<'static> {
    // Invariant: these are argon2's documented valid parameters.
    let params = Params::new(19 * 1024, 2, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hashes a password into a PHC string.
pub fn hash(pw: &str) -> Result<String> {
    let salt = SaltString::encode_b64(&crate::tls::random_bytes::<16>())
        .map_err(|e| anyhow!("salt: {e}"))?;
    Ok(hasher()
        .hash_password(pw.as_bytes(), &salt)
        .map_err(|e| anyhow!("hashing failed: {e}"))?
        .to_string())
}

/// A hash of no real password, computed once: checking a wrong username or unknown email
/// against it costs what a real check costs, so timing does not tell them apart.
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash("Dummy-password-1").unwrap_or_default())
}

/// Checks a password against a PHC string (parameters come from the string).
pub fn verify(pw: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|h| Argon2::default().verify_password(pw.as_bytes(), &h).is_ok())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strength_rules() {
        assert!(check_strength("Short1a").is_err());
        assert!(check_strength("alllowercase1").is_err());
        assert!(check_strength("ALLUPPERCASE1").is_err());
        assert!(check_strength("NoDigitsHere").is_err());
        assert!(check_strength("GoodPassw0rd").is_ok());
    }

    #[test]
    fn hashes_verify_and_pass_the_config_check() {
        let h = hash("GoodPassw0rd").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify("GoodPassw0rd", &h));
        assert!(!verify("GoodPassw0rD", &h));
        crate::config::check_password_hash(&h).unwrap();
    }
}
