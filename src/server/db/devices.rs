//! Devices and their nodes: what `device add|list|show|set|remove` see, and what the hub records
//! as nodes connect, beat and leave.

use super::codes::{device_id_for, insert_code};
use super::{now, Db, Task, CODE_TTL, ONLINE_WINDOW};
use crate::protocol::{DeviceFacts, HaState, LocalSwitches, NodeRole, Reason};
use crate::server::health::{health, Health};
use crate::server::refusal::Refusal;
use crate::tunnelio::Transport;
use anyhow::Result;
use rusqlite::{params, OptionalExtension};
use serde::Serialize;

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
    /// Which node of the device.
    pub role: NodeRole,
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
    /// Hot Standby state as last reported.
    pub ha_state: Option<HaState>,
    /// Online now.
    pub online: bool,
    /// Last heartbeat (Unix seconds).
    pub last_seen: Option<i64>,
    /// Normal, Abnormal or Unknown (offline, or no sample yet).
    pub health: Health,
    /// What is abnormal, e.g. "cpu 91.0% > 85%"; empty unless `health` is "abnormal".
    pub abnormal: Vec<String>,
    /// The last telemetry sample (kept while offline, for the record).
    pub telemetry: Option<crate::protocol::Telemetry>,
    /// The PBX side's own switches as its agent last reported them (None: an agent that does
    /// not report them, or never connected).
    pub switches: Option<LocalSwitches>,
    /// `quic` or `tcp` while the node is online (None when offline, or from an agent that
    /// connected before the server recorded it).
    pub transport: Option<String>,
}

/// What a node says when it connects, and over which transport.
#[derive(Debug, Clone, Copy)]
pub struct NodeHello<'a> {
    /// Reported facts.
    pub facts: &'a DeviceFacts,
    /// Agent version.
    pub agent_version: &'a str,
    /// Hot Standby state.
    pub ha_state: Option<HaState>,
    /// The PBX side's switches.
    pub switches: Option<LocalSwitches>,
    /// QUIC or TCP.
    pub transport: Transport,
}

/// Per-device settings the hub watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFlags {
    /// CM passwordless switch.
    pub allow_passwordless: bool,
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

/// A device just added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddedDevice {
    /// Its id (the host label visits use).
    pub id: String,
    /// Its first authentication code.
    pub code: String,
}

/// Which device and node a key was enrolled for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeKey {
    /// Device id.
    pub device: String,
    /// Node of that device.
    pub role: NodeRole,
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

