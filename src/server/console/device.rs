//! A device's page: nodes with telemetry and health, provisioning task, edit, a new code,
//! remove (confirmed first), and its visits and remote sessions.

use super::devices::{device_for, device_page, device_to_change, scoped_groups, visit_buttons};
use super::layout::{self, Nav};
use super::{in_scope, AppState, Caller};
use crate::server::db::{DeviceChanges, OpFilter};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use http::StatusCode;
use maud::html;
use serde::Deserialize;

pub(super) async fn show(
    State(app): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
) -> Response {
    let d = match device_page(&app, &c, &id) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let filter = OpFilter {
        device: Some(d.id.clone()),
        limit: 200,
        ..Default::default()
    };
    let events = match app.server.db.oplog(&c.user, &filter) {
        Ok(e) => e,
        Err(e) => return layout::internal(&format!("{e:#}")),
    };
    let visits: Vec<_> = events
        .iter()
        .filter(|e| e.action.starts_with("visit.") || e.action.starts_with("session."))
        .take(50)
        .collect();
    let groups = match scoped_groups(&app, &c.user) {
        Ok(g) => g,
        Err(e) => return layout::internal(&format!("{e:#}")),
    };
    let change = c.user.may_change_devices();
    let body = html! {
        div.titlebar {
            h1 { (d.name) }
            div.actions { (visit_buttons(&c, &d)) }
        }
        p { (layout::status_cell(&d)) }
        @if let Some(w) = &d.warning { p.warning role="status" { (w) } }
        dl.facts {
            dt { "Device ID" } dd { (d.id) }
            dt { "Group" } dd { (d.group.as_deref().unwrap_or("—")) }
            dt { "Comment" } dd { (d.comment.as_deref().unwrap_or("—")) }
            dt { "Allow Passwordless Login" } dd { (if d.allow_passwordless { "On" } else { "Off" }) }
            dt { "Verified Serial Number / MAC" } dd { (d.serial.as_deref().unwrap_or("—")) " / " (d.mac.as_deref().unwrap_or("—")) }
            dt { "Added" } dd { (layout::time(Some(d.created_at))) }
            dt { "Activated" } dd { (layout::time(d.activated_at)) }
        }
        h2 { "Nodes" }
        @if d.nodes.is_empty() && d.activated_at.is_some() {
            p #uninstalled { "The agent was uninstalled from the PBX and its key revoked here. Get a new authentication code to connect it again." }
        } @else if d.nodes.is_empty() { p { "Never connected." } } @else {
            table.nodes {
                thead { tr {
                    th scope="col" { "Node" } th scope="col" { "Hot Standby" } th scope="col" { "Status" }
                    th scope="col" { "Serial Number" } th scope="col" { "MAC" } th scope="col" { "Firmware" }
                    th scope="col" { "Model" } th scope="col" { "Agent" } th scope="col" { "Tunnel" } th scope="col" { "Last Seen" }
                    th scope="col" { "CPU / Memory / Disk" } th scope="col" { "Uptime" } th scope="col" { "Health" }
                } }
                tbody { @for n in &d.nodes { tr {
                    td { (n.role) }
                    td { (layout::ha_word(n).unwrap_or("—")) }
                    td { (if n.online { "Online" } else { "Offline" }) }
                    td { (n.serial.as_deref().unwrap_or("")) }
                    td { (n.mac.as_deref().unwrap_or("")) }
                    td { (n.firmware.as_deref().unwrap_or("")) }
                    td { (n.model.as_deref().unwrap_or("")) }
                    td { (n.agent_version.as_deref().unwrap_or("")) }
                    td { (transport_word(n.transport.as_deref())) }
                    td { (layout::time(n.last_seen)) }
                    td { @if let Some(t) = &n.telemetry {
                        (format!("{:.0}% / {:.0}% / {:.0}%", t.cpu_percent, t.memory_percent(), t.disk_percent()))
                    } }
                    td { @if let Some(t) = &n.telemetry {
                        (humantime::format_duration(std::time::Duration::from_secs(t.uptime_secs - t.uptime_secs % 60)))
                    } }
                    td { (n.health.as_str()) @if !n.abnormal.is_empty() { ": " (n.abnormal.join("; ")) } }
                } } }
            }
        }
        @if let Some(t) = &d.provisioning {
            h2 { "Provisioning" }
            p { (t.name) ": " strong { (t.state) } " (" (layout::time(Some(t.updated_at))) ")" }
            @if let Some(o) = &t.output { pre.output { (o) } }
        }
        @if change {
            h2 { "Edit" }
            form.stack method="post" action={"/devices/" (d.id) "/edit"} {
                input type="hidden" name="csrf" value=(c.csrf());
                label for="name" { "Device Name" }
                input #name name="name" required maxlength="64" value=(d.name);
                label for="group" { "Group" }
                select #group name="group" {
                    @if c.user.scope == crate::server::db::Scope::All { option value="" { "No group" } }
                    @for g in &groups { option value=(g) selected[d.group.as_deref() == Some(g.as_str())] { (g) } }
                }
                label for="comment" { "Comment" }
                input #comment name="comment" maxlength="200" value=(d.comment.as_deref().unwrap_or(""));
                div.check {
                    input #allow_passwordless type="checkbox" name="allow_passwordless" checked[d.allow_passwordless];
                    label for="allow_passwordless" { "Allow Passwordless Login to PBX" }
                }
                div.buttons { button type="submit" { "Save" } }
            }
            h2 { "Authentication code" }
            form method="post" action={"/devices/" (d.id) "/code"} {
                input type="hidden" name="csrf" value=(c.csrf());
                p { "A new code lets the PBX activate again (for example after its state was wiped)." }
                button type="submit" { "New Code" }
            }
            h2 { "Remove" }
            p { a.button.danger href={"/devices/" (d.id) "/remove"} { "Remove device…" } }
        }
        h2 { "Visits and remote sessions" }
        @if visits.is_empty() { p { "None yet." } } @else {
            table.log {
                thead { tr { th scope="col" { "Time" } th scope="col" { "User" } th scope="col" { "Action" } th scope="col" { "Client" } th scope="col" { "Result" } th scope="col" { "Detail" } } }
                tbody { @for e in &visits { tr {
                    td { (layout::time(Some(e.at))) } td { (e.actor) } td { (e.action) }
                    td { (e.client.as_deref().unwrap_or("")) } td { (e.result) }
                    td { (e.detail.as_deref().unwrap_or("")) }
                } } }
            }
        }
    };
    layout::page(&c, Nav::Devices, &d.name, body)
}

