//! The server's registry in SQLite (WAL, busy timeout): devices and their nodes (keys), one-time
//! authentication codes, visit links and grants. Admin commands open the same file beside a
//! running server; the server notices their commits through `PRAGMA data_version`.

use crate::protocol::{DeviceFacts, Reason};
use crate::tls::{random_bytes, random_token, sha256};
use anyhow::{Context, Result};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
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

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

const SCHEMA: &str = "
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

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    (crate::protocol::now_ms() / 1000) as i64
}

/// One device as admin commands show it.
#[derive(Debug, Clone, Serialize)]
pub struct Device {
    /// Device id (DNS label).
    pub id: String,
    /// Display name.
    pub name: String,
    /// Group.
    pub group: Option<String>,
    /// Comment.
    pub comment: Option<String>,
    /// CM-side passwordless switch.
    pub allow_passwordless: bool,
    /// Provisioning allowed.
    pub allow_provisioning: bool,
    /// Expected serial.
    pub serial: Option<String>,
    /// Expected MAC.
    pub mac: Option<String>,
    /// Creation time (Unix seconds).
    pub created_at: i64,
    /// Activation time.
    pub activated_at: Option<i64>,
    /// Enrolled nodes.
    pub nodes: Vec<Node>,
    /// Any node online.
    pub online: bool,
    /// The provisioning task, if the device has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provisioning: Option<Task>,
    /// Something the provider should know (e.g. one node of a pair unreachable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

/// One enrolled machine of a device.
#[derive(Debug, Clone, Serialize)]
pub struct Node {
    /// "single", "primary" or "secondary".
    pub role: String,
    /// Reported serial.
    pub serial: Option<String>,
    /// Reported MAC.
    pub mac: Option<String>,
    /// Reported firmware.
    pub firmware: Option<String>,
    /// Reported model.
    pub model: Option<String>,
    /// Agent version.
    pub agent_version: Option<String>,
    /// Hot Standby state ("active"/"standby") as last reported.
    pub ha_state: Option<String>,
    /// Online now.
    pub online: bool,
    /// Last heartbeat (Unix seconds).
    pub last_seen: Option<i64>,
    /// "normal", "abnormal" or "unknown" (offline, or no sample yet).
    pub health: String,
    /// What is abnormal, e.g. "cpu 91.0% > 85%"; empty unless `health` is "abnormal".
    pub abnormal: Vec<String>,
    /// The last telemetry sample (kept while offline, for the record).
    pub telemetry: Option<crate::protocol::Telemetry>,
}

/// Thresholds above which a node is flagged Abnormal: CPU %, memory %, disk %.
pub const ABNORMAL_CPU: f64 = 85.0;
/// Memory threshold, percent.
pub const ABNORMAL_MEMORY: f64 = 85.0;
/// Disk threshold, percent.
pub const ABNORMAL_DISK: f64 = 95.0;

/// Health of a node from its last sample: ("normal" | "abnormal" | "unknown", reasons).
pub fn health(online: bool, t: Option<&crate::protocol::Telemetry>) -> (String, Vec<String>) {
    let Some(t) = t.filter(|_| online) else {
        return ("unknown".into(), vec![]);
    };
    let mut why = vec![];
    for (what, value, limit) in [
        ("cpu", f64::from(t.cpu_percent), ABNORMAL_CPU),
        ("memory", t.memory_percent(), ABNORMAL_MEMORY),
        ("disk", t.disk_percent(), ABNORMAL_DISK),
    ] {
        if value > limit {
            why.push(format!("{what} {value:.1}% > {limit}%"));
        }
    }
    if !t.portal_reachable {
        why.push(format!(
            "web portal unreachable: {}",
            t.portal_error.as_deref().unwrap_or("no connection")
        ));
    }
    let state = if why.is_empty() { "normal" } else { "abnormal" };
    (state.into(), why)
}

/// A provisioning task: pending → executing → finished / failed (or unsupported).
#[derive(Debug, Clone, Serialize)]
pub struct Task {
    /// `Provision-{name}-{serial}`.
    pub name: String,
    /// State.
    pub state: String,
    /// Tail of the apply output.
    pub output: Option<String>,
    /// Last change (Unix seconds).
    pub updated_at: i64,
}

/// Per-device settings the hub watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFlags {
    /// CM passwordless switch.
    pub allow_passwordless: bool,
}

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

