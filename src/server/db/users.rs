//! CM users and groups: who may sign in to the console (or activate a PBX by email), with which
//! role over which groups, their second factor and recovery codes, and their API tokens.

use super::{now, Db};
use anyhow::{bail, ensure, Context, Result};
use rusqlite::{params, OptionalExtension};
use serde::Serialize;

/// What a CM user may do (DESIGN §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything: devices, users, groups, capacity, settings.
    Admin,
    /// Devices of their groups: add, edit, new code, remove, visit.
    Operator,
    /// Sees devices of their groups; changes nothing.
    Viewer,
}

impl Role {
    /// Every role, most powerful first.
    pub const ALL: [Role; 3] = [Role::Admin, Role::Operator, Role::Viewer];
    /// Spelling in the store, the CLI and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
        }
    }
    /// Reads [`Role::as_str`]'s spelling.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which devices a user sees: all of them, or those in some groups (a device in no group is
/// then outside the scope).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Every device.
    All,
    /// Devices of these groups.
    Groups(Vec<String>),
}

impl Scope {
    /// Whether a device of `group` is in this scope.
    pub fn covers(&self, group: Option<&str>) -> bool {
        match self {
            Scope::All => true,
            Scope::Groups(gs) => group.is_some_and(|g| gs.iter().any(|x| x == g)),
        }
    }
}

/// A CM user as the console and the CLI show it (no secrets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    /// Sign-in name (lower case).
    pub email: String,
    /// Role.
    pub role: Role,
    /// Device scope.
    pub scope: Scope,
    /// Whether the user has enrolled a TOTP second factor.
    pub totp_enabled: bool,
    /// Unused recovery codes left.
    pub recovery_codes_left: u32,
    /// Creation (Unix seconds).
    pub created_at: i64,
    /// Last successful console sign-in.
    pub last_login_at: Option<i64>,
}

impl User {
    /// May add, edit, remove and visit devices (in scope).
    pub fn may_change_devices(&self) -> bool {
        matches!(self.role, Role::Admin | Role::Operator)
    }
    /// May manage users, groups, capacity and settings.
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

/// A user to add.
#[derive(Debug, Clone)]
pub struct NewUser {
    /// Sign-in name.
    pub email: String,
    /// PHC hash of the password.
    pub password_hash: String,
    /// Role.
    pub role: Role,
    /// Device scope.
    pub scope: Scope,
}

/// Changes to a user; `None` keeps the value.
#[derive(Debug, Clone, Default)]
pub struct UserChanges {
    /// New role.
    pub role: Option<Role>,
    /// New scope.
    pub scope: Option<Scope>,
    /// New password (PHC hash).
    pub password_hash: Option<String>,
}

/// A group with its device count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Group {
    /// Name.
    pub name: String,
    /// Devices in it.
    pub devices: u64,
}

/// Normalises an email: trimmed, lower case, and it must look like one.
pub fn normalize_email(email: &str) -> Result<String> {
    let e = email.trim().to_lowercase();
    let ok = e.len() <= 254
        && e.split_once('@').is_some_and(|(l, d)| {
            !l.is_empty() && !d.is_empty() && !d.starts_with('.') && !d.ends_with('.')
        })
        && !e.chars().any(|c| c.is_whitespace() || c.is_control());
    ensure!(ok, "{:?} is not an email address", email.trim());
    Ok(e)
}

/// Checks a group name: 1–64 printable characters, no leading or trailing space.
pub fn check_group_name(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty()
            && name.chars().count() <= 64
            && name.trim() == name
            && !name.chars().any(char::is_control),
        "{name:?} is not a group name (1 to 64 printable characters, no surrounding spaces)"
    );
    Ok(())
}

