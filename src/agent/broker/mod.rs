//! The portal login broker (DESIGN §12): for a portal that does not read the identity headers,
//! the agent logs in to it with the portal account mapped to the remote session's role, keeps
//! the portal's cookies in that session's jar, adds them to each of its forwarded requests and
//! keeps them from the visitor's browser. A portal that answers as logged out gets one new
//! login; when the remote session ends the agent logs the portal session out. The portal's
//! password never leaves the PBX and is never logged.

pub mod form;
mod login;

use crate::agent::gate::{Gate, Role, Session};
use crate::agent::portal::Portal;
use crate::config::{PortalAccount, PortalLogin};
use crate::web::Body;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tracing::Instrument;

/// Largest portal page the broker reads (its login page, a login's answer, an HTML page checked
/// for being the login page).
pub const MAX_PAGE: usize = 256 * 1024;
/// Largest visitor body kept to send again after a new portal login; a larger one streams and
/// the visitor is asked to send it again.
pub const MAX_REPLAY: usize = 64 * 1024;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Invariant: nothing panics while these locks are held; the data stays valid even then.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The broker for one config (a reload that changes `[portal_login]` makes a new one).
pub struct Broker {
    config: PortalLogin,
    /// Roles whose login the portal refused (a wrong password): no new attempt, so the portal's
    /// own lockout is not fed, until a reload re-reads the password files.
    refused: Mutex<HashMap<Role, String>>,
}

/// A remote session's portal session: its cookie jar, and one login at a time.
#[derive(Default)]
pub struct PortalSession {
    jar: Mutex<Jar>,
    login: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Jar {
    /// The portal's cookies for this session, name and value.
    cookies: Vec<(String, String)>,
    /// Counts logins, so a request that saw an expired portal session knows whether another
    /// request has logged in again since.
    generation: u64,
    /// A portal session is held (`None`: the broker never ran for this session).
    held: Option<bool>,
    /// The logout on session end is armed.
    watching: bool,
}

impl PortalSession {
    /// Whether a portal session is held (`None` when the agent does not log in for it).
    pub fn held(&self) -> Option<bool> {
        lock(&self.jar).held
    }

    fn generation(&self) -> Option<u64> {
        let jar = lock(&self.jar);
        (jar.held == Some(true)).then_some(jar.generation)
    }
}

/// Why a portal login failed.
enum LoginError {
    /// The portal refused the account (its login form again, a 401): not retried until reload.
    Refused(String),
    /// The portal could not be asked, or answered something unexpected: retried on the next
    /// request.
    Failed(String),
}

impl Broker {
    /// A broker for `config`.
    pub fn new(config: PortalLogin) -> Broker {
        Broker {
            config,
            refused: Mutex::new(HashMap::new()),
        }
    }

    /// The portal account for a role, if the agent logs in for it.
    pub fn account(&self, role: Role) -> Option<&PortalAccount> {
        match role {
            Role::SuperAdmin => self.config.super_admin.as_ref(),
            Role::Administrator => self.config.administrator.as_ref(),
        }
    }

    /// Whether `path` (with or without a query) is the portal's logout.
    pub fn is_logout(&self, path: &str) -> bool {
        let path = path.split('?').next().unwrap_or(path);
        self.config.logout_path.as_deref() == Some(path)
    }

    /// Makes sure `s` holds a portal session, logging in when it does not; returns the login's
    /// generation, or the page the visitor sees instead.
    pub async fn ensure(
        self: &Arc<Self>,
        portal: &Arc<Portal>,
        gate: &Arc<Gate>,
        s: &Arc<Session>,
    ) -> Result<u64, Response<Body>> {
        if let Some(g) = s.portal.generation() {
            return Ok(g);
        }
        self.log_in(portal, gate, s, None).await
    }

    /// The portal answered a request made with login `seen` as logged out: one new login,
    /// unless another request has already made one since.
    pub async fn renew(
        self: &Arc<Self>,
        portal: &Arc<Portal>,
        gate: &Arc<Gate>,
        s: &Arc<Session>,
        seen: u64,
    ) -> Result<u64, Response<Body>> {
        self.log_in(portal, gate, s, Some(seen)).await
    }