/// Fields `device add` takes.
#[derive(Debug, Clone, Default)]
pub struct NewDevice {
    /// Display name.
    pub name: String,
    /// Group.
    pub group: Option<String>,
    /// Comment.
    pub comment: Option<String>,
    /// CM passwordless switch.
    pub allow_passwordless: bool,
    /// Provisioning.
    pub allow_provisioning: bool,
    /// Template text.
    pub template: Option<String>,
    /// Expected serial.
    pub serial: Option<String>,
    /// Expected MAC.
    pub mac: Option<String>,
}

/// Changes `device set` makes.
#[derive(Debug, Clone, Default)]
pub struct DeviceChanges {
    /// New name.
    pub name: Option<String>,
    /// New group.
    pub group: Option<String>,
    /// New comment.
    pub comment: Option<String>,
    /// Passwordless switch.
    pub allow_passwordless: Option<bool>,
    /// Expected serial (checked at activation and every connection); "" clears it.
    pub serial: Option<String>,
    /// Expected MAC; "" clears it.
    pub mac: Option<String>,
}

/// The registry.
pub struct Db {
    conn: Mutex<Connection>,
}

impl Db {
    /// Opens (and creates) `data_dir/server.db`.
    pub fn open(data_dir: &Path) -> Result<Db> {
        crate::fsutil::ensure_private_dir(data_dir)?;
        let path = data_dir.join("server.db");
        let conn =
            Connection::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(SCHEMA)
            .with_context(|| format!("{}: cannot create schema", path.display()))?;
        // Columns added after the first schema; "duplicate column" just means already there.
        for alter in [
            "ALTER TABLE codes ADD COLUMN used_role TEXT",
            "ALTER TABLE nodes ADD COLUMN ha_state TEXT",
            "ALTER TABLE nodes ADD COLUMN telemetry TEXT",
        ] {
            let _ = conn.execute(alter, []);
        }
        Ok(Db {
            conn: Mutex::new(conn),
        })
    }

