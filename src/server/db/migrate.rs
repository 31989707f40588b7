//! The registry's schema, versioned by SQLite's `PRAGMA user_version`: migration `n` takes a
//! database from version `n - 1` to `n`, once, inside one IMMEDIATE transaction that also sets the
//! version, so a failure leaves the database as it was and a server and an admin command opening
//! the file at once do not both apply it. New tables and columns are added as new entries at the
//! end of [`MIGRATIONS`]; an entry, once released, never changes.

use anyhow::{bail, Context, Result};
use rusqlite::{Connection, Transaction, TransactionBehavior};

/// One schema change.
pub struct Migration {
    /// What it does, for errors and logs.
    pub name: &'static str,
    /// Applies it inside the caller's transaction.
    pub apply: fn(&Transaction<'_>) -> rusqlite::Result<()>,
}

/// Every schema change, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        name: "registry: devices, codes, accounts, nodes, visits, grants, settings, provisioning tasks",
        apply: v1_registry,
    },
    Migration {
        name: "console: groups as rows, CM users with roles, scopes and 2FA, API tokens, console sessions, login failures, operation log",
        apply: v2_console,
    },
    Migration {
        name: "provisioning templates as rows; each node's local switches (account login, passwordless) as its agent reports them",
        apply: v3_templates_and_switches,
    },
    Migration {
        name: "each node's tunnel transport (quic or tcp) while it is connected",
        apply: v4_node_transport,
    },
    Migration {
        name: "failed sign-ins counted per source (an index for the source's budget)",
        apply: v5_login_failures_by_source,
    },
];

/// The schema version this build writes.
pub const LATEST: u32 = MIGRATIONS.len() as u32;

/// The first versioned schema. Databases written before versioning (version 0 with tables in
/// place) are brought to it too: `IF NOT EXISTS` keeps their tables and rows, and the columns
/// those servers added later by `ALTER TABLE` are added where missing, checked by name.
fn v1_registry(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(V1)?;
    for (table, column, decl) in [
        ("codes", "used_role", "TEXT"),
        ("nodes", "ha_state", "TEXT"),
        ("nodes", "telemetry", "TEXT"),
    ] {
        if !has_column(tx, table, column)? {
            tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl}"))?;
        }
    }
    Ok(())
}

