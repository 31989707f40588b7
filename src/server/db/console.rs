//! Console sign-in state: sessions (stored by the hash of their cookie, with the stage of the
//! sign-in they have reached and their CSRF token) and failed sign-ins per (email, source).
//! Both live in the store, so a restarted server, or another node on the same store, sees them.

use super::{now, Db};
use crate::crypto::{random_token, sha256};
use anyhow::Result;
use rusqlite::{params, OptionalExtension};
use std::time::Duration;

/// A session ends after this long without a request.
pub const SESSION_IDLE: Duration = Duration::from_secs(30 * 60);
/// A session ends this long after sign-in, however busy.
pub const SESSION_ABSOLUTE: Duration = Duration::from_secs(12 * 3600);
/// Failed sign-ins per (email, source) that lock the pair.
pub const MAX_LOGIN_FAILURES: u32 = 5;
/// How long such a lock lasts, and how far back failures count.
pub const LOGIN_LOCK: Duration = Duration::from_secs(15 * 60);
/// Failed sign-ins from one source, whatever the emails, within [`LOGIN_LOCK`], past which that
/// source signs in nowhere until they age out. The pair lock stops guessing one account's
/// password; this stops trying one password on many accounts (spraying), which meets each
/// pair only once. Generous, so an office behind one address is not locked by its typos.
pub const MAX_SOURCE_FAILURES: u32 = 30;

/// How far a session has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Password checked; the TOTP code (or a recovery code) is still owed.
    SecondFactor,
    /// Password checked; 2FA is mandatory and the user must enrol before anything else.
    MustEnrol,
    /// Signed in.
    Full,
}

impl Stage {
    fn as_str(self) -> &'static str {
        match self {
            Stage::SecondFactor => "second_factor",
            Stage::MustEnrol => "must_enrol",
            Stage::Full => "full",
        }
    }
    fn parse(s: &str) -> Option<Stage> {
        [Stage::SecondFactor, Stage::MustEnrol, Stage::Full]
            .into_iter()
            .find(|x| x.as_str() == s)
    }
}

/// A live console session.
#[derive(Debug, Clone)]
pub struct ConsoleSession {
    /// The user's email.
    pub email: String,
    /// How far the sign-in has come.
    pub stage: Stage,
    /// Token every state-changing request of this session must carry.
    pub csrf: String,
    /// A TOTP secret being enrolled (not yet proven by a code).
    pub pending_secret: Option<Vec<u8>>,
}

/// Failed sign-ins that count now for one (email, source).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failures {
    /// For this email from this source, within [`LOGIN_LOCK`].
    pub pair: u32,
    /// For this email from anywhere, within the last minute (the slowdown).
    pub account_recent: u32,
    /// From this source for any email, within [`LOGIN_LOCK`].
    pub source: u32,
    /// When the pair's lock ends, if it is locked.
    pub locked_until: Option<i64>,
}

