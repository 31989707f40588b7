//! The gate: decides, for every request that arrives through the tunnel, whether it may reach
//! the portal and as whom. It owns the agent's own pages under `/__remote/` (login, logout,
//! session, passwordless exchange), the session store, the lockout and the audit trail. Nothing
//! reaches the portal without a live session bound to the visit (grant) that created it.

use crate::agent::assertion::Assertions;
use crate::agent::audit::{AuditLog, Event};
use crate::agent::clock::Clock;
use crate::agent::lockout::{self, Admission, Lockout};
use crate::config::{Account, AgentConfig};
use crate::protocol::{Scheme, StreamHeader};
use crate::status::{SessionInfo, StatusHandle};
use crate::web::{
    self, Body, LOGIN_PATH, LOGOUT_PATH, PASSWORDLESS_PATH, REMOTE_PREFIX, SESSION_COOKIE,
    SESSION_COOKIE_SECURE, SESSION_PATH,
};
use anyhow::Result;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;

mod login;
mod pages;
mod passwordless;
mod sessions;
#[cfg(test)]
mod tests;

use pages::*;
pub use pages::{cookie_name, safe_next};

/// No session outlives this, however active.
pub const ABSOLUTE_CAP: Duration = Duration::from_secs(12 * 3600);
/// Password verifications running at once (argon2 is memory-hard; the PBX has other work).
pub const MAX_VERIFICATIONS: usize = 2;
/// How long one assertion is reused for a session.
pub const ASSERTION_REUSE: Duration = Duration::from_secs(30);
/// Largest login form body.
const MAX_FORM: usize = 8 * 1024;
/// Live sessions at most. A PBX has a handful of remote admins; the cap bounds memory and the
/// status file when visits pile up faster than they idle out (a soak made ~600 an hour).
/// Past it, a new login ends the least recently active session.
pub const MAX_SESSIONS: usize = 256;

/// The identity headers the portal trusts.
pub const X_PBX_REMOTE_USER: http::HeaderName = http::HeaderName::from_static("x-pbx-remote-user");
/// See [`X_PBX_REMOTE_USER`].
pub const X_PBX_REMOTE_ROLE: http::HeaderName = http::HeaderName::from_static("x-pbx-remote-role");
/// See [`X_PBX_REMOTE_USER`].
pub const X_PBX_REMOTE_ASSERTION: http::HeaderName =
    http::HeaderName::from_static("x-pbx-remote-assertion");

/// What a session may do on the portal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Account Login.
    Administrator,
    /// Passwordless Login.
    SuperAdmin,
}

impl Role {
    /// Header and status spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Administrator => "administrator",
            Role::SuperAdmin => "super_admin",
        }
    }
}

/// The access rules from the config; replaced live on reload.
#[derive(Debug, Clone, PartialEq)]
pub struct Rules {
    /// The remote account, when enabled.
    pub account: Option<Account>,
    /// Local passwordless switch.
    pub passwordless: bool,
    /// Idle logout.
    pub auto_logout: Duration,
    /// The super admin's name (passwordless sessions act as it).
    pub super_admin: String,
}

impl Rules {
    /// The rules in `config`.
    pub fn from_config(c: &AgentConfig) -> Rules {
        Rules {
            account: c.remote_access.account.clone(),
            passwordless: c.remote_access.passwordless,
            auto_logout: c.remote_access.auto_logout,
            super_admin: c.pbx.super_admin.clone(),
        }
    }
}

