//! The visit, login, portal and logout flows in headless Chromium: what a browser sends (Origin,
//! Sec-Fetch-Site, cookies under SameSite=Lax and a page's referrer policy) is the browser's
//! decision, and every other test's client only imitates it. Needs `chromium` (see
//! support/browser.rs).

use crate::support::browser::Browser;
use crate::support::*;

fn origin(w: &World) -> String {
    format!("http://{}.localhost:{}", w.device, w.server.public.port())
}

/// Fills the agent's login page with the test account and waits for where it leads.
async fn log_in(b: &mut Browser) {
    b.act(&format!(
        "document.querySelector('[name=username]').value = '{USER}';\
         document.querySelector('[name=password]').value = '{PASSWORD}';\
         document.querySelector('form button').click()"
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_browser_confirms_a_visit_logs_in_posts_to_the_portal_and_logs_out() {
    let Some(mut b) = Browser::start().await else {
        return;
    };
    let w = World::start(true, "").await;
    let home = origin(&w);

    // The visit link: a confirm page whose form the browser posts (under no-referrer).
    b.go(&w.server.visit(&w.device, "alice", false)).await;
    assert_eq!(b.title().await, "Remote visit");
    b.act("document.querySelector('form button').click()").await;
    assert_eq!(b.title().await, "Remote login", "{}", b.text().await);

    // Account login.
    log_in(&mut b).await;
    assert_eq!(b.path().await, "/");
    assert_eq!(b.text().await, "PBX portal home");
    // The portal's own cookie (set for Domain=127.0.0.1, which the agent strips) is kept for
    // the device's host alone.
    let jar = b.cookies(&home).await;
    let portal_sid = jar.get("portal_sid").expect("portal cookie kept");
    assert_eq!(portal_sid["domain"], format!("{}.localhost", w.device));

    // A portal redirect to its own origin lands on the device's, not on the PBX's address.
    b.go(&format!("{home}/redirect")).await;
    assert_eq!(b.js("location.origin").await, home.as_str());
    assert_eq!(b.path().await, "/target");

    // A portal page under Referrer-Policy: no-referrer posts its form (Origin: null).
    b.go(&format!("{home}/form")).await;
    assert_eq!(b.title().await, "Portal form");
    b.submit("/upload").await;
    let saved: serde_json::Value = serde_json::from_str(&b.text().await).unwrap();
    assert_eq!(saved["len"], "field=portal-form".len(), "{saved}");

    // A WebSocket from a portal page.
    let echo = b
        .js(
            "new Promise((ok, fail) => { const ws = new WebSocket(`ws://${location.host}/ws`);\
             ws.onopen = () => ws.send('hello'); ws.onmessage = m => ok(m.data);\
             ws.onerror = () => fail('websocket failed'); })",
        )
        .await;
    assert_eq!(echo, "hello");

    // Another site's form cannot end the session: the Lax cookies stay home, and without them
    // nothing reaches the agent.
    let hits = w.portal.hits();
    b.go(&format!(
        "data:text/html,<form method=post action='{home}/__remote/logout'><button>x</button></form>"
    ))
    .await;
    b.act("document.querySelector('form button').click()").await;
    assert_ne!(b.title().await, "Logged out");
    assert_eq!(w.agent.status.get().active_sessions.len(), 1);
    assert_eq!(w.portal.hits(), hits);

    // Logging out: the link shows a button, the button ends the session.
    b.go(&format!("{home}/__remote/logout")).await;
    assert_eq!(b.title().await, "Log out");
    assert_eq!(w.agent.status.get().active_sessions.len(), 1);
    b.submit("/__remote/logout").await;
    assert_eq!(b.title().await, "Logged out");
    assert!(w.agent.status.get().active_sessions.is_empty());
    b.go(&format!("{home}/")).await;
    assert_eq!(b.title().await, "Remote login");
    assert_eq!(w.portal.hits(), hits);

    // A deep link without a session: log in, and land where the link pointed.
    b.go(&format!("{home}/form?tab=2")).await;
    assert_eq!(b.title().await, "Remote login");
    log_in(&mut b).await;
    assert_eq!(
        b.js("location.pathname + location.search").await,
        "/form?tab=2"
    );
    assert_eq!(b.title().await, "Portal form");
    b.go(&format!("{home}/__remote/logout")).await;
    b.submit("/__remote/logout").await;
    assert_eq!(b.title().await, "Logged out");

    // Passwordless: the confirm page, then straight into the portal as super admin. Neither
    // the visit token nor the confirm page's URL reaches the portal.
    let visit = w.server.visit(&w.device, "bob", true);
    b.go(&visit).await;
    b.act("document.querySelector('form button').click()").await;
    assert_eq!(b.path().await, "/");
    assert_eq!(b.text().await, "PBX portal home");
    let seen = w.portal.log.last_headers.lock().unwrap().clone();
    assert!(
        seen.iter()
            .all(|(k, v)| k != "referer" && !v.contains("__cm")),
        "{seen:?}"
    );
    let sessions = w.agent.status.get().active_sessions;
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].role, "super_admin");
}

#[tokio::test(flavor = "multi_thread")]
async fn over_https_the_browser_keeps_host_prefixed_secure_cookies_and_gets_in() {
    let Some(mut b) = Browser::start().await else {
        return;
    };
    let certs = tempfile::tempdir().unwrap();
    let id =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "*.localhost".into()]).unwrap();
    let (cert, key) = (
        certs.path().join("front.pem"),
        certs.path().join("front.key"),
    );
    std::fs::write(&cert, id.cert.pem()).unwrap();
    std::fs::write(&key, id.key_pair.serialize_pem()).unwrap();
    let server = TestServer::start_with(|o| {
        o.public_url.set_scheme("https").unwrap();
        o.public_tls = Some((cert, key));
    })
    .await;
    let w = World::start_on(server, false, |t| t).await;
    let home = format!("https://{}.localhost:{}", w.device, w.server.public.port());

    let visit = w.server.visit(&w.device, "alice", false);
    assert!(visit.starts_with(&home), "{visit}");
    b.go(&visit).await;
    b.act("document.querySelector('form button').click()").await;
    assert_eq!(b.title().await, "Remote login", "{}", b.text().await);
    log_in(&mut b).await;
    assert_eq!(b.text().await, "PBX portal home");

    // Both cookies as the browser holds them: `__Host-`, Secure, HttpOnly, Lax, host-only, and
    // none of them readable by page script.
    let jar = b.cookies(&home).await;
    for name in ["__Host-__cm_visit", "__Host-__pbxra_sid"] {
        let c = jar
            .get(name)
            .unwrap_or_else(|| panic!("{name} not kept: {jar:?}"));
        assert_eq!(c["secure"], true, "{c}");
        assert_eq!(c["httpOnly"], true, "{c}");
        assert_eq!(c["sameSite"], "Lax", "{c}");
        assert_eq!(c["path"], "/", "{c}");
        assert_eq!(c["domain"], format!("{}.localhost", w.device), "{c}");
    }
    assert_eq!(b.js("document.cookie").await, "");

    b.go(&format!("{home}/__remote/logout")).await;
    b.submit("/__remote/logout").await;
    assert_eq!(b.title().await, "Logged out");
    assert!(!b.cookies(&home).await.contains_key("__Host-__pbxra_sid"));
    assert!(w.agent.status.get().active_sessions.is_empty());
}
