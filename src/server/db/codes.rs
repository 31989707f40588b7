//! One-time authentication codes and enrolment: spending a code (or a provider account's
//! password) for a node key, under the device's identity checks and the capacity.

use super::devices::identity_mismatch;
use super::users::{Scope, User};
use super::{capacity, now, Db};
use crate::crypto::{random_bytes, sha256};
use crate::protocol::{DeviceFacts, NodeRole, Reason};
use crate::server::refusal::{EnrolError, Refusal};
use anyhow::Result;
use rusqlite::{params, OptionalExtension};
use std::time::Duration;

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

impl Db {
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
    /// Whether `code` is an unused, unexpired code of `device` (Send to Email mails only such).
    pub fn code_is_live(&self, device: &str, code: &str) -> Result<bool> {
        let hash = sha256(normalize_code(code).as_bytes());
        self.with(|c| {
            Ok(c
                .query_row(
                    "SELECT 1 FROM codes WHERE code_hash = ?1 AND device_id = ?2 AND used_at IS NULL AND expires_at > ?3",
                    params![&hash[..], device.to_ascii_lowercase(), now()],
                    |_| Ok(()),
                )
                .optional()?
                .is_some())
        })
    }
    /// Spends a code for a new node key. Errors carry the reason the agent shows; a refused
    /// activation (mismatch, capacity) does not spend the code.
    pub fn redeem_code(
        &self,
        code: &str,
        key_hash: &[u8; 32],
        facts: &DeviceFacts,
    ) -> Result<String, EnrolError> {
        let hash = sha256(normalize_code(code).as_bytes());
        let role = facts.node_role();
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let row: Option<(String, i64, Option<i64>, Option<NodeRole>)> = tx
                .query_row(
                    "SELECT device_id, expires_at, used_at, used_role FROM codes WHERE code_hash = ?1",
                    [&hash[..]],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
                .optional()?;
            let Some((device, expires, used, used_role)) = row else {
                return Err(Refusal::new(Reason::InvalidCode, "the authentication code is not valid; check it or ask the provider for a new one").into());
            };
            // The same activation sent again (its answer was lost, or the agent crashed
            // before keeping it): the key it enrolled is this one. Answered as the first time.
            let retried: Option<String> = tx
                .query_row(
                    "SELECT device_id FROM nodes WHERE key_hash = ?1 AND device_id = ?2",
                    params![&key_hash[..], device],
                    |r| r.get(0),
                )
                .optional()?;
            if used.is_some() && retried.is_some() {
                return Ok(device);
            }
            // One code enrols one machine, or both nodes of a Hot Standby pair (one each).
            let pair_partner = matches!((used_role.and_then(NodeRole::ha), role.ha()), (Some(used), Some(this)) if used.partner() == this);
            if used.is_some() && !pair_partner {
                return Err(Refusal::new(Reason::CodeUsed, "the authentication code was already used; ask the provider for a new one (device code)").into());
            }
            if expires <= now() {
                return Err(Refusal::new(Reason::CodeExpired, "the authentication code has expired; ask the provider for a new one (device code)").into());
            }
            enrol(&tx, &device, role, key_hash, facts)?;
            tx.execute(
                "UPDATE codes SET used_at = COALESCE(used_at, ?2), used_role = ?3 WHERE code_hash = ?1",
                params![&hash[..], now(), role],
            )?;
            tx.commit()?;
            Ok(device)
        })
    }
    /// Enrols a key for an activation by a CM user's email and password: the device pre-added
    /// with this serial (it must be in the user's scope), or a new device named after the PBX,
    /// in the user's first group when their scope is a list of groups.
    pub fn enrol_by_account(
        &self,
        user: &User,
        key_hash: &[u8; 32],
        facts: &DeviceFacts,
    ) -> Result<String, EnrolError> {
        let role = facts.node_role();
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            // This key enrolled already (a retried activation): the same device, not a second.
            let retried: Option<(String, Option<String>)> = tx
                .query_row(
                    "SELECT d.id, d.group_name FROM nodes n JOIN devices d ON d.id = n.device_id WHERE n.key_hash = ?1",
                    [&key_hash[..]],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let existing: Option<(String, Option<String>)> = match retried {
                Some(r) => Some(r),
                None => tx
                    .query_row(
                        "SELECT id, group_name FROM devices WHERE serial = ?1 ORDER BY created_at LIMIT 1",
                        [&facts.serial],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?,
            };
            let device = match existing {
                Some((d, group)) if user.scope.covers(group.as_deref()) => d,
                Some(_) => {
                    return Err(Refusal::new(
                        Reason::BadCredentials,
                        format!("the device pre-added with serial number {} is outside the groups of {}; activate with its authentication code or an account that covers it", facts.serial, user.email),
                    )
                    .into())
                }
                None => {
                    let name = format!("{} {}", facts.model, facts.serial);
                    let id = device_id_for(&name);
                    let group = match &user.scope {
                        Scope::All => None,
                        Scope::Groups(gs) => gs.first().cloned(),
                    };
                    tx.execute(
                        "INSERT INTO devices (id, name, group_name, comment, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![id, name, group, format!("activated with the account {}", user.email), now()],
                    )?;
                    id
                }
            };
            enrol(&tx, &device, role, key_hash, facts)?;
            tx.commit()?;
            Ok(device)
        })
    }
}