/// One remote session.
pub struct Session {
    /// SHA-256 of the session id, hex (what logs and assertions carry).
    pub id_hash: String,
    /// The same digest, the session store's key.
    digest: [u8; 32],
    /// PBX-side user.
    pub user: String,
    /// `user` as the portal's `X-PBX-Remote-User` value (none if it cannot be one).
    user_header: Option<HeaderValue>,
    /// Role.
    pub role: Role,
    /// CM user that created it.
    pub cm_user: String,
    /// Grant (visit) it is bound to.
    pub grant_id: String,
    /// Visitor address at login.
    pub client_addr: String,
    /// Login time (wall clock, RFC 3339).
    pub since: String,
    deadline: Instant,
    last_activity: Mutex<Instant>,
    /// Cancelled when the session ends; WebSockets close on it.
    pub ended: CancellationToken,
    /// The assertion last minted for this session, as a header value, and when.
    assertion: Mutex<Option<(HeaderValue, Instant)>>,
    /// Its portal session when the agent logs in to the portal for it (`[portal_login]`).
    pub(crate) portal: crate::agent::broker::PortalSession,
}

/// What the gate decided for a portal request.
pub enum Verdict {
    /// Answer the visitor directly (login redirect, 401, 403).
    Respond(Response<Body>),
    /// Forward to the portal as this session.
    Forward(Arc<Session>),
}

/// The gate.
pub struct Gate {
    device_id: String,
    server_key: Vec<u8>,
    rules: Mutex<Rules>,
    /// Why Account Login is suspended although the rules enable it (its username became
    /// reserved while the agent ran), if it is.
    account_suspended: Mutex<Option<String>>,
    cm_passwordless: AtomicBool,
    /// Keyed by the SHA-256 of the session id.
    sessions: Mutex<HashMap<[u8; 32], Arc<Session>>>,
    nonces: Mutex<HashMap<String, u64>>,
    lockout: Lockout,
    verify_slots: tokio::sync::Semaphore,
    assertions: Assertions,
    audit: AuditLog,
    clock: Clock,
    status: StatusHandle,
    metrics: Arc<crate::agent::metrics::Metrics>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Invariant: no code panics while holding these locks (short map updates only).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Gate {
    /// Builds the gate for an activated device.
    pub fn new(
        config: &AgentConfig,
        device_id: &str,
        server_signing_key_b64: &str,
        clock: Clock,
        status: StatusHandle,
        metrics: Arc<crate::agent::metrics::Metrics>,
    ) -> Result<Gate> {
        use base64::Engine;
        let server_key = base64::engine::general_purpose::STANDARD
            .decode(server_signing_key_b64)
            .map_err(|_| {
                anyhow::anyhow!("stored server signing key is not base64; activate again")
            })?;
        let state = &config.paths.state_dir;
        Ok(Gate {
            device_id: device_id.to_string(),
            server_key,
            rules: Mutex::new(Rules::from_config(config)),
            account_suspended: Mutex::new(None),
            cm_passwordless: AtomicBool::new(false),
            sessions: Mutex::new(HashMap::new()),
            nonces: Mutex::new(HashMap::new()),
            lockout: Lockout::load(state.join("lockout.json"), clock.clone()),
            verify_slots: tokio::sync::Semaphore::new(MAX_VERIFICATIONS),
            assertions: Assertions::load_or_create(
                state,
                &config.paths.assertion_pubkey,
                device_id,
            )?,
            audit: AuditLog::new(
                state.join("audit.log"),
                crate::agent::outbox::Outbox::open(state.join("audit-outbox")),
            ),
            clock,
            status,
            metrics,
        })
    }

    /// The gate's clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    fn rules(&self) -> Rules {
        lock(&self.rules).clone()
    }

    /// The idle logout in force (asked at every request: no copy of the rules for it).
    fn auto_logout(&self) -> Duration {
        lock(&self.rules).auto_logout
    }

    // ---- sessions -------------------------------------------------------------------------

    /// The CM-side passwordless switch; turning it off ends passwordless sessions.
    pub fn set_cm_passwordless(&self, on: bool) {
        let was = self.cm_passwordless.swap(on, Ordering::SeqCst);
        if was && !on {
            self.end_where(
                |s| s.role == Role::SuperAdmin,
                "revoked",
                "passwordless disabled on the CM",
            );
        }
    }

    /// Audit events waiting for the server.
    pub(crate) fn outbox(&self) -> &crate::agent::outbox::Outbox {
        &self.audit.outbox
    }

