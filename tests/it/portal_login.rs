//! The portal login broker (issue 22, DESIGN §12): the agent logs in to a portal that has its
//! own login, for the visitor, with the account mapped to the session's role, and the visitor's
//! browser never holds the portal's session or its password.

use crate::support::login_portal::{LoginKind, LoginPortal, ACCOUNTS};
use crate::support::*;
use std::time::Duration;

const ADMIN_PW: &str = ACCOUNTS[0].1;
const REMOTE_PW: &str = ACCOUNTS[1].1;

struct Setup {
    server: TestServer,
    portal: LoginPortal,
    agent: TestAgent,
    device: String,
    clock: pbx_remote::agent::clock::Clock,
    tmp: tempfile::TempDir,
}

impl Setup {
    async fn start(kind: LoginKind, per_session: usize, passwords: (&str, &str)) -> Setup {
        let server = TestServer::start().await;
        let portal = LoginPortal::start(kind, per_session).await;
        let (device, code) = server.add_device(true);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("agent");
        let toml = server
            .agent_toml(&dir)
            .code(&code)
            .portal(&portal.url())
            .extra(&portal.config(&tmp.path().join("secrets"), passwords))
            .build();
        let clock = pbx_remote::agent::clock::Clock::default();
        let agent = TestAgent::start_with_clock(&dir, &toml, clock.clone());
        agent.connected().await;
        Setup {
            server,
            portal,
            agent,
            device,
            clock,
            tmp,
        }
    }

    /// A visitor logged in remotely: passwordless (super admin) or with the remote account.
    async fn visitor(&self, passwordless: bool) -> Visitor {
        let url = self.server.visit(&self.device, "alice", passwordless);
        let mut v = Visitor::new(self.server.public, &self.device);
        v.open_visit(&url).await;
        let r = if passwordless {
            v.get("/__remote/passwordless").await
        } else {
            v.login(USER, PASSWORD).await
        };
        assert_eq!(r.status(), 303);
        v
    }

    fn audit(&self) -> String {
        std::fs::read_to_string(self.agent.dir.join("state").join("audit.log")).unwrap_or_default()
    }
}

