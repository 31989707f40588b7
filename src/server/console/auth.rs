//! Who is calling: sessions (email + password, then a TOTP or recovery code), API tokens, the
//! same-origin and CSRF rule for state changes, and the sign-in pages.

use super::layout;
use super::totp::{recovery_hash, totp_step, unix_now};
use super::{is_state_change, AppState, Console, Peer, MAX_BODY, REQUIRE_2FA};
use crate::crypto::ct_eq;
use crate::server::db::{
    ConsoleSession, Source, Stage, User, MAX_LOGIN_FAILURES, MAX_SOURCE_FAILURES,
};
use axum::extract::{FromRequestParts, Query, Request, State};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use http::request::Parts;
use http::{header, StatusCode};
use maud::html;
use serde::Deserialize;
use std::net::IpAddr;
use std::time::Duration;

/// What the sign-in form says when no password-check place is free (nothing is counted).
const BUSY: &str = "The server is busy with other sign-ins. Try again in a moment.";
/// The one answer to every failed sign-in, whatever failed (unknown email, wrong password or
/// code, a lock): it tells an attacker nothing.
const SIGN_IN_FAILED: &str = "Sign-in failed. Check your email, password and code, or wait a while if there were many failed attempts.";
/// Slowdown per recent failure of the same account (from anywhere), up to [`MAX_SLOWDOWN`].
const SLOWDOWN_STEP: Duration = Duration::from_millis(250);
/// Longest slowdown: an account under attack stays usable, just slower.
const MAX_SLOWDOWN: Duration = Duration::from_secs(3);

/// What [`admit`] found about a request, for the extractors.
#[derive(Clone)]
pub(crate) struct Resolved {
    client: IpAddr,
    /// Under `/api/` (refusals are JSON). Decided here, on the whole path: the API's router is
    /// nested, and sees its path without the prefix.
    api: bool,
    /// The session cookie's value and its session.
    session: Option<(String, ConsoleSession)>,
    /// The user behind an API token.
    token_user: Option<User>,
}

/// A signed-in user (a session past every sign-in step, or an API token).
pub(crate) struct Caller {
    /// The user, as the store has them now.
    pub user: User,
    /// Client address.
    pub client: IpAddr,
    /// The session's cookie value and CSRF token (None for an API token).
    pub session: Option<(String, String)>,
}

impl Caller {
    /// Where the caller's operations come from.
    pub fn source(&self) -> Source {
        if self.session.is_some() {
            Source::Console
        } else {
            Source::Api
        }
    }
    /// The CSRF token forms of this session carry ("" for an API token).
    pub fn csrf(&self) -> &str {
        self.session.as_ref().map(|(_, c)| c.as_str()).unwrap_or("")
    }
    /// Refuses a viewer (operators and admins may change devices).
    pub fn may_change(&self, api: bool) -> Result<(), Response> {
        if self.user.may_change_devices() {
            Ok(())
        } else {
            Err(super::forbidden(
                api,
                "Your role (viewer) lets you see devices, not change or visit them.",
            ))
        }
    }
}

/// A session at any sign-in stage (the code page and 2FA enrolment need one).
pub(crate) struct Pending {
    pub user: User,
    pub client: IpAddr,
    pub id: String,
    pub session: ConsoleSession,
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Response;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
        let r = parts.extensions.get::<Resolved>().cloned();
        let Some(r) = r else {
            return Err(layout::internal("request not admitted"));
        };
        let api = r.api;
        if let Some(user) = r.token_user {
            return Ok(Caller {
                user,
                client: r.client,
                session: None,
            });
        }
        let Some((id, s)) = r.session else {
            return Err(sign_in_first(parts, api));
        };
        match s.stage {
            Stage::Full => {}
            Stage::SecondFactor if !api => return Err(Redirect::to("/login/code").into_response()),
            Stage::MustEnrol if !api => return Err(Redirect::to("/account/2fa").into_response()),
            _ => return Err(sign_in_first(parts, api)),
        }
        let user = user_of(parts, &s.email)?;
        Ok(Caller {
            user,
            client: r.client,
            session: Some((id, s.csrf)),
        })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Pending {
    type Rejection = Response;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
        let r = parts.extensions.get::<Resolved>().cloned();
        let Some((id, session)) = r.as_ref().and_then(|r| r.session.clone()) else {
            return Err(Redirect::to("/login").into_response());
        };
        let user = user_of(parts, &session.email)?;
        Ok(Pending {
            user,
            client: r.map(|r| r.client).unwrap_or(IpAddr::from([0, 0, 0, 0])),
            id,
            session,
        })
    }
}

