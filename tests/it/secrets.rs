//! The canary test: the agent binary at `trace` level goes through activation, a reconnect, an
//! account login (and a failed one) and a passwordless login, and none of the planted secrets
//! shows up anywhere an operator or another local user can read.

use crate::support::*;
use pbx_remote::protocol::StreamHeader;
use pbx_remote::secret::Secret;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// How a key file would look if it leaked: PEM body lines, or for DER the whole document and
/// its 32-byte Ed25519 seed in base64 (both alphabets) and hex.
fn key_forms(path: &Path) -> Vec<String> {
    use base64::Engine;
    let bytes = std::fs::read(path).unwrap();
    if let Ok(text) = std::str::from_utf8(&bytes) {
        return text
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 16)
            .map(str::to_string)
            .collect();
    }
    let mut forms = vec![];
    for part in [&bytes[..], &bytes[16..48]] {
        forms.push(base64::engine::general_purpose::STANDARD.encode(part));
        forms.push(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(part));
        forms.push(hex::encode(part));
    }
    forms
}

#[tokio::test(flavor = "multi_thread")]
async fn no_secret_reaches_logs_status_audit_or_cmdline_at_trace_level() {
    let server = TestServer::start().await;
    let portal = PortalFixture::start().await;
    let (device, code) = server.add_device(true);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("agent");
    let stdout = std::fs::File::create(tmp.path().join("stdout")).unwrap();
    let stderr = std::fs::File::create(tmp.path().join("stderr")).unwrap();
    // Activation and the tunnel (the TCP transport) go through a CONNECT proxy whose Basic
    // credentials are planted too.
    let proxy_pw = "Pr0xy-canary-pw";
    let proxy = crate::support::proxy::ConnectProxy::start(Some(&format!("pbx:{proxy_pw}"))).await;
    let toml = transport("tcp")(
        server
            .agent_toml(&dir)
            .code(&code)
            .portal(&portal.url())
            .build(),
    )
    .replacen(
        "[tunnel]\n",
        &format!(
            "[tunnel]\nproxy = \"{}\"\n",
            proxy.url(Some(&format!("pbx:{proxy_pw}")))
        ),
        1,
    );
    let mut agent = AgentProcess::spawn(&dir, &toml, |c| {
        c.env("RUST_LOG", "trace").stdout(stdout).stderr(stderr);
    });
    let status_file = agent.status_file.clone();

    // Activation with the code.
    let first = agent.connected().await;
    assert_eq!(
        proxy.tunnelled(),
        2,
        "activation and the tunnel went through the proxy"
    );
    assert_eq!(first.transport.as_deref(), Some("tcp"));
    let basic = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(format!("pbx:{proxy_pw}"))
    };
    let mut secrets: Vec<(String, String)> = vec![
        ("auth code".into(), code.clone()),
        ("proxy password".into(), proxy_pw.into()),
        ("proxy Basic credentials".into(), basic),
    ];

    // Three reconnects: the server drops the connection each time.
    let mut since = first.since.clone();
    for _ in 0..3 {
        server
            .state
            .hub
            .get(&device)
            .expect("agent connected")
            .conn
            .close(None, "canary reconnect");
        let s = agent
            .wait_status("reconnected", |s| {
                s.state.as_str() == "connected" && s.since != since
            })
            .await;
        since = s.since;
    }

    // An account login, after a failed one.
    let url = server.visit(&device, "alice", false);
    secrets.push(("visit token".into(), visit_token(&url)));
    let mut v = Visitor::new(server.public, &device);
    v.open_visit(&url).await;
    let wrong = "Wr0ng-Canary-Passw0rd";
    assert_eq!(v.login(USER, wrong).await.status(), 401);
    assert_eq!(v.login(USER, PASSWORD).await.status(), 303);
    assert_eq!(v.get("/").await.status(), 200);
    // Credentials a visitor sends the portal itself, as an Authorization header.
    let portal_basic = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode("portal-user:P0rtal-Canary-Pw")
    };
    let r = v
        .request(reqwest::Method::GET, "/headers")
        .header("authorization", format!("Basic {portal_basic}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    secrets.push(("visitor's Authorization header".into(), portal_basic));
    secrets.push(("account password".into(), PASSWORD.into()));
    secrets.push(("wrong password".into(), wrong.into()));
    // The grant cookie of the front and the agent's session cookie (the fixture portal's own
    // test cookie is not ours to protect).
    for (name, value) in v.cookies.iter().filter(|(n, _)| n.starts_with("__")) {
        secrets.push((format!("cookie {name}"), value.clone()));
    }

    // A passwordless login, with a token we minted so we know what to look for.
    let url = server.visit(&device, "bob", true);
    let mut pv = Visitor::new(server.public, &device);
    pv.open_visit(&url).await;
    let grant = pv
        .cookie("__cm_visit")
        .unwrap()
        .split('.')
        .next()
        .unwrap()
        .to_string();
    let now = pbx_remote::protocol::now_ms();
    let token = pbx_remote::token::sign(
        &server.state.keys.signing,
        &pbx_remote::token::Claims {
            dev: device.clone(),
            grant: grant.clone(),
            cm_user: "bob".into(),
            iat_ms: now,
            exp_ms: now + 60_000,
            nonce: "canary-nonce".into(),
        },
    )
    .unwrap();
    let header = StreamHeader {
        cm_user: "bob".into(),
        grant_id: grant,
        client_addr: "127.0.0.1".into(),
        scheme: pbx_remote::protocol::Scheme::Http,
        origin: pv.origin.clone(),
        grant_expires_ms: 0,
        passwordless_token: Some(Secret::new(token.clone())),
    };
    let answer = server
        .inject(
            &device,
            &header,
            b"GET /__remote/passwordless HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await;
    assert!(answer.starts_with("HTTP/1.1 303"), "{answer}");
    let session = answer
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .and_then(|c| c.split(';').next())
        .and_then(|c| c.split_once('='))
        .map(|(_, v)| v.to_string())
        .expect("a session cookie");
    secrets.push(("passwordless token".into(), token));
    secrets.push(("passwordless session cookie".into(), session));
    agent
        .wait_status("two sessions", |s| s.active_sessions.len() == 2)
        .await;

    // Private keys of the device and of the assertion signer.
    for key in ["device.key", "assertion.key"] {
        for line in key_forms(&dir.join("state").join(key)) {
            secrets.push((key.into(), line));
        }
    }
    assert!(secrets.iter().all(|(_, s)| s.len() >= 8), "{secrets:?}");

    // And a logout.
    v.logout().await;
    agent
        .wait_status("one session left", |s| s.active_sessions.len() == 1)
        .await;

    let cmdline = std::fs::read(format!("/proc/{}/cmdline", agent.pid())).unwrap();
    let environ = std::fs::read(format!("/proc/{}/environ", agent.pid())).unwrap();
    let stopped = Instant::now();
    Command::new("kill")
        .args(["-TERM", &agent.pid().to_string()])
        .status()
        .unwrap();
    while agent.child.0.try_wait().unwrap().is_none() {
        assert!(
            stopped.elapsed() < Duration::from_secs(20),
            "agent did not stop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let places = [
        ("stdout", std::fs::read(tmp.path().join("stdout")).unwrap()),
        ("stderr", std::fs::read(tmp.path().join("stderr")).unwrap()),
        ("status.json", std::fs::read(&status_file).unwrap()),
        (
            "audit.log",
            std::fs::read(dir.join("state/audit.log")).unwrap(),
        ),
        ("/proc/PID/cmdline", cmdline),
        ("/proc/PID/environ", environ),
    ];
    let stderr_text = String::from_utf8_lossy(&places[1].1).into_owned();
    assert!(
        stderr_text.lines().count() > 100,
        "trace logging was not on: {} lines",
        stderr_text.lines().count()
    );
    assert!(stderr_text.contains("tunnel connected"));
    let audit = String::from_utf8_lossy(&places[3].1).into_owned();
    assert!(
        audit.contains("login_failed") && audit.contains("passwordless"),
        "{audit}"
    );
    let mut leaks = vec![];
    for (place, bytes) in &places {
        let text = String::from_utf8_lossy(bytes);
        for (what, secret) in &secrets {
            if text.contains(secret.as_str()) {
                let at = text.find(secret.as_str()).unwrap_or(0);
                let mut start = at.saturating_sub(120);
                while !text.is_char_boundary(start) {
                    start -= 1;
                }
                leaks.push(format!("{what} in {place}: …{}…", &text[start..at]));
            }
        }
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
}

/// A4: a panic while activating by email (at the step right after the server accepted, with
/// the password in memory) prints its message and a backtrace, and nowhere the password.
#[tokio::test(flavor = "multi_thread")]
async fn a_panic_during_email_activation_prints_no_secret() {
    use crate::support::console::{add_user, CM_PASSWORD};
    let server = TestServer::start().await;
    add_user(
        &server,
        "canary@example.com",
        pbx_remote::server::db::Role::Operator,
        &[],
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("agent");
    let toml = server.agent_toml(&dir).build().replace(
        "method = \"auth_code\"\nauth_code = \"UNUSED\"",
        &format!(
            "method = \"email\"\nemail = \"canary@example.com\"\npassword = \"{CM_PASSWORD}\""
        ),
    );
    let stderr_path = tmp.path().join("stderr");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let mut agent = AgentProcess::spawn(&dir, &toml, |c| {
        c.env("RUST_LOG", "trace")
            .env("RUST_BACKTRACE", "1")
            .env("PBXRA_PANIC_AT", "activation_accepted")
            .stderr(stderr);
    });
    let text = eventually(Duration::from_secs(20), "the panic printed", || {
        std::fs::read_to_string(&stderr_path)
            .ok()
            .filter(|t| t.contains("test panic at activation_accepted"))
    })
    .await;
    // The whole output once the process is gone (or stopped).
    for _ in 0..100 {
        if agent.child.0.try_wait().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = agent.child.0.kill();
    let text = std::fs::read_to_string(&stderr_path).unwrap_or(text);
    assert!(text.contains("panicked"), "{text}");
    assert!(
        !text.contains(CM_PASSWORD),
        "the email password in the panic output"
    );
    let environ = std::fs::read(format!("/proc/{}/environ", std::process::id())).unwrap();
    assert!(!String::from_utf8_lossy(&environ).contains(CM_PASSWORD));
}

fn visit_token(url: &str) -> String {
    let u = url::Url::parse(url).unwrap();
    u.query_pairs()
        .map(|(_, v)| v.into_owned())
        .chain(u.path_segments().unwrap().map(str::to_string))
        .max_by_key(String::len)
        .unwrap()
}
