//! Admin commands (`device`, `visit`, `capacity`, `fingerprint`; `user`, `group` and `account` in
//! [`users`]): each opens the registry beside a running server and returns the text to print;
//! `--json` output is a stable contract. Every change is written to the Operation Log as
//! `cli:<login name>`; a visit as `cli:LABEL`.

mod users;
pub use users::{
    account_add, group_add, group_list, group_remove, user_add, user_list, user_remove,
    user_reset_2fa, user_set,
};

use crate::server::db::{
    AddedDevice, Capacity, Db, Device, DeviceChanges, NewDevice, Op, Source, CODE_TTL, VISIT_TTL,
};
use crate::server::keys::{ServerKeys, TlsSource};
use anyhow::{Context, Result};
use serde_json::json;
use std::path::Path;
use std::time::Duration;

fn ts(t: Option<i64>) -> String {
    t.map(|s| rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(s.max(0) as u64)))
        .unwrap_or_else(|| "never".into())
}

/// `device add`.
pub fn device_add(data_dir: &Path, d: &NewDevice, as_json: bool) -> Result<String> {
    let mut d = d.clone();
    if let Some(t) = &d.template {
        anyhow::ensure!(
            t.len() <= crate::protocol::MAX_TEMPLATE,
            "--template is {} bytes; at most {} fit in one delivery",
            t.len(),
            crate::protocol::MAX_TEMPLATE
        );
    }
    if let Some(mac) = &d.mac {
        d.mac = Some(crate::protocol::normalize_mac(mac).with_context(|| {
            format!("--mac {mac:?}: expected a MAC such as 00:11:22:33:44:55 (not all zero)")
        })?);
    }
    let db = Db::open(data_dir)?;
    let AddedDevice { id, code } = db.add_device(&d)?;
    log_cli(&db, "device.add", &id, Some(&id));
    let expires = rfc3339(std::time::SystemTime::now() + CODE_TTL);
    Ok(if as_json {
        json!({"device_id": id, "auth_code": code, "code_expires_at": expires}).to_string()
    } else {
        format!("device id:           {id}\nauthentication code: {code}\ncode expires:        {expires}\n")
    })
}

/// `device code`: a fresh code for re-activation.
pub fn device_code(data_dir: &Path, device: &str, ttl: Duration, as_json: bool) -> Result<String> {
    let device = &device.to_ascii_lowercase();
    let db = Db::open(data_dir)?;
    let code = db.new_code(device, ttl)?;
    log_cli(&db, "device.code", device, Some(device));
    Ok(if as_json {
        json!({"device_id": device.to_ascii_lowercase(), "auth_code": code}).to_string()
    } else {
        format!("authentication code: {code}\n")
    })
}

/// `device list [--group G]`.
pub fn device_list(data_dir: &Path, group: Option<&str>, as_json: bool) -> Result<String> {
    let db = Db::open(data_dir)?;
    let devices: Vec<Device> = db
        .list_devices()?
        .into_iter()
        .filter(|d| group.is_none_or(|g| d.group.as_deref() == Some(g)))
        .collect();
    if as_json {
        return Ok(serde_json::to_string_pretty(&devices)?);
    }
    let mut out = format!(
        "{:<28} {:<24} {:<11} {:<22} {}\n",
        "ID", "NAME", "STATUS", "LAST SEEN", "AGENT"
    );
    for d in &devices {
        let last = d.nodes.iter().filter_map(|n| n.last_seen).max();
        let version = d
            .nodes
            .iter()
            .find_map(|n| n.agent_version.clone())
            .unwrap_or_else(|| "-".into());
        let status = if d.online {
            "online"
        } else if d.activated_at.is_none() {
            "pending"
        } else if d.nodes.is_empty() {
            "uninstalled"
        } else {
            "offline"
        };
        out.push_str(&format!(
            "{:<28} {:<24} {:<11} {:<22} {}\n",
            d.id,
            d.name,
            status,
            ts(last),
            version
        ));
    }
    let Capacity { used, total } = db.capacity()?;
    let cap = total
        .map(|c| c.to_string())
        .unwrap_or_else(|| "unlimited".into());
    out.push_str(&format!(
        "{} device(s); slots used {used}/{cap}\n",
        devices.len()
    ));
    Ok(out)
}

