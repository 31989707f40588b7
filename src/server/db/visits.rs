//! Visit links and the grants they turn into: a link is spent once, on its own device, and the
//! grant's cookie is checked in constant time at every visitor request.

use super::{now, Db, GRANT_TTL, VISIT_TTL};
use crate::crypto::{random_token, sha256};
use anyhow::Result;
use rusqlite::{params, OptionalExtension};

/// A redeemed visit: what the front's cookie stands for.
#[derive(Debug, Clone)]
pub struct Grant {
    /// Grant id.
    pub id: String,
    /// Device.
    pub device_id: String,
    /// CM user label.
    pub cm_user: String,
    /// Passwordless visit.
    pub passwordless: bool,
    /// Token already handed over.
    pub redeemed: bool,
    /// Expiry (Unix seconds).
    pub expires_at: i64,
}

/// A visit link not yet spent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VisitLink {
    /// Device it opens.
    pub device: String,
    /// Who asked for it.
    pub cm_user: String,
    /// A passwordless visit.
    pub passwordless: bool,
}

/// A visit link just spent: its grant and the cookie value that stands for it.
#[derive(Debug, Clone)]
pub struct Redeemed {
    /// The grant.
    pub grant: Grant,
    /// `id.secret`, set as the front's grant cookie.
    pub cookie: String,
}

impl Db {
    /// Creates a one-time visit link token for `device`.
    pub fn create_visit(&self, device: &str, cm_user: &str, passwordless: bool) -> Result<String> {
        let device = device.to_ascii_lowercase();
        let token = random_token::<32>();
        self.with(|c| {
            let flags: Option<bool> = c
                .query_row("SELECT allow_passwordless FROM devices WHERE id = ?1", [&device], |r| r.get(0))
                .optional()?;
            let Some(allow) = flags else {
                anyhow::bail!("no device {device:?}");
            };
            anyhow::ensure!(
                !passwordless || allow,
                "passwordless visits are off for {device}; run `device set {device} --allow-passwordless on` first"
            );
            c.execute(
                "INSERT INTO visits (token_hash, device_id, cm_user, passwordless, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![&sha256(token.as_bytes())[..], device, cm_user, passwordless, now(), now() + VISIT_TTL.as_secs() as i64],
            )?;
            Ok(token)
        })
    }
    /// Looks at a visit link without spending it.
    pub fn peek_visit(&self, token: &str) -> Result<Option<VisitLink>> {
        self.read(|c| {
            Ok(c.query_row(
                "SELECT device_id, cm_user, passwordless FROM visits WHERE token_hash = ?1 AND used_at IS NULL AND expires_at > ?2",
                params![&sha256(token.as_bytes())[..], now()],
                |r| {
                    Ok(VisitLink {
                        device: r.get(0)?,
                        cm_user: r.get(1)?,
                        passwordless: r.get(2)?,
                    })
                },
            )
            .optional()?)
        })
    }
    /// Spends a visit link (once, even under a race) and creates its grant.
    pub fn redeem_visit(&self, token: &str, device: &str) -> Result<Option<Redeemed>> {
        let hash = sha256(token.as_bytes());
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let spent = tx.execute(
                "UPDATE visits SET used_at = ?2 WHERE token_hash = ?1 AND used_at IS NULL AND expires_at > ?2 AND device_id = ?3",
                params![&hash[..], now(), device],
            )?;
            if spent != 1 {
                return Ok(None);
            }
            let (cm_user, passwordless): (String, bool) = tx.query_row(
                "SELECT cm_user, passwordless FROM visits WHERE token_hash = ?1",
                [&hash[..]],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let id = random_token::<12>();
            let secret = random_token::<32>();
            let expires_at = now() + GRANT_TTL.as_secs() as i64;
            tx.execute(
                "INSERT INTO grants (id, secret_hash, device_id, cm_user, passwordless, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![id, &sha256(secret.as_bytes())[..], device, cm_user, passwordless, now(), expires_at],
            )?;
            tx.commit()?;
            let cookie = format!("{id}.{secret}");
            Ok(Some(Redeemed {
                grant: Grant { id, device_id: device.to_string(), cm_user, passwordless, redeemed: false, expires_at },
                cookie,
            }))
        })
    }
    /// The live grant a cookie value stands for.
    pub fn grant_by_cookie(&self, cookie: &str) -> Result<Option<Grant>> {
        let Some((id, secret)) = cookie.split_once('.') else {
            return Ok(None);
        };
        let row: Option<(Grant, Vec<u8>)> = self.read(|c| -> Result<_> {
            // The hot path of every visitor request: a cached statement.
            Ok(c.prepare_cached(
                "SELECT id, device_id, cm_user, passwordless, redeemed, expires_at, secret_hash FROM grants
                 WHERE id = ?1 AND ended_at IS NULL AND expires_at > ?2",
            )?
            .query_row(
                params![id, now()],
                |r| {
                    Ok((
                        Grant {
                            id: r.get(0)?,
                            device_id: r.get(1)?,
                            cm_user: r.get(2)?,
                            passwordless: r.get(3)?,
                            redeemed: r.get(4)?,
                            expires_at: r.get(5)?,
                        },
                        r.get(6)?,
                    ))
                },
            )
            .optional()?)
        })?;
        Ok(row
            .filter(|(_, h)| crate::crypto::ct_eq(h, &sha256(secret.as_bytes())))
            .map(|(g, _)| g))
    }
    /// Marks a passwordless grant's token as handed over; true only the first time.
    pub fn mark_grant_redeemed(&self, id: &str) -> Result<bool> {
        self.with(|c| {
            Ok(c.execute(
                "UPDATE grants SET redeemed = 1 WHERE id = ?1 AND redeemed = 0",
                [id],
            )? == 1)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::db::NewDevice;

    #[test]
    fn visits_are_single_use_and_bound_to_their_device() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let id = db
            .add_device(&NewDevice {
                name: "A".into(),
                ..Default::default()
            })
            .unwrap()
            .id;
        assert!(
            db.create_visit(&id, "alice", true).is_err(),
            "passwordless needs the device flag"
        );
        let token = db.create_visit(&id, "alice", false).unwrap();
        assert!(db.redeem_visit(&token, "other-device").unwrap().is_none());
        let Redeemed { grant, cookie } = db.redeem_visit(&token, &id).unwrap().unwrap();
        assert!(db.redeem_visit(&token, &id).unwrap().is_none());
        assert_eq!(db.grant_by_cookie(&cookie).unwrap().unwrap().id, grant.id);
        assert!(db
            .grant_by_cookie(&format!("{}.forged", grant.id))
            .unwrap()
            .is_none());
    }
}