    /// Runs `f` on the connection. Write transactions in `f` start IMMEDIATE: a deferred one
    /// that reads and then writes fails with SQLITE_BUSY_SNAPSHOT when an admin command (or the
    /// server) wrote in between, and no busy timeout can wait that out.
    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        // Invariant: no code panics while holding the connection; if one did, the connection
        // itself is still consistent (SQLite rolls back the open transaction on drop).
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn)
    }

    /// SQLite's `data_version`: changes when another connection commits.
    pub fn data_version(&self) -> Result<i64> {
        self.with(|c| Ok(c.query_row("PRAGMA data_version", [], |r| r.get(0))?))
    }

    /// Adds a device and returns its id and first authentication code.
    pub fn add_device(&self, d: &NewDevice) -> Result<(String, String)> {
        anyhow::ensure!(!d.name.trim().is_empty(), "--name must not be empty");
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let id = loop {
                let id = device_id_for(&d.name);
                let taken: bool = tx
                    .query_row("SELECT 1 FROM devices WHERE id = ?1", [&id], |_| Ok(true))
                    .optional()?
                    .unwrap_or(false);
                if !taken {
                    break id;
                }
            };
            tx.execute(
                "INSERT INTO devices (id, name, grp, comment, allow_passwordless, allow_provisioning, template, serial, mac, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![id, d.name.trim(), d.group, d.comment, d.allow_passwordless, d.allow_provisioning, d.template, d.serial, d.mac, now()],
            )?;
            if d.allow_provisioning {
                let serial = d.serial.as_deref().unwrap_or("");
                tx.execute(
                    "INSERT INTO provision_tasks (device_id, name, state, updated_at) VALUES (?1, ?2, 'pending', ?3)",
                    params![id, format!("Provision-{}-{serial}", d.name.trim()), now()],
                )?;
            }
            let code = insert_code(&tx, &id, CODE_TTL)?;
            tx.commit()?;
            Ok((id, code))
        })
    }

    /// Issues a fresh code for `device`, invalidating unused older ones.
    pub fn new_code(&self, device: &str, ttl: Duration) -> Result<String> {
        let device = device.to_ascii_lowercase();
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let exists: Option<i64> = tx
                .query_row("SELECT 1 FROM devices WHERE id = ?1", [&device], |r| {
                    r.get(0)
                })
                .optional()?;
            anyhow::ensure!(exists.is_some(), "no device {device:?}");
            tx.execute(
                "DELETE FROM codes WHERE device_id = ?1 AND used_at IS NULL",
                [&device],
            )?;
            let code = insert_code(&tx, &device, ttl)?;
            tx.commit()?;
            Ok(code)
        })
    }

    /// Every device with its nodes.
    pub fn list_devices(&self) -> Result<Vec<Device>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT id, name, grp, comment, allow_passwordless, allow_provisioning, serial, mac, created_at, activated_at FROM devices ORDER BY name, id",
            )?;
            let mut devices: Vec<Device> = stmt
                .query_map([], |r| {
                    Ok(Device {
                        id: r.get(0)?,
                        name: r.get(1)?,
                        group: r.get(2)?,
                        comment: r.get(3)?,
                        allow_passwordless: r.get(4)?,
                        allow_provisioning: r.get(5)?,
                        serial: r.get(6)?,
                        mac: r.get(7)?,
                        created_at: r.get(8)?,
                        activated_at: r.get(9)?,
                        nodes: vec![],
                        online: false,
                        provisioning: None,
                        warning: None,
                    })
                })?
                .collect::<Result<_, _>>()?;
            let mut stmt = c.prepare(
                "SELECT role, serial, mac, firmware, model, agent_version, online, last_seen, ha_state, telemetry FROM nodes WHERE device_id = ?1 ORDER BY role",
            )?;
            let fresh = now() - ONLINE_WINDOW.as_secs() as i64;
            for d in &mut devices {
                d.nodes = stmt
                    .query_map([&d.id], |r| {
                        let online: bool = r.get(6)?;
                        let last_seen: Option<i64> = r.get(7)?;
                        let online = online && last_seen.is_some_and(|t| t >= fresh);
                        let telemetry: Option<crate::protocol::Telemetry> = r
                            .get::<_, Option<String>>(9)?
                            .and_then(|j| serde_json::from_str(&j).ok());
                        let (health, abnormal) = health(online, telemetry.as_ref());
                        Ok(Node {
                            role: r.get(0)?,
                            serial: r.get(1)?,
                            mac: r.get(2)?,
                            firmware: r.get(3)?,
                            model: r.get(4)?,
                            agent_version: r.get(5)?,
                            ha_state: r.get(8)?,
                            online,
                            last_seen,
                            health,
                            abnormal,
                            telemetry,
                        })
                    })?
                    .collect::<Result<_, _>>()?;
                d.online = d.nodes.iter().any(|n| n.online);
                d.provisioning = c
                    .query_row(
                        "SELECT name, state, output, updated_at FROM provision_tasks WHERE device_id = ?1",
                        [&d.id],
                        |r| Ok(Task { name: r.get(0)?, state: r.get(1)?, output: r.get(2)?, updated_at: r.get(3)? }),
                    )
                    .optional()?;
                let pair = d.nodes.iter().any(|n| n.role != "single");
                let reachable = d.nodes.iter().filter(|n| n.online).count();
                if pair && reachable == 1 {
                    d.warning = Some("only one node of the Hot Standby pair is reachable".into());
                }
            }
            Ok(devices)
        })
    }

    /// One device.
    pub fn device(&self, id: &str) -> Result<Option<Device>> {
        let id = id.to_ascii_lowercase();
        Ok(self.list_devices()?.into_iter().find(|d| d.id == id))
    }

    /// Removes a device (its nodes, codes, visits and grants go with it).
    pub fn remove_device(&self, id: &str) -> Result<bool> {
        let id = id.to_ascii_lowercase();
        self.with(|c| Ok(c.execute("DELETE FROM devices WHERE id = ?1", [&id])? > 0))
    }

    /// Applies `device set` changes.
    pub fn set_device(&self, id: &str, ch: &DeviceChanges) -> Result<()> {
        let id = id.to_ascii_lowercase();
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let n: usize =
                tx.query_row("SELECT COUNT(*) FROM devices WHERE id = ?1", [&id], |r| {
                    r.get(0)
                })?;
            anyhow::ensure!(n == 1, "no device {id:?}");
            if let Some(v) = &ch.name {
                tx.execute("UPDATE devices SET name = ?2 WHERE id = ?1", params![id, v])?;
            }
            if let Some(v) = &ch.group {
                tx.execute("UPDATE devices SET grp = ?2 WHERE id = ?1", params![id, v])?;
            }
            if let Some(v) = &ch.comment {
                tx.execute(
                    "UPDATE devices SET comment = ?2 WHERE id = ?1",
                    params![id, v],
                )?;
            }
            for (column, value) in [("serial", &ch.serial), ("mac", &ch.mac)] {
                if let Some(v) = value {
                    let v = (!v.is_empty()).then_some(v.as_str());
                    tx.execute(
                        &format!("UPDATE devices SET {column} = ?2 WHERE id = ?1"),
                        params![id, v],
                    )?;
                }
            }
            if let Some(v) = ch.allow_passwordless {
                tx.execute(
                    "UPDATE devices SET allow_passwordless = ?2 WHERE id = ?1",
                    params![id, v],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Spends a code for a new node key. Errors carry the reason the agent shows; a refused
    /// activation (mismatch, capacity) does not spend the code.
    pub fn redeem_code(
        &self,
        code: &str,
        key_hash: &[u8; 32],
        facts: &DeviceFacts,
    ) -> Result<Result<String, (Reason, String)>> {
        let hash = sha256(normalize_code(code).as_bytes());
        let role = node_role(facts);
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let row: Option<(String, i64, Option<i64>, Option<String>)> = tx
                .query_row(
                    "SELECT device_id, expires_at, used_at, used_role FROM codes WHERE code_hash = ?1",
                    [&hash[..]],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .optional()?;
            let Some((device, expires, used, used_role)) = row else {
                return Ok(Err((Reason::InvalidCode, "the authentication code is not valid; check it or ask the provider for a new one".into())));
            };
            // One code enrols one machine, or both nodes of a Hot Standby pair (one each).
            let pair_partner = matches!((used_role.as_deref(), role.as_str()), (Some("primary"), "secondary") | (Some("secondary"), "primary"));
            if used.is_some() && !pair_partner {
                return Ok(Err((Reason::CodeUsed, "the authentication code was already used; ask the provider for a new one (device code)".into())));
            }
            if expires <= now() {
                return Ok(Err((Reason::CodeExpired, "the authentication code has expired; ask the provider for a new one (device code)".into())));
            }
            if let Err(refusal) = enrol(&tx, &device, &role, key_hash, facts)? {
                return Ok(Err(refusal));
            }
            tx.execute(
                "UPDATE codes SET used_at = COALESCE(used_at, ?2), used_role = ?3 WHERE code_hash = ?1",
                params![&hash[..], now(), role],
            )?;
            tx.commit()?;
            Ok(Ok(device))
        })
    }

    /// Enrols a key for a provider-account activation: the device pre-added with this serial,
    /// or a new device named after the PBX.
    pub fn enrol_by_account(
        &self,
        email: &str,
        key_hash: &[u8; 32],
        facts: &DeviceFacts,
    ) -> Result<Result<String, (Reason, String)>> {
        let role = node_role(facts);
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let existing: Option<String> = tx
                .query_row(
                    "SELECT id FROM devices WHERE serial = ?1 ORDER BY created_at LIMIT 1",
                    [&facts.serial],
                    |r| r.get(0),
                )
                .optional()?;
            let device = match existing {
                Some(d) => d,
                None => {
                    let name = format!("{} {}", facts.model, facts.serial);
                    let id = device_id_for(&name);
                    tx.execute(
                        "INSERT INTO devices (id, name, comment, created_at) VALUES (?1, ?2, ?3, ?4)",
                        params![id, name, format!("activated with the account {email}"), now()],
                    )?;
                    id
                }
            };
            if let Err(refusal) = enrol(&tx, &device, &role, key_hash, facts)? {
                return Ok(Err(refusal));
            }
            tx.commit()?;
            Ok(Ok(device))
        })
    }

    /// Adds a CM account (for email activation).
    pub fn add_account(&self, email: &str, password_hash: &str) -> Result<()> {
        let email = email.trim().to_lowercase();
        anyhow::ensure!(email.contains('@'), "{email:?} is not an email address");
        self.with(|c| {
            c.execute(
                "INSERT INTO accounts (email, password_hash, created_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (email) DO UPDATE SET password_hash = excluded.password_hash",
                params![email, password_hash, now()],
            )?;
            Ok(())
        })
    }

    /// The stored hash for an account.
    pub fn account_hash(&self, email: &str) -> Result<Option<String>> {
        let email = email.trim().to_lowercase();
        self.with(|c| {
            Ok(c.query_row(
                "SELECT password_hash FROM accounts WHERE email = ?1",
                [email],
                |r| r.get(0),
            )
            .optional()?)
        })
    }

    /// Checks a connecting node against the device's recorded serial/MAC.
    pub fn check_identity(
        &self,
        device: &str,
        facts: &DeviceFacts,
    ) -> Result<Option<(Reason, String)>> {
        self.with(|c| {
            let row: Option<(Option<String>, Option<String>)> = c
                .query_row(
                    "SELECT serial, mac FROM devices WHERE id = ?1",
                    [device],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            Ok(row.and_then(|(serial, mac)| {
                identity_mismatch(serial.as_deref(), mac.as_deref(), facts)
            }))
        })
    }

    /// Device slots: (used, capacity or None for unlimited).
    pub fn capacity(&self) -> Result<(u64, Option<u64>)> {
        self.with(|c| capacity(c))
    }

    /// The (device, role) a key belongs to.
    pub fn node_by_key(&self, key_hash: &[u8; 32]) -> Result<Option<(String, String)>> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT device_id, role FROM nodes WHERE key_hash = ?1",
                [&key_hash[..]],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
        })
    }

    /// The device's flags, or `None` if it is gone.
    pub fn flags(&self, device: &str) -> Result<Option<DeviceFlags>> {
        self.with(|c| {
            Ok(
                c.prepare_cached("SELECT allow_passwordless FROM devices WHERE id = ?1")?
                    .query_row([device], |r| {
                        Ok(DeviceFlags {
                            allow_passwordless: r.get(0)?,
                        })
                    })
                    .optional()?,
            )
        })
    }

    /// Records a connected node.
    pub fn node_connected(
        &self,
        device: &str,
        role: &str,
        facts: &DeviceFacts,
        agent_version: &str,
        ha_state: Option<&str>,
    ) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE nodes SET online = 1, connected_at = ?3, last_seen = ?3, agent_version = ?4,
                   serial = ?5, mac = ?6, firmware = ?7, model = ?8, edition = ?9, ha_state = ?10
                 WHERE device_id = ?1 AND role = ?2",
                params![device, role, now(), agent_version, facts.serial, facts.mac, facts.firmware, facts.model, facts.edition, ha_state],
            )?;
            Ok(())
        })
    }

    /// Records a heartbeat and its telemetry sample (the last one is kept per node).
    pub fn node_seen(
        &self,
        device: &str,
        role: &str,
        ha_state: Option<&str>,
        telemetry: Option<&crate::protocol::Telemetry>,
    ) -> Result<()> {
        let telemetry = telemetry.map(serde_json::to_string).transpose()?;
        self.with(|c| {
            c.execute(
                "UPDATE nodes SET last_seen = ?3, online = 1, ha_state = ?4, telemetry = COALESCE(?5, telemetry)
                 WHERE device_id = ?1 AND role = ?2",
                params![device, role, now(), ha_state, telemetry],
            )?;
            Ok(())
        })
    }

    /// Records a disconnected node.
    pub fn node_disconnected(&self, device: &str, role: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE nodes SET online = 0, last_seen = ?3 WHERE device_id = ?1 AND role = ?2",
                params![device, role, now()],
            )?;
            Ok(())
        })
    }

    /// Marks every node offline (server start).
    pub fn all_offline(&self) -> Result<()> {
        self.with(|c| {
            c.execute("UPDATE nodes SET online = 0", [])?;
            Ok(())
        })
    }

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

    /// Looks at a visit link without spending it: (device, cm_user, passwordless).
    pub fn peek_visit(&self, token: &str) -> Result<Option<(String, String, bool)>> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT device_id, cm_user, passwordless FROM visits WHERE token_hash = ?1 AND used_at IS NULL AND expires_at > ?2",
                params![&sha256(token.as_bytes())[..], now()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?)
        })
    }

    /// Spends a visit link (once, even under a race) and creates its grant: (grant, cookie).
    pub fn redeem_visit(&self, token: &str, device: &str) -> Result<Option<(Grant, String)>> {
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
            Ok(Some((
                Grant { id, device_id: device.to_string(), cm_user, passwordless, redeemed: false, expires_at },
                cookie,
            )))
        })
    }

    /// The live grant a cookie value stands for.
    pub fn grant_by_cookie(&self, cookie: &str) -> Result<Option<Grant>> {
        let Some((id, secret)) = cookie.split_once('.') else {
            return Ok(None);
        };
        let row: Option<(Grant, Vec<u8>)> = self.with(|c| {
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
            .filter(|(_, h)| crate::tls::ct_eq(h, &sha256(secret.as_bytes())))
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

    /// The device's provisioning task and template while it is still to be delivered.
    pub fn pending_task(&self, device: &str) -> Result<Option<(String, String)>> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT t.name, d.template FROM provision_tasks t JOIN devices d ON d.id = t.device_id
                 WHERE t.device_id = ?1 AND t.state = 'pending' AND d.allow_provisioning = 1 AND d.template IS NOT NULL",
                [device],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
        })
    }

    /// Records a task's progress; a finished or failed task never goes back.
    pub fn set_task_state(
        &self,
        device: &str,
        task: &str,
        state: &str,
        output: &str,
    ) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE provision_tasks SET state = ?3, output = ?4, updated_at = ?5
                 WHERE device_id = ?1 AND name = ?2 AND state NOT IN ('finished', 'failed')",
                params![device, task, state, output, now()],
            )?;
            Ok(())
        })
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

