//! Operation Log: every console, API and CLI change and every visit, with the agents' session
//! events, filtered and exported as CSV. An admin (or a user over all groups) sees everything;
//! others see their own actions and their devices' entries.

use super::layout::{self, Nav};
use super::{AppState, Caller};
use crate::server::db::{OpEntry, OpFilter, Source};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use http::header;
use maud::html;
use serde::{Deserialize, Serialize};

/// Entries per page.
const PAGE: usize = 100;
/// Most rows one CSV export carries.
const CSV_ROWS: usize = 10_000;

/// The filters, as the page's form and the CSV link carry them.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub(super) struct LogQuery {
    #[serde(default)]
    user: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    device: String,
    #[serde(default)]
    source: String,
    /// `YYYY-MM-DD`, from the start of that day (UTC).
    #[serde(default)]
    from: String,
    /// `YYYY-MM-DD`, to the end of that day (UTC).
    #[serde(default)]
    to: String,
    #[serde(default)]
    before: Option<i64>,
}

/// Unix seconds at the start of a `YYYY-MM-DD` day (UTC).
fn day_start(d: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339(&format!("{}T00:00:00Z", d.trim())).ok()?;
    t.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs() as i64)
}

impl LogQuery {
    fn filter(&self, limit: usize) -> OpFilter {
        let some = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_string());
        OpFilter {
            actor: some(&self.user),
            action: some(&self.action),
            device: some(&self.device).map(|d| d.to_ascii_lowercase()),
            source: Source::parse(&self.source),
            since: day_start(&self.from),
            until: day_start(&self.to).map(|t| t + 86_400),
            before_id: self.before,
            limit,
        }
    }
    fn query_string(&self, before: Option<i64>) -> String {
        let mut s = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("user", &self.user),
            ("action", &self.action),
            ("device", &self.device),
            ("source", &self.source),
            ("from", &self.from),
            ("to", &self.to),
        ] {
            if !v.is_empty() {
                s.append_pair(k, v);
            }
        }
        if let Some(b) = before {
            s.append_pair("before", &b.to_string());
        }
        s.finish()
    }
}

pub(super) async fn page(
    State(app): State<AppState>,
    c: Caller,
    Query(q): Query<LogQuery>,
) -> Response {
    let entries = match app.server.db.oplog(&c.user, &q.filter(PAGE)) {
        Ok(e) => e,
        Err(e) => return layout::internal(&format!("{e:#}")),
    };
    let older = (entries.len() == PAGE)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    let actions = [
        ("", "All actions"),
        ("device.", "Devices"),
        ("visit.", "Visits"),
        ("session.", "Remote sessions (from the PBX)"),
        ("user.", "Users and sign-ins"),
        ("group.", "Groups"),
        ("template.", "Templates"),
        ("token.", "API tokens"),
        ("capacity.", "Capacity"),
        ("settings.", "Settings"),
    ];
    let sources = [
        ("", "All sources"),
        ("console", "Console"),
        ("api", "API"),
        ("cli", "Command line"),
        ("front", "Visits opened"),
        ("agent", "PBX agent"),
        ("hub", "Tunnel hub"),
    ];
    let body = html! {
        div.titlebar {
            h1 { "Operation Log" }
            a.button href={"/log.csv?" (q.query_string(None))} download { "Export CSV" }
        }
        form.filters method="get" action="/log" {
            label for="f-user" { "User" }
            input #f-user name="user" value=(q.user);
            label for="f-action" { "Action" }
            select #f-action name="action" {
                @for (v, l) in actions { option value=(v) selected[q.action == v] { (l) } }
            }
            label for="f-device" { "Device ID" }
            input #f-device name="device" value=(q.device);
            label for="f-source" { "Source" }
            select #f-source name="source" {
                @for (v, l) in sources { option value=(v) selected[q.source == v] { (l) } }
            }
            label for="f-from" { "From" }
            input #f-from type="date" name="from" value=(q.from);
            label for="f-to" { "To" }
            input #f-to type="date" name="to" value=(q.to);
            button type="submit" { "Filter" }
        }
        table.log #oplog {
            thead { tr {
                th scope="col" { "Time" } th scope="col" { "User" } th scope="col" { "Source" }
                th scope="col" { "Action" } th scope="col" { "Target" } th scope="col" { "Client" }
                th scope="col" { "Result" }
            } }
            tbody {
                @for e in &entries { tr {
                    td { (layout::time(Some(e.at))) }
                    td { (e.actor) }
                    td { (e.source) }
                    td { (e.action) }
                    td {
                        @match &e.device_id {
                            Some(d) => a href={"/devices/" (d)} { (e.target.as_deref().unwrap_or(d)) },
                            None => (e.target.as_deref().unwrap_or("")),
                        }
                    }
                    td { (e.client.as_deref().unwrap_or("")) }
                    td { (e.result) }
                } }
                @if entries.is_empty() { tr { td colspan="7" { "Nothing matches." } } }
            }
        }
        @if let Some(b) = older {
            nav.pager { a href={"/log?" (q.query_string(Some(b)))} { "Older entries" } }
        }
    };
    layout::page(&c, Nav::Log, "Operation Log", body)
}

/// One CSV field: quoted when it needs it, and a leading `= + - @` (which spreadsheets run as
/// a formula) neutralised with a quote mark.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// The entries as CSV, header first.
fn to_csv(entries: &[OpEntry]) -> String {
    let mut out = String::from("time,user,source,action,target,device,client,result,detail\r\n");
    for e in entries {
        let t = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(e.at.max(0) as u64),
        )
        .to_string();
        let row = [
            t.as_str(),
            &e.actor,
            &e.source,
            &e.action,
            e.target.as_deref().unwrap_or(""),
            e.device_id.as_deref().unwrap_or(""),
            e.client.as_deref().unwrap_or(""),
            &e.result,
            e.detail.as_deref().unwrap_or(""),
        ];
        out.push_str(&row.map(csv_field).join(","));
        out.push_str("\r\n");
    }
    out
}

pub(super) async fn csv(
    State(app): State<AppState>,
    c: Caller,
    Query(q): Query<LogQuery>,
) -> Response {
    match app.server.db.oplog(&c.user, &q.filter(CSV_ROWS)) {
        Ok(entries) => (
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"operation-log.csv\"",
                ),
            ],
            to_csv(&entries),
        )
            .into_response(),
        Err(e) => layout::internal(&format!("{e:#}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_formulas_neutralised() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_field("@cmd"), "'@cmd");
    }

    #[test]
    fn days_are_utc_midnights() {
        assert_eq!(day_start("1970-01-02"), Some(86_400));
        assert_eq!(day_start("yesterday"), None);
    }
}