const V1: &str = "
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    grp TEXT,
    comment TEXT,
    allow_passwordless INTEGER NOT NULL DEFAULT 0,
    allow_provisioning INTEGER NOT NULL DEFAULT 0,
    template TEXT,
    serial TEXT,
    mac TEXT,
    created_at INTEGER NOT NULL,
    activated_at INTEGER
);
CREATE TABLE IF NOT EXISTS codes (
    code_hash BLOB PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER,
    used_role TEXT
);
CREATE TABLE IF NOT EXISTS accounts (
    email TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (
    device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    key_hash BLOB NOT NULL UNIQUE,
    serial TEXT, mac TEXT, firmware TEXT, model TEXT, edition TEXT,
    agent_version TEXT,
    ha_state TEXT,
    telemetry TEXT,
    online INTEGER NOT NULL DEFAULT 0,
    connected_at INTEGER,
    last_seen INTEGER,
    PRIMARY KEY (device_id, role)
);
CREATE TABLE IF NOT EXISTS visits (
    token_hash BLOB PRIMARY KEY,
    device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    cm_user TEXT NOT NULL,
    passwordless INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER
);
CREATE TABLE IF NOT EXISTS grants (
    id TEXT PRIMARY KEY,
    secret_hash BLOB NOT NULL,
    device_id TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    cm_user TEXT NOT NULL,
    passwordless INTEGER NOT NULL,
    redeemed INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    ended_at INTEGER
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS provision_tasks (
    device_id TEXT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    state TEXT NOT NULL,
    output TEXT,
    updated_at INTEGER NOT NULL
);
";

/// Groups become rows (each distinct `devices.grp` one, referenced by `devices.group_name`), and
/// the provider accounts of v1 become CM users with the `operator` role over all groups, which
/// is what they could do before (activate any device by email).
fn v2_console(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(V2)?;
    tx.execute_batch(
        "INSERT INTO groups (name, created_at)
           SELECT DISTINCT grp, strftime('%s','now') FROM devices WHERE grp IS NOT NULL AND grp <> '';
         ALTER TABLE devices ADD COLUMN group_name TEXT REFERENCES groups(name) ON UPDATE CASCADE;
         UPDATE devices SET group_name = NULLIF(grp, '');
         ALTER TABLE devices DROP COLUMN grp;
         CREATE INDEX devices_group ON devices(group_name);
         INSERT INTO users (email, password_hash, role, all_groups, created_at)
           SELECT email, password_hash, 'operator', 1, created_at FROM accounts;
         DROP TABLE accounts;",
    )
}

const V2: &str = "
CREATE TABLE groups (
    name TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL
);
CREATE TABLE users (
    email TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL,
    all_groups INTEGER NOT NULL DEFAULT 1,
    totp_secret BLOB,
    totp_enabled_at INTEGER,
    totp_last_step INTEGER,
    created_at INTEGER NOT NULL,
    last_login_at INTEGER
);
CREATE TABLE user_groups (
    email TEXT NOT NULL REFERENCES users(email) ON DELETE CASCADE ON UPDATE CASCADE,
    group_name TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE ON UPDATE CASCADE,
    PRIMARY KEY (email, group_name)
);
CREATE TABLE recovery_codes (
    email TEXT NOT NULL REFERENCES users(email) ON DELETE CASCADE ON UPDATE CASCADE,
    code_hash BLOB NOT NULL,
    used_at INTEGER,
    PRIMARY KEY (email, code_hash)
);
CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL REFERENCES users(email) ON DELETE CASCADE ON UPDATE CASCADE,
    name TEXT NOT NULL,
    token_hash BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    last_used_at INTEGER,
    revoked_at INTEGER
);
CREATE TABLE console_sessions (
    id_hash BLOB PRIMARY KEY,
    email TEXT NOT NULL REFERENCES users(email) ON DELETE CASCADE ON UPDATE CASCADE,
    stage TEXT NOT NULL,
    csrf TEXT NOT NULL,
    client TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    pending_secret BLOB
);
CREATE TABLE login_failures (
    email TEXT NOT NULL,
    source TEXT NOT NULL,
    at INTEGER NOT NULL
);
CREATE INDEX login_failures_key ON login_failures(email, source, at);
CREATE TABLE oplog (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    actor TEXT NOT NULL,
    source TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT,
    device_id TEXT,
    client TEXT,
    result TEXT NOT NULL,
    detail TEXT,
    node TEXT,
    seq INTEGER
);
CREATE INDEX oplog_at ON oplog(at);
CREATE INDEX oplog_device ON oplog(device_id, at);
CREATE UNIQUE INDEX oplog_agent_event ON oplog(device_id, node, seq);
";

/// Templates the Add dialog picks from, and what each node's agent says of its own switches
/// (NULL until an agent that reports them connects).
fn v3_templates_and_switches(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch(
        "CREATE TABLE templates (
             name TEXT PRIMARY KEY,
             body TEXT NOT NULL,
             created_at INTEGER NOT NULL,
             updated_at INTEGER NOT NULL
         );
         ALTER TABLE nodes ADD COLUMN account_login INTEGER;
         ALTER TABLE nodes ADD COLUMN passwordless INTEGER;",
    )
}

/// Which transport a node's tunnel uses (NULL until an agent connects after this version).
fn v4_node_transport(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch("ALTER TABLE nodes ADD COLUMN transport TEXT;")
}

/// Failed sign-ins are counted per source as well as per (email, source): an index for that.
fn v5_login_failures_by_source(tx: &Transaction<'_>) -> rusqlite::Result<()> {
    tx.execute_batch("CREATE INDEX login_failures_source ON login_failures(source, at);")
}