#[derive(Deserialize)]
pub(super) struct EditForm {
    name: String,
    #[serde(default)]
    group: String,
    #[serde(default)]
    comment: String,
    #[serde(default)]
    allow_passwordless: Option<String>,
}

pub(super) async fn edit(
    State(app): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
    Form(f): Form<EditForm>,
) -> Response {
    let d = match device_to_change(&app, &c, &id) {
        Ok(d) => d,
        Err(r) => return r,
    };
    if !in_scope(&c.user, (!f.group.is_empty()).then_some(f.group.as_str())) {
        return layout::message(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Not saved",
            "Choose one of your groups.",
        );
    }
    let ch = DeviceChanges {
        name: Some(f.name.trim().to_string()).filter(|n| !n.is_empty()),
        group: Some(f.group.clone()),
        comment: Some(f.comment.trim().to_string()),
        allow_passwordless: Some(f.allow_passwordless.is_some()),
        ..Default::default()
    };
    match app.server.db.set_device(&d.id, &ch) {
        Ok(()) => {
            app.server.hub.registry_changed();
            app.log(&c, "device.edit", Some(&d.id), "ok");
            Redirect::to(&format!("/devices/{}", d.id)).into_response()
        }
        Err(e) => layout::message(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Not saved",
            &format!("{e:#}"),
        ),
    }
}

pub(super) async fn new_code(
    State(app): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
) -> Response {
    let d = match device_to_change(&app, &c, &id) {
        Ok(d) => d,
        Err(r) => return r,
    };
    match app.server.db.new_code(&d.id, crate::server::db::CODE_TTL) {
        Ok(code) => {
            app.log(&c, "device.code", Some(&d.id), "ok");
            super::add::code_page(&app, &c, &d.id, &d.name, &code)
        }
        Err(e) => layout::internal(&format!("{e:#}")),
    }
}

pub(super) async fn remove_page(
    State(app): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
) -> Response {
    let d = match device_to_change(&app, &c, &id) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let body = html! {
        h1 { "Remove " (d.name) "?" }
        p { "The device's agent is told at once and forgets its credential; its slot is freed. To connect it again it needs a new authentication code. This cannot be undone." }
        form method="post" action={"/devices/" (d.id) "/remove"} {
            input type="hidden" name="csrf" value=(c.csrf());
            div.buttons {
                button.danger type="submit" { "Remove" }
                a href={"/devices/" (d.id)} { "Cancel" }
            }
        }
    };
    layout::page(&c, Nav::Devices, "Remove device", body)
}

pub(super) async fn remove(
    State(app): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = c.may_change(false) {
        return r;
    }
    match remove_device(&app, &c, &id) {
        Ok(true) => Redirect::to("/devices").into_response(),
        Ok(false) => layout::not_found(),
        Err(e) => layout::internal(&format!("{e:#}")),
    }
}

/// Removes a device in the caller's scope; false when there is none for them.
pub(crate) fn remove_device(app: &AppState, c: &Caller, id: &str) -> anyhow::Result<bool> {
    let Some(d) = device_for(app, &c.user, id)? else {
        return Ok(false);
    };
    let removed = app.server.db.remove_device(&d.id)?;
    if removed {
        app.server.hub.registry_changed();
        app.log(c, "device.remove", Some(&d.id), "ok");
    }
    Ok(removed)
}

/// A node's tunnel transport as the console says it.
fn transport_word(t: Option<&str>) -> &'static str {
    match t {
        Some("quic") => "QUIC",
        Some("tcp") => "TCP",
        _ => "—",
    }
}