    /// The switches the CM is told about: Account Login (enabled and not suspended) and the
    /// local passwordless switch.
    pub fn local_switches(&self) -> crate::protocol::LocalSwitches {
        let rules = self.rules();
        crate::protocol::LocalSwitches {
            account_login: rules.account.is_some() && lock(&self.account_suspended).is_none(),
            passwordless: rules.passwordless,
        }
    }

    /// New access rules (reload): ends sessions the new rules no longer allow.
    pub fn apply_rules(&self, new: Rules) {
        let old = std::mem::replace(&mut *lock(&self.rules), new.clone());
        let account_changed = match (&old.account, &new.account) {
            (Some(a), Some(b)) => a.username != b.username || a.password_hash != b.password_hash,
            (Some(_), None) => true,
            _ => false,
        };
        if account_changed {
            self.end_where(
                |s| s.role == Role::Administrator,
                "revoked",
                "remote account disabled or its password changed",
            );
        }
        if old.passwordless && !new.passwordless {
            self.end_where(
                |s| s.role == Role::SuperAdmin,
                "revoked",
                "passwordless disabled on this PBX",
            );
        }
    }

    /// Suspends Account Login while `why` is set (the remote account's username became
    /// reserved: an extension took it as its email), ending the account's sessions at once;
    /// `None` lifts the suspension. Passwordless Login is not affected.
    pub fn suspend_account(&self, why: Option<String>) {
        let was = std::mem::replace(&mut *lock(&self.account_suspended), why.clone());
        match (was, why) {
            (None, Some(why)) => {
                tracing::warn!(reason = %why, "account login suspended");
                self.end_where(
                    |s| s.role == Role::Administrator,
                    "revoked",
                    "the remote account's username is now reserved",
                );
            }
            (Some(_), None) => tracing::info!("account login resumed"),
            _ => {}
        }
    }

    /// The remote account, if Account Login is enabled and not suspended.
    fn account(&self) -> Option<Account> {
        if lock(&self.account_suspended).is_some() {
            return None;
        }
        self.rules().account
    }

    // ---- portal requests ------------------------------------------------------------------

    /// Decides a request for the portal.
    pub fn admit<B>(&self, h: &StreamHeader, req: &Request<B>) -> Verdict {
        match self.lookup(h, req.headers()) {
            Some(s) if s.grant_id != h.grant_id || s.cm_user != h.cm_user => {
                self.audit.record(Event {
                    event: "grant_mismatch",
                    cm_user: &h.cm_user,
                    client_addr: &h.client_addr,
                    user: Some(&s.user),
                    role: Some(s.role.as_str()),
                    session: Some(&s.id_hash),
                    reason: Some("session cookie presented under another visit"),
                });
                Verdict::Respond(web::page(
                    StatusCode::FORBIDDEN,
                    "Session belongs to another visit",
                    "This remote session was opened by another visit. Open a visit link of your own.",
                ))
            }
            Some(s) if !same_network(&s.client_addr, &h.client_addr) => {
                // The visit and session cookies came from another network than the one that
                // logged in: a copied pair. The session is ended; its owner logs in again.
                let opened = format!("session opened from {}; ended", s.client_addr);
                self.audit.record(Event {
                    event: "session_address_mismatch",
                    cm_user: &h.cm_user,
                    client_addr: &h.client_addr,
                    user: Some(&s.user),
                    role: Some(s.role.as_str()),
                    session: Some(&s.id_hash),
                    reason: Some(&opened),
                });
                self.end(
                    &s,
                    "logout",
                    Some("its cookie was used from another network"),
                );
                Verdict::Respond(web::page(
                    StatusCode::FORBIDDEN,
                    "Remote session ended",
                    "This remote session was opened from another network, so it has been ended. Open a visit link from the management platform again.",
                ))
            }
            Some(s) => {
                self.touch(&s);
                Verdict::Forward(s)
            }
            None => Verdict::Respond(login_required(req)),
        }
    }

