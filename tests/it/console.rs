//! The provider console over HTTP: sign-in, lockout, TOTP and recovery codes, CSRF and origin
//! rules, roles and scope (404 outside it) in pages and API, API tokens, and a visit from the
//! console carrying the user's email to the agent.

use crate::support::console::*;
use crate::support::*;
use pbx_remote::server::db::{OpEntry, OpFilter, Role, Source};
use reqwest::Method;
use std::time::Duration;

/// The Operation Log as the CM user `email` sees it, through `filter`.
fn oplog_of(server: &TestServer, email: &str, filter: OpFilter) -> Vec<OpEntry> {
    let db = server.db();
    let viewer = db.user(email).unwrap().unwrap();
    db.oplog(&viewer, &filter).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn sign_in_sets_a_strict_session_and_every_change_needs_origin_and_csrf() {
    let server = TestServer::start().await;
    add_user(&server, "ann@example.com", Role::Admin, &[]);
    let mut cm = Cm::new(&server);

    let (status, headers, _) = cm.get("/devices").await;
    assert_eq!(status, 303);
    assert_eq!(headers["location"], "/login?next=%2Fdevices");

    let (_, headers, page) = cm.get("/login").await;
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["referrer-policy"], "same-origin");
    assert!(!page.contains("<script>"), "no inline script");

    let r = cm
        .post(
            "/login",
            &[("email", "ann@example.com"), ("password", "wrong-password")],
        )
        .await;
    assert_eq!(r.status(), 401);
    let wrong = r.text().await.unwrap();
    let r = cm
        .post(
            "/login",
            &[("email", "nobody@example.com"), ("password", CM_PASSWORD)],
        )
        .await;
    let unknown = r.text().await.unwrap();
    assert!(wrong.contains("Sign-in failed") && unknown.contains("Sign-in failed"));

    // A sign-in form posted from another site is refused before any password is checked.
    let r = cm
        .raw(Method::POST, "/login")
        .header("origin", "http://evil.example")
        .form(&[("email", "ann@example.com"), ("password", CM_PASSWORD)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    let r = cm
        .post(
            "/login",
            &[("email", "Ann@Example.com"), ("password", CM_PASSWORD)],
        )
        .await;
    assert_eq!(r.status(), 303);
    assert_eq!(location(&r), "/devices");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.contains("HttpOnly")
            && cookie.contains("SameSite=Strict")
            && cookie.contains("Path=/"),
        "{cookie}"
    );
    let (status, _, page) = cm.get("/devices").await;
    assert_eq!(status, 200);
    assert!(page.contains("My Devices") && page.contains("ann@example.com"));

    // State changes: the session's token and the console's origin, or 403.
    let csrf = cm.csrf.clone().unwrap();
    let session = cm.session.clone().unwrap();
    let post = |origin: Option<&str>, site: Option<&str>, token: &str| {
        let mut b = cm
            .raw(Method::POST, "/account/tokens")
            .header("cookie", format!("cm_session={session}"));
        if let Some(o) = origin {
            b = b.header("origin", o);
        }
        if let Some(s) = site {
            b = b.header("sec-fetch-site", s);
        }
        b.form(&[("name", "t"), ("csrf", token)]).send()
    };
    assert_eq!(
        post(Some(&cm.base), None, "").await.unwrap().status(),
        403,
        "no token"
    );
    assert_eq!(
        post(Some(&cm.base), None, "stale").await.unwrap().status(),
        403,
        "wrong token"
    );
    assert_eq!(
        post(Some("http://evil.example"), None, &csrf)
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        post(None, Some("same-site"), &csrf).await.unwrap().status(),
        403
    );
    assert_eq!(
        post(Some(&cm.base), Some("same-origin"), &csrf)
            .await
            .unwrap()
            .status(),
        200
    );

    // Sign out is a POST; the session is gone after it.
    let r = cm.post("/logout", &[]).await;
    assert_eq!(r.status(), 303);
    let r = cm
        .raw(Method::GET, "/devices")
        .header("cookie", format!("cm_session={session}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "the old session no longer opens pages");
}

#[tokio::test(flavor = "multi_thread")]
async fn five_failures_lock_that_address_only_with_the_same_generic_error() {
    let server = TestServer::start().await;
    add_user(&server, "ann@example.com", Role::Operator, &[]);
    let mut cm = Cm::new(&server);
    for _ in 0..5 {
        let r = cm
            .post(
                "/login",
                &[
                    ("email", "ann@example.com"),
                    ("password", "not-the-password"),
                ],
            )
            .await;
        assert_eq!(r.status(), 401);
    }
    let r = cm
        .post(
            "/login",
            &[("email", "ann@example.com"), ("password", CM_PASSWORD)],
        )
        .await;
    assert_eq!(
        r.status(),
        401,
        "locked: even the right password is refused"
    );
    assert!(
        r.text().await.unwrap().contains("Sign-in failed"),
        "one generic error"
    );

    // The lock is per (email, address): the user signs in from elsewhere.
    let mut other = Cm::from(&server, std::net::IpAddr::from([127, 0, 0, 2]));
    assert_eq!(
        other.sign_in("ann@example.com", CM_PASSWORD).await,
        "/devices"
    );
    let log = oplog_of(
        &server,
        "ann@example.com",
        OpFilter {
            action: Some("user.login".into()),
            limit: 20,
            ..Default::default()
        },
    );
    assert_eq!(
        log.iter().filter(|o| o.result == "refused").count(),
        6,
        "{log:?}"
    );
    assert_eq!(log[0].client.as_deref(), Some("127.0.0.2"));
}

/// A console behind a reverse proxy (`--trusted-proxy`) counts the browser's address from
/// `X-Forwarded-For`: one guesser's failures lock that browser out, not every user of the
/// proxy, and the Operation Log names the browser. From a peer that is not trusted the header
/// is ignored, so it cannot be used to step around a lock.
#[tokio::test(flavor = "multi_thread")]
async fn behind_a_trusted_proxy_the_lockout_counts_the_browser_not_the_proxy() {
    let trusted = TestServer::start_with(|o| {
        o.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    add_user(&trusted, "ann@example.com", Role::Operator, &[]);
    let guesser = std::net::IpAddr::from([203, 0, 113, 7]);
    let ann = std::net::IpAddr::from([198, 51, 100, 20]);
    let fail_five_times = async |cm: &mut Cm| {
        for _ in 0..5 {
            let wrong = [("email", "ann@example.com"), ("password", "not-it")];
            assert_eq!(cm.post("/login", &wrong).await.status(), 401);
        }
    };
    let mut cm = Cm::forwarded_for(&trusted, guesser);
    fail_five_times(&mut cm).await;
    let right = [("email", "ann@example.com"), ("password", CM_PASSWORD)];
    assert_eq!(cm.post("/login", &right).await.status(), 401, "locked");
    let mut browser = Cm::forwarded_for(&trusted, ann);
    assert_eq!(
        browser.sign_in("ann@example.com", CM_PASSWORD).await,
        "/devices"
    );
    let log = oplog_of(
        &trusted,
        "ann@example.com",
        OpFilter {
            action: Some("user.login".into()),
            limit: 20,
            ..Default::default()
        },
    );
    assert_eq!(log[0].client.as_deref(), Some("198.51.100.20"), "{log:?}");
    assert_eq!(log[1].client.as_deref(), Some("203.0.113.7"), "{log:?}");

    // Without --trusted-proxy the header names nobody: the lock stays on the peer.
    let plain = TestServer::start().await;
    add_user(&plain, "ann@example.com", Role::Operator, &[]);
    let mut cm = Cm::forwarded_for(&plain, guesser);
    fail_five_times(&mut cm).await;
    let mut spoofing = Cm::forwarded_for(&plain, ann);
    let r = spoofing.post("/login", &right).await;
    assert_eq!(
        r.status(),
        401,
        "a forwarded-for header steps around no lock"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn totp_enrolment_then_each_code_and_recovery_code_works_once() {
    let server = TestServer::start().await;
    add_user(&server, "ann@example.com", Role::Admin, &[]);
    let mut cm = Cm::new(&server);
    cm.sign_in("ann@example.com", CM_PASSWORD).await;

    let (_, _, page) = cm.get("/account/2fa").await;
    let secret = text_of(&page, "totp-secret").expect("the base32 secret is shown");
    let (status, headers, svg) = cm.get("/account/2fa/qr.svg").await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "image/svg+xml");
    assert!(svg.contains("<svg"), "a QR code drawn by the server");
    let r = cm.post("/account/2fa", &[("code", "000000")]).await;
    assert_eq!(r.status(), 422, "a wrong code does not turn it on");
    let step = totp_now();
    let r = cm
        .post("/account/2fa", &[("code", &totp_code(&secret, step))])
        .await;
    assert_eq!(r.status(), 200);
    let page = r.text().await.unwrap();
    let codes: Vec<String> = page
        .split("<li><code>")
        .skip(1)
        .map(|s| s.split('<').next().unwrap().to_string())
        .collect();
    assert_eq!(codes.len(), 10, "ten recovery codes");
    let user = server.db().user("ann@example.com").unwrap().unwrap();
    assert!(user.totp_enabled && user.recovery_codes_left == 10);

    cm.post("/logout", &[]).await;
    assert_eq!(
        cm.sign_in("ann@example.com", CM_PASSWORD).await,
        "/login/code"
    );
    let (status, _, _) = cm.get("/devices").await;
    assert_eq!(status, 303, "no pages before the second factor");
    let (_, _, page) = cm.get("/login/code").await;
    assert!(page.contains("autocomplete=\"one-time-code\""));
    let r = cm
        .post("/login/code", &[("code", &totp_code(&secret, step))])
        .await;
    assert_eq!(r.status(), 401, "the enrolment's code is spent");
    let r = cm
        .post("/login/code", &[("code", &totp_code(&secret, step + 1))])
        .await;
    assert_eq!(r.status(), 303, "{}", r.text().await.unwrap());
    assert_eq!(location(&r), "/devices");
    assert_eq!(cm.get("/devices").await.0, 200);

    // The same code a second time, in another sign-in: refused.
    cm.post("/logout", &[]).await;
    cm.sign_in("ann@example.com", CM_PASSWORD).await;
    let r = cm
        .post("/login/code", &[("code", &totp_code(&secret, step + 1))])
        .await;
    assert_eq!(r.status(), 401, "each code once");
    let r = cm
        .post("/login/code", &[("code", &codes[3].to_uppercase())])
        .await;
    assert_eq!(r.status(), 303, "a recovery code instead");
    cm.post("/logout", &[]).await;
    cm.sign_in("ann@example.com", CM_PASSWORD).await;
    let r = cm.post("/login/code", &[("code", &codes[3])]).await;
    assert_eq!(r.status(), 401, "each recovery code once");
    assert_eq!(
        server
            .db()
            .user("ann@example.com")
            .unwrap()
            .unwrap()
            .recovery_codes_left,
        9
    );

    // Lost both: the admin's shell resets it, and the password alone signs in again.
    pbx_remote::server::admin::user_reset_2fa(&server.data_dir(), "ann@example.com").unwrap();
    let mut fresh = Cm::from(&server, std::net::IpAddr::from([127, 0, 0, 3]));
    assert_eq!(
        fresh.sign_in("ann@example.com", CM_PASSWORD).await,
        "/devices"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn mandatory_2fa_sends_a_user_to_enrolment_before_anything_else() {
    let server = TestServer::start().await;
    add_user(&server, "op@example.com", Role::Operator, &[]);
    server
        .db()
        .set_setting(pbx_remote::server::console::REQUIRE_2FA, "on")
        .unwrap();
    let mut cm = Cm::new(&server);
    assert_eq!(
        cm.sign_in("op@example.com", CM_PASSWORD).await,
        "/account/2fa"
    );
    let (status, headers, _) = cm.get("/devices").await;
    assert_eq!(
        (status.as_u16(), &headers["location"]),
        (303, &"/account/2fa".parse().unwrap())
    );
    let (status, _, _) = cm.get("/api/v1/devices").await;
    assert_eq!(status, 401, "nor the API");
    let (_, _, page) = cm.get("/account/2fa").await;
    let secret = text_of(&page, "totp-secret").unwrap();
    let r = cm
        .post("/account/2fa", &[("code", &totp_code(&secret, totp_now()))])
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(cm.get("/devices").await.0, 200, "enrolled: signed in");
}

#[tokio::test(flavor = "multi_thread")]
async fn roles_and_groups_scope_pages_and_api_alike() {
    let server = TestServer::start().await;
    let data = server.data_dir();
    pbx_remote::server::admin::group_add(&data, "east").unwrap();
    pbx_remote::server::admin::group_add(&data, "west").unwrap();
    let add = |name: &str, group: &str| {
        server
            .db()
            .add_device(&pbx_remote::server::db::NewDevice {
                name: name.into(),
                group: Some(group.into()),
                ..Default::default()
            })
            .unwrap()
            .id
    };
    let (east, west) = (add("East PBX", "east"), add("West PBX", "west"));
    add_user(&server, "op@example.com", Role::Operator, &["east"]);
    add_user(&server, "view@example.com", Role::Viewer, &[]);

    let mut op = Cm::new(&server);
    op.sign_in("op@example.com", CM_PASSWORD).await;
    let (_, _, page) = op.get("/devices").await;
    assert!(
        page.contains("East PBX") && !page.contains("West PBX"),
        "{page}"
    );
    assert_eq!(
        op.get(&format!("/devices/{west}")).await.0,
        404,
        "outside the scope: 404"
    );
    assert_eq!(op.get(&format!("/devices/{east}")).await.0, 200);
    assert_eq!(op.get(&format!("/api/v1/devices/{west}")).await.0, 404);
    let r = op.post(&format!("/devices/{west}/remove"), &[]).await;
    assert_eq!(r.status(), 404, "nor removable");
    assert!(server.db().device(&west).unwrap().is_some());
    let r = op
        .post("/devices/add", &[("name", "Sneaky"), ("group", "west")])
        .await;
    assert_eq!(r.status(), 422, "an operator adds only into their groups");
    let r = op
        .post("/devices/add", &[("name", "New East"), ("group", "east")])
        .await;
    assert_eq!(r.status(), 200);
    let page = r.text().await.unwrap();
    let code = text_of(&page, "auth-code").expect("the code is shown once");
    assert_eq!(code.len(), pbx_remote::server::db::new_auth_code().len());

    // A viewer: sees every device, changes none, opens none.
    let mut view = Cm::new(&server);
    view.sign_in("view@example.com", CM_PASSWORD).await;
    let (_, _, page) = view.get("/devices").await;
    assert!(page.contains("West PBX") && page.contains("East PBX"));
    assert!(!page.contains("href=\"/devices/add\""), "no Add");
    assert!(!page.contains("Remote Visit"), "no visit buttons");
    let r = view.post(&format!("/devices/{east}/visit"), &[]).await;
    assert_eq!(r.status(), 403);

    // API tokens: shown once, stored hashed, scoped by role, revocable, last use shown.
    let r = view.post("/account/tokens", &[("name", "reporting")]).await;
    let page = r.text().await.unwrap();
    let token = text_of(&page, "api-token").unwrap();
    assert!(token.starts_with(pbx_remote::server::db::TOKEN_PREFIX));
    let script = Cm::new(&server);
    let api = |method: Method, path: &str| {
        script
            .raw(method, &format!("/api/v1{path}"))
            .header("authorization", format!("Bearer {token}"))
    };
    let list: serde_json::Value = api(Method::GET, "/devices")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["total"], 3);
    let r = api(Method::POST, "/devices")
        .json(&serde_json::json!({"name": "By API"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a viewer's token cannot add");
    let r = api(Method::DELETE, &format!("/devices/{east}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let (_, _, page) = view.get("/account").await;
    assert!(
        page.contains("reporting") && !page.contains(&token),
        "never shown again"
    );
    let id = server.db().tokens("view@example.com").unwrap()[0]
        .id
        .clone();
    assert!(server.db().tokens("view@example.com").unwrap()[0]
        .last_used_at
        .is_some());
    view.post(&format!("/account/tokens/{id}/revoke"), &[])
        .await;
    let r = api(Method::GET, "/devices").send().await.unwrap();
    assert_eq!(r.status(), 401, "revoked");

    // An operator's token adds in scope, and the page that lists their devices shows it.
    let r = op.post("/account/tokens", &[("name", "ci")]).await;
    let token = text_of(&r.text().await.unwrap(), "api-token").unwrap();
    let r = op
        .raw(Method::POST, "/api/v1/devices")
        .header("authorization", format!("Bearer {token}"))
        .json(&serde_json::json!({"name": "API East", "group": "east"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let added: serde_json::Value = r.json().await.unwrap();
    assert!(added["auth_code"].is_string());
    let log = oplog_of(
        &server,
        "op@example.com",
        OpFilter {
            action: Some("device.add".into()),
            limit: 10,
            ..Default::default()
        },
    );
    let sources: Vec<_> = log
        .iter()
        .map(|o| (o.actor.as_str(), o.source.as_str()))
        .collect();
    assert_eq!(
        sources,
        [("op@example.com", "api"), ("op@example.com", "console")]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_console_visit_carries_the_signed_in_users_email_to_the_agent() {
    let w = World::start(true, "").await;
    add_user(&w.server, "ops@example.com", Role::Operator, &[]);
    let mut cm = Cm::new(&w.server);
    cm.sign_in("ops@example.com", CM_PASSWORD).await;
    let (_, _, page) = cm.get("/devices").await;
    assert!(page.contains("Passwordless Login") && page.contains("target=\"_blank\""));
    let r = cm
        .post(
            &format!("/devices/{}/visit", w.device),
            &[("passwordless", "on")],
        )
        .await;
    assert_eq!(r.status(), 303);
    let url = location(&r);
    assert!(url.contains(&format!("//{}.localhost:", w.device)), "{url}");

    let mut v = Visitor::new(w.server.public, &w.device);
    v.open_visit(&url).await;
    assert_eq!(v.get("/__remote/passwordless").await.status(), 303);
    let h: serde_json::Value = v.get("/headers").await.json().await.unwrap();
    assert_eq!(h["x-pbx-remote-role"], serde_json::json!(["super_admin"]));
    let pem = std::fs::read_to_string(w.agent.dir.join("assertion.pub")).unwrap();
    let jwt = h["x-pbx-remote-assertion"][0].as_str().unwrap();
    let claims = pbx_remote::agent::assertion::verify(&pem, jwt).unwrap();
    assert_eq!(claims["cm_user"], "ops@example.com");
    let who = &w.agent.status.get().active_sessions[0].who;
    assert!(who.contains("ops@example.com"), "{who}");

    let log = oplog_of(
        &w.server,
        "ops@example.com",
        OpFilter {
            source: Some(Source::Console),
            limit: 10,
            ..Default::default()
        },
    );
    assert!(
        log.iter().any(|o| o.action == "visit.passwordless"
            && o.actor == "ops@example.com"
            && o.device_id.as_deref() == Some(w.device.as_str())),
        "{log:?}"
    );
    let opened = oplog_of(
        &w.server,
        "ops@example.com",
        OpFilter {
            source: Some(Source::Front),
            limit: 10,
            ..Default::default()
        },
    );
    assert_eq!(opened.len(), 1, "{opened:?}");
    assert_eq!(
        (
            opened[0].action.as_str(),
            opened[0].actor.as_str(),
            opened[0].client.as_deref()
        ),
        ("visit.open", "ops@example.com", Some("127.0.0.1"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_console_on_the_fronts_host_or_under_it_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let opts = |console: &str| pbx_remote::server::ServerOptions {
        data_dir: dir.path().to_path_buf(),
        public_url: url::Url::parse("http://pbx.example.com:8080").unwrap(),
        public_tls: None,
        trusted_proxies: vec![],
        tls: Default::default(),
        console: Some(pbx_remote::server::console::ConsoleOptions {
            url: url::Url::parse(console).unwrap(),
            tls: None,
        }),
        smtp: None,
        data_threads: 1,
    };
    for bad in ["http://pbx.example.com:9000", "http://cm.pbx.example.com"] {
        let err = pbx_remote::server::ServerState::open(opts(bad))
            .err()
            .unwrap();
        assert!(
            format!("{err:#}").contains("public front's host"),
            "{err:#}"
        );
    }
    assert!(pbx_remote::server::ServerState::open(opts("http://cm.example.com")).is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_reports_its_switches_and_the_console_says_which_side_is_off() {
    // Heartbeats a minute apart: a reload's report cannot ride on the next regular one.
    let w = World::start_with_toml(true, |t| {
        t.replace("heartbeat_secs = 1", "heartbeat_secs = 60")
    })
    .await;
    add_user(&w.server, "ops@example.com", Role::Operator, &[]);
    let switches = || {
        w.server.db().device(&w.device).unwrap().unwrap().nodes[0]
            .switches
            .map(|s| (s.account_login, s.passwordless))
    };
    assert_eq!(switches(), Some((true, true)), "reported at connect");
    let mut cm = Cm::new(&w.server);
    cm.sign_in("ops@example.com", CM_PASSWORD).await;
    let (_, _, page) = cm.get("/devices").await;
    assert!(
        page.contains(">Passwordless Login</button>"),
        "offered: both sides on"
    );

    // The PBX turns its passwordless switch off: a reload, reported at once.
    let path = w.agent.dir.join("agent.toml");
    let toml = std::fs::read_to_string(&path).unwrap();
    let off = toml.replace(
        "[remote_access.passwordless]\nenabled = true",
        "[remote_access.passwordless]\nenabled = false",
    );
    assert_ne!(toml, off);
    std::fs::write(&path, off).unwrap();
    w.agent.reload_and_wait().await;
    eventually(Duration::from_secs(5), "the switch reported", || {
        (switches() == Some((true, false))).then_some(())
    })
    .await;
    let (_, _, page) = cm.get("/devices").await;
    assert!(
        !page.contains(">Passwordless Login</button>"),
        "not offered"
    );
    assert!(
        page.contains("Passwordless Login is off on the PBX"),
        "{page}"
    );
    let r = cm
        .post(
            &format!("/devices/{}/visit", w.device),
            &[("passwordless", "on")],
        )
        .await;
    assert_eq!(r.status(), 409, "nor minted by a hand-made post");

    // And the CM's flag too: the console names both sides.
    pbx_remote::server::admin::device_set(
        &w.server.data_dir(),
        &w.device,
        &pbx_remote::server::db::DeviceChanges {
            allow_passwordless: Some(false),
            ..Default::default()
        },
    )
    .unwrap();
    let (_, _, page) = cm.get("/devices").await;
    assert!(
        page.contains("Passwordless Login is off in CM and on the PBX"),
        "{page}"
    );
    assert!(
        page.contains(">Remote Visit</button>"),
        "account login is still on"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn over_https_the_session_cookie_is_host_prefixed_and_secure() {
    let certs = tempfile::tempdir().unwrap();
    let id = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let (cert, key) = (certs.path().join("cm.pem"), certs.path().join("cm.key"));
    std::fs::write(&cert, id.cert.pem()).unwrap();
    std::fs::write(&key, id.key_pair.serialize_pem()).unwrap();
    let server = TestServer::start_with(|o| {
        let c = o.console.as_mut().unwrap();
        c.url.set_scheme("https").unwrap();
        c.tls = Some((cert, key));
    })
    .await;
    add_user(&server, "ann@example.com", Role::Admin, &[]);
    let base = format!("https://{}", server.console);
    pbx_remote::tls::install_default_provider();
    let client = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = client
        .post(format!("{base}/login"))
        .header("origin", &base)
        .form(&[("email", "ann@example.com"), ("password", CM_PASSWORD)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.starts_with("__Host-cm_session="), "{cookie}");
    assert!(cookie.contains("; Secure") && cookie.contains("Path=/") && !cookie.contains("Domain"));
    let value = cookie.split(';').next().unwrap().to_string();
    let r = client
        .get(format!("{base}/devices"))
        .header("cookie", &value)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "signed in over https");
    // A plain-http name for the same session means nothing there.
    let plain = value.replace("__Host-cm_session", "cm_session");
    let r = client
        .get(format!("{base}/devices"))
        .header("cookie", plain)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
}

/// Each sign-in runs argon2 (19 MiB, tens of milliseconds). A flood of sign-ins with made-up
/// emails from one machine, which no per-account lockout slows, takes that machine's few places
/// in the password line; the rest of it is told at once that the server is busy, nothing else
/// fails, and a user elsewhere signs in while the flood goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_sign_ins_from_one_machine_is_answered_busy_and_others_sign_in() {
    use pbx_remote::server::passwords::{PER_SOURCE, RUNNING, WAITING};
    let server = TestServer::start().await;
    add_user(&server, "ann@example.com", Role::Operator, &[]);
    let flood = 6 * (RUNNING + WAITING);
    let (answers_tx, mut answers) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..flood {
        let (mut cm, answers_tx) = (Cm::new(&server), answers_tx.clone());
        tokio::spawn(async move {
            let email = format!("nobody{i}@example.com");
            let r = cm
                .post("/login", &[("email", &email), ("password", "not-it")])
                .await;
            let _ = answers_tx.send((r.status().as_u16(), r.text().await.unwrap()));
        });
    }
    drop(answers_tx);
    let (mut busy, mut refused, mut ann_signed_in) = (0, 0, false);
    while let Some(answer) = tokio::time::timeout(Duration::from_secs(60), answers.recv())
        .await
        .expect("the flood is answered")
    {
        match answer {
            (503, page) => {
                assert!(page.contains("The server is busy"), "{page}");
                busy += 1;
            }
            (401, _) => refused += 1,
            (status, page) => panic!("a flooding sign-in got {status}: {page}"),
        }
        // Once the flood is being turned away, Ann signs in from another machine.
        if busy == 1 && !ann_signed_in {
            let mut ann = Cm::from(&server, std::net::IpAddr::from([127, 0, 0, 2]));
            assert_eq!(
                ann.sign_in("ann@example.com", CM_PASSWORD).await,
                "/devices"
            );
            ann_signed_in = true;
        }
    }
    assert!(
        busy > 0,
        "no sign-in of {flood} was told the server is busy"
    );
    assert!(
        refused >= PER_SOURCE,
        "only {refused} sign-ins were checked"
    );
    assert!(ann_signed_in);
}

/// One password tried on many accounts meets each (email, source) pair once, so the pair lock
/// never trips; the source's budget does: past it that address signs in nowhere, even with the
/// right password, while the same user signs in from elsewhere.
#[tokio::test(flavor = "multi_thread")]
async fn one_address_failing_on_many_emails_is_locked_for_every_email() {
    use pbx_remote::server::db::MAX_SOURCE_FAILURES;
    let server = TestServer::start().await;
    add_user(&server, "ann@example.com", Role::Operator, &[]);
    let sprayer = std::net::IpAddr::from([127, 0, 0, 3]);
    let mut cm = Cm::from(&server, sprayer);
    for i in 0..MAX_SOURCE_FAILURES {
        let email = format!("staff{i}@example.com");
        let r = cm
            .post("/login", &[("email", &email), ("password", "Summer-2026!")])
            .await;
        assert_eq!(r.status(), 401, "{email}");
    }
    let right = [("email", "ann@example.com"), ("password", CM_PASSWORD)];
    let r = cm.post("/login", &right).await;
    assert_eq!(r.status(), 401, "the address has spent its budget");
    assert!(r.text().await.unwrap().contains("Sign-in failed"));
    let mut ann = Cm::from(&server, std::net::IpAddr::from([127, 0, 0, 4]));
    assert_eq!(
        ann.sign_in("ann@example.com", CM_PASSWORD).await,
        "/devices"
    );
}