fn show_text(d: &Device) -> String {
    let mut out = format!(
        "id:                 {}\nname:               {}\ngroup:              {}\ncomment:            {}\nstatus:             {}\nallow passwordless: {}\ncreated:            {}\nactivated:          {}\n",
        d.id,
        d.name,
        d.group.as_deref().unwrap_or("-"),
        d.comment.as_deref().unwrap_or("-"),
        if d.online {
            "online"
        } else if d.nodes.is_empty() && d.activated_at.is_some() {
            "uninstalled (the agent was deactivated and its key revoked; a new code enrols it again)"
        } else {
            "offline"
        },
        if d.allow_passwordless { "on" } else { "off" },
        ts(Some(d.created_at)),
        ts(d.activated_at),
    );
    if let Some(w) = &d.warning {
        out.push_str(&format!("warning:            {w}\n"));
    }
    for n in &d.nodes {
        out.push_str(&format!(
            "node {}{}: {}{} serial {} mac {} firmware {} agent {} last seen {}\n",
            n.role,
            n.ha_state.map(|s| format!(" ({s})")).unwrap_or_default(),
            if n.online { "online" } else { "offline" },
            n.transport
                .as_deref()
                .map(|t| format!(" over {t}"))
                .unwrap_or_default(),
            n.serial.as_deref().unwrap_or("-"),
            n.mac.as_deref().unwrap_or("-"),
            n.firmware.as_deref().unwrap_or("-"),
            n.agent_version.as_deref().unwrap_or("-"),
            ts(n.last_seen)
        ));
        out.push_str(&format!("  health: {}", n.health));
        if !n.abnormal.is_empty() {
            out.push_str(&format!(" ({})", n.abnormal.join("; ")));
        }
        out.push('\n');
        if let Some(t) = &n.telemetry {
            out.push_str(&format!(
                "  cpu {:.1}%  memory {:.1}%  disk {:.1}%  load {:.2} {:.2} {:.2}  uptime {}  portal {}\n",
                t.cpu_percent,
                t.memory_percent(),
                t.disk_percent(),
                t.load[0],
                t.load[1],
                t.load[2],
                humantime::format_duration(std::time::Duration::from_secs(t.uptime_secs)),
                match (t.portal_reachable, t.portal_latency_ms) {
                    (true, Some(ms)) => format!("up ({ms:.1} ms)"),
                    (true, None) => "up".to_string(),
                    (false, _) => "down".to_string(),
                }
            ));
        }
    }
    out
}

/// `device groups`: each group with its device count.
pub fn device_groups(data_dir: &Path, as_json: bool) -> Result<String> {
    let mut groups: std::collections::BTreeMap<String, usize> = Default::default();
    for d in Db::open(data_dir)?.list_devices()? {
        *groups.entry(d.group.unwrap_or_default()).or_default() += 1;
    }
    if as_json {
        let list: Vec<_> = groups
            .iter()
            .map(|(g, n)| json!({"group": g, "devices": n}))
            .collect();
        return Ok(serde_json::to_string_pretty(&list)?);
    }
    Ok(groups
        .iter()
        .map(|(g, n)| format!("{:<24} {n}\n", if g.is_empty() { "(none)" } else { g }))
        .collect())
}

/// `device show`.
pub fn device_show(data_dir: &Path, device: &str, as_json: bool) -> Result<String> {
    let db = Db::open(data_dir)?;
    let d = db
        .device(device)?
        .with_context(|| format!("no device {device:?}"))?;
    Ok(if as_json {
        serde_json::to_string_pretty(&d)?
    } else {
        show_text(&d)
    })
}

/// `device remove`.
pub fn device_remove(data_dir: &Path, device: &str) -> Result<String> {
    let device = &device.to_ascii_lowercase();
    let db = Db::open(data_dir)?;
    anyhow::ensure!(db.remove_device(device)?, "no device {device:?}");
    log_cli(&db, "device.remove", device, Some(device));
    Ok(format!(
        "removed {device}; a connected agent is told within seconds\n"
    ))
}

