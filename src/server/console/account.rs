//! Account: the signed-in user's password, two-factor sign-in (enrolment with a QR code drawn by
//! the server, recovery codes) and API tokens.

use super::auth::Pending;
use super::layout::{self, Nav};
use super::totp::{new_recovery_codes, recovery_hash, totp, totp_step, unix_now};
use super::{AppState, Caller, REQUIRE_2FA};
use crate::server::db::{Source, Stage, UserChanges};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Form;
use http::{header, StatusCode};
use maud::html;
use serde::Deserialize;

/// Bytes of a new TOTP secret (160 bits, RFC 4226's recommendation).
const SECRET_BYTES: usize = 20;

pub(super) async fn page(State(app): State<AppState>, c: Caller) -> Response {
    page_with(&app, &c, None)
}

fn page_with(app: &AppState, c: &Caller, note: Option<&str>) -> Response {
    let tokens = match app.server.db.tokens(&c.user.email) {
        Ok(t) => t,
        Err(e) => return layout::internal(&format!("{e:#}")),
    };
    let mandatory = app.server.db.setting(REQUIRE_2FA).ok().flatten().as_deref() == Some("on");
    let body = html! {
        h1 { "Account" }
        @if let Some(n) = note { p.note role="status" { (n) } }
        dl.facts {
            dt { "Email" } dd { (c.user.email) }
            dt { "Role" } dd { (c.user.role) }
            dt { "Last sign-in" } dd { (layout::time(c.user.last_login_at)) }
        }
        h2 { "Password" }
        form.stack method="post" action="/account/password" {
            input type="hidden" name="csrf" value=(c.csrf());
            label for="current" { "Current password" }
            input #current type="password" name="current" autocomplete="current-password" required;
            label for="new" { "New password" }
            input #new type="password" name="new" autocomplete="new-password" required minlength="10";
            div.buttons { button type="submit" { "Change password" } }
        }
        h2 { "Two-factor sign-in" }
        @if c.user.totp_enabled {
            p { "On. " (c.user.recovery_codes_left) " recovery code(s) left." }
            @if !mandatory {
                form.stack method="post" action="/account/2fa/off" {
                    input type="hidden" name="csrf" value=(c.csrf());
                    label for="off-password" { "Password, to turn it off" }
                    input #off-password type="password" name="password" autocomplete="current-password" required;
                    div.buttons { button.danger type="submit" { "Turn off" } }
                }
            }
        } @else {
            p { "Off. " a href="/account/2fa" { "Set up two-factor sign-in" } }
        }
        h2 { "API tokens" }
        p { "A token acts as you under /api/v1/ with your role and groups. It is shown once." }
        @if !tokens.is_empty() {
            table.tokens {
                thead { tr { th scope="col" { "Name" } th scope="col" { "ID" } th scope="col" { "Created" } th scope="col" { "Last used" } th scope="col" { "State" } } }
                tbody { @for t in &tokens { tr {
                    td { (t.name) } td { code { (t.id) } } td { (layout::time(Some(t.created_at))) }
                    td { (layout::time(t.last_used_at)) }
                    td {
                        @if t.revoked_at.is_some() { "Revoked" } @else {
                            form.inline method="post" action={"/account/tokens/" (t.id) "/revoke"} {
                                input type="hidden" name="csrf" value=(c.csrf());
                                button.danger type="submit" { "Revoke" }
                            }
                        }
                    }
                } } }
            }
        }
        form.stack method="post" action="/account/tokens" {
            input type="hidden" name="csrf" value=(c.csrf());
            label for="token-name" { "New token's name" }
            input #token-name name="name" required maxlength="64" placeholder="billing script";
            div.buttons { button type="submit" { "Create token" } }
        }
    };
    layout::page(c, Nav::Account, "Account", body)
}

#[derive(Deserialize)]
pub(super) struct PasswordForm {
    current: String,
    new: String,
}

