//! The reserved-name watch: Account Login is suspended while an extension's email equals the
//! remote account's username, and resumes when the clash goes.

use super::*;

/// How often the agent reads `pbx.extension_emails_file` again for the remote account's name.
pub const RESERVED_POLL: Duration = Duration::from_secs(2);

/// Suspends Account Login while an extension's email equals the remote account's username, and
/// lifts the suspension when the clash goes. The config check refuses such a config, but the
/// PBX rewrites the list whenever extensions change, long after the check. `config_error` says
/// why while it lasts. A list that cannot be read (being replaced, say) keeps the last verdict.
#[derive(Default)]
pub(super) struct ReservedNames {
    /// The clash last found (and shown in `config_error`).
    pub(super) shown: Option<String>,
    /// Whether the last read failed (so the failure is logged once).
    pub(super) unreadable: bool,
}

impl ReservedNames {
    pub(super) fn check(&mut self, gate: &gate::Gate, c: &AgentConfig, status: &StatusHandle) {
        let clash = match (&c.remote_access.account, &c.pbx.extension_emails_file) {
            (Some(account), Some(file)) => {
                match crate::config::is_extension_email(file, &account.username) {
                    Ok(taken) => taken.then(|| {
                        format!(
                            "{}: remote_access.account.username: {:?} is now an extension's \
                             email (listed in {}); Account Login is suspended until one of \
                             them is renamed",
                            c.source.display(),
                            account.username,
                            file.display()
                        )
                    }),
                    Err(e) => {
                        if !std::mem::replace(&mut self.unreadable, true) {
                            tracing::warn!(file = %file.display(), error = %e, "cannot read pbx.extension_emails_file; keeping the last check");
                        }
                        return;
                    }
                }
            }
            _ => None,
        };
        self.unreadable = false;
        if clash.is_none() && self.shown.is_none() {
            // Nothing suspended and nothing to suspend: no status to look at.
            return;
        }
        if clash != self.shown {
            gate.suspend_account(clash.clone());
        }
        // Shown while it lasts (a reload that clears `config_error` does not hide it), without
        // hiding a refused reload's message.
        let current = status.get().config_error;
        match &clash {
            Some(m) if current.is_none() || (current == self.shown && current != clash) => {
                status.update(|s| s.config_error = Some(m.clone()))
            }
            None if self.shown.is_some() && current == self.shown => {
                status.update(|s| s.config_error = None)
            }
            _ => {}
        }
        self.shown = clash;
    }
}
