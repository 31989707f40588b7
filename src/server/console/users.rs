//! Users (admins only): CM users with their role and group scope, 2FA reset, removal, and the
//! setting that makes two-factor sign-in mandatory.

use super::devices::scoped_groups;
use super::layout::{self, not_saved, Nav};
use super::{admin_only, AppState, Caller, REQUIRE_2FA};
use crate::server::db::{NewUser, Role, Scope, User, UserChanges};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{html, Markup};

fn scope_text(s: &Scope) -> String {
    match s {
        Scope::All => "All groups".into(),
        Scope::Groups(g) if g.is_empty() => "No group".into(),
        Scope::Groups(g) => g.join(", "),
    }
}

/// Role select and group checkboxes (none ticked: all groups).
fn role_and_scope(groups: &[String], role: Role, scope: &Scope) -> Markup {
    html! {
        label for="role" { "Role" }
        select #role name="role" {
            @for r in Role::ALL { option value=(r.as_str()) selected[r == role] { (r) } }
        }
        fieldset {
            legend { "Groups (none ticked: all groups)" }
            @for (i, g) in groups.iter().enumerate() {
                div.check {
                    input id={"g" (i)} type="checkbox" name="group" value=(g) checked[matches!(scope, Scope::Groups(gs) if gs.contains(g))];
                    label for={"g" (i)} { (g) }
                }
            }
            @if groups.is_empty() { p.hint { "No groups yet." } }
        }
    }
}

pub(super) async fn list(State(app): State<AppState>, c: Caller) -> Response {
    if let Err(r) = admin_only(&c) {
        return r;
    }
    let (users, groups) = match (app.server.db.users(), scoped_groups(&app, &c.user)) {
        (Ok(u), Ok(g)) => (u, g),
        (Err(e), _) | (_, Err(e)) => return layout::internal(&format!("{e:#}")),
    };
    let mandatory = app.server.db.setting(REQUIRE_2FA).ok().flatten().as_deref() == Some("on");
    let body = html! {
        h1 { "Users" }
        table {
            thead { tr {
                th scope="col" { "Email" } th scope="col" { "Role" } th scope="col" { "Groups" }
                th scope="col" { "Two-factor" } th scope="col" { "Last sign-in" }
            } }
            tbody { @for u in &users { tr {
                td { a href={"/users/" (u.email)} { (u.email) } }
                td { (u.role) }
                td { (scope_text(&u.scope)) }
                td { (if u.totp_enabled { "On" } else { "Off" }) }
                td { (layout::time(u.last_login_at)) }
            } } }
        }
        h2 { "Add user" }
        form.stack method="post" action="/users" {
            input type="hidden" name="csrf" value=(c.csrf());
            label for="email" { "Email" }
            input #email type="email" name="email" required autocomplete="off";
            label for="password" { "Initial password (at least 10 characters; they can change it under Account)" }
            input #password type="password" name="password" required minlength="10" autocomplete="new-password";
            (role_and_scope(&groups, Role::Operator, &Scope::All))
            div.buttons { button type="submit" { "Add user" } }
        }
        h2 { "Two-factor sign-in" }
        form method="post" action="/users/settings" {
            input type="hidden" name="csrf" value=(c.csrf());
            div.check {
                input #require_2fa type="checkbox" name="require_2fa" checked[mandatory];
                label for="require_2fa" { "Require two-factor sign-in for every user (those without it set it up at their next sign-in)" }
            }
            div.buttons { button type="submit" { "Save" } }
        }
    };
    layout::page(&c, Nav::Users, "Users", body)
}

/// A form's fields as pairs (the group checkboxes repeat one name, which serde's form
/// reader does not collect).
struct Fields(Vec<(String, String)>);

impl Fields {
    fn parse(body: &[u8]) -> Fields {
        Fields(url::form_urlencoded::parse(body).into_owned().collect())
    }
    fn one(&self, k: &str) -> &str {
        self.0
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    }
    fn scope(&self) -> Scope {
        let gs: Vec<String> = self
            .0
            .iter()
            .filter(|(n, _)| n == "group")
            .map(|(_, v)| v.clone())
            .collect();
        if gs.is_empty() {
            Scope::All
        } else {
            Scope::Groups(gs)
        }
    }
    fn role(&self) -> anyhow::Result<Role> {
        Role::parse(self.one("role")).ok_or_else(|| anyhow::anyhow!("choose a role"))
    }
}

