//! The provider console (DESIGN §9): CM users sign in (password, then TOTP) on the console's own
//! origin and manage the devices of their scope — My Devices, Add, a device's page, Remote Visit
//! and Passwordless Login — and their account (password, 2FA, API tokens). The pages and the
//! JSON API under `/api/v1/` share one router; pages are rendered on the server (maud escapes
//! everything it interpolates) and the one script, embedded like the stylesheet, only refreshes
//! the device list and copies codes.
//!
//! Every request passes [`guard`] first: it resolves the caller (session cookie or API token),
//! and refuses a state change from a session without a same-origin `Origin`/`Sec-Fetch-Site`
//! and the session's CSRF token. Handlers then take a [`Caller`] and never see a request that
//! skipped those checks.

// Handlers and extractors refuse with the `Response` to send, as axum's own rejections do;
// boxing it would add an allocation to each refusal and nothing else.
#![allow(clippy::result_large_err)]

mod account;
mod add;
mod api;
mod auth;
mod catalog;
mod device;
mod devices;
mod layout;
mod log;
mod totp;
mod users;

use crate::httpserve::{self, Limits};
use crate::server::db::{Op, Source, User};
use crate::server::ServerState;
use anyhow::Result;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http::{header, HeaderValue, Method, StatusCode};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use url::Url;

pub(crate) use auth::Caller;

/// Concurrent console connections.
const MAX_CONNECTIONS: usize = 256;
/// Largest request body (a provisioning template is the largest thing a form carries).
const MAX_BODY: usize = 1024 * 1024;
/// The session cookie on an https console: host-only, never sent over http.
pub const SESSION_COOKIE_SECURE: &str = "__Host-cm_session";
/// The session cookie on a loopback http console.
pub const SESSION_COOKIE: &str = "cm_session";
/// The setting that makes 2FA mandatory for every user.
pub const REQUIRE_2FA: &str = "console_require_2fa";