    /// Sets the identity headers the portal trusts (exactly one of each).
    pub fn identity_headers(&self, s: &Session, h: &mut HeaderMap) {
        let jwt = {
            let mut cached = lock(&s.assertion);
            let now = self.clock.now();
            match &*cached {
                Some((jwt, at)) if now.saturating_duration_since(*at) < ASSERTION_REUSE => {
                    Some(jwt.clone())
                }
                _ => {
                    let jwt = HeaderValue::from_str(&self.assertions.mint(
                        &s.user,
                        s.role.as_str(),
                        &s.cm_user,
                        &s.id_hash,
                    ))
                    .ok();
                    *cached = jwt.clone().map(|j| (j, now));
                    jwt
                }
            }
        };
        if let Some(user) = &s.user_header {
            h.insert(X_PBX_REMOTE_USER, user.clone());
        }
        h.insert(X_PBX_REMOTE_ROLE, HeaderValue::from_static(s.role.as_str()));
        if let Some(jwt) = jwt {
            h.insert(X_PBX_REMOTE_ASSERTION, jwt);
        }
    }

    // ---- the agent's own pages ------------------------------------------------------------

    /// Serves `/__remote/…`.
    pub async fn handle_remote(&self, h: &StreamHeader, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let mut resp = match (req.method().clone(), path.as_str()) {
            (Method::GET | Method::HEAD, LOGIN_PATH) => {
                let next = query_param(req.uri().query(), "next").unwrap_or_else(|| "/".into());
                self.login_page(StatusCode::OK, &next, None)
            }
            (Method::POST, LOGIN_PATH | LOGOUT_PATH)
                if !web::same_origin(req.headers(), &h.origin) =>
            {
                web::page(
                    StatusCode::FORBIDDEN,
                    "Cross-site request refused",
                    "This form was not sent from this PBX's remote access pages.",
                )
            }
            (Method::POST, LOGIN_PATH) => {
                let previous = self.lookup(h, req.headers());
                let resp = self.login_post(h, req).await;
                if resp.status() == StatusCode::SEE_OTHER {
                    self.end_replaced(previous);
                }
                resp
            }
            // Only a same-origin POST ends a session: a link or an image on another site
            // (a cross-site GET carries the Lax cookies) gets the confirmation form instead.
            (Method::GET | Method::HEAD, LOGOUT_PATH) => self.logout_form(h, req.headers()),
            (Method::POST, LOGOUT_PATH) => self.logout(h, req.headers()),
            (_, LOGIN_PATH | LOGOUT_PATH) => {
                let mut r = web::page(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "Method not allowed",
                    "This page takes GET or POST.",
                );
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, POST"));
                r
            }
            (Method::GET | Method::HEAD, SESSION_PATH) => self.session_json(h, req.headers()),
            (Method::GET | Method::HEAD, PASSWORDLESS_PATH) => {
                let previous = self.lookup(h, req.headers());
                let resp = self.passwordless(h);
                if resp.status() == StatusCode::SEE_OTHER {
                    self.end_replaced(previous);
                }
                resp
            }
            _ => web::page(
                StatusCode::NOT_FOUND,
                "Not found",
                "No such remote access page.",
            ),
        };
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        resp
    }
}

/// Whether two visitor addresses (as the front reports them) are on the same network: the same
/// IPv4 /24 or IPv6 /64 (an IPv4-mapped address counts as IPv4). A session stays with the
/// network it was opened from, which tolerates a NAT pool or a privacy address but not a copy of
/// its cookies used elsewhere.
pub(crate) fn same_network(a: &str, b: &str) -> bool {
    use std::net::IpAddr;
    let parse = |s: &str| {
        s.parse::<IpAddr>().ok().map(|ip| match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        })
    };
    match (parse(a), parse(b)) {
        (Some(IpAddr::V4(x)), Some(IpAddr::V4(y))) => x.octets()[..3] == y.octets()[..3],
        (Some(IpAddr::V6(x)), Some(IpAddr::V6(y))) => x.segments()[..4] == y.segments()[..4],
        (Some(_), Some(_)) => false,
        _ => a == b,
    }
}