fn user_of(parts: &Parts, email: &str) -> Result<User, Response> {
    let app = parts
        .extensions
        .get::<AppState>()
        .ok_or_else(|| layout::internal("console state missing"))?;
    match app.server.db.user(email) {
        Ok(Some(u)) => Ok(u),
        // The user was removed while signed in: the session means nothing now.
        Ok(None) => Err(Redirect::to("/login").into_response()),
        Err(e) => Err(layout::internal(&format!("{e:#}"))),
    }
}

fn sign_in_first(parts: &Parts, api: bool) -> Response {
    if api {
        return super::api::error(StatusCode::UNAUTHORIZED, "sign in, or send a bearer token");
    }
    let next = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let to = format!(
        "/login?next={}",
        url::form_urlencoded::byte_serialize(next.as_bytes()).collect::<String>()
    );
    Redirect::to(&to).into_response()
}

/// Resolves the caller into the request's extensions and enforces the rule for state changes:
/// from a session they need a same-origin `Origin`/`Sec-Fetch-Site` and the session's CSRF
/// token (header `X-CSRF-Token`, or form field `csrf`); a sign-in form (no session yet) needs
/// the same origin. A bearer token is no ambient credential, so an API call with one needs
/// neither.
pub(super) async fn admit(app: &AppState, req: &mut Request) -> Result<(), Response> {
    let peer = req
        .extensions()
        .get::<Peer>()
        .map(|p| p.0.ip())
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    // Behind a trusted proxy the lockout and the Operation Log count the browser, not the proxy
    // (which would let one guesser lock an email out for everyone).
    let client = app.server.opts.client_of(peer, req.headers());
    let api = req.uri().path().starts_with("/api/");
    let db = &app.server.db;
    let mut resolved = Resolved {
        client,
        api,
        session: None,
        token_user: None,
    };
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if let Some(token) = bearer {
        if !api {
            return Err(layout::message(
                StatusCode::BAD_REQUEST,
                "Tokens are for the API",
                "API tokens work under /api/v1/ only; sign in to use the pages.",
            ));
        }
        match db.user_by_token(token) {
            Ok(Some(u)) => resolved.token_user = Some(u),
            Ok(None) => {
                return Err(super::api::error(
                    StatusCode::UNAUTHORIZED,
                    "unknown or revoked token",
                ))
            }
            Err(e) => return Err(layout::internal(&format!("{e:#}"))),
        }
    } else if let Some(id) = crate::web::cookie(req.headers(), app.cookie_name()) {
        match db.session(id) {
            Ok(Some(s)) => resolved.session = Some((id.to_string(), s)),
            Ok(None) => {}
            Err(e) => return Err(layout::internal(&format!("{e:#}"))),
        }
    }
    if is_state_change(req.method()) && resolved.token_user.is_none() {
        if !crate::web::same_origin(req.headers(), &app.origin) {
            return Err(refuse(api, "Cross-site request refused."));
        }
        if let Some((_, s)) = &resolved.session {
            let sent = csrf_of(req).await?;
            if !sent.is_some_and(|t| ct_eq(t.as_bytes(), s.csrf.as_bytes())) {
                return Err(refuse(
                    api,
                    "This form has expired (missing or stale security token). Reload the page and try again.",
                ));
            }
        }
    }
    req.extensions_mut().insert(resolved);
    req.extensions_mut().insert(app.clone());
    Ok(())
}

fn refuse(api: bool, why: &str) -> Response {
    if api {
        super::api::error(StatusCode::FORBIDDEN, why)
    } else {
        layout::message(StatusCode::FORBIDDEN, "Request refused", why)
    }
}

/// The CSRF token a request carries: the `X-CSRF-Token` header, or a urlencoded form's `csrf`
/// field (the body is read, bounded, and put back for the handler).
async fn csrf_of(req: &mut Request) -> Result<Option<String>, Response> {
    if let Some(v) = req.headers().get("x-csrf-token") {
        return Ok(v.to_str().ok().map(str::to_string));
    }
    let form = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form {
        return Ok(None);
    }
    let body = std::mem::take(req.body_mut());
    let bytes = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        layout::message(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Too large",
            "The form is larger than the console accepts.",
        )
    })?;
    let token = url::form_urlencoded::parse(&bytes)
        .find(|(k, _)| k == "csrf")
        .map(|(_, v)| v.into_owned());
    *req.body_mut() = axum::body::Body::from(bytes);
    Ok(token)
}

