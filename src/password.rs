//! Password hashing for the remote account (`hash-password`) and the server's CM accounts:
//! argon2id with OWASP's minimum parameters (19 MiB, t=2, p=1), well under the 64 MiB cap.

use anyhow::{anyhow, Result};
use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

/// Largest PHC memory cost accepted for the remote account's hash, in KiB (64 MiB).
pub const MAX_ARGON2_MEMORY_KIB: u32 = 64 * 1024;

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
    let salt = SaltString::encode_b64(&crate::crypto::random_bytes::<16>())
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

/// Block memory is reserved with at least this capacity (33 MiB, above glibc's largest dynamic
/// mmap threshold of 32 MiB), so it is always its own mapping and goes back to the OS when the
/// check ends. Plain allocation left each blocking thread's malloc arena holding ~19 MiB: a soak
/// with many logins took the agent from 8 to 135 MiB, past the unit's `MemoryMax=128M`. Only the
/// pages the parameters need are touched.
const RESERVED_BLOCKS: usize = 33 * 1024;

/// Checks a password against a PHC string (parameters come from the string).
pub fn verify(pw: &str, phc: &str) -> bool {
    verify_phc(pw, phc).unwrap_or(false)
}

fn verify_phc(pw: &str, phc: &str) -> Option<bool> {
    use argon2::Block;
    let h = PasswordHash::new(phc).ok()?;
    let params = Params::try_from(&h).ok()?;
    let algorithm = Algorithm::try_from(h.algorithm).ok()?;
    let version = match h.version {
        Some(v) => Version::try_from(v).ok()?,
        None => Version::default(),
    };
    let expected = h.hash?;
    let mut salt = [0u8; 64];
    let salt = h.salt?.decode_b64(&mut salt).ok()?;
    let argon = Argon2::new(algorithm, version, params.clone());
    let mut blocks: Vec<Block> = Vec::with_capacity(params.block_count().max(RESERVED_BLOCKS));
    blocks.resize(params.block_count(), Block::default());
    let mut out = vec![0u8; expected.len()];
    argon
        .hash_password_into_with_memory(pw.as_bytes(), salt, &mut out, &mut blocks)
        .ok()?;
    Some(crate::crypto::ct_eq(&out, expected.as_bytes()))
}

/// Checks a PHC string is argon2id with a memory cost the PBX can afford.
pub fn check_password_hash(phc: &str) -> Result<(), String> {
    let hash = argon2::PasswordHash::new(phc).map_err(|_| {
        "expected an argon2id PHC string from `pbx-remote-agent hash-password`".to_string()
    })?;
    if hash.algorithm.as_str() != "argon2id" {
        return Err(format!(
            "expected an argon2id hash, got {}",
            hash.algorithm.as_str()
        ));
    }
    let params =
        argon2::Params::try_from(&hash).map_err(|e| format!("invalid argon2 parameters: {e}"))?;
    if params.m_cost() > MAX_ARGON2_MEMORY_KIB {
        return Err(format!(
            "memory cost m={} KiB is above the limit of {MAX_ARGON2_MEMORY_KIB} KiB (64 MiB)",
            params.m_cost()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_accepts_the_password_and_nothing_else() {
        let phc = hash("Right-Passw0rd-1").unwrap();
        assert!(verify("Right-Passw0rd-1", &phc));
        assert!(!verify("Right-Passw0rd-2", &phc));
        assert!(!verify("", &phc));
        assert!(!verify("Right-Passw0rd-1", "not a phc string"));
        // The stored hash altered in its last character no longer matches.
        let mut tampered = phc.clone();
        let last = tampered.pop().unwrap();
        tampered.push(if last == 'A' { 'B' } else { 'A' });
        assert!(!verify("Right-Passw0rd-1", &tampered));
        // Parameters come from the string: a cheaper hash made elsewhere still verifies.
        let cheap = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(8 * 1024, 1, 1, None).unwrap(),
        );
        let salt = SaltString::encode_b64(&[9u8; 16]).unwrap();
        let other = cheap
            .hash_password(b"Other-Passw0rd-1", &salt)
            .unwrap()
            .to_string();
        assert!(verify("Other-Passw0rd-1", &other));
        assert!(!verify("Other-Passw0rd-2", &other));
    }

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
        check_password_hash(&h).unwrap();
    }
}
