//! The gate's rules in-process: rule changes, the session cap, cookies, `next`, redirects.

use super::*;
use std::path::Path;

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
        scheme: Scheme::Https,
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
    let audit = std::fs::read_to_string(&gate.audit.path).unwrap();
    assert!(audit.contains("session limit"), "{audit}");
}

#[test]
fn https_visitors_get_host_prefixed_secure_cookies() {
    let h = header("a");
    let c = session_cookie(&h, "id");
    assert!(
        c.starts_with("__Host-__pbxra_sid=id;") && c.contains("; Secure") && c.contains("Path=/")
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

#[test]
fn a_session_stays_with_the_network_it_was_opened_from() {
    for (a, b, same) in [
        ("127.0.0.1", "127.0.0.1", true),
        ("203.0.113.7", "203.0.113.200", true),
        ("203.0.113.7", "203.0.114.7", false),
        ("::ffff:203.0.113.7", "203.0.113.9", true),
        ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9", true),
        ("2001:db8:1:2::1", "2001:db8:1:3::1", false),
        ("203.0.113.7", "2001:db8::1", false),
        ("", "", true),
        ("not an address", "203.0.113.7", false),
    ] {
        assert_eq!(same_network(a, b), same, "{a} / {b}");
    }
}
