//! My Devices (search, filters, sort, pages, live status) and the Remote Visit / Passwordless
//! Login buttons, which mint a one-time visit link under the signed-in user's email.

use super::layout::{self, Nav};
use super::{in_scope, AppState, Caller};
use crate::server::db::{Device, User};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use http::StatusCode;
use maud::{html, Markup};
use serde::{Deserialize, Serialize};

/// Devices per page of My Devices.
pub(super) const PAGE_SIZE: usize = 50;

/// My Devices' filters, sort and page (the page and `GET /api/v1/devices` take the same).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub(crate) struct ListQuery {
    /// Searched in name, id, serial number, MAC and comment.
    #[serde(default)]
    pub q: String,
    /// Group name; empty for all.
    #[serde(default)]
    pub group: String,
    /// `online`, `offline`, `abnormal`, `never`; empty for all.
    #[serde(default)]
    pub status: String,
    /// `name`, `status`, `group`, `last_seen`, `firmware`.
    #[serde(default)]
    pub sort: String,
    /// `desc` for descending.
    #[serde(default)]
    pub dir: String,
    /// 1-based page.
    #[serde(default)]
    pub page: Option<usize>,
}

/// One page of devices.
#[derive(Debug, Serialize)]
pub(crate) struct Listing {
    /// Devices matching the filters, all pages.
    pub total: usize,
    /// This page (1-based).
    pub page: usize,
    /// Pages in all.
    pub pages: usize,
    /// This page's devices.
    pub devices: Vec<Device>,
}

/// A device's last heartbeat over its nodes.
fn last_seen(d: &Device) -> Option<i64> {
    d.nodes.iter().filter_map(|n| n.last_seen).max()
}

fn firmware(d: &Device) -> &str {
    d.nodes
        .iter()
        .find_map(|n| n.firmware.as_deref())
        .unwrap_or("")
}

fn serial(d: &Device) -> &str {
    d.serial
        .as_deref()
        .or_else(|| d.nodes.iter().find_map(|n| n.serial.as_deref()))
        .unwrap_or("")
}

/// Filters, sorts and pages the devices `user` may see.
pub(crate) fn listing(app: &AppState, user: &User, q: &ListQuery) -> anyhow::Result<Listing> {
    let needle = q.q.trim().to_lowercase();
    let mut devices: Vec<Device> = app
        .server
        .db
        .list_devices()?
        .into_iter()
        .filter(|d| in_scope(user, d.group.as_deref()))
        .filter(|d| q.group.is_empty() || d.group.as_deref() == Some(q.group.as_str()))
        .filter(|d| q.status.is_empty() || layout::status(d).1 == q.status)
        .filter(|d| {
            needle.is_empty()
                || [
                    Some(d.name.as_str()),
                    Some(d.id.as_str()),
                    Some(serial(d)),
                    d.mac.as_deref(),
                    d.comment.as_deref(),
                ]
                .into_iter()
                .flatten()
                .any(|f| f.to_lowercase().contains(&needle))
        })
        .collect();
    match q.sort.as_str() {
        "status" => devices.sort_by_key(|d| layout::status(d).0),
        "group" => devices.sort_by(|a, b| a.group.cmp(&b.group)),
        "last_seen" => devices.sort_by_key(last_seen),
        "firmware" => devices.sort_by(|a, b| firmware(a).cmp(firmware(b))),
        _ => {} // by name, as the store returns them
    }
    if q.dir == "desc" {
        devices.reverse();
    }
    let total = devices.len();
    let pages = total.div_ceil(PAGE_SIZE).max(1);
    let page = q.page.unwrap_or(1).clamp(1, pages);
    let devices = devices
        .into_iter()
        .skip((page - 1) * PAGE_SIZE)
        .take(PAGE_SIZE)
        .collect();
    Ok(Listing {
        total,
        page,
        pages,
        devices,
    })
}

/// The device `id` if `user` may see it (None is 404 either way).
pub(crate) fn device_for(app: &AppState, user: &User, id: &str) -> anyhow::Result<Option<Device>> {
    Ok(app
        .server
        .db
        .device(id)?
        .filter(|d| in_scope(user, d.group.as_deref())))
}

/// The device `id` for a page of `c`: 404 when there is none in their scope (whether or not it
/// exists), 500 on a store error.
pub(super) fn device_page(app: &AppState, c: &Caller, id: &str) -> Result<Device, Response> {
    match device_for(app, &c.user, id) {
        Ok(Some(d)) => Ok(d),
        Ok(None) => Err(layout::not_found()),
        Err(e) => Err(layout::internal(&format!("{e:#}"))),
    }
}

