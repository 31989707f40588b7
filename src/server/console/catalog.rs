//! Groups, Templates and My Subscription: what devices are filed under, what they may be
//! provisioned with, and how many slots the provider has. Everyone sees them (within their
//! scope); admins change groups and capacity, admins and operators change templates.

use super::devices::scoped_groups;
use super::layout::{self, not_saved, Nav};
use super::{admin_only, AppState, Caller};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use maud::html;
use serde::Deserialize;

pub(super) async fn groups(State(app): State<AppState>, c: Caller) -> Response {
    let all = match app.server.db.groups() {
        Ok(g) => g,
        Err(e) => return layout::internal(&format!("{e:#}")),
    };
    let mine: Vec<_> = all
        .into_iter()
        .filter(|g| c.user.scope.covers(Some(&g.name)))
        .collect();
    let body = html! {
        h1 { "Groups" }
        p { "Devices are filed under groups; a user's scope is all groups or a list of them." }
        table.narrow {
            thead { tr { th scope="col" { "Group" } th scope="col" { "Devices" } @if c.user.is_admin() { th scope="col" { "" } } } }
            tbody {
                @for g in &mine { tr {
                    td { a href={"/devices?group=" (url::form_urlencoded::byte_serialize(g.name.as_bytes()).collect::<String>())} { (g.name) } }
                    td { (g.devices) }
                    @if c.user.is_admin() { td {
                        @if g.devices == 0 {
                            form.inline method="post" action={"/groups/" (g.name) "/remove"} {
                                input type="hidden" name="csrf" value=(c.csrf());
                                button.danger type="submit" { "Remove" }
                            }
                        } @else { small { "Move its devices to remove it" } }
                    } }
                } }
                @if mine.is_empty() { tr { td colspan="3" { "No groups yet." } } }
            }
        }
        @if c.user.is_admin() {
            h2 { "Add group" }
            form.stack method="post" action="/groups" {
                input type="hidden" name="csrf" value=(c.csrf());
                label for="group-name" { "Name" }
                input #group-name name="name" required maxlength="64";
                div.buttons { button type="submit" { "Add" } }
            }
        }
    };
    layout::page(&c, Nav::Groups, "Groups", body)
}

#[derive(Deserialize)]
pub(super) struct NameForm {
    name: String,
}

pub(super) async fn add_group(
    State(app): State<AppState>,
    c: Caller,
    Form(f): Form<NameForm>,
) -> Response {
    if let Err(r) = admin_only(&c) {
        return r;
    }
    let name = f.name.trim();
    let result = app.server.db.add_group(name);
    app.saved(&c, ("group.add", name), result, "/groups", "/groups")
}

pub(super) async fn remove_group(
    State(app): State<AppState>,
    c: Caller,
    Path(name): Path<String>,
) -> Response {
    if let Err(r) = admin_only(&c) {
        return r;
    }
    let result = app.server.db.remove_group(&name);
    app.saved(&c, ("group.remove", &name), result, "/groups", "/groups")
}

pub(super) async fn templates(State(app): State<AppState>, c: Caller) -> Response {
    let list = match app.server.db.templates() {
        Ok(t) => t,
        Err(e) => return layout::internal(&format!("{e:#}")),
    };
    let change = c.user.may_change_devices();
    let body = html! {
        h1 { "Templates" }
        p { "A provisioning template is sent once to a device added with Allow Provisioning via Template, on its first connection, and applied by the PBX's own tools." }
        table.narrow {
            thead { tr { th scope="col" { "Name" } th scope="col" { "Size" } th scope="col" { "Changed" } } }
            tbody {
                @for t in &list { tr {
                    td { a href={"/templates/" (t.name)} { (t.name) } }
                    td { (t.body.len()) " bytes" }
                    td { (layout::time(Some(t.updated_at))) }
                } }
                @if list.is_empty() { tr { td colspan="3" { "No templates yet." } } }
            }
        }
        @if change { (template_form(&c, "", "")) }
    };
    layout::page(&c, Nav::Templates, "Templates", body)
}

fn template_form(c: &Caller, name: &str, body: &str) -> maud::Markup {
    html! {
        h2 { @if name.is_empty() { "New template" } @else { "Edit " (name) } }
        form.stack method="post" action="/templates" {
            input type="hidden" name="csrf" value=(c.csrf());
            label for="template-name" { "Name" }
            input #template-name name="name" required maxlength="64" value=(name) readonly[!name.is_empty()];
            label for="template-body" { "Template" }
            textarea #template-body name="body" rows="14" required { (body) }
            div.buttons { button type="submit" { "Save" } }
        }
    }
}

