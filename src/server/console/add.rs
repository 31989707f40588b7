//! Add: the dialog of Yeastar's *My Devices > Add*, and the authentication code shown once.

use super::devices::scoped_groups;
use super::layout::{self, Nav};
use super::{in_scope, AppState, Caller};
use crate::server::db::{AddedDevice, NewDevice};
use axum::extract::State;
use axum::response::Response;
use axum::Form;
use http::StatusCode;
use maud::html;
use serde::Deserialize;

pub(super) async fn add_page(State(app): State<AppState>, c: Caller) -> Response {
    if let Err(r) = c.may_change(false) {
        return r;
    }
    add_form(&app, &c, None, &AddForm::default())
}

/// The Add dialog's fields.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct AddForm {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub comment: String,
    #[serde(default)]
    pub allow_passwordless: Option<String>,
    #[serde(default)]
    pub allow_provisioning: Option<String>,
    #[serde(default)]
    pub verify: Option<String>,
    #[serde(default)]
    pub serial: String,
    #[serde(default)]
    pub mac: String,
    /// The name of a stored template (the dialog's choice).
    #[serde(default)]
    pub template: String,
    /// A template's text given directly (the API's `template`); wins over the name.
    #[serde(skip)]
    pub template_text: Option<String>,
}

fn add_form(app: &AppState, c: &Caller, error: Option<&str>, f: &AddForm) -> Response {
    let groups = match scoped_groups(app, &c.user) {
        Ok(g) => g,
        Err(e) => return layout::internal(&format!("{e:#}")),
    };
    let templates: Vec<String> = match app.server.db.templates() {
        Ok(t) => t.into_iter().map(|t| t.name).collect(),
        Err(e) => return layout::internal(&format!("{e:#}")),
    };
    let all = c.user.scope == crate::server::db::Scope::All;
    let body = html! {
        h1 { "Add Device" }
        @if let Some(e) = error { p.error role="alert" { (e) } }
        form.stack method="post" action="/devices/add" {
            input type="hidden" name="csrf" value=(c.csrf());
            label for="name" { "Device Name" }
            input #name name="name" required maxlength="64" value=(f.name);
            label for="group" { "Group" }
            select #group name="group" {
                @if all { option value="" { "No group" } }
                @for g in &groups { option value=(g) selected[f.group == *g] { (g) } }
            }
            label for="comment" { "Comment" }
            input #comment name="comment" maxlength="200" value=(f.comment);
            div.check {
                input #allow_passwordless type="checkbox" name="allow_passwordless" checked[f.allow_passwordless.is_some()];
                label for="allow_passwordless" { "Allow Passwordless Login to PBX" }
            }
            div.check {
                input #allow_provisioning type="checkbox" name="allow_provisioning" checked[f.allow_provisioning.is_some()];
                label for="allow_provisioning" { "Allow Provisioning via Template" }
            }
            div.check {
                input #verify type="checkbox" name="verify" checked[f.verify.is_some()];
                label for="verify" { "Verify Serial Number and MAC Address" }
            }
            p.hint { "Provisioning needs both to be verified: the template is only sent to that machine." }
            label for="serial" { "Serial Number" }
            input #serial name="serial" maxlength="64" value=(f.serial);
            label for="mac" { "MAC Address" }
            input #mac name="mac" placeholder="00:11:22:33:44:55" value=(f.mac);
            label for="template" { "Provisioning Template" }
            select #template name="template" {
                option value="" { "None" }
                @for t in &templates { option value=(t) selected[f.template == *t] { (t) } }
            }
            p.hint { "Templates are kept under " a href="/templates" { "Templates" } "." }
            div.buttons {
                button type="submit" { "Save" }
                a href="/devices" { "Cancel" }
            }
        }
    };
    let status = if error.is_some() {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    let mut r = layout::page(c, Nav::Devices, "Add Device", body);
    *r.status_mut() = status;
    r
}

/// Checks the Add fields and adds the device; errors are for the user to read.
pub(crate) fn add_device(app: &AppState, c: &Caller, f: &AddForm) -> anyhow::Result<AddedDevice> {
    let verify = f.verify.is_some() || f.allow_provisioning.is_some();
    let (serial, mac) = (f.serial.trim(), f.mac.trim());
    anyhow::ensure!(!f.name.trim().is_empty(), "Device Name is required.");
    if verify {
        anyhow::ensure!(
            !serial.is_empty() && !mac.is_empty(),
            "Verify Serial Number and MAC Address needs both the Serial Number and the MAC Address."
        );
    }
    let group = (!f.group.is_empty()).then(|| f.group.clone());
    anyhow::ensure!(
        in_scope(&c.user, group.as_deref()),
        "Choose one of your groups."
    );
    let mac = if verify {
        Some(crate::protocol::normalize_mac(mac).ok_or_else(|| {
            anyhow::anyhow!(
                "MAC Address {mac:?}: expected six pairs of hex digits, such as 00:11:22:33:44:55."
            )
        })?)
    } else {
        None
    };
    let stored;
    let template = match &f.template_text {
        Some(t) => t.trim(),
        None if f.template.is_empty() => "",
        None => {
            stored = app.server.db.template(&f.template)?.ok_or_else(|| {
                anyhow::anyhow!("There is no template {:?} (any more).", f.template)
            })?;
            stored.trim()
        }
    };
    if f.allow_provisioning.is_some() {
        anyhow::ensure!(
            !template.is_empty(),
            "Allow Provisioning via Template needs a Provisioning Template."
        );
        anyhow::ensure!(
            template.len() <= crate::protocol::MAX_TEMPLATE,
            "The template is {} bytes; at most {} fit in one delivery.",
            template.len(),
            crate::protocol::MAX_TEMPLATE
        );
    }
    let added = app.server.db.add_device(&NewDevice {
        name: f.name.trim().to_string(),
        group,
        comment: Some(f.comment.trim().to_string()).filter(|s| !s.is_empty()),
        allow_passwordless: f.allow_passwordless.is_some(),
        allow_provisioning: f.allow_provisioning.is_some(),
        template: f.allow_provisioning.is_some().then(|| template.to_string()),
        serial: verify.then(|| serial.to_string()),
        mac,
    })?;
    app.log(c, "device.add", Some(&added.id), "ok");
    Ok(added)
}