fn has_column(c: &Connection, table: &str, column: &str) -> rusqlite::Result<bool> {
    let mut stmt = c.prepare("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")?;
    stmt.exists([table, column])
}

fn version(c: &Connection) -> rusqlite::Result<u32> {
    c.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// Brings the database to [`LATEST`]. A database from a newer server is refused, not touched.
pub fn apply(conn: &mut Connection) -> Result<()> {
    apply_list(conn, MIGRATIONS)
}

fn apply_list(conn: &mut Connection, migrations: &[Migration]) -> Result<()> {
    let latest = migrations.len() as u32;
    for (n, m) in (1..).zip(migrations) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Read inside the write lock: another process may have migrated since the last look.
        let current = version(&tx)?;
        if current > latest {
            bail!(
                "schema version {current} was written by a newer server (this one knows up to \
                 {latest}); run that version or newer"
            );
        }
        if current >= n {
            continue;
        }
        (m.apply)(&tx).with_context(|| format!("migration {n} ({})", m.name))?;
        tx.pragma_update(None, "user_version", n)?;
        tx.commit()
            .with_context(|| format!("migration {n} ({}): commit", m.name))?;
        tracing::info!(version = n, migration = m.name, "registry schema migrated");
    }
    let current = version(conn)?;
    if current > latest {
        bail!(
            "schema version {current} was written by a newer server (this one knows up to \
             {latest}); run that version or newer"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::db::{Db, NewDevice, Role, Scope};
    use crate::server::health::Health;

    const UNVERSIONED: &str = include_str!("testdata/unversioned.sql");

    fn tables(c: &Connection) -> Vec<String> {
        let mut s = c
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .unwrap();
        s.query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    }

    fn open_raw(dir: &std::path::Path) -> Connection {
        Connection::open(dir.join("server.db")).unwrap()
    }

    #[test]
    fn a_new_database_gets_every_migration_once() {
        let dir = tempfile::tempdir().unwrap();
        Db::open(dir.path()).unwrap();
        Db::open(dir.path()).unwrap();
        let c = open_raw(dir.path());
        assert_eq!(version(&c).unwrap(), LATEST);
        assert_eq!(
            tables(&c),
            [
                "api_tokens",
                "codes",
                "console_sessions",
                "devices",
                "grants",
                "groups",
                "login_failures",
                "nodes",
                "oplog",
                "provision_tasks",
                "recovery_codes",
                "settings",
                "sqlite_sequence",
                "templates",
                "user_groups",
                "users",
                "visits"
            ]
        );
    }

    #[test]
    fn a_database_written_before_versioning_keeps_its_data() {
        let dir = tempfile::tempdir().unwrap();
        open_raw(dir.path()).execute_batch(UNVERSIONED).unwrap();
        let db = Db::open(dir.path()).unwrap();
        assert_eq!(version(&open_raw(dir.path())).unwrap(), LATEST);

        let d = db
            .device("acme-hq-7k2mq")
            .unwrap()
            .expect("the device survives");
        assert_eq!(
            (d.name.as_str(), d.group.as_deref()),
            ("Acme HQ", Some("east"))
        );
        assert!(d.allow_passwordless && d.allow_provisioning);
        assert_eq!(d.mac.as_deref(), Some("00:11:22:33:44:55"));
        let n = &d.nodes[0];
        assert_eq!(n.ha_state, Some(crate::protocol::HaState::Active));
        assert_eq!(n.telemetry.as_ref().map(|t| t.cpu_percent), Some(12.5));
        assert_eq!(n.health, Health::Unknown, "offline");
        assert_eq!(
            d.provisioning.as_ref().map(|t| t.state.as_str()),
            Some("pending")
        );
        assert_eq!(db.node_by_key(&[1; 32]).unwrap().unwrap().device, d.id);
        assert_eq!(
            db.capacity().unwrap(),
            super::super::Capacity {
                used: 1,
                total: Some(25)
            }
        );
        // The v1 account is now an operator over all groups, and the group a row.
        let ops = db
            .user("ops@example.com")
            .unwrap()
            .expect("account kept as a user");
        assert_eq!((ops.role, &ops.scope), (Role::Operator, &Scope::All));
        assert!(db.user_credentials("ops@example.com").unwrap().is_some());
        assert_eq!(
            db.groups().unwrap(),
            [crate::server::db::Group {
                name: "east".into(),
                devices: 1
            }]
        );
        let grant = db
            .grant_by_cookie("grant1.grant-secret")
            .unwrap()
            .expect("grant");
        assert_eq!((grant.cm_user.as_str(), grant.passwordless), ("bob", true));
        assert!(db.peek_visit("visit-token").unwrap().is_some());
        // The old code is still spendable, and spending it writes the late column.
        let facts = crate::protocol::DeviceFacts {
            edition: "software".into(),
            firmware: "83.19.0.110".into(),
            model: "m".into(),
            serial: "s".into(),
            mac: "00:11:22:33:44:66".into(),
            ha_role: None,
        };
        assert_eq!(
            db.redeem_code("aaaa-bbbb-cccc-dddd", &[2; 32], &facts)
                .unwrap(),
            "spare-abcde"
        );
        db.add_device(&NewDevice {
            name: "New".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(db.list_devices().unwrap().len(), 3);
    }

    #[test]
    fn the_oldest_unversioned_schema_gets_its_late_columns() {
        let dir = tempfile::tempdir().unwrap();
        // The first servers' tables lacked three columns later added by ALTER TABLE.
        let c = open_raw(dir.path());
        c.execute_batch(UNVERSIONED).unwrap();
        c.execute_batch(
            "ALTER TABLE codes DROP COLUMN used_role; ALTER TABLE nodes DROP COLUMN ha_state;
             ALTER TABLE nodes DROP COLUMN telemetry;",
        )
        .unwrap();
        assert!(
            !has_column(&c, "nodes", "telemetry").unwrap(),
            "fixture is the old shape"
        );
        drop(c);
        let db = Db::open(dir.path()).unwrap();
        let c = open_raw(dir.path());
        for (t, col) in [
            ("codes", "used_role"),
            ("nodes", "ha_state"),
            ("nodes", "telemetry"),
        ] {
            assert!(has_column(&c, t, col).unwrap(), "{t}.{col}");
        }
        let d = db.device("acme-hq-7k2mq").unwrap().unwrap();
        assert_eq!(d.nodes[0].firmware.as_deref(), Some("83.19.0.110"));
        assert!(d.nodes[0].telemetry.is_none());
    }

    #[test]
    fn a_failed_migration_changes_nothing_and_names_itself() {
        fn good(tx: &Transaction<'_>) -> rusqlite::Result<()> {
            tx.execute_batch("CREATE TABLE a (x INTEGER)")
        }
        fn bad(tx: &Transaction<'_>) -> rusqlite::Result<()> {
            tx.execute_batch("CREATE TABLE b (x INTEGER); INSERT INTO nowhere VALUES (1)")
        }
        let list = [
            Migration {
                name: "a",
                apply: good,
            },
            Migration {
                name: "b then fail",
                apply: bad,
            },
        ];
        let mut c = Connection::open_in_memory().unwrap();
        let err = apply_list(&mut c, &list).unwrap_err();
        assert!(
            format!("{err:#}").contains("migration 2 (b then fail)"),
            "{err:#}"
        );
        assert_eq!(version(&c).unwrap(), 1, "the first one stays applied");
        assert_eq!(tables(&c), ["a"], "the second left nothing behind");
    }

    #[test]
    fn a_database_from_a_newer_server_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let c = open_raw(dir.path());
        c.pragma_update(None, "user_version", LATEST + 1).unwrap();
        drop(c);
        let err = Db::open(dir.path()).err().expect("refused");
        assert!(format!("{err:#}").contains("newer server"), "{err:#}");
        assert!(tables(&open_raw(dir.path())).is_empty());
    }
}
