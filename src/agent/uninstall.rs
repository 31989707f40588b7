//! `pbx-remote-agent deactivate`, run by the package's removal scripts (or by hand): the CM is
//! told this node is leaving, so its key is revoked there, and the credential here is deleted.
//! A CM that cannot be told keeps the credential here unless `force` says otherwise.

use super::state::StateDir;
use super::tunnel::{self, Deactivation};
use crate::config::AgentConfig;
use crate::protocol::Reason;
use anyhow::Result;

/// What `deactivate` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Deactivated {
    /// There was no credential: nothing to tell the CM (leftover markers are deleted).
    NotActivated,
    /// The CM revoked the node's key; the credential here is deleted.
    Revoked {
        /// Device id.
        device_id: String,
        /// Nodes of the device the CM still has (a Hot Standby peer).
        nodes_left: u32,
    },
    /// The CM does not know the key (removed there, or another CM); the credential is deleted.
    Unknown {
        /// Device id from the credential.
        device_id: String,
        /// What the CM said.
        message: String,
    },
    /// The credential could not be read; with `force` it is deleted unread (without, an error).
    Unreadable {
        /// Why.
        message: String,
    },
    /// The CM could not be told. The credential is deleted only when `forced`.
    NotTold {
        /// Device id from the credential.
        device_id: String,
        /// Why.
        reason: Reason,
        /// Details.
        message: String,
        /// The credential was deleted anyway (`--force`).
        forced: bool,
    },
}

/// Tells the CM and deletes the credential (see [`Deactivated`]).
pub async fn deactivate(config: &AgentConfig, force: bool) -> Result<Deactivated> {
    if !config.paths.state_dir.exists() {
        return Ok(Deactivated::NotActivated);
    }
    let state = StateDir::open(&config.paths.state_dir)?;
    let loaded = match state.load_any() {
        Err(e) if force => {
            state.forget_all()?;
            return Ok(Deactivated::Unreadable {
                message: format!("{e:#}"),
            });
        }
        other => other?,
    };
    let Some((credential, key)) = loaded else {
        state.forget_all()?;
        return Ok(Deactivated::NotActivated);
    };
    let device_id = credential.device_id;
    let outcome = match tunnel::deactivate(config, &key).await {
        Ok(Deactivation::Revoked {
            device_id,
            nodes_left,
        }) => Deactivated::Revoked {
            device_id,
            nodes_left,
        },
        Ok(Deactivation::Unknown(message)) => Deactivated::Unknown { device_id, message },
        Err((reason, message)) => Deactivated::NotTold {
            device_id,
            reason,
            message,
            forced: force,
        },
    };
    if !matches!(outcome, Deactivated::NotTold { forced: false, .. }) {
        state.forget_all()?;
    }
    tracing::debug!(?outcome, "deactivated");
    Ok(outcome)
}