/// [`device_page`] for a change: a viewer is refused first.
pub(super) fn device_to_change(app: &AppState, c: &Caller, id: &str) -> Result<Device, Response> {
    c.may_change(false)?;
    device_page(app, c, id)
}

/// The groups `user` may see or put devices in, by name.
pub(crate) fn scoped_groups(app: &AppState, user: &User) -> anyhow::Result<Vec<String>> {
    Ok(app
        .server
        .db
        .groups()?
        .into_iter()
        .map(|g| g.name)
        .filter(|g| in_scope(user, Some(g)))
        .collect())
}

/// `q` as a query string (empty fields left out).
fn query_string(q: &ListQuery) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in [
        ("q", q.q.as_str()),
        ("group", &q.group),
        ("status", &q.status),
        ("sort", &q.sort),
        ("dir", &q.dir),
    ] {
        if !v.is_empty() {
            s.append_pair(k, v);
        }
    }
    if let Some(p) = q.page.filter(|p| *p > 1) {
        s.append_pair("page", &p.to_string());
    }
    s.finish()
}

pub(super) async fn list(
    State(app): State<AppState>,
    c: Caller,
    Query(q): Query<ListQuery>,
) -> Response {
    let (listing, groups) = match (listing(&app, &c.user, &q), app.server.db.groups()) {
        (Ok(l), Ok(g)) => (l, g),
        (Err(e), _) | (_, Err(e)) => return layout::internal(&format!("{e:#}")),
    };
    let groups: Vec<String> = groups
        .into_iter()
        .map(|g| g.name)
        .filter(|g| in_scope(&c.user, Some(g)))
        .collect();
    let sort_link = |key: &str, label: &str| {
        let desc = q.sort == key && q.dir != "desc";
        let mut next = q.clone();
        next.sort = key.into();
        next.dir = if desc { "desc".into() } else { String::new() };
        next.page = None;
        let mark = match (
            q.sort == key || (key == "name" && q.sort.is_empty()),
            q.dir == "desc",
        ) {
            (true, false) => " ▲",
            (true, true) => " ▼",
            _ => "",
        };
        html! { a href={"/devices?" (query_string(&next))} { (label) (mark) } }
    };
    let api = format!("/api/v1/devices?{}", query_string(&q));
    let body = html! {
        div.titlebar {
            h1 { "My Devices" }
            @if c.user.may_change_devices() { a.button href="/devices/add" { "Add" } }
        }
        form.filters method="get" action="/devices" role="search" {
            label for="q" { "Search" }
            input #q type="search" name="q" value=(q.q) placeholder="Name, serial number, MAC or comment";
            label for="group" { "Group" }
            select #group name="group" {
                option value="" { "All groups" }
                @for g in &groups { option value=(g) selected[q.group == *g] { (g) } }
            }
            label for="status" { "Status" }
            select #status name="status" {
                @for (v, label) in [("", "All"), ("online", "Online"), ("offline", "Offline"), ("abnormal", "Abnormal"), ("never", "Never connected"), ("uninstalled", "Uninstalled")] {
                    option value=(v) selected[q.status == v] { (label) }
                }
            }
            input type="hidden" name="sort" value=(q.sort);
            input type="hidden" name="dir" value=(q.dir);
            button type="submit" { "Filter" }
        }
        p.count #device-count { (listing.total) " device(s)" }
        table.devices #devices data-poll=(api) {
            thead { tr {
                th scope="col" { (sort_link("name", "Device Name")) }
                th scope="col" { (sort_link("status", "Status")) }
                th scope="col" { (sort_link("group", "Group")) }
                th scope="col" { "Comment" }
                th scope="col" { "Serial Number" }
                th scope="col" { (sort_link("firmware", "Firmware")) }
                th scope="col" { (sort_link("last_seen", "Last Seen")) }
                th scope="col" { "Actions" }
            } }
            tbody #device-rows {
                @for d in &listing.devices { (row(&c, d)) }
                @if listing.devices.is_empty() {
                    tr { td colspan="8" { "No devices match." } }
                }
            }
        }
        @if listing.pages > 1 {
            nav.pager aria-label="Pages" {
                @if listing.page > 1 {
                    a href={"/devices?" (query_string(&ListQuery { page: Some(listing.page - 1), ..q.clone() }))} { "Previous" }
                }
                span { "Page " (listing.page) " of " (listing.pages) }
                @if listing.page < listing.pages {
                    a href={"/devices?" (query_string(&ListQuery { page: Some(listing.page + 1), ..q.clone() }))} { "Next" }
                }
            }
        }
    };
    layout::page(&c, Nav::Devices, "My Devices", body)
}