impl Db {
    /// Starts a session at `stage` and returns its cookie value (only its hash is stored).
    pub fn create_session(&self, email: &str, stage: Stage, client: &str) -> Result<String> {
        let id = random_token::<32>();
        let csrf = random_token::<24>();
        self.with(|c| {
            // Old sessions go while we are here, so the table stays the size of the live ones.
            c.execute(
                "DELETE FROM console_sessions WHERE last_seen < ?1 OR created_at < ?2",
                params![
                    now() - SESSION_IDLE.as_secs() as i64,
                    now() - SESSION_ABSOLUTE.as_secs() as i64
                ],
            )?;
            c.execute(
                "INSERT INTO console_sessions (id_hash, email, stage, csrf, client, created_at, last_seen)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
                params![&sha256(id.as_bytes())[..], email, stage.as_str(), csrf, client, now()],
            )?;
            Ok(id)
        })
    }
    /// The live session behind a cookie value; its idle time restarts. An expired one is gone.
    pub fn session(&self, id: &str) -> Result<Option<ConsoleSession>> {
        let hash = sha256(id.as_bytes());
        let t = now();
        self.with(|c| {
            let row = c
                .query_row(
                    "SELECT email, stage, csrf, pending_secret FROM console_sessions
                     WHERE id_hash = ?1 AND last_seen >= ?2 AND created_at >= ?3",
                    params![
                        &hash[..],
                        t - SESSION_IDLE.as_secs() as i64,
                        t - SESSION_ABSOLUTE.as_secs() as i64
                    ],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, Option<Vec<u8>>>(3)?,
                        ))
                    },
                )
                .optional()?;
            let Some((email, stage, csrf, pending_secret)) = row else {
                return Ok(None);
            };
            let Some(stage) = Stage::parse(&stage) else {
                return Ok(None);
            };
            c.execute(
                "UPDATE console_sessions SET last_seen = ?2 WHERE id_hash = ?1",
                params![&hash[..], t],
            )?;
            Ok(Some(ConsoleSession {
                email,
                stage,
                csrf,
                pending_secret,
            }))
        })
    }
    /// Ends a session.
    pub fn end_session(&self, id: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "DELETE FROM console_sessions WHERE id_hash = ?1",
                [&sha256(id.as_bytes())[..]],
            )?;
            Ok(())
        })
    }
    /// Keeps (or drops) a TOTP secret being enrolled in the session.
    pub fn set_pending_secret(&self, id: &str, secret: Option<&[u8]>) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE console_sessions SET pending_secret = ?2 WHERE id_hash = ?1",
                params![&sha256(id.as_bytes())[..], secret],
            )?;
            Ok(())
        })
    }

    /// Records a failed sign-in.
    pub fn login_failed(&self, email: &str, source: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "DELETE FROM login_failures WHERE at < ?1",
                [now() - LOGIN_LOCK.as_secs() as i64],
            )?;
            c.execute(
                "INSERT INTO login_failures (email, source, at) VALUES (?1, ?2, ?3)",
                params![email, source, now()],
            )?;
            Ok(())
        })
    }
    /// The failures that count now for `email` from `source`.
    pub fn login_failures(&self, email: &str, source: &str) -> Result<Failures> {
        let t = now();
        self.with(|c| {
            let (pair, first): (u32, Option<i64>) = c.query_row(
                "SELECT COUNT(*), MIN(at) FROM login_failures WHERE email = ?1 AND source = ?2 AND at >= ?3",
                params![email, source, t - LOGIN_LOCK.as_secs() as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let account_recent: u32 = c.query_row(
                "SELECT COUNT(*) FROM login_failures WHERE email = ?1 AND at >= ?2",
                params![email, t - 60],
                |r| r.get(0),
            )?;
            let from_source: u32 = c.query_row(
                "SELECT COUNT(*) FROM login_failures WHERE source = ?1 AND at >= ?2",
                params![source, t - LOGIN_LOCK.as_secs() as i64],
                |r| r.get(0),
            )?;
            let locked_until = (pair >= MAX_LOGIN_FAILURES)
                .then(|| first.map(|f| f + LOGIN_LOCK.as_secs() as i64))
                .flatten();
            Ok(Failures {
                pair,
                account_recent,
                source: from_source,
                locked_until,
            })
        })
    }
    /// Forgets the pair's failures after a successful sign-in.
    pub fn login_succeeded(&self, email: &str, source: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "DELETE FROM login_failures WHERE email = ?1 AND source = ?2",
                params![email, source],
            )?;
            Ok(())
        })
    }
    /// Moves a session on to `stage` under a new cookie value (a sign-in step never keeps the
    /// id the browser had before it), keeping its CSRF token. Returns the new value.
    pub fn advance_session(&self, id: &str, stage: Stage) -> Result<Option<String>> {
        let new = random_token::<32>();
        self.with(|c| {
            let n = c.execute(
                "UPDATE console_sessions SET id_hash = ?2, stage = ?3, last_seen = ?4 WHERE id_hash = ?1",
                params![
                    &sha256(id.as_bytes())[..],
                    &sha256(new.as_bytes())[..],
                    stage.as_str(),
                    now()
                ],
            )?;
            Ok((n == 1).then_some(new))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_advance_under_new_ids_and_end() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        db.add_user(&crate::server::db::NewUser {
            email: "a@x.io".into(),
            password_hash: "h".into(),
            role: crate::server::db::Role::Admin,
            scope: crate::server::db::Scope::All,
        })
        .unwrap();
        let id = db
            .create_session("a@x.io", Stage::SecondFactor, "127.0.0.1")
            .unwrap();
        let s = db.session(&id).unwrap().unwrap();
        assert_eq!(s.stage, Stage::SecondFactor);
        let full = db.advance_session(&id, Stage::Full).unwrap().unwrap();
        assert!(db.session(&id).unwrap().is_none(), "the old id is spent");
        let f = db.session(&full).unwrap().unwrap();
        assert_eq!((f.stage, &f.csrf), (Stage::Full, &s.csrf));
        db.end_session(&full).unwrap();
        assert!(db.session(&full).unwrap().is_none());
    }

    #[test]
    fn five_failures_lock_the_pair_only() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        for _ in 0..4 {
            db.login_failed("a@x.io", "198.51.100.7").unwrap();
        }
        let f = db.login_failures("a@x.io", "198.51.100.7").unwrap();
        assert_eq!((f.pair, f.locked_until), (4, None));
        db.login_failed("a@x.io", "198.51.100.7").unwrap();
        let f = db.login_failures("a@x.io", "198.51.100.7").unwrap();
        assert!(f.locked_until.is_some_and(|t| t > now()));
        let other = db.login_failures("a@x.io", "203.0.113.9").unwrap();
        assert_eq!(other.locked_until, None, "another source is not locked");
        assert_eq!(other.account_recent, 5, "but the account slows down");
        db.login_succeeded("a@x.io", "198.51.100.7").unwrap();
        assert_eq!(db.login_failures("a@x.io", "198.51.100.7").unwrap().pair, 0);
    }
}