pub(super) async fn add(
    State(app): State<AppState>,
    c: Caller,
    Form(f): Form<AddForm>,
) -> Response {
    if let Err(r) = c.may_change(false) {
        return r;
    }
    match add_device(&app, &c, &f) {
        Ok(added) => code_page(&app, &c, &added.id, &f.name, &added.code),
        Err(e) => add_form(&app, &c, Some(&format!("{e:#}")), &f),
    }
}

/// The address a PBX's `[server] address` takes, as the running server recorded it.
fn agent_address(app: &AppState) -> String {
    app.server
        .db
        .setting(crate::server::AGENT_ADDRESS)
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// The authentication code, shown once, with Copy, what the PBX needs besides it, and Send to
/// Email when the server has SMTP settings.
pub(super) fn code_page(app: &AppState, c: &Caller, id: &str, name: &str, code: &str) -> Response {
    code_page_with(app, c, id, name, code, None)
}

fn code_page_with(
    app: &AppState,
    c: &Caller,
    id: &str,
    name: &str,
    code: &str,
    note: Option<(bool, String)>,
) -> Response {
    let pin = app.server.keys.pin_hex();
    let address = agent_address(app);
    let body = html! {
        h1 { "Authentication code for " (name) }
        p { "Give this code to the PBX's administrator. It is shown once, works once and expires in 24 hours." }
        @if let Some((ok, text)) = &note {
            p class=(if *ok { "note" } else { "error" }) role="status" { (text) }
        }
        div.code-box {
            code #auth-code { (code) }
            button type="button" data-copy="auth-code" { "Copy" }
        }
        dl {
            dt { "Device" } dd { a href={"/devices/" (id)} { (id) } }
            dt { "Server address" } dd { code #server-address { (address) } }
            dt { "Server pin (pin_sha256)" } dd { code { (pin) } }
        }
        @if app.server.mailer.is_some() {
            h2 { "Send to Email" }
            form.stack method="post" action={"/devices/" (id) "/mail"} {
                input type="hidden" name="csrf" value=(c.csrf());
                input type="hidden" name="code" value=(code);
                label for="mail-to" { "Email address" }
                input #mail-to type="email" name="to" required autocomplete="email";
                div.buttons { button type="submit" { "Send to Email" } }
            }
        }
        p { a href="/devices" { "Back to My Devices" } }
    };
    layout::page(c, Nav::Devices, "Authentication code", body)
}

#[derive(Deserialize)]
pub(super) struct MailForm {
    code: String,
    to: String,
}

/// Mails a live code of the device (only a live one: the form cannot make the console mail
/// arbitrary text), then shows the code page again saying what happened.
pub(super) async fn mail(
    State(app): State<AppState>,
    c: Caller,
    axum::extract::Path(id): axum::extract::Path<String>,
    Form(f): Form<MailForm>,
) -> Response {
    let Some(mailer) = &app.server.mailer else {
        return layout::not_found();
    };
    let d = match super::devices::device_to_change(&app, &c, &id) {
        Ok(d) => d,
        Err(r) => return r,
    };
    match app.server.db.code_is_live(&d.id, &f.code) {
        Ok(true) => {}
        Ok(false) => {
            return layout::message(
                StatusCode::CONFLICT,
                "Code not sent",
                "That code is used, expired or replaced by a newer one; issue a new code on the device's page.",
            )
        }
        Err(e) => return layout::internal(&format!("{e:#}")),
    }
    let address = agent_address(&app);
    let pin = app.server.keys.pin_hex();
    let mail = crate::server::mail::CodeMail {
        device: &d.name,
        code: &f.code,
        server_address: &address,
        pin: &pin,
    };
    let note = match mailer.send_code(f.to.trim(), &mail).await {
        Ok(()) => {
            app.log(&c, "device.code_mail", Some(&d.id), "ok");
            (true, format!("Sent to {}.", f.to.trim()))
        }
        Err(e) => {
            app.log(&c, "device.code_mail", Some(&d.id), "failed");
            (false, format!("Not sent: {e:#}"))
        }
    };
    code_page_with(&app, &c, &d.id, &d.name, &f.code, Some(note))
}
