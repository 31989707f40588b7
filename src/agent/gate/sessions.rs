//! The session store: sessions created at login, found by cookie and grant, touched by activity,
//! and ended (logout, idle, 12 h cap, revocation, the cap on live sessions), each end audited.

use super::*;

impl Gate {
    pub(super) fn create_session(
        &self,
        h: &StreamHeader,
        user: &str,
        role: Role,
    ) -> (String, Arc<Session>) {
        let id = crate::crypto::random_token::<32>();
        let digest = crate::crypto::sha256(id.as_bytes());
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
            portal: Default::default(),
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
    pub(super) fn lookup(&self, h: &StreamHeader, headers: &HeaderMap) -> Option<Arc<Session>> {
        let sid = web::cookie(headers, cookie_name(h))?;
        let s = lock(&self.sessions)
            .get(&crate::crypto::sha256(sid.as_bytes()))
            .cloned()?;
        if let Some(why) = self.expired(&s) {
            self.end(&s, why, None);
            return None;
        }
        Some(s)
    }
    pub(super) fn expired(&self, s: &Session) -> Option<&'static str> {
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
    /// Ends a session: gone from the store, audited, then its WebSockets closed (so whoever
    /// sees a socket close finds the event already written).
    pub(super) fn end(&self, s: &Session, event: &str, reason: Option<&str>) {
        let removed = lock(&self.sessions).remove(&s.digest).is_some();
        if removed {
            self.audit_session(s, event, reason);
            self.publish_sessions();
        }
        s.ended.cancel();
    }
    /// An audit event about `s`.
    pub(crate) fn audit_session(&self, s: &Session, event: &str, reason: Option<&str>) {
        self.audit.record(Event {
            event,
            cm_user: &s.cm_user,
            client_addr: &s.client_addr,
            user: Some(&s.user),
            role: Some(s.role.as_str()),
            session: Some(&s.id_hash),
            reason,
        });
    }
    /// Ends every live session (the run is ending).
    pub(crate) fn end_all(&self, reason: &str) {
        self.end_where(|_| true, "logout", reason);
    }
    /// Ends every session `which` selects.
    pub(super) fn end_where(&self, which: impl Fn(&Session) -> bool, event: &str, reason: &str) {
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
    /// A new login replaces the session the browser held (its id is never reused).
    pub(super) fn end_replaced(&self, previous: Option<Arc<Session>>) {
        if let Some(old) = previous {
            self.end(&old, "logout", Some("replaced by a new login"));
        }
    }
    /// A successful login of either kind: new session, audit line, cookie and redirect.
    pub(super) fn open_session(
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
    /// Writes the live sessions into the status (and whether each holds a portal session, when
    /// the agent logs in to the portal for them).
    pub(crate) fn publish_sessions(&self) {
        let mut list: Vec<SessionInfo> = lock(&self.sessions)
            .values()
            .map(|s| SessionInfo {
                who: format!("{} (CM user {})", s.user, s.cm_user),
                role: s.role.as_str().to_string(),
                since: s.since.clone(),
                portal_session: s.portal.held(),
            })
            .collect();
        list.sort_by(|a, b| a.since.cmp(&b.since));
        self.status.update(|st| st.active_sessions = list);
    }
}