fn row(c: &Caller, d: &Device) -> Markup {
    html! {
        tr data-id=(d.id) {
            td { a href={"/devices/" (d.id)} { (d.name) } }
            td.status-cell { (layout::status_cell(d)) }
            td { (d.group.as_deref().unwrap_or("")) }
            td { (d.comment.as_deref().unwrap_or("")) }
            td { (serial(d)) }
            td { (firmware(d)) }
            td { (layout::time(last_seen(d))) }
            td.actions { (visit_buttons(c, d)) }
        }
    }
}

/// Remote Visit and Passwordless Login, or why they are not offered.
pub(super) fn visit_buttons(c: &Caller, d: &Device) -> Markup {
    if !c.user.may_change_devices() {
        return html! {};
    }
    let form = |passwordless: bool, label: &str| {
        html! {
            form.inline method="post" action={"/devices/" (d.id) "/visit"} target="_blank" {
                input type="hidden" name="csrf" value=(c.csrf());
                @if passwordless { input type="hidden" name="passwordless" value="on"; }
                button type="submit" disabled[!d.online] { (label) }
            }
        }
    };
    let account = visit_refusal(d, false);
    let passwordless = visit_refusal(d, true);
    html! {
        @match account {
            None => (form(false, "Remote Visit")),
            Some(why) => small.off { (why) },
        }
        @match passwordless {
            None => (form(true, "Passwordless Login")),
            Some(why) => small.off { (why) },
        }
    }
}

/// Why a visit of this kind is not offered: the CM's flag, or the PBX's own switch as its
/// agent reports it (the node visits go to: the active one, else any online, else the last
/// report). None when it is offered.
pub(crate) fn visit_refusal(d: &Device, passwordless: bool) -> Option<&'static str> {
    let node = d
        .nodes
        .iter()
        .filter(|n| n.online)
        .max_by_key(|n| n.ha_state == Some(crate::protocol::HaState::Active))
        .or_else(|| d.nodes.iter().find(|n| n.switches.is_some()));
    let switches = node.and_then(|n| n.switches);
    if !passwordless {
        return match switches {
            Some(s) if !s.account_login => Some("Remote Visit: Account Login is off on the PBX"),
            _ => None,
        };
    }
    let pbx = switches.map(|s| s.passwordless);
    match (d.allow_passwordless, pbx) {
        (true, Some(true)) => None,
        (false, Some(false)) => Some("Passwordless Login is off in CM and on the PBX"),
        (false, _) => Some("Passwordless Login is off for this device in CM"),
        (true, Some(false)) => Some("Passwordless Login is off on the PBX"),
        (true, None) if d.nodes.is_empty() => {
            Some("Passwordless Login: the PBX has not connected yet")
        }
        (true, None) => Some("Passwordless Login: the PBX's agent does not report its switch"),
    }
}

#[derive(Deserialize)]
pub(super) struct VisitForm {
    #[serde(default)]
    passwordless: Option<String>,
}

/// Mints a one-time visit link for the signed-in user and sends the browser (a new tab) to it.
pub(super) async fn visit(
    State(app): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
    Form(f): Form<VisitForm>,
) -> Response {
    if let Err(r) = c.may_change(false) {
        return r;
    }
    match visit_url(&app, &c, &id, f.passwordless.is_some()) {
        Ok(Some(url)) => Redirect::to(&url).into_response(),
        Ok(None) => layout::not_found(),
        Err(e) => layout::message(
            StatusCode::CONFLICT,
            "Cannot open the device",
            &format!("{e:#}"),
        ),
    }
}

/// A visit link for `c` to device `id` (None when outside their scope), recorded under their
/// email: the agent's audit and the portal's assertion carry it as `cm_user`.
pub(crate) fn visit_url(
    app: &AppState,
    c: &Caller,
    id: &str,
    passwordless: bool,
) -> anyhow::Result<Option<String>> {
    let Some(d) = device_for(app, &c.user, id)? else {
        return Ok(None);
    };
    if let Some(why) = visit_refusal(&d, passwordless) {
        anyhow::bail!("{why}.");
    }
    let token = app
        .server
        .db
        .create_visit(&d.id, &c.user.email, passwordless)?;
    let action = if passwordless {
        "visit.passwordless"
    } else {
        "visit.create"
    };
    app.log(c, action, Some(&d.id), "ok");
    Ok(Some(crate::server::front::visit_url(
        &app.server.opts.public_url,
        &d.id,
        &token,
        passwordless,
    )))
}