/// Where the console is served.
#[derive(Debug, Clone)]
pub struct ConsoleOptions {
    /// The URL users open (its origin is the console's origin).
    pub url: Url,
    /// Certificate and key for HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// Refuses a console URL whose host is the public front's host or under it: devices are served
/// at `DEVICE.<public host>`, so a console there would share cookies and origin rules with
/// every device's portal.
pub fn check_console_url(console: &Url, public: &Url) -> Result<()> {
    anyhow::ensure!(
        matches!(console.scheme(), "http" | "https") && console.host_str().is_some(),
        "--console-url {console}: expected http:// or https:// and a host name"
    );
    let (c, p) = (
        console.host_str().unwrap_or_default().to_ascii_lowercase(),
        public.host_str().unwrap_or_default().to_ascii_lowercase(),
    );
    let under = c == p || c.ends_with(&format!(".{p}"));
    anyhow::ensure!(
        !under,
        "--console-url {console}: its host {c} is the public front's host ({p}) or under it, where every device's portal is served; give the console a host of its own"
    );
    Ok(())
}

/// What the handlers share.
pub(crate) struct Console {
    server: Arc<ServerState>,
    /// `scheme://host[:port]` of the console, as browsers send it in `Origin`.
    origin: String,
    /// Served over https (cookies get `Secure` and the `__Host-` name).
    secure: bool,
    /// The Content-Security-Policy: `form-action` names the devices' hosts too, because a
    /// visit button posts here and is answered with a redirect to the device's front.
    csp: HeaderValue,
}

type AppState = Arc<Console>;

impl Console {
    pub(crate) fn new(server: Arc<ServerState>, url: &Url) -> Result<Console> {
        let public = &server.opts.public_url;
        let devices = format!(
            "{}://*.{}{}",
            public.scheme(),
            public.host_str().unwrap_or("localhost"),
            public.port().map(|p| format!(":{p}")).unwrap_or_default()
        );
        let csp = format!(
            "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; form-action 'self' {devices}; frame-ancestors 'none'; base-uri 'none'"
        );
        Ok(Console {
            origin: url.origin().ascii_serialization(),
            secure: url.scheme() == "https",
            csp: HeaderValue::from_str(&csp)?,
            server,
        })
    }
    fn cookie_name(&self) -> &'static str {
        if self.secure {
            SESSION_COOKIE_SECURE
        } else {
            SESSION_COOKIE
        }
    }
    fn session_cookie(&self, value: &str) -> String {
        let secure = if self.secure { "; Secure" } else { "" };
        format!(
            "{}={value}; Path=/; HttpOnly; SameSite=Strict{secure}",
            self.cookie_name()
        )
    }
    fn clear_cookie(&self) -> String {
        let secure = if self.secure { "; Secure" } else { "" };
        format!(
            "{}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict{secure}",
            self.cookie_name()
        )
    }
    /// The answer to a form that changed something: on success the operation is logged and
    /// the browser goes to `to`; on failure a page says why and leads back to `back`.
    fn saved(
        &self,
        c: &Caller,
        (action, target): (&str, &str),
        result: Result<()>,
        to: &str,
        back: &str,
    ) -> Response {
        match result {
            Ok(()) => {
                self.log(c, action, Some(target), "ok");
                axum::response::Redirect::to(to).into_response()
            }
            Err(e) => layout::not_saved(back, e),
        }
    }
    /// Records an operation; a failure to record is logged, never turned into the
    /// operation's failure (it has happened).
    fn log(&self, who: &Caller, action: &str, target: Option<&str>, result: &str) {
        self.log_as(
            &who.user.email,
            who.source(),
            who.client,
            action,
            target,
            result,
        );
    }
    fn log_as(
        &self,
        actor: &str,
        source: Source,
        client: IpAddr,
        action: &str,
        target: Option<&str>,
        result: &str,
    ) {
        let client = client.to_string();
        let device = target.filter(|t| !t.contains('@'));
        let op = Op {
            actor,
            source,
            action,
            target,
            device: if action.starts_with("device.") || action.starts_with("visit.") {
                device
            } else {
                None
            },
            client: Some(&client),
            result,
            detail: None,
        };
        if let Err(e) = self.server.db.log_op(&op) {
            tracing::warn!(error = %format!("{e:#}"), action, "operation log write failed");
        }
    }
}

/// The peer address of the connection, put in each request's extensions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer(pub SocketAddr);

/// The console's router (pages, API, assets) behind [`guard`].
pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { axum::response::Redirect::to("/devices") }),
        )
        .route("/login", get(auth::login_page).post(auth::login))
        .route("/login/code", get(auth::code_page).post(auth::code))
        .route("/logout", post(auth::logout))
        .route("/devices", get(devices::list))
        .route("/devices/add", get(add::add_page).post(add::add))
        .route("/devices/{id}", get(device::show))
        .route("/devices/{id}/edit", post(device::edit))
        .route("/devices/{id}/code", post(device::new_code))
        .route("/devices/{id}/mail", post(add::mail))
        .route("/devices/{id}/visit", post(devices::visit))
        .route(
            "/devices/{id}/remove",
            get(device::remove_page).post(device::remove),
        )
        .route("/groups", get(catalog::groups).post(catalog::add_group))
        .route("/groups/{name}/remove", post(catalog::remove_group))
        .route(
            "/templates",
            get(catalog::templates).post(catalog::save_template),
        )
        .route("/templates/{name}", get(catalog::template))
        .route("/templates/{name}/remove", post(catalog::remove_template))
        .route(
            "/subscription",
            get(catalog::subscription).post(catalog::set_capacity),
        )
        .route("/users", get(users::list).post(users::add))
        .route("/users/settings", post(users::settings))
        .route("/users/{email}", get(users::show).post(users::edit))
        .route("/users/{email}/reset-2fa", post(users::reset_2fa))
        .route("/users/{email}/remove", post(users::remove))
        .route("/log", get(log::page))
        .route("/log.csv", get(log::csv))
        .route("/account", get(account::page))
        .route("/account/password", post(account::password))
        .route(
            "/account/2fa",
            get(account::enrol_page).post(account::enrol),
        )
        .route("/account/2fa/qr.svg", get(account::qr))
        .route("/account/2fa/off", post(account::disable_2fa))
        .route("/account/tokens", post(account::create_token))
        .route("/account/tokens/{id}/revoke", post(account::revoke_token))
        .route("/assets/console.css", get(css))
        .route("/assets/console.js", get(js))
        .nest("/api/v1", api::router())
        .fallback(|| async { layout::not_found() })
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn css() -> Response {
    asset(
        "text/css; charset=utf-8",
        include_str!("assets/console.css"),
    )
}