pub(super) async fn password(
    State(app): State<AppState>,
    c: Caller,
    Form(f): Form<PasswordForm>,
) -> Response {
    let db = &app.server.db;
    let Ok(Some((phc, _))) = db.user_credentials(&c.user.email) else {
        return layout::internal("user vanished");
    };
    let Ok(ok) = app
        .server
        .passwords
        .verify(c.client, f.current.clone(), phc)
        .await
    else {
        return busy("Password not changed");
    };
    if !ok {
        app.log(
            &c,
            "user.password",
            Some(&c.user.email),
            "refused: wrong current password",
        );
        return layout::message(
            StatusCode::FORBIDDEN,
            "Password not changed",
            "The current password is wrong.",
        );
    }
    if let Err(e) = crate::password::check_strength(&f.new) {
        return layout::message(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Password not changed",
            &format!("{e:#}"),
        );
    }
    let hash = match app.server.passwords.hash(c.client, f.new.clone()).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return layout::internal(&format!("{e:#}")),
        Err(_) => return busy("Password not changed"),
    };
    // A new password ends every session of the user; this browser gets a fresh one.
    let changed = db.set_user(
        &c.user.email,
        &UserChanges {
            password_hash: Some(hash),
            ..Default::default()
        },
    );
    let id =
        changed.and_then(|_| db.create_session(&c.user.email, Stage::Full, &c.client.to_string()));
    match id {
        Ok(id) => {
            app.log(&c, "user.password", Some(&c.user.email), "ok");
            (
                [(header::SET_COOKIE, app.session_cookie(&id))],
                Redirect::to("/account"),
            )
                .into_response()
        }
        Err(e) => layout::internal(&format!("{e:#}")),
    }
}

/// Enrolment: a fresh secret kept in the session until a code proves the app has it.
pub(super) async fn enrol_page(State(app): State<AppState>, p: Pending) -> Response {
    if p.session.stage == Stage::SecondFactor {
        return Redirect::to("/login/code").into_response();
    }
    if p.user.totp_enabled {
        return Redirect::to("/account").into_response();
    }
    let secret = match &p.session.pending_secret {
        Some(s) => s.clone(),
        None => {
            let s = crate::crypto::random_bytes::<SECRET_BYTES>().to_vec();
            if let Err(e) = app.server.db.set_pending_secret(&p.id, Some(&s)) {
                return layout::internal(&format!("{e:#}"));
            }
            s
        }
    };
    enrol_form(&p, &secret, None)
}