impl Db {
    /// Adds a group.
    pub fn add_group(&self, name: &str) -> Result<()> {
        check_group_name(name)?;
        self.with(|c| {
            let n = c.execute(
                "INSERT INTO groups (name, created_at) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                params![name, now()],
            )?;
            ensure!(n == 1, "group {name:?} already exists");
            Ok(())
        })
    }
    /// Every group with its device count, by name.
    pub fn groups(&self) -> Result<Vec<Group>> {
        self.with(|c| {
            let mut s = c.prepare(
                "SELECT g.name, COUNT(d.id) FROM groups g LEFT JOIN devices d ON d.group_name = g.name
                 GROUP BY g.name ORDER BY g.name",
            )?;
            let rows = s.query_map([], |r| {
                Ok(Group {
                    name: r.get(0)?,
                    devices: r.get(1)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }
    /// Removes an empty group (devices must be moved first; nothing is left without a group
    /// by surprise). Users scoped to it lose it from their scope.
    pub fn remove_group(&self, name: &str) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let devices: u64 = tx.query_row(
                "SELECT COUNT(*) FROM devices WHERE group_name = ?1",
                [name],
                |r| r.get(0),
            )?;
            ensure!(
                devices == 0,
                "group {name:?} still holds {devices} device(s); move or remove them first"
            );
            ensure!(
                tx.execute("DELETE FROM groups WHERE name = ?1", [name])? == 1,
                "no group {name:?}"
            );
            tx.commit()?;
            Ok(())
        })
    }

    /// Adds a user; an existing email is an error.
    pub fn add_user(&self, u: &NewUser) -> Result<User> {
        let email = normalize_email(&u.email)?;
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let n = tx.execute(
                "INSERT INTO users (email, password_hash, role, all_groups, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
                params![email, u.password_hash, u.role, u.scope == Scope::All, now()],
            )?;
            ensure!(
                n == 1,
                "user {email} already exists (change it with `user set`)"
            );
            write_scope(&tx, &email, &u.scope)?;
            tx.commit()?;
            Ok(())
        })?;
        self.user(&email)?.context("user just added")
    }
    /// Changes a user. The last admin cannot stop being one.
    pub fn set_user(&self, email: &str, ch: &UserChanges) -> Result<User> {
        let email = normalize_email(email)?;
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let role = role_of(&tx, &email)?;
            if let Some(new) = ch.role {
                if role == Role::Admin && new != Role::Admin && admins(&tx)? <= 1 {
                    bail!("{email} is the last admin; make another user admin first");
                }
                tx.execute(
                    "UPDATE users SET role = ?2 WHERE email = ?1",
                    params![email, new],
                )?;
            }
            if let Some(scope) = &ch.scope {
                tx.execute(
                    "UPDATE users SET all_groups = ?2 WHERE email = ?1",
                    params![email, *scope == Scope::All],
                )?;
                write_scope(&tx, &email, scope)?;
            }
            if let Some(h) = &ch.password_hash {
                tx.execute(
                    "UPDATE users SET password_hash = ?2 WHERE email = ?1",
                    params![email, h],
                )?;
                // A new password ends every other way in: sessions sign in again.
                tx.execute("DELETE FROM console_sessions WHERE email = ?1", [&email])?;
            }
            tx.commit()?;
            Ok(())
        })?;
        self.user(&email)?.context("user just changed")
    }
    /// Removes a user (their sessions and tokens go with them). The last admin stays.
    pub fn remove_user(&self, email: &str) -> Result<()> {
        let email = normalize_email(email)?;
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let role = role_of(&tx, &email)?;
            if role == Role::Admin && admins(&tx)? <= 1 {
                bail!("{email} is the last admin; make another user admin first");
            }
            tx.execute("DELETE FROM users WHERE email = ?1", [&email])?;
            tx.commit()?;
            Ok(())
        })
    }
    /// One user.
    pub fn user(&self, email: &str) -> Result<Option<User>> {
        let Ok(email) = normalize_email(email) else {
            return Ok(None);
        };
        Ok(self.users_where(Some(&email))?.pop())
    }
    /// Every user, by email.
    pub fn users(&self) -> Result<Vec<User>> {
        self.users_where(None)
    }
    fn users_where(&self, email: Option<&str>) -> Result<Vec<User>> {
        self.with(|c| {
            let mut s = c.prepare(
                "SELECT email, role, all_groups, totp_enabled_at IS NOT NULL, created_at, last_login_at,
                   (SELECT COUNT(*) FROM recovery_codes r WHERE r.email = u.email AND r.used_at IS NULL)
                 FROM users u WHERE ?1 IS NULL OR email = ?1 ORDER BY email",
            )?;
            let mut users: Vec<(User, bool)> = s
                .query_map([email], |r| {
                    Ok((
                        User {
                            email: r.get(0)?,
                            role: r.get(1)?,
                            scope: Scope::All,
                            totp_enabled: r.get(3)?,
                            created_at: r.get(4)?,
                            last_login_at: r.get(5)?,
                            recovery_codes_left: r.get(6)?,
                        },
                        r.get::<_, bool>(2)?,
                    ))
                })?
                .collect::<Result<_, _>>()?;
            let mut groups = c.prepare(
                "SELECT group_name FROM user_groups WHERE email = ?1 ORDER BY group_name",
            )?;
            for (u, all) in &mut users {
                if !*all {
                    u.scope = Scope::Groups(
                        groups
                            .query_map([&u.email], |r| r.get(0))?
                            .collect::<Result<_, _>>()?,
                    );
                }
            }
            Ok(users.into_iter().map(|(u, _)| u).collect())
        })
    }
    /// The password hash to check a sign-in against, with the user's role.
    pub fn user_credentials(&self, email: &str) -> Result<Option<(String, Role)>> {
        let Ok(email) = normalize_email(email) else {
            return Ok(None);
        };
        self.with(|c| {
            Ok(c.query_row(
                "SELECT password_hash, role FROM users WHERE email = ?1",
                [email],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
        })
    }
    /// Records a successful console sign-in.
    pub fn user_signed_in(&self, email: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE users SET last_login_at = ?2 WHERE email = ?1",
                params![email, now()],
            )?;
            Ok(())
        })
    }

    /// The user's TOTP secret, once enrolled.
    pub fn totp_secret(&self, email: &str) -> Result<Option<Vec<u8>>> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT totp_secret FROM users WHERE email = ?1 AND totp_enabled_at IS NOT NULL",
                [email],
                |r| r.get(0),
            )
            .optional()?
            .flatten())
        })
    }
    /// Turns 2FA on with `secret`, spending `step` (the code that proved the enrolment), and
    /// replaces the recovery codes by these hashes.
    pub fn enable_totp(
        &self,
        email: &str,
        secret: &[u8],
        step: u64,
        recovery_hashes: &[[u8; 32]],
    ) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let n = tx.execute(
                "UPDATE users SET totp_secret = ?2, totp_enabled_at = ?3, totp_last_step = ?4 WHERE email = ?1",
                params![email, secret, now(), step as i64],
            )?;
            ensure!(n == 1, "no user {email}");
            tx.execute("DELETE FROM recovery_codes WHERE email = ?1", [email])?;
            for h in recovery_hashes {
                tx.execute(
                    "INSERT INTO recovery_codes (email, code_hash) VALUES (?1, ?2)",
                    params![email, &h[..]],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
    }
    /// Spends a TOTP time step: true only the first time a step at or after the last one
    /// spent is offered, so each code is accepted once (and an older one never again).
    pub fn spend_totp_step(&self, email: &str, step: u64) -> Result<bool> {
        self.with(|c| {
            Ok(c.execute(
                "UPDATE users SET totp_last_step = ?2
                 WHERE email = ?1 AND totp_enabled_at IS NOT NULL
                   AND (totp_last_step IS NULL OR totp_last_step < ?2)",
                params![email, step as i64],
            )? == 1)
        })
    }
    /// Spends a recovery code (by hash); true once per code.
    pub fn spend_recovery_code(&self, email: &str, code_hash: &[u8; 32]) -> Result<bool> {
        self.with(|c| {
            Ok(c.execute(
                "UPDATE recovery_codes SET used_at = ?3 WHERE email = ?1 AND code_hash = ?2 AND used_at IS NULL",
                params![email, &code_hash[..], now()],
            )? == 1)
        })
    }
    /// Turns 2FA off and drops the recovery codes (`user reset-2fa`, or the user's own choice).
    pub fn reset_totp(&self, email: &str) -> Result<()> {
        let email = normalize_email(email)?;
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let n = tx.execute(
                "UPDATE users SET totp_secret = NULL, totp_enabled_at = NULL, totp_last_step = NULL WHERE email = ?1",
                [&email],
            )?;
            ensure!(n == 1, "no user {email}");
            tx.execute("DELETE FROM recovery_codes WHERE email = ?1", [&email])?;
            tx.commit()?;
            Ok(())
        })
    }
}