    async fn log_in(
        self: &Arc<Self>,
        portal: &Arc<Portal>,
        gate: &Arc<Gate>,
        s: &Arc<Session>,
        seen: Option<u64>,
    ) -> Result<u64, Response<Body>> {
        let Some(account) = self.account(s.role) else {
            return Err(error_page(
                "no portal account is mapped to this kind of session",
            ));
        };
        let _one_at_a_time = s.portal.login.lock().await;
        if let Some(g) = s.portal.generation() {
            if seen != Some(g) {
                return Ok(g);
            }
        }
        if let Some(why) = lock(&self.refused).get(&s.role).cloned() {
            return Err(error_page(&why));
        }
        let result = login::log_in(&self.config, account, portal)
            .instrument(tracing::debug_span!("portal_login", user = %account.username))
            .await;
        let generation = {
            let mut jar = lock(&s.portal.jar);
            match &result {
                Ok(cookies) => {
                    jar.cookies = cookies.clone();
                    jar.generation += 1;
                    jar.held = Some(true);
                }
                Err(_) => {
                    jar.cookies.clear();
                    jar.held = Some(false);
                }
            }
            jar.generation
        };
        gate.publish_sessions();
        match result {
            Ok(_) => {
                let why = format!(
                    "as portal user {}{}",
                    account.username,
                    if seen.is_some() {
                        " (the portal had ended the previous portal session)"
                    } else {
                        ""
                    }
                );
                tracing::info!(user = %account.username, role = s.role.as_str(), "logged in to the portal for a remote session");
                gate.audit_session(s, "portal_login", Some(&why));
                self.arm_logout(portal, gate, s);
                Ok(generation)
            }
            Err(LoginError::Refused(why)) => {
                let why = format!(
                    "the portal refused user {} ({why}); check {} and reload",
                    account.username,
                    account.password_file.display()
                );
                tracing::warn!(reason = %why, "portal login refused; not retried until a reload");
                gate.audit_session(s, "portal_login_failed", Some(&why));
                lock(&self.refused).insert(s.role, why.clone());
                Err(error_page(&why))
            }
            Err(LoginError::Failed(why)) => {
                let why = format!(
                    "logging in as portal user {} failed: {why}",
                    account.username
                );
                tracing::warn!(reason = %why, "portal login failed");
                gate.audit_session(s, "portal_login_failed", Some(&why));
                Err(error_page(&why))
            }
        }
    }

    /// Logs the portal session out when the remote session ends, however it ends.
    fn arm_logout(self: &Arc<Self>, portal: &Arc<Portal>, gate: &Arc<Gate>, s: &Arc<Session>) {
        {
            let mut jar = lock(&s.portal.jar);
            if std::mem::replace(&mut jar.watching, true) {
                return;
            }
        }
        // Without a logout path the portal session simply dies with the remote session.
        let Some(path) = self.config.logout_path.clone() else {
            return;
        };
        let (portal, gate, s) = (portal.clone(), gate.clone(), s.clone());
        tokio::spawn(
            async move {
                s.ended.cancelled().await;
                let cookies = {
                    let mut jar = lock(&s.portal.jar);
                    jar.held = Some(false);
                    std::mem::take(&mut jar.cookies)
                };
                if cookies.is_empty() {
                    return;
                }
                match login::log_out(&path, &cookies, &portal).await {
                    Ok(status) => {
                        let why = format!("portal answered {status}");
                        gate.audit_session(&s, "portal_logout", Some(&why));
                    }
                    Err(e) => {
                        let why = format!("portal logout failed: {e}");
                        tracing::warn!(reason = %why, "portal logout failed");
                        gate.audit_session(&s, "portal_logout", Some(&why));
                    }
                }
            }
            .in_current_span(),
        );
    }

    /// The `Cookie` header toward the portal: the visitor's own cookies (those its pages set
    /// in the browser), with the jar's added and taking precedence, so a visitor can neither
    /// see nor replace the portal session.
    pub fn add_cookies(&self, s: &Session, h: &mut HeaderMap) {
        let jar = lock(&s.portal.jar);
        if jar.cookies.is_empty() {
            return;
        }
        let names: Vec<&str> = jar.cookies.iter().map(|(n, _)| n.as_str()).collect();
        crate::web::drop_cookies(h, &names);
        let mut line = h
            .get(header::COOKIE)
            .and_then(|v| v.to_str().ok())
            .map(|v| format!("{v}; "))
            .unwrap_or_default();
        line.push_str(&login::cookie_line(&jar.cookies));
        if let Ok(v) = HeaderValue::from_str(&line) {
            h.insert(header::COOKIE, v);
        }
    }

    /// Moves every `Set-Cookie` of a portal answer into the session's jar: none reaches the
    /// visitor's browser.
    pub fn keep_cookies(&self, s: &Session, h: &mut HeaderMap) {
        if !h.contains_key(header::SET_COOKIE) {
            return;
        }
        let mut jar = lock(&s.portal.jar);
        login::store_cookies(&mut jar.cookies, h);
        h.remove(header::SET_COOKIE);
    }

    /// Whether the agent reads HTML answers for the portal's login page (form logins).
    pub fn detects_login_pages(&self) -> bool {
        matches!(self.config.method, crate::config::LoginMethod::Form { .. })
    }

    /// Whether `html` is the portal's login page: a form with both the username and the
    /// password field (a form with only a password, such as "change password", is not).
    pub fn is_login_page(&self, html: &[u8]) -> bool {
        let crate::config::LoginMethod::Form {
            username_field,
            password_field,
        } = &self.config.method
        else {
            return false;
        };
        let html = String::from_utf8_lossy(html);
        form::login_form(&html, password_field)
            .is_some_and(|f| f.inputs.iter().any(|i| i == username_field))
    }

    /// Whether a portal answer says the portal session is gone: a 401, or a redirect to the
    /// login page.
    pub fn looks_logged_out(&self, status: StatusCode, h: &HeaderMap) -> bool {
        login::looks_logged_out(&self.config.login_path, status, h)
    }
}

/// The page a visitor sees when the agent cannot log in to the portal for them: it names the
/// account and the config to check, never a secret, and is never a redirect (no loop).
pub fn error_page(why: &str) -> Response<Body> {
    let mut chars = why.chars();
    let why: String = chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default();
    crate::web::page(
        StatusCode::BAD_GATEWAY,
        "The agent could not sign in to the PBX web portal",
        &format!("{why}. The remote session itself is fine; ask the PBX's administrator to check the agent's [portal_login] settings."),
    )
}