fn holds_portal_cookie(v: &Visitor) -> bool {
    v.cookies
        .iter()
        .any(|(n, _)| matches!(n.as_str(), "PORTALSID" | "BSID" | "pre"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_passwordless_visit_lands_on_a_form_login_portal_as_its_super_admin() {
    let s = Setup::start(LoginKind::Form, 100, (ADMIN_PW, REMOTE_PW)).await;
    let mut v = s.visitor(true).await;
    let r = v.get("/home").await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("Welcome, admin"));
    assert_eq!(
        s.portal.logins(),
        1,
        "one login, with the CSRF field carried"
    );
    assert_eq!(s.portal.refused(), 0);
    assert!(!holds_portal_cookie(&v), "{:?}", v.cookies);

    // The portal sees its own session cookie, never the agent's, nor a visitor's forged
    // credentials.
    let r = v
        .request(reqwest::Method::GET, "/whoami")
        .header("authorization", "Basic Zm9yZ2VkOmZvcmdlZA==")
        .header(
            "cookie",
            format!("{}; PORTALSID=planted", v.cookie_header()),
        )
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("set-cookie").is_none());
    let who: serde_json::Value = r.json().await.unwrap();
    assert_eq!(who["user"], "admin");
    assert_eq!(who["authorization"], serde_json::Value::Null);
    let cookie = who["cookie"].as_str().unwrap();
    assert!(
        cookie.contains("PORTALSID=") && !cookie.contains("planted"),
        "{cookie}"
    );
    assert!(
        !cookie.contains("__pbxra_sid") && !cookie.contains("__cm_visit"),
        "{cookie}"
    );

    let status = s.agent.status.get();
    assert_eq!(status.active_sessions.len(), 1);
    assert_eq!(status.active_sessions[0].portal_session, Some(true));
    let audit = s.audit();
    assert!(
        audit.contains("\"portal_login\"") && audit.contains("as portal user admin"),
        "{audit}"
    );
    assert!(!audit.contains(ADMIN_PW));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_portal_session_is_renewed_once_and_a_small_post_is_sent_again() {
    let s = Setup::start(LoginKind::Form, 2, (ADMIN_PW, REMOTE_PW)).await;
    let mut v = s.visitor(true).await;
    for _ in 0..2 {
        assert_eq!(v.get("/home").await.status(), 200);
    }
    assert_eq!(s.portal.logins(), 1);
    // The portal session has used its requests: the POST is answered with a redirect to the
    // login page, the agent logs in again and sends the POST once more.
    let r = v
        .request(reqwest::Method::POST, "/echo")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("note=hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "admin: note=hello");
    assert_eq!(s.portal.logins(), 2);
    assert_eq!(
        *s.portal.log.echoed.lock().unwrap(),
        vec!["note=hello".to_string()]
    );
    let r = v.get("/home").await;
    assert_eq!(r.status(), 200);
    assert!(!holds_portal_cookie(&v));
    let audit = s.audit();
    assert!(
        audit.contains("the portal had ended the previous portal session"),
        "{audit}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_passwordless_visit_reaches_a_basic_portal_as_its_super_admin() {
    let s = Setup::start(LoginKind::Basic, 100, (ADMIN_PW, REMOTE_PW)).await;
    let mut v = s.visitor(true).await;
    let r = v.get("/whoami").await;
    assert!(r.headers().get("set-cookie").is_none());
    let who: serde_json::Value = r.json().await.unwrap();
    assert_eq!(who["user"], "admin");
    assert!(who["cookie"].as_str().unwrap().contains("BSID="));
    assert!(!holds_portal_cookie(&v));
    assert_eq!(
        s.agent.status.get().active_sessions[0].portal_session,
        Some(true)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_login_page_shown_in_place_counts_as_logged_out() {
    let s = Setup::start(LoginKind::Form, 1, (ADMIN_PW, REMOTE_PW)).await;
    let mut v = s.visitor(true).await;
    for round in 0..3 {
        let r = v.get("/home").await;
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        assert!(text.contains("Welcome, admin"), "round {round}: {text}");
    }
    assert_eq!(s.portal.logins(), 3, "one portal session per request here");
    assert_eq!(s.portal.refused(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_logout_logs_the_portal_session_out() {
    for kind in [LoginKind::Form, LoginKind::Basic] {
        idle_logout_logs_out(kind).await;
    }
}

async fn idle_logout_logs_out(kind: LoginKind) {
    let s = Setup::start(kind, 100, (ADMIN_PW, REMOTE_PW)).await;
    let mut v = s.visitor(true).await;
    assert_eq!(v.get("/whoami").await.status(), 200);
    assert_eq!(s.portal.live_sessions(), 1);
    s.clock.advance(Duration::from_secs(16 * 60));
    eventually(Duration::from_secs(5), "the portal logout", || {
        (s.portal.logouts() == 1).then_some(())
    })
    .await;
    assert_eq!(s.portal.live_sessions(), 0);
    eventually(Duration::from_secs(5), "the audit line", || {
        s.audit().contains("\"portal_logout\"").then_some(())
    })
    .await;
    assert!(s.agent.status.get().active_sessions.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_portals_own_logout_link_ends_the_remote_session() {
    let s = Setup::start(LoginKind::Form, 100, (ADMIN_PW, REMOTE_PW)).await;
    let mut v = s.visitor(true).await;
    assert_eq!(v.get("/home").await.status(), 200);
    let r = v.get("/logout").await;
    assert_eq!(r.status(), 200);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("The remote session has ended"));
    eventually(Duration::from_secs(5), "the portal logout", || {
        (s.portal.logouts() == 1).then_some(())
    })
    .await;
    let r = v.get("/home").await;
    assert_ne!(r.status(), 200, "the remote session is over");
    assert_eq!(s.portal.logins(), 1, "and not logged in again");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_portal_password_shows_an_error_page_once_and_never_loops() {
    for kind in [LoginKind::Form, LoginKind::Basic] {
        wrong_password(kind).await;
    }
}

async fn wrong_password(kind: LoginKind) {
    let s = Setup::start(kind, 100, ("Wr0ng-portal-pw", REMOTE_PW)).await;
    let mut v = s.visitor(true).await;
    for _ in 0..3 {
        let r = v.get("/whoami").await;
        assert_eq!(r.status(), 502);
        assert!(r.headers().get("location").is_none());
        let text = r.text().await.unwrap();
        assert!(
            text.contains("could not sign in") && text.contains("portal-super-admin.secret"),
            "{text}"
        );
        assert!(!text.contains("Wr0ng-portal-pw"));
    }
    assert_eq!(
        s.portal.refused(),
        1,
        "a refused password is not tried again"
    );
    assert_eq!(s.portal.logins(), 0);
    assert!(s.audit().contains("\"portal_login_failed\""));
    assert_eq!(
        s.agent.status.get().active_sessions[0].portal_session,
        Some(false)
    );

    // Fixed and reloaded: the next request logs in.
    let file = s
        .tmp
        .path()
        .join("secrets")
        .join("portal-super-admin.secret");
    std::fs::write(&file, format!("{ADMIN_PW}\n")).unwrap();
    s.agent.reload_and_wait().await;
    let r = v.get("/whoami").await;
    assert_eq!(r.status(), 200);
    assert_eq!((s.portal.logins(), s.portal.refused()), (1, 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_account_login_reaches_a_basic_portal_as_its_administrator_account() {
    let s = Setup::start(LoginKind::Basic, 2, (ADMIN_PW, REMOTE_PW)).await;
    let v = s.visitor(false).await;
    for round in 0..3 {
        let r = v
            .request(reqwest::Method::GET, "/whoami")
            .header("authorization", "Basic Zm9yZ2VkOmZvcmdlZA==")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "round {round}");
        let who: serde_json::Value = r.json().await.unwrap();
        assert_eq!(who["user"], "remote");
        assert_eq!(
            who["authorization"],
            serde_json::Value::Null,
            "forged header stripped"
        );
    }
    // Two requests per portal session: the third renewed it.
    assert_eq!(s.portal.logins(), 2);
    assert!(!holds_portal_cookie(&v));
    // Only the agent's own login carried credentials.
    let seen = s.portal.log.seen.lock().unwrap().clone();
    assert!(seen
        .iter()
        .all(|(path, auth)| auth.is_none() || path == "/auth"));
}

#[tokio::test(flavor = "multi_thread")]
async fn websockets_carry_the_sessions_portal_cookies() {
    use futures_util::StreamExt;
    let s = Setup::start(LoginKind::Form, 100, (ADMIN_PW, REMOTE_PW)).await;
    let mut v = s.visitor(true).await;
    assert_eq!(v.get("/home").await.status(), 200);
    let (mut ws, resp) = v.websocket(&v.origin.clone()).await.unwrap();
    assert!(resp.headers().get("set-cookie").is_none());
    let first = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.into_text().unwrap().as_str(), "hello admin");
}

#[tokio::test(flavor = "multi_thread")]
async fn each_remote_session_has_its_own_portal_session() {
    let s = Setup::start(LoginKind::Form, 100, (ADMIN_PW, REMOTE_PW)).await;
    let mut a = s.visitor(true).await;
    let mut b = s.visitor(false).await;
    let who = |v: &mut Visitor| {
        let r = v.request(reqwest::Method::GET, "/whoami").send();
        async move { r.await.unwrap().json::<serde_json::Value>().await.unwrap() }
    };
    let (wa, wb) = (who(&mut a).await, who(&mut b).await);
    assert_eq!(
        (wa["user"].as_str(), wb["user"].as_str()),
        (Some("admin"), Some("remote"))
    );
    assert_ne!(wa["cookie"], wb["cookie"], "one jar per remote session");
    assert_eq!(s.portal.live_sessions(), 2);
    // Ending one leaves the other's portal session alone.
    assert_eq!(a.get("/logout").await.status(), 200);
    eventually(Duration::from_secs(5), "one portal logout", || {
        (s.portal.logouts() == 1).then_some(())
    })
    .await;
    assert_eq!(who(&mut b).await["user"], "remote");
    assert_eq!(s.portal.live_sessions(), 1);
}

/// The agent binary at `trace`, through logins, a renewal and a refused password: neither the
/// portal passwords (plain, form-encoded or as Basic credentials) nor the portal's session ids
/// appear in its output, status or audit log.
#[tokio::test(flavor = "multi_thread")]
async fn no_portal_secret_reaches_the_logs_at_trace_level() {
    use base64::Engine;
    for kind in [LoginKind::Form, LoginKind::Basic] {
        let server = TestServer::start().await;
        let portal = LoginPortal::start(kind, 2).await;
        let (device, code) = server.add_device(true);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("agent");
        let wrong = "Wr0ng-canary-portal-pw";
        let toml = server
            .agent_toml(&dir)
            .code(&code)
            .portal(&portal.url())
            .extra(&portal.config(&tmp.path().join("secrets"), (ADMIN_PW, wrong)))
            .build();
        let out = tmp.path().join("out");
        let (stdout, stderr) = (
            std::fs::File::create(&out).unwrap(),
            std::fs::File::create(tmp.path().join("err")).unwrap(),
        );
        let agent = AgentProcess::spawn(&dir, &toml, |c| {
            c.env("RUST_LOG", "trace").stdout(stdout).stderr(stderr);
        });
        agent.connected().await;
        let url = server.visit(&device, "alice", true);
        let mut v = Visitor::new(server.public, &device);
        v.open_visit(&url).await;
        assert_eq!(v.get("/__remote/passwordless").await.status(), 303);
        for _ in 0..3 {
            assert_eq!(v.get("/whoami").await.status(), 200, "{kind:?}");
        }
        assert_eq!(portal.logins(), 2, "{kind:?}: a renewal happened");
        let url = server.visit(&device, "bob", false);
        let mut w = Visitor::new(server.public, &device);
        w.open_visit(&url).await;
        assert_eq!(w.login(USER, PASSWORD).await.status(), 303);
        assert_eq!(
            w.get("/whoami").await.status(),
            502,
            "{kind:?}: wrong password"
        );

        let mut secrets = vec![ADMIN_PW.to_string(), wrong.to_string()];
        for (user, pw) in [("admin", ADMIN_PW), ("remote", wrong)] {
            secrets.push(base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}")));
            secrets.push(url::form_urlencoded::byte_serialize(pw.as_bytes()).collect());
        }
        secrets.extend(portal.log.sessions.lock().unwrap().keys().cloned());
        let mut text = std::fs::read_to_string(&out).unwrap();
        text += &std::fs::read_to_string(tmp.path().join("err")).unwrap();
        assert!(text.contains("TRACE"), "{kind:?}: trace logging was not on");
        text += &std::fs::read_to_string(&agent.status_file).unwrap();
        text += &std::fs::read_to_string(dir.join("state").join("audit.log")).unwrap();
        for secret in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "{kind:?}: {secret} in the output"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn in_a_browser_a_passwordless_visit_lands_in_a_form_login_portal_signed_in() {
    let Some(mut b) = crate::support::browser::Browser::start().await else {
        return;
    };
    let s = Setup::start(LoginKind::Form, 100, (ADMIN_PW, REMOTE_PW)).await;
    let home = format!("http://{}.localhost:{}", s.device, s.server.public.port());
    b.go(&s.server.visit(&s.device, "alice", true)).await;
    b.act("document.querySelector('form button').click()").await;
    assert_eq!(b.path().await, "/home");
    assert_eq!(
        b.js("document.getElementById('welcome').textContent").await,
        "Welcome, admin"
    );
    let jar = b.cookies(&home).await;
    assert!(
        !jar.contains_key("PORTALSID") && !jar.contains_key("pre"),
        "the browser holds no portal cookie: {:?}",
        jar.keys()
    );
    b.screenshot("portal-login-01-home").await;
    // The portal's own logout link ends the remote session and the portal's.
    b.go(&format!("{home}/logout")).await;
    assert_eq!(b.title().await, "Logged out");
    eventually(Duration::from_secs(5), "the portal logout", || {
        (s.portal.logouts() == 1).then_some(())
    })
    .await;
    b.go(&format!("{home}/home")).await;
    assert_eq!(b.title().await, "Remote login", "{}", b.text().await);
}

/// A reload that starts a new run (here: another transport) ends the old run's sessions, and
/// with them their portal sessions, instead of leaving both behind.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_run_ends_the_old_runs_sessions_and_their_portal_sessions() {
    let s = Setup::start(LoginKind::Form, 100, (ADMIN_PW, REMOTE_PW)).await;
    let mut v = s.visitor(true).await;
    assert_eq!(v.get("/home").await.status(), 200);
    let path = s.agent.dir.join("agent.toml");
    let toml = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, transport("tcp")(toml)).unwrap();
    s.agent.reload_and_wait().await;
    eventually(Duration::from_secs(5), "the portal logout", || {
        (s.portal.logouts() == 1).then_some(())
    })
    .await;
    assert!(
        s.audit().contains("restarted with new settings"),
        "{}",
        s.audit()
    );
    s.agent.connected().await;
    assert_ne!(
        v.get("/home").await.status(),
        200,
        "the old session is gone"
    );
}