pub(super) async fn add(
    State(app): State<AppState>,
    c: Caller,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = admin_only(&c) {
        return r;
    }
    let f = Fields::parse(&body);
    let password = f.one("password").to_string();
    let made = async {
        crate::password::check_strength(&password)?;
        let role = f.role()?;
        let hash = app.server.passwords.hash(c.client, password).await??;
        app.server.db.add_user(&NewUser {
            email: f.one("email").to_string(),
            password_hash: hash,
            role,
            scope: f.scope(),
        })
    };
    match made.await {
        Ok(u) => {
            app.log(&c, "user.add", Some(&u.email), "ok");
            Redirect::to("/users").into_response()
        }
        Err(e) => not_saved("/users", e),
    }
}

pub(super) async fn settings(
    State(app): State<AppState>,
    c: Caller,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = admin_only(&c) {
        return r;
    }
    let on = Fields::parse(&body).one("require_2fa") == "on";
    let v = if on { "on" } else { "off" };
    match app.server.db.set_setting(REQUIRE_2FA, v) {
        Ok(()) => {
            app.log(&c, "settings.require_2fa", Some(v), "ok");
            Redirect::to("/users").into_response()
        }
        Err(e) => layout::internal(&format!("{e:#}")),
    }
}

fn user_or_404(app: &AppState, email: &str) -> Result<User, Response> {
    match app.server.db.user(email) {
        Ok(Some(u)) => Ok(u),
        Ok(None) => Err(layout::not_found()),
        Err(e) => Err(layout::internal(&format!("{e:#}"))),
    }
}

pub(super) async fn show(
    State(app): State<AppState>,
    c: Caller,
    Path(email): Path<String>,
) -> Response {
    if let Err(r) = admin_only(&c) {
        return r;
    }
    let u = match user_or_404(&app, &email) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let groups = scoped_groups(&app, &c.user).unwrap_or_default();
    let body = html! {
        h1 { (u.email) }
        dl.facts {
            dt { "Two-factor" } dd { (if u.totp_enabled { "On" } else { "Off" }) }
            dt { "Recovery codes left" } dd { (u.recovery_codes_left) }
            dt { "Added" } dd { (layout::time(Some(u.created_at))) }
            dt { "Last sign-in" } dd { (layout::time(u.last_login_at)) }
        }
        h2 { "Role and groups" }
        form.stack method="post" action={"/users/" (u.email)} {
            input type="hidden" name="csrf" value=(c.csrf());
            (role_and_scope(&groups, u.role, &u.scope))
            div.buttons { button type="submit" { "Save" } }
        }
        @if u.totp_enabled {
            h2 { "Reset two-factor sign-in" }
            p { "For a user who lost both their authenticator and their recovery codes." }
            form method="post" action={"/users/" (u.email) "/reset-2fa"} {
                input type="hidden" name="csrf" value=(c.csrf());
                button.danger type="submit" { "Reset 2FA" }
            }
        }
        h2 { "Remove" }
        form method="post" action={"/users/" (u.email) "/remove"} {
            input type="hidden" name="csrf" value=(c.csrf());
            p { "Their sessions and API tokens end with them." }
            button.danger type="submit" { "Remove user" }
        }
    };
    layout::page(&c, Nav::Users, &u.email, body)
}

pub(super) async fn edit(
    State(app): State<AppState>,
    c: Caller,
    Path(email): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = admin_only(&c) {
        return r;
    }
    let f = Fields::parse(&body);
    let changed = f.role().and_then(|role| {
        app.server.db.set_user(
            &email,
            &UserChanges {
                role: Some(role),
                scope: Some(f.scope()),
                password_hash: None,
            },
        )
    });
    let back = format!("/users/{email}");
    match changed {
        Ok(u) => {
            app.log(&c, "user.edit", Some(&u.email), "ok");
            Redirect::to(&back).into_response()
        }
        Err(e) => not_saved(&back, e),
    }
}

pub(super) async fn reset_2fa(
    State(app): State<AppState>,
    c: Caller,
    Path(email): Path<String>,
) -> Response {
    if let Err(r) = admin_only(&c) {
        return r;
    }
    let result = app.server.db.reset_totp(&email);
    app.saved(
        &c,
        ("user.reset_2fa", &email),
        result,
        &format!("/users/{email}"),
        "/users",
    )
}

pub(super) async fn remove(
    State(app): State<AppState>,
    c: Caller,
    Path(email): Path<String>,
) -> Response {
    if let Err(r) = admin_only(&c) {
        return r;
    }
    let result = app.server.db.remove_user(&email);
    app.saved(
        &c,
        ("user.remove", &email),
        result,
        "/users",
        &format!("/users/{email}"),
    )
}
