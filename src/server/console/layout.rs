//! The console's page frame (header, navigation, the signed-in user) and small renderers the
//! pages share: times, device status, messages.

use super::Caller;
use crate::protocol::{HaState, NodeRole};
use crate::server::db::{Device, Node};
use crate::server::health::Health;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use maud::{html, Markup, DOCTYPE};

fn head(title: &str) -> Markup {
    html! {
        meta charset="utf-8";
        meta name="viewport" content="width=device-width, initial-scale=1";
        title { (title) " · Central Management" }
        link rel="stylesheet" href="/assets/console.css";
        script src="/assets/console.js" defer {}
    }
}

/// A page without navigation (sign-in, messages).
pub(super) fn bare(status: StatusCode, title: &str, body: Markup) -> Response {
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head { (head(title)) }
            body.bare {
                header.top { span.brand { "Central Management" } }
                main.narrow { (body) }
            }
        }
    };
    (status, page).into_response()
}

/// Which navigation entry a page belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Nav {
    Devices,
    Groups,
    Templates,
    Users,
    Subscription,
    Log,
    Account,
}

/// A page of the signed-in console.
pub(super) fn page(c: &Caller, nav: Nav, title: &str, body: Markup) -> Response {
    let item = |n: Nav, href: &str, label: &str| {
        html! {
            a href=(href) aria-current=[(n == nav).then_some("page")] { (label) }
        }
    };
    let page = html! {
        (DOCTYPE)
        html lang="en" {
            head { (head(title)) }
            body {
                header.top {
                    span.brand { "Central Management" }
                    nav aria-label="Main" {
                        (item(Nav::Devices, "/devices", "My Devices"))
                        (item(Nav::Groups, "/groups", "Groups"))
                        (item(Nav::Templates, "/templates", "Templates"))
                        @if c.user.is_admin() { (item(Nav::Users, "/users", "Users")) }
                        (item(Nav::Subscription, "/subscription", "My Subscription"))
                        (item(Nav::Log, "/log", "Operation Log"))
                        (item(Nav::Account, "/account", "Account"))
                    }
                    div.me {
                        span { (c.user.email) " · " (c.user.role) }
                        form method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(c.csrf());
                            button.link type="submit" { "Sign out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    };
    page.into_response()
}

/// A page saying one thing.
pub(super) fn message(status: StatusCode, title: &str, text: &str) -> Response {
    bare(
        status,
        title,
        html! { h1 { (title) } p { (text) } p { a href="/devices" { "Back to My Devices" } } },
    )
}

/// A form that could not be saved: why, and the way back to `back`.
pub(super) fn not_saved(back: &str, e: anyhow::Error) -> Response {
    let body = html! {
        h1 { "Not saved" }
        p.error role="alert" { (format!("{e:#}")) }
        p { a href=(back) { "Back" } }
    };
    bare(StatusCode::UNPROCESSABLE_ENTITY, "Not saved", body)
}

/// 404, also for what exists but is outside the caller's scope.
pub(super) fn not_found() -> Response {
    message(
        StatusCode::NOT_FOUND,
        "Not found",
        "There is nothing here, or it is not yours to see.",
    )
}

/// 500, logged with its cause.
pub(super) fn internal(cause: &str) -> Response {
    tracing::error!(error = cause, "console request failed");
    message(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Something went wrong",
        "The console could not complete this request; the server's log has the details.",
    )
}

/// A Unix time as `YYYY-MM-DD HH:MM:SS UTC`, or "Never".
pub(super) fn time(t: Option<i64>) -> String {
    match t {
        Some(s) => {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(s.max(0) as u64);
            let s = humantime::format_rfc3339_seconds(t).to_string();
            format!("{} UTC", s.trim_end_matches('Z').replacen('T', " ", 1))
        }
        None => "Never".into(),
    }
}

/// A device's status as the list shows it: its word and a CSS class.
pub(super) fn status(d: &Device) -> (&'static str, &'static str) {
    if d.nodes.is_empty() && d.activated_at.is_some() {
        // Every node's agent was deactivated (uninstalled); a new code enrols the PBX again.
        ("Uninstalled", "uninstalled")
    } else if d.nodes.is_empty() {
        ("Never connected", "never")
    } else if !d.online {
        ("Offline", "offline")
    } else if d
        .nodes
        .iter()
        .any(|n| n.online && n.health == Health::Abnormal)
    {
        ("Abnormal", "abnormal")
    } else {
        ("Online", "online")
    }
}

/// Why a device is Abnormal: each distinct reason once over its online nodes, in full.
pub(super) fn abnormal_why(d: &Device) -> Vec<&str> {
    let mut why: Vec<&str> = d
        .nodes
        .iter()
        .filter(|n| n.online)
        .flat_map(|n| n.abnormal.iter().map(String::as_str))
        .collect();
    why.dedup();
    why
}

/// A reason in a few words (what comes before its first colon), for a table cell; the cell's
/// title keeps the whole text.
fn brief(reason: &str) -> &str {
    reason.split(':').next().unwrap_or(reason)
}

/// A node's Hot Standby word: Active or Standby (None for a single PBX).
pub(super) fn ha_word(n: &Node) -> Option<&'static str> {
    if n.role == NodeRole::Single {
        return None;
    }
    Some(match n.ha_state {
        Some(HaState::Active) => "Active",
        Some(HaState::Standby) => "Standby",
        _ => "Unknown",
    })
}

/// The status cell: the device's word, and for a Hot Standby pair each node's.
pub(super) fn status_cell(d: &Device) -> Markup {
    let (word, class) = status(d);
    let why = abnormal_why(d);
    let full = why.join("; ");
    let mut short: Vec<&str> = why.iter().map(|w| brief(w)).collect();
    short.dedup();
    html! {
        span class={"status " (class)} title=[(!full.is_empty()).then_some(full.as_str())] { (word) }
        @if class == "abnormal" && !short.is_empty() { small.why title=(full) { (short.join("; ")) } }
        @for n in d.nodes.iter().filter(|n| n.role != NodeRole::Single) {
            small.node {
                (n.role) ": " (ha_word(n).unwrap_or("Unknown")) ", "
                (if n.online { "Online" } else { "Offline" })
                @if n.transport.as_deref() == Some("tcp") { " (TCP)" }
            }
        }
        // A PBX whose network blocks UDP: worth a glance, not an alarm.
        @if d.nodes.len() == 1 && d.nodes[0].transport.as_deref() == Some("tcp") {
            small.why title="UDP is blocked or slow on this PBX's network; the tunnel runs over TCP" { "over TCP" }
        }
    }
}
