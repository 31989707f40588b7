//! The gate: decides, for every request that arrives through the tunnel, whether it may reach
//! the portal and as whom. It owns the agent's own pages under `/__remote/` (login, logout,
//! session, passwordless exchange), the session store, the lockout and the audit trail. Nothing
//! reaches the portal without a live session bound to the visit (grant) that created it.

use crate::agent::assertion::Assertions;
use crate::agent::audit::{AuditLog, Event};
use crate::agent::clock::Clock;
use crate::agent::lockout::{self, Admission, Lockout};
use crate::config::{Account, AgentConfig};
use crate::protocol::StreamHeader;
use crate::status::{SessionInfo, StatusHandle};
use crate::web::{self, Body};
use anyhow::Result;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;

/// Session cookie on plain-HTTP fronts.
pub const SESSION_COOKIE: &str = "__pbxra_sid";
/// Session cookie when the visitor-facing scheme is https.
pub const SESSION_COOKIE_SECURE: &str = "__Host-__pbxra_sid";
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
            audit: AuditLog::new(state.join("audit.log")),
            clock,
            status,
            metrics,
        })
    }

    /// The gate's clock.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Where audit lines go.
    pub fn audit_path(&self) -> &Path {
        self.audit.path()
    }

    fn rules(&self) -> Rules {
        lock(&self.rules).clone()
    }

    /// The idle logout in force (asked at every request: no copy of the rules for it).
    fn auto_logout(&self) -> Duration {
        lock(&self.rules).auto_logout
    }

    // ---- sessions -------------------------------------------------------------------------

    fn create_session(&self, h: &StreamHeader, user: &str, role: Role) -> (String, Arc<Session>) {
        let id = crate::tls::random_token::<32>();
        let digest = crate::tls::sha256(id.as_bytes());
        let id_hash = hex::encode(digest);
        let now = self.clock.now();
        let mut deadline = now + ABSOLUTE_CAP;
        if h.grant_expires_ms > 0 {
            let left = h.grant_expires_ms.saturating_sub(crate::protocol::now_ms());
            deadline = deadline.min(now + Duration::from_millis(left));
        }
        let s = Arc::new(Session {
            id_hash,
            digest,
            user: user.to_string(),
            user_header: HeaderValue::from_str(user).ok(),
            role,
            cm_user: h.cm_user.clone(),
            grant_id: h.grant_id.clone(),
            client_addr: h.client_addr.clone(),
            since: crate::status::rfc3339(SystemTime::now()),
            deadline,
            last_activity: Mutex::new(now),
            ended: CancellationToken::new(),
            assertion: Mutex::new(None),
        });
        let evicted = {
            let mut sessions = lock(&self.sessions);
            let oldest = (sessions.len() >= MAX_SESSIONS)
                .then(|| {
                    sessions
                        .values()
                        .min_by_key(|s| *lock(&s.last_activity))
                        .cloned()
                })
                .flatten();
            sessions.insert(digest, s.clone());
            oldest
        };
        if let Some(old) = evicted {
            self.end(&old, "logout", Some("session limit: least recently active"));
        }
        self.publish_sessions();
        (id, s)
    }

    fn lookup(&self, h: &StreamHeader, headers: &HeaderMap) -> Option<Arc<Session>> {
        let sid = web::cookie(headers, cookie_name(h))?;
        let s = lock(&self.sessions)
            .get(&crate::tls::sha256(sid.as_bytes()))
            .cloned()?;
        if let Some(why) = self.expired(&s) {
            self.end(&s, why, None);
            return None;
        }
        Some(s)
    }

    fn expired(&self, s: &Session) -> Option<&'static str> {
        let now = self.clock.now();
        if now >= s.deadline {
            return Some("absolute_expiry");
        }
        let idle = self.auto_logout();
        let last = *lock(&s.last_activity);
        (now.saturating_duration_since(last) >= idle).then_some("idle_expiry")
    }

    /// Records visitor activity (requests, client WebSocket data frames).
    pub fn touch(&self, s: &Session) {
        *lock(&s.last_activity) = self.clock.now();
    }

    /// Ends a session: gone from the store, its WebSockets closed, audited.
    fn end(&self, s: &Session, event: &str, reason: Option<&str>) {
        let removed = lock(&self.sessions).remove(&s.digest).is_some();
        s.ended.cancel();
        if removed {
            self.audit.record(Event {
                event,
                cm_user: &s.cm_user,
                client_addr: &s.client_addr,
                user: Some(&s.user),
                role: Some(s.role.as_str()),
                session: Some(&s.id_hash),
                reason,
            });
            self.publish_sessions();
        }
    }

    /// Ends every session `which` selects.
    fn end_where(&self, which: impl Fn(&Session) -> bool, event: &str, reason: &str) {
        let victims: Vec<Arc<Session>> = lock(&self.sessions)
            .values()
            .filter(|s| which(s))
            .cloned()
            .collect();
        for s in victims {
            self.end(&s, event, Some(reason));
        }
    }

    /// Ends idle and over-age sessions; run every few hundred milliseconds.
    pub fn sweep(&self) {
        let all: Vec<Arc<Session>> = lock(&self.sessions).values().cloned().collect();
        for s in all {
            if let Some(why) = self.expired(&s) {
                self.end(&s, why, None);
            }
        }
        let now = self.clock.server_now_ms().unwrap_or(u64::MAX);
        lock(&self.nonces).retain(|_, exp| *exp > now.saturating_sub(120_000));
    }

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

    fn publish_sessions(&self) {
        let mut list: Vec<SessionInfo> = lock(&self.sessions)
            .values()
            .map(|s| SessionInfo {
                who: format!("{} (CM user {})", s.user, s.cm_user),
                role: s.role.as_str().to_string(),
                since: s.since.clone(),
            })
            .collect();
        list.sort_by(|a, b| a.since.cmp(&b.since));
        self.status.update(|st| st.active_sessions = list);
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
            (Method::GET | Method::HEAD, "/__remote/login") => {
                let next = query_param(req.uri().query(), "next").unwrap_or_else(|| "/".into());
                self.login_page(StatusCode::OK, &next, None)
            }
            (Method::POST, "/__remote/login" | "/__remote/logout")
                if !web::same_origin(req.headers(), &h.origin) =>
            {
                web::page(
                    StatusCode::FORBIDDEN,
                    "Cross-site request refused",
                    "This form was not sent from this PBX's remote access pages.",
                )
            }
            (Method::POST, "/__remote/login") => {
                let previous = self.lookup(h, req.headers());
                let resp = self.login_post(h, req).await;
                if resp.status() == StatusCode::SEE_OTHER {
                    self.end_replaced(previous);
                }
                resp
            }
            // Only a same-origin POST ends a session: a link or an image on another site
            // (a cross-site GET carries the Lax cookies) gets the confirmation form instead.
            (Method::GET | Method::HEAD, "/__remote/logout") => self.logout_form(h, req.headers()),
            (Method::POST, "/__remote/logout") => self.logout(h, req.headers()),
            (_, "/__remote/login" | "/__remote/logout") => {
                let mut r = web::page(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "Method not allowed",
                    "This page takes GET or POST.",
                );
                r.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, POST"));
                r
            }
            (Method::GET | Method::HEAD, "/__remote/session") => {
                self.session_json(h, req.headers())
            }
            (Method::GET | Method::HEAD, "/__remote/passwordless") => {
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

    /// A new login replaces the session the browser held (its id is never reused).
    fn end_replaced(&self, previous: Option<Arc<Session>>) {
        if let Some(old) = previous {
            self.end(&old, "logout", Some("replaced by a new login"));
        }
    }

    fn login_page(&self, status: StatusCode, next: &str, error: Option<&str>) -> Response<Body> {
        let rules = self.rules();
        let closed = if rules.account.is_none() {
            Some("Account login is not enabled on this PBX.")
        } else if lock(&self.account_suspended).is_some() {
            Some(
                "Account login is suspended on this PBX: the remote account's username is now \
                 used by one of its extensions. The PBX administrator must rename one of them.",
            )
        } else {
            None
        };
        if let Some(why) = closed {
            let mut body = format!("<p>{why}</p>");
            if rules.passwordless {
                body.push_str("<p>Ask the provider for a passwordless visit link.</p>");
            }
            return web::html(StatusCode::FORBIDDEN, "Remote login", &body);
        }
        let error = error
            .map(|e| format!("<p role=\"alert\"><strong>{}</strong></p>", web::escape(e)))
            .unwrap_or_default();
        let body = format!(
            "{error}<form method=\"post\" action=\"/__remote/login\">\
             <input type=\"hidden\" name=\"next\" value=\"{next}\">\
             <p><label>Username<br><input name=\"username\" autocomplete=\"username\" required></label></p>\
             <p><label>Password<br><input name=\"password\" type=\"password\" autocomplete=\"current-password\" required></label></p>\
             <p><button type=\"submit\">Log in</button></p></form>\
             <p>Remote access to this PBX's web portal with the remote account (Administrator).</p>",
            next = web::escape(&safe_next(next)),
        );
        web::html(status, "Remote login", &body)
    }

    async fn login_post(&self, h: &StreamHeader, req: Request<Incoming>) -> Response<Body> {
        let Some(account) = self.account() else {
            return self.login_page(StatusCode::FORBIDDEN, "/", None);
        };
        let form = match Limited::new(req.into_body(), MAX_FORM).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return web::page(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "Form too large",
                    "The login form was too large.",
                )
            }
        };
        let mut username = String::new();
        let mut password = crate::secret::Secret::default();
        let mut next = "/".to_string();
        for (k, v) in url::form_urlencoded::parse(&form) {
            match k.as_ref() {
                "username" => username = v.trim().to_string(),
                "password" => password = crate::secret::Secret::new(v.into_owned()),
                "next" => next = v.into_owned(),
                _ => {}
            }
        }
        const GENERIC: &str = "Wrong username or password.";
        if username.is_empty() || password.is_empty() {
            return self.login_page(StatusCode::UNAUTHORIZED, &next, Some(GENERIC));
        }
        let key = lockout::key(&h.cm_user, &h.client_addr, &username);
        let audit = |event: &str, reason: Option<&str>| {
            self.audit.record(Event {
                event,
                cm_user: &h.cm_user,
                client_addr: &h.client_addr,
                user: Some(&username),
                role: Some(Role::Administrator.as_str()),
                session: None,
                reason,
            })
        };
        match self.lockout.reserve(&key, &username) {
            Admission::Locked { left } => {
                audit("login_failed", Some("locked out"));
                self.metrics.login_failed();
                let msg = format!(
                    "Too many failed attempts. Try again in {}.",
                    human_duration(left)
                );
                return self.login_page(StatusCode::TOO_MANY_REQUESTS, &next, Some(&msg));
            }
            Admission::Go { delay } => {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
            }
        }
        let user_ok = username.eq_ignore_ascii_case(&account.username);
        // Wrong usernames are checked against a dummy hash so both cases cost the same.
        let phc = if user_ok {
            account.password_hash.expose().to_string()
        } else {
            crate::password::dummy_hash().to_string()
        };
        let ok = match self.verify_slots.acquire().await {
            Ok(_permit) => {
                let pw = password.clone();
                tokio::task::spawn_blocking(move || crate::password::verify(pw.expose(), &phc))
                    .await
                    .unwrap_or(false)
                    && user_ok
            }
            Err(_) => false,
        };
        let locked_now = self.lockout.finish(&key, &username, ok);
        if !ok {
            audit("login_failed", Some("wrong username or password"));
            self.metrics.login_failed();
            if locked_now {
                audit("lockout", Some("3 failed logins; locked for 10 minutes"));
            }
            return self.login_page(StatusCode::UNAUTHORIZED, &next, Some(GENERIC));
        }
        // The rules may have changed during the slow password check: a suspended account gets
        // the suspension page, a changed password the generic error.
        if self.account().as_ref() != Some(&account) {
            return self.login_page(StatusCode::UNAUTHORIZED, &next, Some(GENERIC));
        }
        self.open_session(
            h,
            &account.username,
            Role::Administrator,
            "login_ok",
            &safe_next(&next),
        )
    }

    fn passwordless(&self, h: &StreamHeader) -> Response<Body> {
        let refuse = |reason: &str, title: &str, detail: &str| {
            self.audit.record(Event {
                event: "passwordless_rejected",
                cm_user: &h.cm_user,
                client_addr: &h.client_addr,
                user: None,
                role: Some(Role::SuperAdmin.as_str()),
                session: None,
                reason: Some(reason),
            });
            let mut r = web::page(StatusCode::FORBIDDEN, title, detail);
            r.headers_mut()
                .insert("referrer-policy", HeaderValue::from_static("no-referrer"));
            r
        };
        let Some(token) = &h.passwordless_token else {
            return refuse(
                "used",
                "This passwordless link was already used",
                "A passwordless visit logs in once. Ask the provider for a new visit link.",
            );
        };
        let rules = self.rules();
        if !rules.passwordless {
            return refuse(
                "disabled_locally",
                "Passwordless login is disabled on this PBX",
                "The PBX owner has turned Passwordless Login off in Remote Management.",
            );
        }
        if !self.cm_passwordless.load(Ordering::SeqCst) {
            return refuse("not_allowed", "Passwordless login is not allowed for this device", "The provider has not allowed passwordless login for this device on the management platform.");
        }
        let claims = match crate::token::verify(&self.server_key, token.expose()) {
            Ok(c) => c,
            Err(_) => {
                return refuse(
                    "invalid_signature",
                    "Invalid passwordless link",
                    "The link was not signed by this PBX's management server.",
                )
            }
        };
        if claims.dev != self.device_id || claims.grant != h.grant_id || claims.cm_user != h.cm_user
        {
            return refuse(
                "wrong_device",
                "Invalid passwordless link",
                "The link was made for another device or visit.",
            );
        }
        if claims.exp_ms <= claims.iat_ms
            || claims.exp_ms - claims.iat_ms > crate::token::MAX_TOKEN_LIFETIME_MS
        {
            return refuse(
                "invalid_lifetime",
                "Invalid passwordless link",
                "The link's lifetime is not allowed.",
            );
        }
        let server_now = match self.clock.server_now_ms() {
            Ok(t) => t,
            Err(why) => return refuse("clock", "Cannot check the link's time", &why),
        };
        if server_now >= claims.exp_ms {
            return refuse("expired", "This passwordless link has expired", "Passwordless links must be used within a minute. Ask the provider for a new visit link.");
        }
        {
            let mut nonces = lock(&self.nonces);
            if nonces.contains_key(&claims.nonce) {
                drop(nonces);
                return refuse(
                    "used",
                    "This passwordless link was already used",
                    "A passwordless visit logs in once. Ask the provider for a new visit link.",
                );
            }
            nonces.insert(claims.nonce.clone(), claims.exp_ms);
        }
        self.open_session(
            h,
            &rules.super_admin,
            Role::SuperAdmin,
            "passwordless_ok",
            "/",
        )
    }

    /// A successful login of either kind: new session, audit line, cookie and redirect.
    fn open_session(
        &self,
        h: &StreamHeader,
        user: &str,
        role: Role,
        event: &str,
        location: &str,
    ) -> Response<Body> {
        let (id, s) = self.create_session(h, user, role);
        self.audit.record(Event {
            event,
            cm_user: &h.cm_user,
            client_addr: &h.client_addr,
            user: Some(&s.user),
            role: Some(s.role.as_str()),
            session: Some(&s.id_hash),
            reason: None,
        });
        redirect_with_cookie(location, &session_cookie(h, &id))
    }

    /// The page a logout link opens: a button that posts the logout, or word that there is no
    /// session to end.
    fn logout_form(&self, h: &StreamHeader, headers: &HeaderMap) -> Response<Body> {
        let body = match self.lookup(h, headers) {
            Some(s) => format!(
                "<p>Signed in as <strong>{}</strong>.</p>\
                 <form method=\"post\" action=\"/__remote/logout\">\
                 <p><button type=\"submit\">Log out</button></p></form>",
                web::escape(&s.user)
            ),
            None => "<p>There is no remote session to end.</p>\
                     <p><a href=\"/__remote/login\">Log in</a></p>"
                .to_string(),
        };
        web::html(StatusCode::OK, "Log out", &body)
    }

    fn logout(&self, h: &StreamHeader, headers: &HeaderMap) -> Response<Body> {
        if let Some(s) = self.lookup(h, headers) {
            self.end(&s, "logout", None);
        }
        let mut r = web::html(
            StatusCode::OK,
            "Logged out",
            "<p>The remote session has ended.</p><p><a href=\"/__remote/login\">Log in again</a></p>",
        );
        if let Ok(v) = HeaderValue::from_str(&clear_cookie(h)) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
        r
    }

    fn session_json(&self, h: &StreamHeader, headers: &HeaderMap) -> Response<Body> {
        let Some(s) = self.lookup(h, headers) else {
            return json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": "no session"}),
            );
        };
        let idle_left = self.auto_logout().saturating_sub(
            self.clock
                .now()
                .saturating_duration_since(*lock(&s.last_activity)),
        );
        let abs_left = s.deadline.saturating_duration_since(self.clock.now());
        let at = |d: Duration| crate::status::rfc3339(SystemTime::now() + d);
        json(
            StatusCode::OK,
            serde_json::json!({
                "user": s.user,
                "role": s.role.as_str(),
                "cm_user": s.cm_user,
                "since": s.since,
                "expires_at": at(idle_left.min(abs_left)),
                "absolute_expires_at": at(abs_left),
            }),
        )
    }
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(web::full(v.to_string()))
        .unwrap_or_else(|_| web::page(StatusCode::INTERNAL_SERVER_ERROR, "Error", ""))
}