fn node_role(facts: &DeviceFacts) -> String {
    facts.ha_role.clone().unwrap_or_else(|| "single".into())
}

fn capacity(c: &Connection) -> Result<(u64, Option<u64>)> {
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
    Ok((used, cap.and_then(|v| v.parse().ok())))
}

/// Expected vs reported serial/MAC; `None` when they agree (or nothing is recorded).
pub fn identity_mismatch(
    serial: Option<&str>,
    mac: Option<&str>,
    facts: &DeviceFacts,
) -> Option<(Reason, String)> {
    let serial_ok = serial.is_none_or(|s| s.eq_ignore_ascii_case(&facts.serial));
    let mac_ok =
        mac.is_none_or(|m| crate::config::normalize_mac(m).as_deref() == Some(facts.mac.as_str()));
    if serial_ok && mac_ok {
        return None;
    }
    Some((
        Reason::DeviceMismatch,
        format!(
            "this device is registered for serial {} and MAC {}, but this PBX reports serial {} and MAC {}; check the PBX or ask the provider to correct the device",
            serial.unwrap_or("(any)"),
            mac.unwrap_or("(any)"),
            facts.serial,
            facts.mac
        ),
    ))
}

/// Checks identity and capacity, then records the node. `Ok(Err)` is a refusal to report.
fn enrol(
    tx: &rusqlite::Transaction<'_>,
    device: &str,
    role: &str,
    key_hash: &[u8; 32],
    facts: &DeviceFacts,
) -> Result<Result<(), (Reason, String)>> {
    let (serial, mac, activated): (Option<String>, Option<String>, Option<i64>) = tx.query_row(
        "SELECT serial, mac, activated_at FROM devices WHERE id = ?1",
        [device],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    if let Some(refusal) = identity_mismatch(serial.as_deref(), mac.as_deref(), facts) {
        return Ok(Err(refusal));
    }
    if activated.is_none() {
        let (used, cap) = capacity(tx)?;
        if let Some(cap) = cap.filter(|cap| used >= *cap) {
            return Ok(Err((
                Reason::CapacityExceeded,
                format!("all {cap} device slots of this management server are in use; the provider must remove a device or raise the capacity"),
            )));
        }
    }
    // A key already enrolled elsewhere is moved, never duplicated.
    tx.execute("DELETE FROM nodes WHERE key_hash = ?1", [&key_hash[..]])?;
    tx.execute(
        "INSERT INTO nodes (device_id, role, key_hash, serial, mac, firmware, model, edition)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (device_id, role) DO UPDATE SET key_hash = excluded.key_hash,
           serial = excluded.serial, mac = excluded.mac, firmware = excluded.firmware,
           model = excluded.model, edition = excluded.edition, online = 0",
        params![
            device,
            role,
            &key_hash[..],
            facts.serial,
            facts.mac,
            facts.firmware,
            facts.model,
            facts.edition
        ],
    )?;
    tx.execute(
        "UPDATE devices SET activated_at = COALESCE(activated_at, ?2) WHERE id = ?1",
        params![device, now()],
    )?;
    Ok(Ok(()))
}

fn insert_code(tx: &rusqlite::Transaction<'_>, device: &str, ttl: Duration) -> Result<String> {
    let code = new_auth_code();
    tx.execute(
        "INSERT INTO codes (code_hash, device_id, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
        params![
            &sha256(normalize_code(&code).as_bytes())[..],
            device,
            now(),
            now() + ttl.as_secs() as i64
        ],
    )?;
    Ok(code)
}

/// A new code: 16 Crockford base32 characters (80 bits) as XXXX-XXXX-XXXX-XXXX.
pub fn new_auth_code() -> String {
    let bytes = random_bytes::<16>();
    let chars: Vec<char> = bytes
        .iter()
        .map(|b| CROCKFORD[(b & 31) as usize] as char)
        .collect();
    chars
        .chunks(4)
        .map(|c| c.iter().collect::<String>())
        .collect::<Vec<_>>()
        .join("-")
}

/// Canonical form of a typed code: upper case, no separators, O→0 and I/L→1.
pub fn normalize_code(code: &str) -> String {
    code.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| match c.to_ascii_uppercase() {
            'O' => '0',
            'I' | 'L' => '1',
            other => other,
        })
        .collect()
}

