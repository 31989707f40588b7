//! Account Login: the login page, the password check under the lockout and the verification
//! slots, logout (a same-origin POST) and the session page.

use super::*;

impl Gate {
    pub(super) fn login_page(
        &self,
        status: StatusCode,
        next: &str,
        error: Option<&str>,
    ) -> Response<Body> {
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
    pub(super) async fn login_post(
        &self,
        h: &StreamHeader,
        req: Request<Incoming>,
    ) -> Response<Body> {
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
    /// The page a logout link opens: a button that posts the logout, or word that there is no
    /// session to end.
    pub(super) fn logout_form(&self, h: &StreamHeader, headers: &HeaderMap) -> Response<Body> {
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
    pub(super) fn logout(&self, h: &StreamHeader, headers: &HeaderMap) -> Response<Body> {
        self.logged_out(h, self.lookup(h, headers).as_deref())
    }
    /// Ends `s` (when there is one) and answers with the "Logged out" page, clearing the cookie.
    pub(crate) fn logged_out(&self, h: &StreamHeader, s: Option<&Session>) -> Response<Body> {
        if let Some(s) = s {
            self.end(s, "logout", None);
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
    pub(super) fn session_json(&self, h: &StreamHeader, headers: &HeaderMap) -> Response<Body> {
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
