//! The server's registry in SQLite (WAL, busy timeout): devices and their nodes (keys), one-time
//! authentication codes, visit links and grants, provisioning tasks and settings. Admin commands
//! open the same file beside a running server; the server notices their commits through
//! `PRAGMA data_version`. The schema is versioned ([`migrate`]).

mod codes;
mod console;
mod devices;
pub mod migrate;
mod oplog;
mod tasks;
mod templates;
mod tokens;
mod users;
mod visits;

pub use codes::{device_id_for, new_auth_code, normalize_code};
pub use console::{
    ConsoleSession, Failures, Stage, LOGIN_LOCK, MAX_LOGIN_FAILURES, MAX_SOURCE_FAILURES,
    SESSION_ABSOLUTE, SESSION_IDLE,
};
pub use devices::{
    identity_mismatch, AddedDevice, Device, DeviceChanges, DeviceFlags, NewDevice, Node, NodeHello,
    NodeKey,
};
pub use oplog::{Op, OpEntry, OpFilter, Source};
pub use tasks::{PendingTask, Task};
pub use templates::Template;
pub use tokens::{ApiToken, TOKEN_PREFIX};
pub use users::{
    check_group_name, normalize_email, Group, NewUser, Role, Scope, User, UserChanges,
};
pub use visits::{Grant, Redeemed, VisitLink};

use anyhow::{Context, Result};
use rusqlite::{params, Connection, OptionalExtension};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

/// Default lifetime of an authentication code.
pub const CODE_TTL: Duration = Duration::from_secs(24 * 3600);
/// Lifetime of a visit link.
pub const VISIT_TTL: Duration = Duration::from_secs(10 * 60);
/// Absolute lifetime of a visit grant.
pub const GRANT_TTL: Duration = Duration::from_secs(12 * 3600);
/// A node counts as online when seen within this long (covers a crashed server).
pub const ONLINE_WINDOW: Duration = Duration::from_secs(90);

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    (crate::protocol::now_ms() / 1000) as i64
}

/// The registry.
pub struct Db {
    conn: Mutex<Connection>,
    /// A second connection for the reads of the visit path (a visitor's grant, rechecked every
    /// second; a device's flags; a visit link). In WAL mode a read never waits for a writer, so
    /// these must not queue behind `conn` while it waits out the busy timeout on a write lock
    /// held by another process: that would hold up the data path's thread, and every visit.
    reader: Mutex<Connection>,
}

impl Db {
    /// Opens (and creates) `data_dir/server.db`.
    pub fn open(data_dir: &Path) -> Result<Db> {
        crate::fsutil::ensure_private_dir(data_dir)?;
        let path = data_dir.join("server.db");
        let mut conn =
            Connection::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        migrate::apply(&mut conn).with_context(|| format!("{}: cannot migrate", path.display()))?;
        let reader =
            Connection::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        reader.busy_timeout(Duration::from_secs(5))?;
        reader.pragma_update(None, "query_only", "ON")?;
        Ok(Db {
            conn: Mutex::new(conn),
            reader: Mutex::new(reader),
        })
    }
    /// Runs the read-only `f` on the visit path's own connection (see [`Db`]).
    fn read<T, E>(&self, f: impl FnOnce(&Connection) -> Result<T, E>) -> Result<T, E> {
        // Invariant: as for `with`; a read leaves nothing open behind it.
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn)
    }
    /// Runs `f` on the connection. Write transactions in `f` start IMMEDIATE: a deferred one
    /// that reads and then writes fails with SQLITE_BUSY_SNAPSHOT when an admin command (or the
    /// server) wrote in between, and no busy timeout can wait that out.
    fn with<T, E>(&self, f: impl FnOnce(&mut Connection) -> Result<T, E>) -> Result<T, E> {
        // Invariant: no code panics while holding the connection; if one did, the connection
        // itself is still consistent (SQLite rolls back the open transaction on drop).
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn)
    }
    /// SQLite's `data_version`: changes when another connection commits.
    pub fn data_version(&self) -> Result<i64> {
        self.with(|c| Ok(c.query_row("PRAGMA data_version", [], |r| r.get(0))?))
    }
    /// Device slots in use and in all.
    pub fn capacity(&self) -> Result<Capacity> {
        self.with(|c| capacity(c))
    }
    /// A setting.
    pub fn setting(&self, key: &str) -> Result<Option<String>> {
        self.with(|c| {
            Ok(
                c.query_row("SELECT value FROM settings WHERE key = ?1", [key], |r| {
                    r.get(0)
                })
                .optional()?,
            )
        })
    }
    /// Sets a setting.
    pub fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO settings (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )?;
            Ok(())
        })
    }
}

/// Device slots: activated devices against the capacity setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Capacity {
    /// Activated devices.
    pub used: u64,
    /// Slots in all; `None` is unlimited.
    pub total: Option<u64>,
}

fn capacity(c: &Connection) -> Result<Capacity> {
    let used: u64 = c.query_row(
        "SELECT COUNT(*) FROM devices WHERE activated_at IS NOT NULL",
        [],
        |r| r.get(0),
    )?;
    let cap: Option<String> = c
        .query_row(
            "SELECT value FROM settings WHERE key = 'capacity'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    Ok(Capacity {
        used,
        total: cap.and_then(|v| v.parse().ok()),
    })
}

/// Roles and states are stored as their wire spelling; a spelling this server does not know is
/// a read error naming it, never a silent default.
macro_rules! sql_text_enum {
    ($t:ty, $what:literal) => {
        impl rusqlite::types::ToSql for $t {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(self.as_str().into())
            }
        }
        impl rusqlite::types::FromSql for $t {
            fn column_result(
                v: rusqlite::types::ValueRef<'_>,
            ) -> rusqlite::types::FromSqlResult<Self> {
                let s = v.as_str()?;
                <$t>::parse(s).ok_or_else(|| {
                    rusqlite::types::FromSqlError::Other(format!("unknown {} {s:?}", $what).into())
                })
            }
        }
    };
}

sql_text_enum!(crate::protocol::NodeRole, "node role");
sql_text_enum!(crate::protocol::TaskState, "task state");
sql_text_enum!(users::Role, "user role");

impl rusqlite::types::ToSql for crate::protocol::HaState {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}
impl rusqlite::types::FromSql for crate::protocol::HaState {
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        Ok(crate::protocol::HaState::parse(v.as_str()?))
    }
}

#[cfg(test)]
mod concurrency {
    use super::*;

    #[test]
    fn admin_writes_beside_a_busy_writer_do_not_fail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        Db::open(&path).unwrap();
        let writer = {
            let path = path.clone();
            std::thread::spawn(move || {
                let db = Db::open(&path).unwrap();
                for i in 0..200 {
                    db.set_setting("noise", &i.to_string()).unwrap();
                }
            })
        };
        let db = Db::open(&path).unwrap();
        for i in 0..50 {
            db.add_device(&NewDevice {
                name: format!("d{i}"),
                ..Default::default()
            })
            .unwrap();
        }
        writer.join().unwrap();
        assert_eq!(db.list_devices().unwrap().len(), 50);
    }
}