/// The key failed sign-ins are counted under: [`crate::server::source_of`], written as the
/// registry keeps it (an IPv6 source with its `/64`).
fn source_key(ip: IpAddr) -> String {
    match crate::server::source_of(ip) {
        IpAddr::V6(net) => format!("{net}/64"),
        v4 => v4.to_string(),
    }
}

#[derive(Deserialize)]
pub(super) struct NextQuery {
    next: Option<String>,
}

/// Only a path on this origin may follow a sign-in (no open redirect).
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n,
        _ => "/devices",
    }
}

pub(super) async fn login_page(Query(q): Query<NextQuery>) -> Response {
    login_form(StatusCode::OK, None, q.next.as_deref(), "")
}

fn login_form(
    status: StatusCode,
    error: Option<&str>,
    next: Option<&str>,
    email: &str,
) -> Response {
    let body = html! {
        h1 { "Sign in" }
        @if let Some(e) = error { p.error role="alert" { (e) } }
        form method="post" action="/login" {
            input type="hidden" name="next" value=(safe_next(next));
            label for="email" { "Email" }
            input #email type="email" name="email" autocomplete="username" required autofocus value=(email);
            label for="password" { "Password" }
            input #password type="password" name="password" autocomplete="current-password" required;
            button type="submit" { "Sign in" }
        }
    };
    layout::bare(status, "Sign in", body)
}

#[derive(Deserialize)]
pub(super) struct LoginForm {
    email: String,
    password: String,
    next: Option<String>,
}

/// Checks the failure counts and applies the account's slowdown; `false` when the pair is
/// locked, or the source has spent its budget ([`MAX_SOURCE_FAILURES`]).
async fn admit_attempt(app: &Console, email: &str, source: &str) -> anyhow::Result<bool> {
    let f = app.server.db.login_failures(email, source)?;
    let delay = (SLOWDOWN_STEP * f.account_recent).min(MAX_SLOWDOWN);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    Ok(f.pair < MAX_LOGIN_FAILURES && f.source < MAX_SOURCE_FAILURES)
}

pub(super) async fn login(
    State(app): State<AppState>,
    Extension(r): Extension<Resolved>,
    Form(f): Form<LoginForm>,
) -> Response {
    match try_login(&app, r.client, &f).await {
        Ok(resp) => resp,
        Err(e) => layout::internal(&format!("{e:#}")),
    }
}

async fn try_login(app: &Console, client: IpAddr, f: &LoginForm) -> anyhow::Result<Response> {
    let db = &app.server.db;
    let email = crate::server::db::normalize_email(&f.email).unwrap_or_default();
    let source = source_key(client);
    let unlocked = admit_attempt(app, &email, &source).await?;
    let creds = db.user_credentials(&email)?;
    let known = creds.is_some();
    let phc = creds
        .map(|(h, _)| h)
        .unwrap_or_else(|| crate::password::dummy_hash().to_string());
    // The hash is checked even when locked or unknown: every failure costs the same. A busy
    // server is nobody's failure: nothing is counted.
    let Ok(verified) = app
        .server
        .passwords
        .verify(client, f.password.clone(), phc)
        .await
    else {
        return Ok(login_form(
            StatusCode::SERVICE_UNAVAILABLE,
            Some(BUSY),
            f.next.as_deref(),
            &f.email,
        ));
    };
    let Some(user) = (verified && known && unlocked)
        .then(|| db.user(&email))
        .transpose()?
        .flatten()
    else {
        db.login_failed(&email, &source)?;
        app.log_as(
            &email,
            Source::Console,
            client,
            "user.login",
            None,
            "refused",
        );
        return Ok(login_form(
            StatusCode::UNAUTHORIZED,
            Some(SIGN_IN_FAILED),
            f.next.as_deref(),
            &f.email,
        ));
    };
    db.login_succeeded(&email, &source)?;
    let mandatory = db.setting(REQUIRE_2FA)?.as_deref() == Some("on");
    let (stage, to) = if user.totp_enabled {
        (Stage::SecondFactor, "/login/code".to_string())
    } else if mandatory {
        (Stage::MustEnrol, "/account/2fa".to_string())
    } else {
        (Stage::Full, safe_next(f.next.as_deref()).to_string())
    };
    let id = db.create_session(&user.email, stage, &client.to_string())?;
    if stage == Stage::Full {
        signed_in(app, &user.email, client)?;
    }
    Ok(with_cookie(app, &id, &to))
}

