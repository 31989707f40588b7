//! The second factor: RFC 6238 codes (SHA-1, 6 digits, 30 s, one step either side; the caller
//! spends the step so each code works once) and single-use recovery codes, stored hashed.

use crate::crypto::{ct_eq, sha256};

/// TOTP parameters (RFC 6238 defaults, which every authenticator app reads).
const TOTP_STEP: u64 = 30;
/// Issuer shown in authenticator apps.
const TOTP_ISSUER: &str = "pbx-remote CM";

/// Seconds since the Unix epoch.
pub(super) fn unix_now() -> u64 {
    crate::protocol::now_ms() / 1000
}

/// The TOTP generator for `secret` (SHA-1, 6 digits, 30 s: what authenticator apps expect).
pub(super) fn totp(email: &str, secret: &[u8]) -> totp_rs::TOTP {
    totp_rs::TOTP::new_unchecked(
        totp_rs::Algorithm::SHA1,
        6,
        1,
        TOTP_STEP,
        secret.to_vec(),
        Some(TOTP_ISSUER.to_string()),
        email.to_string(),
    )
}

/// The time step `code` belongs to (the current one or one either side), or None. The caller
/// spends the step, so a code works once.
pub(super) fn totp_step(email: &str, secret: &[u8], code: &str, now: u64) -> Option<u64> {
    let code: String = code.chars().filter(|c| !c.is_whitespace()).collect();
    if secret.is_empty() || code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let t = totp(email, secret);
    let current = now / TOTP_STEP;
    [current.saturating_sub(1), current, current + 1]
        .into_iter()
        .find(|step| ct_eq(t.generate(step * TOTP_STEP).as_bytes(), code.as_bytes()))
}

/// A recovery code as stored: its SHA-256 once spaces and dashes are gone and case is folded.
pub(super) fn recovery_hash(code: &str) -> [u8; 32] {
    let norm: String = code
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    sha256(norm.as_bytes())
}

/// Ten new recovery codes (`xxxxx-xxxxx`, 40 random bits each), to be shown once.
pub(super) fn new_recovery_codes() -> Vec<String> {
    (0..10)
        .map(|_| {
            let h = hex::encode(crate::crypto::random_bytes::<5>());
            format!("{}-{}", &h[..5], &h[5..])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totp_codes_match_rfc_6238_and_name_their_step() {
        // RFC 6238 appendix B, SHA-1 secret "12345678901234567890": T = 59 s gives 94287082
        // (8 digits); its last six digits are the 6-digit code.
        let secret = b"12345678901234567890";
        assert_eq!(totp("a@x.io", secret).generate(59), "287082");
        assert_eq!(totp_step("a@x.io", secret, "287 082", 59), Some(1));
        assert_eq!(
            totp_step("a@x.io", secret, "287082", 59 + 30),
            Some(1),
            "one step late"
        );
        assert_eq!(
            totp_step("a@x.io", secret, "287082", 59 + 90),
            None,
            "too late"
        );
        assert_eq!(totp_step("a@x.io", secret, "28708", 59), None);
        assert_eq!(totp_step("a@x.io", b"", "287082", 59), None);
    }

    #[test]
    fn recovery_codes_are_fresh_and_hash_loosely() {
        let codes = new_recovery_codes();
        assert_eq!(codes.len(), 10);
        assert_eq!(
            codes.iter().collect::<std::collections::HashSet<_>>().len(),
            10
        );
        assert_eq!(
            recovery_hash(&codes[0]),
            recovery_hash(&codes[0].to_uppercase().replace('-', " "))
        );
    }
}