/// A user's role, or an error naming the email when there is no such user.
fn role_of(tx: &rusqlite::Transaction<'_>, email: &str) -> Result<Role> {
    tx.query_row("SELECT role FROM users WHERE email = ?1", [email], |r| {
        r.get(0)
    })
    .optional()?
    .with_context(|| format!("no user {email}"))
}

fn admins(tx: &rusqlite::Transaction<'_>) -> Result<u64> {
    Ok(
        tx.query_row("SELECT COUNT(*) FROM users WHERE role = 'admin'", [], |r| {
            r.get(0)
        })?,
    )
}

fn write_scope(tx: &rusqlite::Transaction<'_>, email: &str, scope: &Scope) -> Result<()> {
    tx.execute("DELETE FROM user_groups WHERE email = ?1", [email])?;
    if let Scope::Groups(groups) = scope {
        for g in groups {
            let known: bool = tx
                .query_row("SELECT 1 FROM groups WHERE name = ?1", [g], |_| Ok(true))
                .optional()?
                .unwrap_or(false);
            ensure!(known, "no group {g:?}; add it first (`group add`)");
            tx.execute(
                "INSERT OR IGNORE INTO user_groups (email, group_name) VALUES (?1, ?2)",
                params![email, g],
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        (dir, db)
    }

    /// A user to add in tests (the store's other rooms' tests use it too).
    pub(in crate::server::db) fn new(email: &str, role: Role, scope: Scope) -> NewUser {
        NewUser {
            email: email.into(),
            password_hash: "h".into(),
            role,
            scope,
        }
    }

    #[test]
    fn users_have_roles_scopes_and_a_last_admin() {
        let (_d, db) = db();
        db.add_group("east").unwrap();
        db.add_group("west").unwrap();
        let a = db
            .add_user(&new(" Ann@X.io ", Role::Admin, Scope::All))
            .unwrap();
        assert_eq!(a.email, "ann@x.io");
        let o = db
            .add_user(&new(
                "op@x.io",
                Role::Operator,
                Scope::Groups(vec!["east".into()]),
            ))
            .unwrap();
        assert!(o.scope.covers(Some("east")));
        assert!(!o.scope.covers(Some("west")) && !o.scope.covers(None));
        assert!(db
            .add_user(&new("op@x.io", Role::Viewer, Scope::All))
            .is_err());
        let err = db
            .add_user(&new(
                "v@x.io",
                Role::Viewer,
                Scope::Groups(vec!["north".into()]),
            ))
            .unwrap_err();
        assert!(format!("{err:#}").contains("no group \"north\""), "{err:#}");
        assert!(db.user("v@x.io").unwrap().is_none(), "nothing half-added");
        let err = db
            .set_user(
                "ann@x.io",
                &UserChanges {
                    role: Some(Role::Viewer),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert!(format!("{err:#}").contains("last admin"), "{err:#}");
        assert!(db.remove_user("ann@x.io").is_err());
        db.set_user(
            "op@x.io",
            &UserChanges {
                role: Some(Role::Admin),
                ..Default::default()
            },
        )
        .unwrap();
        db.remove_user("ann@x.io").unwrap();
        assert_eq!(db.users().unwrap().len(), 1);
        let err = db.remove_group("nowhere").unwrap_err();
        assert!(format!("{err:#}").contains("no group"), "{err:#}");
        db.remove_group("east").unwrap();
        assert_eq!(
            db.user("op@x.io").unwrap().unwrap().scope,
            Scope::Groups(vec![])
        );
    }

    #[test]
    fn a_group_with_devices_is_not_removed() {
        let (_d, db) = db();
        db.add_group("east").unwrap();
        assert!(db.add_group("east").is_err(), "no duplicates");
        db.add_device(&super::super::NewDevice {
            name: "A".into(),
            group: Some("east".into()),
            ..Default::default()
        })
        .unwrap();
        let err = db.remove_group("east").unwrap_err();
        assert!(format!("{err:#}").contains("1 device"), "{err:#}");
        assert_eq!(
            db.groups().unwrap(),
            [Group {
                name: "east".into(),
                devices: 1
            }]
        );
    }

    #[test]
    fn totp_steps_and_recovery_codes_are_spent_once() {
        let (_d, db) = db();
        db.add_user(&new("a@x.io", Role::Admin, Scope::All))
            .unwrap();
        assert!(!db.spend_totp_step("a@x.io", 100).unwrap(), "not enrolled");
        let codes = [b"one", b"two"].map(|c| crate::crypto::sha256(c));
        db.enable_totp("a@x.io", b"secret", 100, &codes).unwrap();
        assert_eq!(
            db.totp_secret("a@x.io").unwrap().as_deref(),
            Some(&b"secret"[..])
        );
        assert!(
            !db.spend_totp_step("a@x.io", 100).unwrap(),
            "the enrolment code is spent"
        );
        assert!(db.spend_totp_step("a@x.io", 101).unwrap());
        assert!(!db.spend_totp_step("a@x.io", 101).unwrap(), "replay");
        assert!(!db.spend_totp_step("a@x.io", 99).unwrap(), "older step");
        assert!(db.spend_recovery_code("a@x.io", &codes[0]).unwrap());
        assert!(!db.spend_recovery_code("a@x.io", &codes[0]).unwrap());
        assert_eq!(db.user("a@x.io").unwrap().unwrap().recovery_codes_left, 1);
        db.reset_totp("a@x.io").unwrap();
        let u = db.user("a@x.io").unwrap().unwrap();
        assert!(!u.totp_enabled && u.recovery_codes_left == 0);
        assert!(db.totp_secret("a@x.io").unwrap().is_none());
    }

    #[test]
    fn emails_are_normalised_and_checked() {
        assert_eq!(normalize_email(" A@B.c ").unwrap(), "a@b.c");
        for bad in ["", "a", "@b", "a@", "a b@c.d", "a@.c"] {
            assert!(normalize_email(bad).is_err(), "{bad:?}");
        }
    }
}
