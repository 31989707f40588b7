//! API tokens: per-user bearer tokens for `/api/v1/`, shown once, stored as SHA-256 hashes,
//! revocable, with their last use recorded.

use super::users::User;
use super::{now, Db};
use crate::crypto::{random_token, sha256};
use anyhow::{ensure, Result};
use rusqlite::{params, OptionalExtension};
use serde::Serialize;

/// An API token as its owner sees it (the token itself is shown once, at creation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiToken {
    /// Id (shown, used to revoke).
    pub id: String,
    /// What the owner called it.
    pub name: String,
    /// Creation.
    pub created_at: i64,
    /// Last use.
    pub last_used_at: Option<i64>,
    /// Revocation, if revoked.
    pub revoked_at: Option<i64>,
}

/// Prefix of every API token, so a leaked one is recognisable in logs and scanners.
pub const TOKEN_PREFIX: &str = "pbxcm_";

impl Db {
    /// Creates an API token for `email`; returns its id and the token, shown once.
    pub fn create_token(&self, email: &str, name: &str) -> Result<(String, String)> {
        let name = name.trim();
        ensure!(
            !name.is_empty() && name.chars().count() <= 64,
            "a token needs a name of 1 to 64 characters"
        );
        let id = random_token::<6>();
        let token = format!("{TOKEN_PREFIX}{}", random_token::<32>());
        self.with(|c| {
            c.execute(
                "INSERT INTO api_tokens (id, email, name, token_hash, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, email, name, &sha256(token.as_bytes())[..], now()],
            )?;
            Ok::<_, anyhow::Error>(())
        })?;
        Ok((id, token))
    }
    /// The user's tokens, newest first.
    pub fn tokens(&self, email: &str) -> Result<Vec<ApiToken>> {
        self.with(|c| {
            let mut s = c.prepare(
                "SELECT id, name, created_at, last_used_at, revoked_at FROM api_tokens
                 WHERE email = ?1 ORDER BY created_at DESC, id",
            )?;
            let rows = s.query_map([email], |r| {
                Ok(ApiToken {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    created_at: r.get(2)?,
                    last_used_at: r.get(3)?,
                    revoked_at: r.get(4)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }
    /// Revokes one of the user's tokens; false when there is no such live token.
    pub fn revoke_token(&self, email: &str, id: &str) -> Result<bool> {
        self.with(|c| {
            Ok(c.execute(
                "UPDATE api_tokens SET revoked_at = ?3 WHERE email = ?1 AND id = ?2 AND revoked_at IS NULL",
                params![email, id, now()],
            )? == 1)
        })
    }
    /// The user a live token belongs to (its last use recorded).
    pub fn user_by_token(&self, token: &str) -> Result<Option<User>> {
        if !token.starts_with(TOKEN_PREFIX) {
            return Ok(None);
        }
        let hash = sha256(token.as_bytes());
        let email: Option<String> = self.with(|c| {
            let email = c
                .query_row(
                    "SELECT email FROM api_tokens WHERE token_hash = ?1 AND revoked_at IS NULL",
                    [&hash[..]],
                    |r| r.get(0),
                )
                .optional()?;
            if email.is_some() {
                c.execute(
                    "UPDATE api_tokens SET last_used_at = ?2 WHERE token_hash = ?1",
                    params![&hash[..], now()],
                )?;
            }
            Ok::<_, anyhow::Error>(email)
        })?;
        match email {
            Some(e) => self.user(&e),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::db::users::tests::new;
    use crate::server::db::{Role, Scope};

    #[test]
    fn tokens_are_stored_hashed_and_revocable() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        db.add_user(&new("a@x.io", Role::Operator, Scope::All))
            .unwrap();
        let (id, token) = db.create_token("a@x.io", "ci").unwrap();
        assert!(token.starts_with(TOKEN_PREFIX));
        let raw = std::fs::read(dir.path().join("server.db")).unwrap();
        let wal = std::fs::read(dir.path().join("server.db-wal")).unwrap_or_default();
        for bytes in [&raw, &wal] {
            assert!(
                !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
                "the token itself is never stored"
            );
        }
        assert_eq!(db.user_by_token(&token).unwrap().unwrap().email, "a@x.io");
        assert!(db.tokens("a@x.io").unwrap()[0].last_used_at.is_some());
        assert!(db.user_by_token("pbxcm_wrong").unwrap().is_none());
        assert!(
            !db.revoke_token("b@x.io", &id).unwrap(),
            "only the owner revokes"
        );
        assert!(db.revoke_token("a@x.io", &id).unwrap());
        assert!(db.user_by_token(&token).unwrap().is_none());
        assert!(db.tokens("a@x.io").unwrap()[0].revoked_at.is_some());
    }
}