fn enrol_form(p: &Pending, secret: &[u8], error: Option<&str>) -> Response {
    let base32 = totp(&p.user.email, secret).get_secret_base32();
    let must = p.session.stage == Stage::MustEnrol;
    let body = html! {
        h1 { "Set up two-factor sign-in" }
        @if must { p.note { "Two-factor sign-in is required for every user of this console. Set it up to continue." } }
        @if let Some(e) = error { p.error role="alert" { (e) } }
        ol {
            li { "Scan this QR code with an authenticator app (or type the key below)." }
            li { "Enter the 6-digit code it shows." }
        }
        img.qr src="/account/2fa/qr.svg" alt="QR code of the two-factor key" width="200" height="200";
        p { "Key: " code #totp-secret { (base32) } }
        form.stack method="post" action="/account/2fa" {
            input type="hidden" name="csrf" value=(p.session.csrf);
            label for="code" { "Code from the app" }
            input #code name="code" autocomplete="one-time-code" inputmode="numeric" required autofocus;
            div.buttons { button type="submit" { "Turn on" } }
        }
    };
    let status = if error.is_some() {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    layout::bare(status, "Two-factor sign-in", body)
}

/// The pending secret's `otpauth://` URI as a QR code (SVG drawn here, no image from elsewhere).
pub(super) async fn qr(p: Pending) -> Response {
    let Some(secret) = &p.session.pending_secret else {
        return layout::not_found();
    };
    let url = totp(&p.user.email, secret).get_url();
    match qrcode::QrCode::new(url.as_bytes()) {
        Ok(code) => {
            let svg = code
                .render::<qrcode::render::svg::Color<'_>>()
                .min_dimensions(200, 200)
                .quiet_zone(true)
                .build();
            ([(header::CONTENT_TYPE, "image/svg+xml")], svg).into_response()
        }
        Err(e) => layout::internal(&format!("QR code: {e}")),
    }
}

#[derive(Deserialize)]
pub(super) struct CodeForm {
    code: String,
}

pub(super) async fn enrol(
    State(app): State<AppState>,
    p: Pending,
    Form(f): Form<CodeForm>,
) -> Response {
    if p.session.stage == Stage::SecondFactor || p.user.totp_enabled {
        return Redirect::to("/account").into_response();
    }
    let Some(secret) = p.session.pending_secret.clone() else {
        return Redirect::to("/account/2fa").into_response();
    };
    let Some(step) = totp_step(&p.user.email, &secret, &f.code, unix_now()) else {
        return enrol_form(
            &p,
            &secret,
            Some("That code does not match. Check the app's clock and try the next code."),
        );
    };
    let codes = new_recovery_codes();
    let hashes: Vec<[u8; 32]> = codes.iter().map(|c| recovery_hash(c)).collect();
    let db = &app.server.db;
    let mut cookie = None;
    let done = db
        .enable_totp(&p.user.email, &secret, step, &hashes)
        .and_then(|_| db.set_pending_secret(&p.id, None))
        .and_then(|_| {
            if p.session.stage == Stage::MustEnrol {
                cookie = db.advance_session(&p.id, Stage::Full)?;
                db.user_signed_in(&p.user.email)?;
            }
            Ok(())
        });
    if let Err(e) = done {
        return layout::internal(&format!("{e:#}"));
    }
    app.log_as(
        &p.user.email,
        Source::Console,
        p.client,
        "user.2fa_on",
        Some(&p.user.email),
        "ok",
    );
    let body = html! {
        h1 { "Two-factor sign-in is on" }
        p { "Keep these recovery codes somewhere safe. Each works once, in place of a code from the app, if you lose it. They are not shown again." }
        ul.recovery #recovery-codes { @for c in &codes { li { code { (c) } } } }
        p { a.button href="/devices" { "Continue" } }
    };
    let mut r = layout::bare(StatusCode::OK, "Recovery codes", body);
    if let Some(id) = cookie {
        if let Ok(v) = http::HeaderValue::from_str(&app.session_cookie(&id)) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    r
}

#[derive(Deserialize)]
pub(super) struct OffForm {
    password: String,
}

pub(super) async fn disable_2fa(
    State(app): State<AppState>,
    c: Caller,
    Form(f): Form<OffForm>,
) -> Response {
    let db = &app.server.db;
    if db.setting(REQUIRE_2FA).ok().flatten().as_deref() == Some("on") {
        return layout::message(
            StatusCode::FORBIDDEN,
            "Not allowed",
            "Two-factor sign-in is required for every user of this console.",
        );
    }
    let Ok(Some((phc, _))) = db.user_credentials(&c.user.email) else {
        return layout::internal("user vanished");
    };
    let Ok(ok) = app
        .server
        .passwords
        .verify(c.client, f.password.clone(), phc)
        .await
    else {
        return busy("Not turned off");
    };
    if !ok {
        return layout::message(
            StatusCode::FORBIDDEN,
            "Not turned off",
            "The password is wrong.",
        );
    }
    match db.reset_totp(&c.user.email) {
        Ok(()) => {
            app.log(&c, "user.2fa_off", Some(&c.user.email), "ok");
            Redirect::to("/account").into_response()
        }
        Err(e) => layout::internal(&format!("{e:#}")),
    }
}

#[derive(Deserialize)]
pub(super) struct TokenForm {
    name: String,
}

pub(super) async fn create_token(
    State(app): State<AppState>,
    c: Caller,
    Form(f): Form<TokenForm>,
) -> Response {
    match app.server.db.create_token(&c.user.email, &f.name) {
        Ok((id, token)) => {
            app.log(&c, "token.create", Some(&id), "ok");
            let body = html! {
                h1 { "API token " (f.name.trim()) }
                p { "Copy it now: it is not shown again. Send it as " code { "Authorization: Bearer …" } "." }
                div.code-box {
                    code #api-token { (token) }
                    button type="button" data-copy="api-token" { "Copy" }
                }
                p { a href="/account" { "Back to Account" } }
            };
            layout::page(&c, Nav::Account, "API token", body)
        }
        Err(e) => page_with(&app, &c, Some(&format!("{e:#}"))),
    }
}

pub(super) async fn revoke_token(
    State(app): State<AppState>,
    c: Caller,
    Path(id): Path<String>,
) -> Response {
    match app.server.db.revoke_token(&c.user.email, &id) {
        Ok(true) => {
            app.log(&c, "token.revoke", Some(&id), "ok");
            Redirect::to("/account").into_response()
        }
        Ok(false) => layout::not_found(),
        Err(e) => layout::internal(&format!("{e:#}")),
    }
}

/// The page for a change that found no password-check place free (see [`crate::server::passwords`]).
fn busy(title: &str) -> Response {
    layout::message(
        StatusCode::SERVICE_UNAVAILABLE,
        title,
        &format!("{}.", crate::server::passwords::Busy),
    )
}
