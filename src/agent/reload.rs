//! Reload rules: what a changed config file changes in a running tunnel (access rules, metrics,
//! timings and the portal, on the same connection) and what needs a new run.

use super::*;

/// What a reload can change in a running tunnel without a new connection.
pub(super) struct Running {
    pub(super) gate: Arc<gate::Gate>,
    pub(super) proxy: Arc<proxy::ProxyCtx>,
    pub(super) config: watch::Sender<Arc<AgentConfig>>,
}

/// The running tunnel, once it has one (none while activating or after a restart began).
pub(super) type LiveRun = Arc<std::sync::Mutex<Option<Running>>>;

pub(super) enum Reload {
    /// Invalid file: the old config stays, `config_error` says why.
    Refused,
    /// Applied to the running tunnel, same connection (the new config, if anything changed).
    Live(Option<Arc<AgentConfig>>),
    /// Needs a new run: server, activation, paths, HA, provisioning or the device facts the
    /// server checks at each connection changed, or there is no running tunnel to update.
    Restart(Arc<AgentConfig>),
}

/// Whether `new` differs from `old` only in what a running tunnel takes live: access rules,
/// logging, metrics, tunnel timings (not its proxy or transport), the portal's address and
/// trust, and the portal login (its password files are read again at every reload).
pub(super) fn keeps_connection(old: &AgentConfig, new: &AgentConfig) -> bool {
    let mut same = new.clone();
    same.remote_access = old.remote_access.clone();
    same.log_format = old.log_format;
    same.metrics_listen = old.metrics_listen;
    // Timings apply live; a new proxy or transport takes a new connection.
    same.tunnel = crate::config::Tunnel {
        proxy: new.tunnel.proxy.clone(),
        transport: new.tunnel.transport,
        ..old.tunnel.clone()
    };
    same.pbx.portal_url = old.pbx.portal_url.clone();
    same.pbx.portal_ca_file = old.pbx.portal_ca_file.clone();
    same.pbx.portal_source_addr = old.pbx.portal_source_addr;
    same.pbx.super_admin = old.pbx.super_admin.clone();
    same.pbx.extension_emails_file = old.pbx.extension_emails_file.clone();
    same.portal_login = old.portal_login.clone();
    same == *old
}

/// Whether the portal upstream must be rebuilt for `new`.
pub(super) fn portal_changed(old: &AgentConfig, new: &AgentConfig) -> bool {
    old.pbx.portal_url != new.pbx.portal_url
        || old.pbx.portal_ca_file != new.pbx.portal_ca_file
        || old.pbx.portal_source_addr != new.pbx.portal_source_addr
        || old.tunnel.portal_timeout != new.tunnel.portal_timeout
}

pub(super) fn reload(current: &Arc<AgentConfig>, status: &StatusHandle, live: &LiveRun) -> Reload {
    let refuse = |message: String| {
        tracing::warn!(error = %message, "reloaded config refused; the previous one stays in force");
        status.update(|s| s.config_error = Some(message));
        Reload::Refused
    };
    let new = match AgentConfig::load(&current.source) {
        Ok(c) => c,
        Err(e) => return refuse(e.0),
    };
    if new == **current {
        status.update(|s| s.config_error = None);
        tracing::info!("config reloaded; nothing changed");
        return Reload::Live(None);
    }
    let running = live.lock().unwrap_or_else(|p| p.into_inner());
    let Some(run) = running.as_ref().filter(|_| keeps_connection(current, &new)) else {
        status.update(|s| s.config_error = None);
        return Reload::Restart(Arc::new(new));
    };
    // Build the new portal before changing anything, so a bad one refuses the whole reload.
    if portal_changed(current, &new) {
        match portal::Portal::new(&new, new.paths.state_dir.clone()) {
            Ok(p) => run.proxy.set_portal(p),
            Err(e) => {
                return refuse(format!(
                    "{}: pbx.portal_url: {e:#}",
                    current.source.display()
                ))
            }
        }
    }
    if new.portal_login != current.portal_login {
        // Sessions logged in already keep their portal session; new logins use the new
        // account or password, and a refused account is tried again.
        run.proxy.set_broker(new.portal_login.clone());
    }
    status.update(|s| s.config_error = None);
    if new.log_format != current.log_format {
        // The subscriber is installed once per process.
        tracing::warn!("log.format changes take effect when the agent next starts");
    }
    run.gate.apply_rules(gate::Rules::from_config(&new));
    let new = Arc::new(new);
    run.config.send_replace(new.clone());
    tracing::info!("config reloaded; applied to the running tunnel");
    Reload::Live(Some(new))
}