/// Checks identity and capacity, then records the node.
fn enrol(
    tx: &rusqlite::Transaction<'_>,
    device: &str,
    role: NodeRole,
    key_hash: &[u8; 32],
    facts: &DeviceFacts,
) -> Result<(), EnrolError> {
    let (serial, mac, activated): (Option<String>, Option<String>, Option<i64>) = tx.query_row(
        "SELECT serial, mac, activated_at FROM devices WHERE id = ?1",
        [device],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    if let Some(refusal) = identity_mismatch(serial.as_deref(), mac.as_deref(), facts) {
        return Err(refusal.into());
    }
    if activated.is_none() {
        let slots = capacity(tx)?;
        if let Some(cap) = slots.total.filter(|cap| slots.used >= *cap) {
            return Err(Refusal::new(
                Reason::CapacityExceeded,
                format!("all {cap} device slots of this management server are in use; the provider must remove a device or raise the capacity"),
            ).into());
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
    Ok(())
}

pub(super) fn insert_code(
    tx: &rusqlite::Transaction<'_>,
    device: &str,
    ttl: Duration,
) -> Result<String> {
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
    use crate::server::db::NewDevice;

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
        let added = db
            .add_device(&NewDevice {
                name: "Acme HQ".into(),
                ..Default::default()
            })
            .unwrap();
        assert!(
            added.id.starts_with("acme-hq-") && added.id.len() <= 63,
            "{}",
            added.id
        );
        assert_eq!(added.code.len(), 19);
        let typed = added.code.to_lowercase().replace('-', " ");
        let reason = |r: Result<String, EnrolError>| r.unwrap_err().refusal().unwrap().reason;
        let first = db.redeem_code(&typed, &[1; 32], &facts()).unwrap();
        assert_eq!(first, added.id);
        let again = db.redeem_code(&added.code, &[2; 32], &facts());
        assert_eq!(reason(again), Reason::CodeUsed);
        // The same activation sent again (same key): answered as the first time.
        let retried = db.redeem_code(&added.code, &[1; 32], &facts()).unwrap();
        assert_eq!(retried, added.id);
        assert_eq!(db.list_devices().unwrap().len(), 1);
        let bogus = db.redeem_code("AAAA-AAAA-AAAA-AAAA", &[3; 32], &facts());
        assert_eq!(reason(bogus), Reason::InvalidCode);
        assert_eq!(db.node_by_key(&[1; 32]).unwrap().unwrap().device, added.id);
        let expired = db.new_code(&added.id, Duration::ZERO).unwrap();
        assert_eq!(
            reason(db.redeem_code(&expired, &[4; 32], &facts())),
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
}