/// A DNS-label device id: a slug of the name and a random suffix.
pub fn device_id_for(name: &str) -> String {
    let mut slug = String::new();
    for ch in name.chars() {
        if ch.is_ascii_alphanumeric() {
            slug.push(ch.to_ascii_lowercase());
        } else if !slug.ends_with('-') && !slug.is_empty() {
            slug.push('-');
        }
        if slug.len() >= 40 {
            break;
        }
    }
    let slug = slug.trim_end_matches('-');
    let suffix: String = random_bytes::<5>()
        .iter()
        .map(|b| CROCKFORD[(b & 31) as usize].to_ascii_lowercase() as char)
        .collect();
    if slug.is_empty() {
        format!("pbx-{suffix}")
    } else {
        format!("{slug}-{suffix}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> DeviceFacts {
        DeviceFacts {
            edition: "software".into(),
            firmware: "83.19.0.110".into(),
            model: "m".into(),
            serial: "s".into(),
            mac: "00:11:22:33:44:55".into(),
            ha_role: None,
        }
    }

    #[test]
    fn codes_are_single_use_and_typo_tolerant() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let (id, code) = db
            .add_device(&NewDevice {
                name: "Acme HQ".into(),
                ..Default::default()
            })
            .unwrap();
        assert!(id.starts_with("acme-hq-") && id.len() <= 63, "{id}");
        assert_eq!(code.len(), 19);
        let typed = code.to_lowercase().replace('-', " ");
        let first = db.redeem_code(&typed, &[1; 32], &facts()).unwrap();
        assert_eq!(first.unwrap(), id);
        let again = db.redeem_code(&code, &[2; 32], &facts()).unwrap();
        assert_eq!(again.unwrap_err().0, Reason::CodeUsed);
        let bogus = db
            .redeem_code("AAAA-AAAA-AAAA-AAAA", &[3; 32], &facts())
            .unwrap();
        assert_eq!(bogus.unwrap_err().0, Reason::InvalidCode);
        assert_eq!(db.node_by_key(&[1; 32]).unwrap().unwrap().0, id);
        let expired = db.new_code(&id, Duration::ZERO).unwrap();
        assert_eq!(
            db.redeem_code(&expired, &[4; 32], &facts())
                .unwrap()
                .unwrap_err()
                .0,
            Reason::CodeExpired
        );
    }

    #[test]
    fn codes_have_80_bits_from_the_whole_alphabet() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            for c in new_auth_code().chars().filter(|c| *c != '-') {
                seen.insert(c);
            }
        }
        assert_eq!(seen.len(), 32);
    }

    #[test]
    fn visits_are_single_use_and_bound_to_their_device() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let (id, _) = db
            .add_device(&NewDevice {
                name: "A".into(),
                ..Default::default()
            })
            .unwrap();
        assert!(
            db.create_visit(&id, "alice", true).is_err(),
            "passwordless needs the device flag"
        );
        let token = db.create_visit(&id, "alice", false).unwrap();
        assert!(db.redeem_visit(&token, "other-device").unwrap().is_none());
        let (grant, cookie) = db.redeem_visit(&token, &id).unwrap().unwrap();
        assert!(db.redeem_visit(&token, &id).unwrap().is_none());
        assert_eq!(db.grant_by_cookie(&cookie).unwrap().unwrap().id, grant.id);
        assert!(db
            .grant_by_cookie(&format!("{}.forged", grant.id))
            .unwrap()
            .is_none());
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
