//! Leaf crypto helpers both sides use: OS random bytes and URL-safe tokens, SHA-256, and
//! constant-time comparison. Nothing here imports another module of the crate.

use base64::Engine;
use ring::digest;
use subtle::ConstantTimeEq;

/// `N` random bytes from the OS.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom;
    let mut out = [0u8; N];
    // Invariant: the OS RNG does not fail on Linux after boot; if it did, nothing secure could
    // proceed, so stopping is the right outcome.
    ring::rand::SystemRandom::new()
        .fill(&mut out)
        .expect("operating system random number generator failed");
    out
}

/// A random URL-safe token (base64url, no padding) of `N` bytes.
pub fn random_token<const N: usize>() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<N>())
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Equality of digests, tokens and pins in time that does not depend on where they differ.
/// Lengths are public (digests and pins have fixed ones), so a length mismatch returns early.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_compare() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
        assert!(ct_eq(b"", b""));
    }

    #[test]
    fn tokens_are_url_safe_and_distinct() {
        let (a, b) = (random_token::<32>(), random_token::<32>());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        assert_eq!(
            hex::encode(sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