/// The session cookie's name for this visitor-facing scheme.
pub fn cookie_name(h: &StreamHeader) -> &'static str {
    if h.scheme == "https" {
        SESSION_COOKIE_SECURE
    } else {
        SESSION_COOKIE
    }
}

fn session_cookie(h: &StreamHeader, id: &str) -> String {
    let secure = if h.scheme == "https" { "; Secure" } else { "" };
    format!(
        "{}={id}; Path=/; HttpOnly; SameSite=Lax{secure}",
        cookie_name(h)
    )
}

fn clear_cookie(h: &StreamHeader) -> String {
    let secure = if h.scheme == "https" { "; Secure" } else { "" };
    format!(
        "{}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax{secure}",
        cookie_name(h)
    )
}

fn redirect_with_cookie(location: &str, cookie: &str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(header::LOCATION, location)
        .header(header::SET_COOKIE, cookie)
        .header(header::CACHE_CONTROL, "no-store")
        .header("referrer-policy", "no-referrer")
        .body(web::full(Bytes::new()))
        .unwrap_or_else(|_| web::page(StatusCode::INTERNAL_SERVER_ERROR, "Error", ""))
}

/// Without a session: HTML navigations go to the login page, everything else gets 401.
fn login_required<B>(req: &Request<B>) -> Response<Body> {
    let html = matches!(*req.method(), Method::GET | Method::HEAD)
        && req
            .headers()
            .get(header::ACCEPT)
            .and_then(|a| a.to_str().ok())
            .is_some_and(|a| a.contains("text/html"));
    if html {
        let next = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let target = format!(
            "/__remote/login?next={}",
            url::form_urlencoded::byte_serialize(next.as_bytes()).collect::<String>()
        );
        return Response::builder()
            .status(StatusCode::SEE_OTHER)
            .header(header::LOCATION, target)
            .header(header::CACHE_CONTROL, "no-store")
            .body(web::full(Bytes::new()))
            .unwrap_or_else(|_| web::page(StatusCode::UNAUTHORIZED, "Login required", ""));
    }
    let mut r = web::page(
        StatusCode::UNAUTHORIZED,
        "Login required",
        "Log in through /__remote/login first.",
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Cookie"));
    r
}

/// A same-site path to go to after login (never another host, never the agent's own pages).
pub fn safe_next(next: &str) -> String {
    let ok = next.starts_with('/')
        && !next.starts_with("//")
        && !next.starts_with("/\\")
        && !next.starts_with("/__remote/")
        && !next.chars().any(|c| c.is_control());
    if ok {
        next.to_string()
    } else {
        "/".to_string()
    }
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn human_duration(d: Duration) -> String {
    let secs = d.as_secs().max(1);
    if secs >= 60 {
        let m = secs.div_ceil(60);
        format!("{m} minute{}", if m == 1 { "" } else { "s" })
    } else {
        format!("{secs} second{}", if secs == 1 { "" } else { "s" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate_for_test(dir: &Path) -> Gate {
        let hash = crate::password::hash("Test-Passw0rd-1").unwrap();
        let text = format!(
            r#"
[server]
enabled = true
address = "127.0.0.1:1"
[activation]
method = "auth_code"
auth_code = "AAAA-AAAA-AAAA-AAAA"
[pbx]
edition = "software"
firmware = "83.19.0.110"
model = "m"
serial = "s"
mac = "02:00:00:00:00:01"
portal_url = "http://127.0.0.1:9"
[remote_access.account]
enabled = true
username = "provider"
password_hash = "{hash}"
[remote_access.passwordless]
enabled = true
[paths]
state_dir = "{d}/state"
status_file = "{d}/status.json"
assertion_pubkey = "{d}/assertion.pub"
"#,
            d = dir.display()
        );
        let config = AgentConfig::parse(&dir.join("agent.toml"), &text).unwrap();
        crate::fsutil::ensure_private_dir(&config.paths.state_dir).unwrap();
        let status = StatusHandle::new(config.paths.status_file.clone(), Default::default());
        Gate::new(
            &config,
            "dev",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            Clock::default(),
            status,
            Default::default(),
        )
        .unwrap()
    }

    fn header(cm: &str) -> StreamHeader {
        StreamHeader {
            cm_user: cm.into(),
            grant_id: format!("g-{cm}"),
            client_addr: "10.0.0.1".into(),
            scheme: "https".into(),
            origin: "https://dev.cm.example".into(),
            grant_expires_ms: 0,
            passwordless_token: None,
        }
    }

    #[test]
    fn rule_changes_end_exactly_the_sessions_they_no_longer_allow() {
        let dir = tempfile::tempdir().unwrap();
        let gate = gate_for_test(dir.path());
        let (_, admin) = gate.create_session(&header("a"), "provider", Role::Administrator);
        let (_, sa) = gate.create_session(&header("b"), "admin", Role::SuperAdmin);
        let rules = gate.rules();

        // Unrelated change (idle time): nobody is logged out.
        gate.apply_rules(Rules {
            auto_logout: Duration::from_secs(3600),
            ..rules.clone()
        });
        assert!(!admin.ended.is_cancelled() && !sa.ended.is_cancelled());

        // Password changed: account sessions end, passwordless ones stay.
        let mut changed = rules.clone();
        if let Some(a) = changed.account.as_mut() {
            a.password_hash =
                crate::secret::Secret::new(crate::password::hash("Other-Passw0rd-2").unwrap());
        }
        gate.apply_rules(changed.clone());
        assert!(admin.ended.is_cancelled());
        assert!(!sa.ended.is_cancelled());

        // Local passwordless off: passwordless sessions end.
        gate.apply_rules(Rules {
            passwordless: false,
            ..changed
        });
        assert!(sa.ended.is_cancelled());
        assert_eq!(gate.status.get().active_sessions.len(), 0);
    }

    #[test]
    fn past_the_session_cap_the_least_recently_active_session_ends() {
        let dir = tempfile::tempdir().unwrap();
        let gate = gate_for_test(dir.path());
        let sessions: Vec<Arc<Session>> = (0..MAX_SESSIONS)
            .map(|i| {
                gate.create_session(&header(&format!("u{i}")), "provider", Role::Administrator)
                    .1
            })
            .collect();
        // The first one is used again, so the second is now the least recently active.
        *lock(&sessions[1].last_activity) -= Duration::from_secs(1);
        gate.touch(&sessions[0]);
        let (_, newest) = gate.create_session(&header("new"), "provider", Role::Administrator);
        assert!(sessions[1].ended.is_cancelled());
        assert!(!sessions[0].ended.is_cancelled() && !newest.ended.is_cancelled());
        assert_eq!(gate.status.get().active_sessions.len(), MAX_SESSIONS);
        let audit = std::fs::read_to_string(gate.audit_path()).unwrap();
        assert!(audit.contains("session limit"), "{audit}");
    }

    #[test]
    fn https_visitors_get_host_prefixed_secure_cookies() {
        let h = header("a");
        let c = session_cookie(&h, "id");
        assert!(
            c.starts_with("__Host-__pbxra_sid=id;")
                && c.contains("; Secure")
                && c.contains("Path=/")
        );
        assert!(!c.to_lowercase().contains("domain="));
    }

    #[test]
    fn next_never_leaves_the_device() {
        assert_eq!(safe_next("/admin?x=1"), "/admin?x=1");
        for bad in [
            "//evil.com/",
            "https://evil.com/",
            "/\\evil.com",
            "/__remote/logout",
            "javascript:x",
            "/a\nb",
        ] {
            assert_eq!(safe_next(bad), "/", "{bad:?}");
        }
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_duration(Duration::from_secs(599)), "10 minutes");
        assert_eq!(human_duration(Duration::from_secs(61)), "2 minutes");
        assert_eq!(human_duration(Duration::from_secs(1)), "1 second");
    }

    #[test]
    fn html_navigations_are_redirected_others_get_401() {
        let req = Request::get("/admin?a=b")
            .header("accept", "text/html,*/*")
            .body(())
            .unwrap();
        let r = login_required(&req);
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        assert_eq!(
            r.headers()["location"],
            "/__remote/login?next=%2Fadmin%3Fa%3Db"
        );
        let api = Request::get("/api/x")
            .header("accept", "application/json")
            .body(())
            .unwrap();
        assert_eq!(login_required(&api).status(), StatusCode::UNAUTHORIZED);
        let post = Request::post("/x")
            .header("accept", "text/html")
            .body(())
            .unwrap();
        assert_eq!(login_required(&post).status(), StatusCode::UNAUTHORIZED);
    }
}