impl Db {
    /// Adds a device and returns its id and first authentication code.
    pub fn add_device(&self, d: &NewDevice) -> Result<AddedDevice> {
        anyhow::ensure!(!d.name.trim().is_empty(), "--name must not be empty");
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let group = d.group.as_deref().filter(|g| !g.is_empty());
            check_group(&tx, group)?;
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
                "INSERT INTO devices (id, name, group_name, comment, allow_passwordless, allow_provisioning, template, serial, mac, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![id, d.name.trim(), group, d.comment, d.allow_passwordless, d.allow_provisioning, d.template, d.serial, d.mac, now()],
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
            Ok(AddedDevice { id, code })
        })
    }
    /// Every device with its nodes.
    pub fn list_devices(&self) -> Result<Vec<Device>> {
        self.with(|c| load_devices(c, None))
    }
    /// One device.
    pub fn device(&self, id: &str) -> Result<Option<Device>> {
        let id = id.to_ascii_lowercase();
        self.with(|c| Ok(load_devices(c, Some(&id))?.pop()))
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
                let v = (!v.is_empty()).then_some(v.as_str());
                check_group(&tx, v)?;
                tx.execute(
                    "UPDATE devices SET group_name = ?2 WHERE id = ?1",
                    params![id, v],
                )?;
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
    /// Checks a connecting node against the device's recorded serial/MAC.
    pub fn check_identity(&self, device: &str, facts: &DeviceFacts) -> Result<Option<Refusal>> {
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
    /// The device and node a key belongs to.
    pub fn node_by_key(&self, key_hash: &[u8; 32]) -> Result<Option<NodeKey>> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT device_id, role FROM nodes WHERE key_hash = ?1",
                [&key_hash[..]],
                |r| {
                    Ok(NodeKey {
                        device: r.get(0)?,
                        role: r.get(1)?,
                    })
                },
            )
            .optional()?)
        })
    }
    /// Revokes the node holding `key_hash` (its agent is being uninstalled): the node's row goes,
    /// the device stays for the provider (a new code enrols the PBX again). Returns the device
    /// and how many of its nodes are left, or `None` for an unknown key.
    pub fn remove_node(&self, key_hash: &[u8; 32]) -> Result<Option<(NodeKey, u32)>> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let node = tx
                .query_row(
                    "DELETE FROM nodes WHERE key_hash = ?1 RETURNING device_id, role",
                    [&key_hash[..]],
                    |r| {
                        Ok(NodeKey {
                            device: r.get(0)?,
                            role: r.get(1)?,
                        })
                    },
                )
                .optional()?;
            let Some(node) = node else {
                return Ok(None);
            };
            let left: u32 = tx.query_row(
                "SELECT COUNT(*) FROM nodes WHERE device_id = ?1",
                [&node.device],
                |r| r.get(0),
            )?;
            tx.commit()?;
            Ok(Some((node, left)))
        })
    }
    /// The device's flags, or `None` if it is gone.
    pub fn flags(&self, device: &str) -> Result<Option<DeviceFlags>> {
        self.read(|c| {
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
        role: NodeRole,
        hello: &NodeHello<'_>,
    ) -> Result<()> {
        let NodeHello {
            facts,
            agent_version,
            ha_state,
            switches,
            transport,
        } = *hello;
        let (account_login, passwordless) =
            switches.map(|s| (s.account_login, s.passwordless)).unzip();
        self.with(|c| {
            c.execute(
                "UPDATE nodes SET online = 1, connected_at = ?3, last_seen = ?3, agent_version = ?4,
                   serial = ?5, mac = ?6, firmware = ?7, model = ?8, edition = ?9, ha_state = ?10,
                   account_login = ?11, passwordless = ?12, transport = ?13
                 WHERE device_id = ?1 AND role = ?2",
                params![device, role, now(), agent_version, facts.serial, facts.mac, facts.firmware, facts.model, facts.edition, ha_state, account_login, passwordless, transport.as_str()],
            )?;
            Ok(())
        })
    }
    /// Records a heartbeat and its telemetry sample (the last one is kept per node).
    pub fn node_seen(
        &self,
        device: &str,
        role: NodeRole,
        ha_state: Option<HaState>,
        telemetry: Option<&crate::protocol::Telemetry>,
        switches: Option<LocalSwitches>,
    ) -> Result<()> {
        let telemetry = telemetry.map(serde_json::to_string).transpose()?;
        let (account_login, passwordless) =
            switches.map(|s| (s.account_login, s.passwordless)).unzip();
        self.with(|c| {
            c.execute(
                "UPDATE nodes SET last_seen = ?3, online = 1, ha_state = ?4, telemetry = COALESCE(?5, telemetry),
                   account_login = COALESCE(?6, account_login), passwordless = COALESCE(?7, passwordless)
                 WHERE device_id = ?1 AND role = ?2",
                params![device, role, now(), ha_state, telemetry, account_login, passwordless],
            )?;
            Ok(())
        })
    }
    /// Records a disconnected node.
    pub fn node_disconnected(&self, device: &str, role: NodeRole) -> Result<()> {
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
}

/// Expected vs reported serial/MAC; `None` when they agree (or nothing is recorded).
pub fn identity_mismatch(
    serial: Option<&str>,
    mac: Option<&str>,
    facts: &DeviceFacts,
) -> Option<Refusal> {
    let serial_ok = serial.is_none_or(|s| s.eq_ignore_ascii_case(&facts.serial));
    let mac_ok = mac
        .is_none_or(|m| crate::protocol::normalize_mac(m).as_deref() == Some(facts.mac.as_str()));
    if serial_ok && mac_ok {
        return None;
    }
    Some(Refusal::new(
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

/// A device's group must be a row of `groups` (an empty group means none).
fn check_group(tx: &rusqlite::Transaction<'_>, group: Option<&str>) -> Result<()> {
    let Some(g) = group else { return Ok(()) };
    let known = tx
        .query_row("SELECT 1 FROM groups WHERE name = ?1", [g], |_| Ok(()))
        .optional()?
        .is_some();
    anyhow::ensure!(known, "no group {g:?}; add it first (`group add {g}`)");
    Ok(())
}

/// Devices with their nodes and provisioning task (one device, or all by name): three queries
/// whatever the fleet's size, not two per device.
fn load_devices(c: &rusqlite::Connection, only: Option<&str>) -> Result<Vec<Device>> {
    let mut stmt = c.prepare_cached(
        "SELECT id, name, group_name, comment, allow_passwordless, allow_provisioning, serial, mac, created_at, activated_at
         FROM devices WHERE ?1 IS NULL OR id = ?1 ORDER BY name, id",
    )?;
    let mut devices: Vec<Device> = stmt
        .query_map([only], |r| {
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
    let index: std::collections::HashMap<String, usize> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| (d.id.clone(), i))
        .collect();
    let fresh = now() - ONLINE_WINDOW.as_secs() as i64;
    let mut stmt = c.prepare_cached(
        "SELECT device_id, role, serial, mac, firmware, model, agent_version, online, last_seen, ha_state, telemetry,
           account_login, passwordless, transport
         FROM nodes WHERE ?1 IS NULL OR device_id = ?1 ORDER BY device_id, role",
    )?;
    let mut rows = stmt.query([only])?;
    while let Some(r) = rows.next()? {
        let device: String = r.get(0)?;
        let Some(&i) = index.get(&device) else {
            continue;
        };
        let online: bool = r.get(7)?;
        let last_seen: Option<i64> = r.get(8)?;
        let online = online && last_seen.is_some_and(|t| t >= fresh);
        let telemetry: Option<crate::protocol::Telemetry> = r
            .get::<_, Option<String>>(10)?
            .and_then(|j| serde_json::from_str(&j).ok());
        let (health, abnormal) = health(online, telemetry.as_ref());
        devices[i].nodes.push(Node {
            role: r.get(1)?,
            serial: r.get(2)?,
            mac: r.get(3)?,
            firmware: r.get(4)?,
            model: r.get(5)?,
            agent_version: r.get(6)?,
            ha_state: r.get(9)?,
            online,
            last_seen,
            health,
            abnormal,
            telemetry,
            switches: match (r.get::<_, Option<bool>>(11)?, r.get::<_, Option<bool>>(12)?) {
                (Some(account_login), Some(passwordless)) => Some(LocalSwitches {
                    account_login,
                    passwordless,
                }),
                _ => None,
            },
            transport: if online { r.get(13)? } else { None },
        });
    }
    let mut stmt = c.prepare_cached(
        "SELECT device_id, name, state, output, updated_at FROM provision_tasks WHERE ?1 IS NULL OR device_id = ?1",
    )?;
    let mut rows = stmt.query([only])?;
    while let Some(r) = rows.next()? {
        let device: String = r.get(0)?;
        if let Some(&i) = index.get(&device) {
            devices[i].provisioning = Some(Task {
                name: r.get(1)?,
                state: r.get(2)?,
                output: r.get(3)?,
                updated_at: r.get(4)?,
            });
        }
    }
    for d in &mut devices {
        d.online = d.nodes.iter().any(|n| n.online);
        let pair = d.nodes.iter().any(|n| n.role != NodeRole::Single);
        let reachable = d.nodes.iter().filter(|n| n.online).count();
        if pair && reachable == 1 {
            d.warning = Some("only one node of the Hot Standby pair is reachable".into());
        }
    }
    Ok(devices)
}