async fn js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("assets/console.js"),
    )
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Resolves the caller, enforces same-origin and CSRF on every state change made with a
/// session, and sets the security headers on every answer.
async fn guard(State(app): State<AppState>, mut req: Request, next: Next) -> Response {
    let mut resp = match auth::admit(&app, &mut req).await {
        Ok(()) => next.run(req).await,
        Err(refusal) => refusal,
    };
    let h = resp.headers_mut();
    let set = |h: &mut http::HeaderMap, k: &'static str, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    h.insert("content-security-policy", app.csp.clone());
    set(h, "x-content-type-options", "nosniff");
    set(h, "referrer-policy", "same-origin");
    set(h, "x-frame-options", "DENY");
    if !h.contains_key(header::CACHE_CONTROL) {
        set(h, "cache-control", "no-store");
    }
    resp
}

/// Serves the console on `listener` until `shutdown`.
pub async fn serve(
    server: Arc<ServerState>,
    opts: ConsoleOptions,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let tls = match &opts.tls {
        Some((cert, key)) => Some(crate::server::front::tls_acceptor(
            cert,
            key,
            "--console-cert/--console-key",
        )?),
        None => None,
    };
    let app = Arc::new(Console::new(server, &opts.url)?);
    let router = router(app);
    let limits = Limits::new("console", MAX_CONNECTIONS);
    httpserve::serve(listener, tls, limits, shutdown, move |peer| {
        let router = router.clone();
        hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let mut req = req.map(axum::body::Body::new);
            req.extensions_mut().insert(Peer(peer));
            tower::ServiceExt::oneshot(router.clone(), req)
        })
    })
    .await;
    Ok(())
}

/// A page's or the API's refusal for a request the caller may not make: 404 for what is
/// outside their scope (its existence is not confirmed), 403 for a role that may not.
pub(crate) fn forbidden(api: bool, why: &str) -> Response {
    if api {
        api::error(StatusCode::FORBIDDEN, why)
    } else {
        layout::message(StatusCode::FORBIDDEN, "Not allowed", why)
    }
}

/// Refuses anyone but an admin (users, groups, capacity, settings).
pub(crate) fn admin_only(c: &Caller) -> Result<(), Response> {
    if c.user.is_admin() {
        Ok(())
    } else {
        Err(forbidden(false, "Only an admin may do this."))
    }
}

/// Whether a user may see a device of `group`.
pub(crate) fn in_scope(user: &User, group: Option<&str>) -> bool {
    user.scope.covers(group)
}

/// Whether `m` changes state.
pub(crate) fn is_state_change(m: &Method) -> bool {
    !matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_host_must_not_be_the_front_or_under_it() {
        let public = Url::parse("https://pbx.example.com").unwrap();
        let ok = |u: &str| check_console_url(&Url::parse(u).unwrap(), &public).is_ok();
        assert!(ok("https://cm.example.com"));
        assert!(ok("https://example.com"));
        assert!(!ok("https://pbx.example.com:9443"));
        assert!(!ok("https://console.pbx.example.com"));
        assert!(!ok("https://CONSOLE.PBX.example.com"));
        assert!(ok("https://notpbx.example.com"));
    }
}