/// `device set`.
pub fn device_set(data_dir: &Path, device: &str, changes: &DeviceChanges) -> Result<String> {
    let device = &device.to_ascii_lowercase();
    let mut changes = changes.clone();
    if let Some(mac) = changes.mac.as_ref().filter(|m| !m.is_empty()) {
        changes.mac = Some(crate::protocol::normalize_mac(mac).with_context(|| {
            format!("--mac {mac:?}: expected a MAC such as 00:11:22:33:44:55 (not all zero)")
        })?);
    }
    let db = Db::open(data_dir)?;
    db.set_device(device, &changes)?;
    log_cli(&db, "device.edit", device, Some(device));
    Ok(format!("updated {device}\n"))
}

/// `visit`: a one-time link, valid 10 minutes.
pub fn visit(
    data_dir: &Path,
    device: &str,
    cm_user: &str,
    passwordless: bool,
    as_json: bool,
) -> Result<String> {
    anyhow::ensure!(!cm_user.trim().is_empty(), "--as must name the CM user");
    let db = Db::open(data_dir)?;
    let public = db
        .setting("public_url")?
        .context("the server has not run with this data dir yet, so its public URL is unknown; start `pbx-remote-server run` first")?;
    let public = url::Url::parse(&public).context("stored public URL")?;
    let device = device.to_ascii_lowercase();
    // A label typed on the shell is a claim, not a signed-in person: the audit says so.
    let actor = format!("cli:{}", cm_user.trim());
    let token = db.create_visit(&device, &actor, passwordless)?;
    let action = if passwordless {
        "visit.passwordless"
    } else {
        "visit.create"
    };
    log_as(&db, &actor, action, &device, Some(&device));
    let url = crate::server::front::visit_url(&public, &device, &token, passwordless);
    let expires = rfc3339(std::time::SystemTime::now() + VISIT_TTL);
    Ok(if as_json {
        json!({"url": url, "device_id": device, "passwordless": passwordless, "expires_at": expires}).to_string()
    } else {
        format!("{url}\n(one use, valid until {expires})\n")
    })
}

/// `capacity set N|unlimited`.
pub fn capacity_set(data_dir: &Path, value: &str) -> Result<String> {
    let v = match value {
        "unlimited" => "unlimited".to_string(),
        n => n
            .parse::<u32>()
            .map(|n| n.to_string())
            .map_err(|_| anyhow::anyhow!("expected a number or \"unlimited\", got {n:?}"))?,
    };
    let db = Db::open(data_dir)?;
    db.set_setting("capacity", &v)?;
    log_cli(&db, "capacity.set", &v, None);
    Ok(format!("capacity: {v}\n"))
}

/// `fingerprint`: the `pin_sha256` value alone on the last line.
pub fn fingerprint(data_dir: &Path) -> Result<String> {
    let db = Db::open(data_dir)?;
    let pin = match db.setting("pin_sha256")? {
        Some(p) => p,
        None => ServerKeys::load_or_create(data_dir, &TlsSource::default())?.pin_hex(),
    };
    Ok(format!(
        "# server.pin_sha256 for agents of this server:\n{pin}\n"
    ))
}

/// The Operation Log's actor for a shell user: `cli:` and the login name (the one `sudo` was
/// run by, when it was).
fn cli_actor() -> String {
    let name = ["SUDO_USER", "LOGNAME", "USER"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| "shell".into());
    format!("cli:{name}")
}

/// Records a CLI change. The change itself has happened: a failure to log it is reported on
/// stderr, not turned into the command's failure.
fn log_cli(db: &Db, action: &str, target: &str, device: Option<&str>) {
    log_as(db, &cli_actor(), action, target, device)
}

fn log_as(db: &Db, actor: &str, action: &str, target: &str, device: Option<&str>) {
    let op = Op {
        actor,
        source: Source::Cli,
        action,
        target: Some(target),
        device,
        client: None,
        result: "ok",
        detail: None,
    };
    if let Err(e) = db.log_op(&op) {
        eprintln!(
            "warning: {action} {target} was done but not written to the Operation Log: {e:#}"
        );
    }
}

/// RFC 3339 time, millisecond precision, as the agent's status file writes it.
fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}