pub(super) async fn template(
    State(app): State<AppState>,
    c: Caller,
    Path(name): Path<String>,
) -> Response {
    let body = match app.server.db.template(&name) {
        Ok(Some(b)) => b,
        Ok(None) => return layout::not_found(),
        Err(e) => return layout::internal(&format!("{e:#}")),
    };
    let page = html! {
        h1 { "Template " (name) }
        @if c.user.may_change_devices() {
            (template_form(&c, &name, &body))
            form method="post" action={"/templates/" (name) "/remove"} {
                input type="hidden" name="csrf" value=(c.csrf());
                div.buttons { button.danger type="submit" { "Remove template" } }
            }
        } @else {
            pre.output { (body) }
        }
    };
    layout::page(&c, Nav::Templates, &name, page)
}

#[derive(Deserialize)]
pub(super) struct TemplateForm {
    name: String,
    body: String,
}

pub(super) async fn save_template(
    State(app): State<AppState>,
    c: Caller,
    Form(f): Form<TemplateForm>,
) -> Response {
    if let Err(r) = c.may_change(false) {
        return r;
    }
    let name = f.name.trim();
    let result = app.server.db.save_template(name, &f.body);
    app.saved(
        &c,
        ("template.save", name),
        result,
        "/templates",
        "/templates",
    )
}

pub(super) async fn remove_template(
    State(app): State<AppState>,
    c: Caller,
    Path(name): Path<String>,
) -> Response {
    if let Err(r) = c.may_change(false) {
        return r;
    }
    match app.server.db.remove_template(&name) {
        Ok(true) => {
            app.log(&c, "template.remove", Some(&name), "ok");
            Redirect::to("/templates").into_response()
        }
        Ok(false) => layout::not_found(),
        Err(e) => layout::internal(&format!("{e:#}")),
    }
}

pub(super) async fn subscription(State(app): State<AppState>, c: Caller) -> Response {
    let cap = match app.server.db.capacity() {
        Ok(c) => c,
        Err(e) => return layout::internal(&format!("{e:#}")),
    };
    let visible = super::devices::listing(&app, &c.user, &Default::default())
        .map(|l| l.total)
        .unwrap_or(0);
    let total = cap
        .total
        .map(|t| t.to_string())
        .unwrap_or_else(|| "Unlimited".into());
    let groups = scoped_groups(&app, &c.user).map(|g| g.len()).unwrap_or(0);
    let body = html! {
        h1 { "My Subscription" }
        dl.facts #slots {
            dt { "Device slots used" } dd #slots-used { (cap.used) }
            dt { "Device slots in all" } dd #slots-total { (total) }
            dt { "Devices you can see" } dd { (visible) }
            dt { "Groups you can see" } dd { (groups) }
        }
        p.hint { "A device holds a slot from its activation until it is removed; a Hot Standby pair holds one." }
        @if c.user.is_admin() {
            h2 { "Capacity" }
            form.stack method="post" action="/subscription" {
                input type="hidden" name="csrf" value=(c.csrf());
                label for="capacity" { "Device slots (a number, or unlimited)" }
                input #capacity name="capacity" required value=(cap.total.map(|t| t.to_string()).unwrap_or_else(|| "unlimited".into()));
                div.buttons { button type="submit" { "Save" } }
            }
        }
    };
    layout::page(&c, Nav::Subscription, "My Subscription", body)
}

#[derive(Deserialize)]
pub(super) struct CapacityForm {
    capacity: String,
}

pub(super) async fn set_capacity(
    State(app): State<AppState>,
    c: Caller,
    Form(f): Form<CapacityForm>,
) -> Response {
    if let Err(r) = admin_only(&c) {
        return r;
    }
    let v = f.capacity.trim().to_ascii_lowercase();
    let ok = v == "unlimited" || v.parse::<u32>().is_ok();
    if !ok {
        return not_saved(
            "/subscription",
            anyhow::anyhow!("capacity {v:?}: expected a number or \"unlimited\""),
        );
    }
    match app.server.db.set_setting("capacity", &v) {
        Ok(()) => {
            app.log(&c, "capacity.set", Some(&v), "ok");
            Redirect::to("/subscription").into_response()
        }
        Err(e) => layout::internal(&format!("{e:#}")),
    }
}
