//! The agent's state directory: the device key and the credential from activation, plus the
//! fingerprint of the settings it was activated with (changing them re-activates).

use crate::config::{Activation, AgentConfig};
use crate::fsutil;
use crate::tls::KeyIdentity;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const KEY_FILE: &str = "device.key";
const CREDENTIAL_FILE: &str = "credential.json";
const REMOVED_FILE: &str = "removed.json";
/// The key of an activation that was sent but not finished (see [`StateDir::pending_key`]).
const PENDING_FILE: &str = "activation-pending.json";

/// What activation left behind.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Credential {
    /// Device id assigned by the server.
    pub device_id: String,
    /// Server's Ed25519 key for passwordless tokens (base64), pinned at activation.
    pub signing_key: String,
    /// Fingerprint of server/method/email/code-hash this credential belongs to.
    pub fingerprint: String,
    /// When activation succeeded (RFC 3339).
    pub activated_at: String,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Creates or tightens the directory (0700).
    pub fn open(dir: &Path) -> Result<StateDir> {
        fsutil::ensure_private_dir(dir)?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
        })
    }

    /// Path of a file inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The credential and key, if activation happened with these settings.
    pub fn load(&self, fingerprint: &str) -> Result<Option<(Credential, KeyIdentity)>> {
        let Some(cred) = self.credential()? else {
            return Ok(None);
        };
        if cred.fingerprint != fingerprint {
            tracing::info!("server or activation settings changed; activating again");
            return Ok(None);
        }
        let found = self.with_key(cred)?;
        if found.is_none() {
            tracing::warn!("credential without device key; activating again");
        }
        Ok(found)
    }

    /// The credential and key whatever settings they were made with (for `deactivate`).
    pub fn load_any(&self) -> Result<Option<(Credential, KeyIdentity)>> {
        match self.credential()? {
            Some(cred) => self.with_key(cred),
            None => Ok(None),
        }
    }

    fn credential(&self) -> Result<Option<Credential>> {
        let Some(raw) = fsutil::read_private(&self.path(CREDENTIAL_FILE))? else {
            return Ok(None);
        };
        let cred = serde_json::from_slice(&raw).with_context(|| {
            format!(
                "{}: corrupt credential",
                self.path(CREDENTIAL_FILE).display()
            )
        })?;
        Ok(Some(cred))
    }

    fn with_key(&self, cred: Credential) -> Result<Option<(Credential, KeyIdentity)>> {
        let Some(pem) = fsutil::read_private(&self.path(KEY_FILE))? else {
            return Ok(None);
        };
        let pem = String::from_utf8(pem).context("device key is not PEM text")?;
        let key = KeyIdentity::from_pem(&pem, &[device_cert_name()])
            .with_context(|| format!("{}", self.path(KEY_FILE).display()))?;
        Ok(Some((cred, key)))
    }

    /// Stores key and credential (key first; the credential's presence means "activated"),
    /// then lets go of the pending activation.
    pub fn store(&self, cred: &Credential, key: &KeyIdentity) -> Result<()> {
        fsutil::write_private(&self.path(KEY_FILE), key.key.serialize_pem().as_bytes())?;
        crate::agent::crash_point("credential_half_written");
        fsutil::write_private(
            &self.path(CREDENTIAL_FILE),
            &serde_json::to_vec_pretty(cred)?,
        )?;
        self.clear_pending()
    }

    /// The key of an activation for these settings that was sent and never finished (a crash,
    /// a lost answer): sent again with it, the server recognises the same activation and
    /// answers as the first time, instead of refusing the spent code. Another fingerprint's
    /// pending key is dropped.
    pub fn pending_key(&self, fingerprint: &str) -> Result<Option<KeyIdentity>> {
        let Some(raw) = fsutil::read_private(&self.path(PENDING_FILE))? else {
            return Ok(None);
        };
        let v: serde_json::Value = serde_json::from_slice(&raw).unwrap_or_default();
        let pem = v["key_pem"]
            .as_str()
            .filter(|_| v["fingerprint"] == fingerprint);
        match pem.map(|p| KeyIdentity::from_pem(p, &[device_cert_name()])) {
            Some(Ok(key)) => Ok(Some(key)),
            _ => {
                self.clear_pending()?;
                Ok(None)
            }
        }
    }

    /// Keeps `key` as the pending activation's (0600) before its public half is sent.
    pub fn save_pending(&self, fingerprint: &str, key: &KeyIdentity) -> Result<()> {
        let v = serde_json::json!({
            "fingerprint": fingerprint,
            "key_pem": key.key.serialize_pem(),
        });
        fsutil::write_private(&self.path(PENDING_FILE), v.to_string().as_bytes())
    }

    /// Drops the pending activation (finished, or refused for good).
    pub fn clear_pending(&self) -> Result<()> {
        match std::fs::remove_file(self.path(PENDING_FILE)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).context("removing the pending activation"),
        }
    }

    /// Records that the CM removed this device, so a restart with the same (spent) settings
    /// shows `device_removed` instead of trying the code again.
    pub fn mark_removed(&self, fingerprint: &str, device_id: &str) -> Result<()> {
        let marker = serde_json::json!({
            "fingerprint": fingerprint,
            "device_id": device_id,
            "removed_at": crate::status::rfc3339(std::time::SystemTime::now()),
        });
        fsutil::write_private(&self.path(REMOVED_FILE), marker.to_string().as_bytes())
    }

    /// The removal marker's device id, if it matches these settings. A marker for other
    /// settings is deleted: the config changed, so activation may try again.
    pub fn removed(&self, fingerprint: &str) -> Result<Option<String>> {
        let Some(raw) = fsutil::read_private(&self.path(REMOVED_FILE))? else {
            return Ok(None);
        };
        let v: serde_json::Value = serde_json::from_slice(&raw).unwrap_or_default();
        if v["fingerprint"] == fingerprint {
            return Ok(Some(v["device_id"].as_str().unwrap_or("").to_string()));
        }
        std::fs::remove_file(self.path(REMOVED_FILE)).context("removing the removal marker")?;
        Ok(None)
    }

    /// Deletes the credential and key.
    pub fn forget(&self) -> Result<()> {
        self.remove(&[CREDENTIAL_FILE, KEY_FILE])
    }

    /// Deletes every key and marker activation left (`deactivate`): the credential, the device
    /// key, a pending activation, the removal marker and the assertion signing key. The audit
    /// log and lockouts stay until purge.
    pub fn forget_all(&self) -> Result<()> {
        self.remove(&[
            CREDENTIAL_FILE,
            KEY_FILE,
            PENDING_FILE,
            REMOVED_FILE,
            crate::agent::assertion::KEY_FILE,
        ])
    }

    fn remove(&self, files: &[&str]) -> Result<()> {
        for &f in files {
            match std::fs::remove_file(self.path(f)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {f}")),
            }
        }
        Ok(())
    }
}

/// Name put into the device's throw-away certificate.
pub fn device_cert_name() -> String {
    "pbx-remote-agent-device".to_string()
}

/// Fingerprint of the settings that decide whether to (re-)activate: server, method, email and a
/// hash of the code. Never the password.
pub fn activation_fingerprint(config: &AgentConfig) -> String {
    let (method, email, code_hash) = match &config.activation {
        Activation::AuthCode(code) => (
            "auth_code",
            String::new(),
            hex::encode(crate::crypto::sha256(code.expose().as_bytes())),
        ),
        Activation::Email { email, .. } => ("email", email.to_lowercase(), String::new()),
    };
    let text = format!(
        "{}\n{method}\n{email}\n{code_hash}",
        config.server.address.authority()
    );
    hex::encode(crate::crypto::sha256(text.as_bytes()))
}