fn signed_in(app: &Console, email: &str, client: IpAddr) -> anyhow::Result<()> {
    app.server.db.user_signed_in(email)?;
    app.log_as(email, Source::Console, client, "user.login", None, "ok");
    Ok(())
}

fn with_cookie(app: &Console, id: &str, to: &str) -> Response {
    (
        [(header::SET_COOKIE, app.session_cookie(id))],
        Redirect::to(to),
    )
        .into_response()
}

pub(super) async fn code_page(p: Pending) -> Response {
    if p.session.stage != Stage::SecondFactor {
        return Redirect::to("/devices").into_response();
    }
    code_form(StatusCode::OK, None, &p.session.csrf)
}

fn code_form(status: StatusCode, error: Option<&str>, csrf: &str) -> Response {
    let body = html! {
        h1 { "Two-factor sign-in" }
        @if let Some(e) = error { p.error role="alert" { (e) } }
        form method="post" action="/login/code" {
            input type="hidden" name="csrf" value=(csrf);
            label for="code" { "Code from your authenticator app, or a recovery code" }
            input #code name="code" autocomplete="one-time-code" inputmode="numeric" required autofocus;
            button type="submit" { "Verify" }
        }
        form method="post" action="/logout" {
            input type="hidden" name="csrf" value=(csrf);
            button.link type="submit" { "Cancel" }
        }
    };
    layout::bare(status, "Two-factor sign-in", body)
}

#[derive(Deserialize)]
pub(super) struct CodeForm {
    code: String,
}

pub(super) async fn code(
    State(app): State<AppState>,
    p: Pending,
    Form(f): Form<CodeForm>,
) -> Response {
    if p.session.stage != Stage::SecondFactor {
        return Redirect::to("/devices").into_response();
    }
    match try_code(&app, &p, &f.code).await {
        Ok(r) => r,
        Err(e) => layout::internal(&format!("{e:#}")),
    }
}

async fn try_code(app: &Console, p: &Pending, code: &str) -> anyhow::Result<Response> {
    let db = &app.server.db;
    let email = &p.user.email;
    let source = source_key(p.client);
    let ok = admit_attempt(app, email, &source).await? && {
        let secret = db.totp_secret(email)?.unwrap_or_default();
        match totp_step(email, &secret, code, unix_now()) {
            Some(step) => db.spend_totp_step(email, step)?,
            None => db.spend_recovery_code(email, &recovery_hash(code))?,
        }
    };
    if !ok {
        db.login_failed(email, &source)?;
        app.log_as(
            email,
            Source::Console,
            p.client,
            "user.login_2fa",
            None,
            "refused",
        );
        return Ok(code_form(
            StatusCode::UNAUTHORIZED,
            Some(SIGN_IN_FAILED),
            &p.session.csrf,
        ));
    }
    db.login_succeeded(email, &source)?;
    let Some(id) = db.advance_session(&p.id, Stage::Full)? else {
        return Ok(Redirect::to("/login").into_response());
    };
    signed_in(app, email, p.client)?;
    Ok(with_cookie(app, &id, "/devices"))
}

pub(super) async fn logout(
    State(app): State<AppState>,
    Extension(r): Extension<Resolved>,
) -> Response {
    if let Some((id, s)) = &r.session {
        if let Err(e) = app.server.db.end_session(id) {
            return layout::internal(&format!("{e:#}"));
        }
        app.log_as(
            &s.email,
            Source::Console,
            r.client,
            "user.logout",
            None,
            "ok",
        );
    }
    (
        [(header::SET_COOKIE, app.clear_cookie())],
        Redirect::to("/login"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_stays_on_this_origin() {
        assert_eq!(safe_next(Some("/devices/x?q=1")), "/devices/x?q=1");
        for bad in [
            "//evil.example",
            "https://evil.example",
            "/\\evil",
            "devices",
        ] {
            assert_eq!(safe_next(Some(bad)), "/devices", "{bad}");
        }
    }

    #[test]
    fn failures_count_per_address_or_v6_slash_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(source_key(ip("198.51.100.7")), "198.51.100.7");
        assert_eq!(source_key(ip("2001:db8:1:2:3:4:5:6")), "2001:db8:1:2::/64");
        assert_eq!(source_key(ip("::ffff:198.51.100.7")), "198.51.100.7");
    }
}
