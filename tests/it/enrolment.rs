//! Enrolment and fleet rules: email activation, device checks, capacity, removal, clock.

use crate::support::*;
use pbx_remote::protocol::Reason;
use pbx_remote::server::db::{Capacity, DeviceChanges, NewDevice};
use pbx_remote::status::State;
use std::time::Duration;

const PROVIDER: &str = "provider@example.com";
const PROVIDER_PW: &str = "Provider-Passw0rd-9";

fn email_toml(
    server: &TestServer,
    portal: &str,
    dir: &std::path::Path,
    email: &str,
    password: &str,
) -> String {
    server.agent_toml(dir).portal(portal).build().replace(
        "method = \"auth_code\"\nauth_code = \"UNUSED\"",
        &format!("method = \"email\"\nemail = \"{email}\"\npassword = \"{password}\""),
    )
}

fn grep_dir(dir: &std::path::Path, needle: &str) -> Vec<std::path::PathBuf> {
    let mut hits = vec![];
    let mut stack = vec![dir.to_path_buf()];
    let mut files = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files += 1;
                let bytes = std::fs::read(&p).unwrap();
                if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    hits.push(p);
                }
            }
        }
    }
    assert!(files > 0, "searched no files in {}", dir.display());
    hits
}

#[tokio::test(flavor = "multi_thread")]
async fn email_activation_creates_the_device_and_forgets_the_password() {
    let server = TestServer::start().await;
    let portal = PortalFixture::start().await;
    pbx_remote::server::admin::account_add(&server.data_dir(), PROVIDER, PROVIDER_PW).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(
        tmp.path(),
        &email_toml(&server, &portal.url(), tmp.path(), PROVIDER, PROVIDER_PW),
    );
    let s = agent.connected().await;
    let device = server
        .db()
        .device(s.device_id.as_deref().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(device.name, "Test SN0001");
    assert_eq!(device.nodes[0].serial.as_deref(), Some("SN0001"));
    // Used once: neither the agent's state nor the server's data holds it.
    assert!(grep_dir(&tmp.path().join("state"), PROVIDER_PW).is_empty());
    assert!(grep_dir(&server.data_dir(), PROVIDER_PW).is_empty());
    // The password may now be removed from the file: the credential carries on.
    let toml = std::fs::read_to_string(tmp.path().join("agent.toml"))
        .unwrap()
        .replace(&format!("password = \"{PROVIDER_PW}\""), "");
    agent.shutdown().await;
    let again = TestAgent::start(tmp.path(), &toml);
    again.connected().await;
}

/// Email activation takes a CM user who may add devices: a viewer's correct password reads as
/// wrong credentials, and an operator scoped to a group gets the new device in that group.
#[tokio::test(flavor = "multi_thread")]
async fn email_activation_needs_an_admin_or_operator_and_keeps_their_scope() {
    use pbx_remote::server::admin;
    use pbx_remote::server::db::{OpFilter, Role, Source};
    let server = TestServer::start().await;
    let portal = PortalFixture::start().await;
    let data = server.data_dir();
    admin::group_add(&data, "east").unwrap();
    admin::user_add(&data, "viewer@example.com", Role::Viewer, &[], PROVIDER_PW).unwrap();
    let east = ["east".to_string()];
    admin::user_add(
        &data,
        "east@example.com",
        Role::Operator,
        &east,
        PROVIDER_PW,
    )
    .unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let viewer = TestAgent::start(
        tmp.path(),
        &email_toml(
            &server,
            &portal.url(),
            tmp.path(),
            "viewer@example.com",
            PROVIDER_PW,
        ),
    );
    let s = viewer
        .wait(Duration::from_secs(10), |s| s.state == State::Failed)
        .await;
    assert_eq!(
        s.reason,
        Some(Reason::BadCredentials),
        "a viewer adds nothing"
    );
    viewer.shutdown().await;

    let tmp = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(
        tmp.path(),
        &email_toml(
            &server,
            &portal.url(),
            tmp.path(),
            "east@example.com",
            PROVIDER_PW,
        ),
    );
    let id = agent.connected().await.device_id.unwrap();
    let device = server.db().device(&id).unwrap().unwrap();
    assert_eq!(device.group.as_deref(), Some("east"));

    // Both attempts are in the Operation Log under the user who made them.
    let db = server.db();
    let me = db.user("east@example.com").unwrap().unwrap();
    let all = OpFilter {
        source: Some(Source::Api),
        limit: 10,
        ..Default::default()
    };
    let log = db.oplog(&me, &all).unwrap();
    assert!(
        log.iter().any(|o| o.actor == "east@example.com"
            && o.action == "device.activate"
            && o.device_id.as_deref() == Some(id.as_str())
            && o.result == "ok"),
        "{log:?}"
    );

    // A shell visit is a claim, recorded as such.
    admin::visit(&data, &id, "alice", false, true).unwrap();
    let log = db
        .oplog(
            &me,
            &OpFilter {
                source: Some(Source::Cli),
                limit: 10,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(
        log.iter()
            .any(|o| o.actor == "cli:alice" && o.action == "visit.create"),
        "{log:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_provider_password_fails_once_and_waits() {
    let server = TestServer::start().await;
    pbx_remote::server::admin::account_add(&server.data_dir(), PROVIDER, PROVIDER_PW).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(
        tmp.path(),
        &(email_toml(
            &server,
            "http://127.0.0.1:9",
            tmp.path(),
            PROVIDER,
            "Wrong-Passw0rd-1",
        ) + METRICS_ON_ANY_PORT),
    );
    let s = agent
        .wait(Duration::from_secs(10), |s| s.state == State::Failed)
        .await;
    assert_eq!(s.reason, Some(Reason::BadCredentials));
    assert!(s.message.unwrap().contains("activation.password"));
    assert_eq!(agent.activation_attempts().await, 1);
    agent.move_past_backoff().await;
    assert_eq!(
        agent.activation_attempts().await,
        1,
        "no automatic retry with the same password"
    );
    assert_eq!(agent.status.get().state, State::Failed);
}

/// The other side of the tests above: a failure worth retrying is retried once the backoff has
/// passed, which the same attempt counter and moved clock show.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_server_is_retried_when_the_backoff_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let closed: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let agent = TestAgent::start(
        tmp.path(),
        &AgentToml::new(closed, &"ab".repeat(32), tmp.path())
            .extra(METRICS_ON_ANY_PORT)
            .build(),
    );
    let mut waiting = None;
    for round in 0..3 {
        // Each failed attempt ends in `reconnecting` with a new retry time: backing off.
        let s = agent
            .wait(Duration::from_secs(10), |s| {
                s.state == State::Reconnecting
                    && s.next_retry_at.is_some()
                    && s.next_retry_at != waiting
            })
            .await;
        waiting = s.next_retry_at;
        let before = agent.activation_attempts().await;
        agent.move_past_backoff().await;
        let after = agent.activation_attempts().await;
        assert!(
            after > before,
            "round {round}: the move made an attempt due ({before} → {after})"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn account_failures_lock_per_email_and_source_only() {
    use base64::Engine;
    let server = TestServer::start().await;
    pbx_remote::server::admin::account_add(&server.data_dir(), PROVIDER, PROVIDER_PW).unwrap();
    let pin = pbx_remote::config::parse_pin(&server.pin).unwrap();
    let client_from = |ip: &str| {
        let tls = pbx_remote::tls::client_config(
            &pbx_remote::tls::ServerTrust::Pin(pin),
            &[b"http/1.1"],
            None,
        )
        .unwrap();
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .local_address(ip.parse::<std::net::IpAddr>().unwrap())
            .build()
            .unwrap()
    };
    let attempt = |c: reqwest::Client, pw: &str| {
        let key = pbx_remote::tls::KeyIdentity::generate(&[]).unwrap();
        let req = pbx_remote::protocol::ActivateRequest {
            protocol_version: pbx_remote::protocol::PROTOCOL_VERSION,
            agent_version: "t".into(),
            proof: pbx_remote::protocol::ActivationProof::Email {
                email: PROVIDER.into(),
                password: pbx_remote::secret::Secret::new(pw),
            },
            device_public_key: base64::engine::general_purpose::STANDARD.encode(key.spki_der()),
            facts: pbx_remote::protocol::DeviceFacts {
                edition: "software".into(),
                firmware: "83.19.0.110".into(),
                model: "m".into(),
                serial: "S1".into(),
                mac: "02:00:00:00:00:01".into(),
                ha_role: None,
            },
        };
        let url = format!(
            "https://{}{}",
            server.tunnel,
            pbx_remote::protocol::ACTIVATE_PATH
        );
        async move {
            let r = c.post(url).json(&req).send().await.unwrap();
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap();
            (status, body)
        }
    };
    let attacker = client_from("127.0.0.1");
    for _ in 0..pbx_remote::server::api::MAX_ACCOUNT_FAILURES {
        let (_, b) = attempt(attacker.clone(), "Guess-Passw0rd-1").await;
        assert_eq!(b["code"], "bad_credentials");
    }
    let (status, b) = attempt(attacker.clone(), PROVIDER_PW).await;
    assert_eq!(status, 429);
    assert_eq!(b["code"], "rate_limited");
    assert!(
        b["message"]
            .as_str()
            .unwrap()
            .contains("try again in 15 minutes"),
        "{b}"
    );
    // An agent on the locked source with the right password shows the server's lockout
    // message and time, and does not try again behind the owner's back (catalogue A2).
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("locked");
    let agent = TestAgent::start(
        &dir,
        &email_toml(&server, "http://127.0.0.1:9", &dir, PROVIDER, PROVIDER_PW),
    );
    let s = agent
        .wait(Duration::from_secs(10), |s| s.state == State::Failed)
        .await;
    assert_eq!(s.reason, Some(Reason::RateLimited));
    let message = s.message.unwrap();
    assert!(message.contains("try again in 15 minutes"), "{message}");
    let status_text = std::fs::read_to_string(dir.join("status.json")).unwrap();
    assert!(!status_text.contains(PROVIDER_PW), "not in the status");
    // Refused for good: no pending activation (its key) is kept, and nothing else either.
    let kept: Vec<_> = std::fs::read_dir(dir.join("state"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(kept.is_empty(), "{kept:?}");
    agent.shutdown().await;
    // The provider's own PBX elsewhere is not locked out by someone knowing the email.
    let (status, b) = attempt(client_from("127.0.0.2"), PROVIDER_PW).await;
    assert_eq!(status, 200, "{b}");
}

#[tokio::test(flavor = "multi_thread")]
async fn serial_and_mac_are_checked_at_activation_and_every_connection() {
    let server = TestServer::start().await;
    let added = server
        .db()
        .add_device(&NewDevice {
            name: "Pinned".into(),
            serial: Some("OTHER-SN".into()),
            mac: Some("02:00:00:00:00:99".into()),
            ..Default::default()
        })
        .unwrap();
    let (device, code) = (added.id, added.code);
    let tmp = tempfile::tempdir().unwrap();
    let toml = server.agent_toml(tmp.path()).code(&code).build();
    let agent = TestAgent::start(tmp.path(), &toml);
    let s = agent
        .wait(Duration::from_secs(10), |s| s.state == State::Failed)
        .await;
    assert_eq!(s.reason, Some(Reason::DeviceMismatch));
    let msg = s.message.unwrap();
    for needle in [
        "OTHER-SN",
        "02:00:00:00:00:99",
        "SN0001",
        "02:00:00:00:00:01",
    ] {
        assert!(msg.contains(needle), "{msg} lacks {needle}");
    }
    agent.shutdown().await;

    // Corrected on the CM: the same (unspent) code works.
    let dir = server.data_dir();
    let fix = DeviceChanges {
        serial: Some("SN0001".into()),
        mac: Some("02-00-00-00-00-01".into()),
        ..Default::default()
    };
    pbx_remote::server::admin::device_set(&dir, &device, &fix).unwrap();
    let agent = TestAgent::start(tmp.path(), &toml);
    agent.connected().await;

    // Changed again while connected: the next connection is refused with the reason.
    let swap = DeviceChanges {
        serial: Some("REPLACED-SN".into()),
        ..Default::default()
    };
    pbx_remote::server::admin::device_set(&dir, &device, &swap).unwrap();
    agent.shutdown().await;
    let agent = TestAgent::start(tmp.path(), &toml);
    let s = agent
        .wait(Duration::from_secs(10), |s| {
            s.reason == Some(Reason::DeviceMismatch)
        })
        .await;
    assert!(s.message.unwrap().contains("REPLACED-SN"));
}

#[tokio::test(flavor = "multi_thread")]
async fn unusable_macs_are_clear_errors() {
    let server = TestServer::start().await;
    let (_, code) = server.add_device(false);
    let tmp = tempfile::tempdir().unwrap();
    for (iface, needle) in [
        ("nosuchif0", "cannot read /sys/class/net/nosuchif0/address"),
        ("lo", "no usable MAC"),
    ] {
        let toml = server
            .agent_toml(&tmp.path().join(iface))
            .code(&code)
            .build()
            .replace(
                "mac = \"02:00:00:00:00:01\"",
                &format!("mac_interface = \"{iface}\""),
            );
        let agent = TestAgent::start(&tmp.path().join(iface), &toml);
        let s = agent
            .wait(Duration::from_secs(10), |s| s.state == State::Failed)
            .await;
        let msg = s.message.unwrap();
        assert!(
            msg.contains("pbx.mac_interface") && msg.contains(needle),
            "{msg}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn capacity_counts_activated_devices() {
    let server = TestServer::start().await;
    pbx_remote::server::admin::capacity_set(&server.data_dir(), "1").unwrap();
    let (_, first) = server.add_device(false);
    let (_, second) = server.add_device(false);
    let tmp = tempfile::tempdir().unwrap();
    let a = TestAgent::start(
        &tmp.path().join("a"),
        &server
            .agent_toml(&tmp.path().join("a"))
            .code(&first)
            .build(),
    );
    a.connected().await;
    let b = TestAgent::start(
        &tmp.path().join("b"),
        &server
            .agent_toml(&tmp.path().join("b"))
            .code(&second)
            .build(),
    );
    let s = b
        .wait(Duration::from_secs(10), |s| s.state == State::Failed)
        .await;
    assert_eq!(s.reason, Some(Reason::CapacityExceeded));
    assert!(s.message.unwrap().contains("1 device slots"));
    let list = pbx_remote::server::admin::device_list(&server.data_dir(), None, false).unwrap();
    assert!(list.contains("slots used 1/1"), "{list}");
    // Adding devices and codes ahead stays allowed.
    server.add_device(false);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_device_forgets_its_credential_and_stays_removed_across_restarts() {
    let w = World::start(false, "").await;
    pbx_remote::server::admin::device_remove(&w.server.data_dir(), &w.device).unwrap();
    w.agent
        .wait(Duration::from_secs(5), |s| {
            s.reason == Some(Reason::DeviceRemoved)
        })
        .await;
    let state = w.agent.dir.join("state");
    assert!(!state.join("credential.json").exists() && !state.join("device.key").exists());
    let toml = std::fs::read_to_string(w.agent.dir.join("agent.toml")).unwrap();
    let dir = w.agent.dir.clone();
    w.agent.shutdown().await;

    let again = TestAgent::start(&dir, &toml);
    let s = again
        .wait(Duration::from_secs(5), |s| s.state == State::Failed)
        .await;
    assert_eq!(
        s.reason,
        Some(Reason::DeviceRemoved),
        "not code_used: {s:?}"
    );
    assert!(s.message.unwrap().contains("new authentication code"));
    again.shutdown().await;

    // A new code re-enrols.
    let (_, code) = w.server.add_device(false);
    let old_code = toml
        .split("auth_code = \"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    let fresh = TestAgent::start(&dir, &toml.replace(&old_code, &code));
    fresh.connected().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clock_without_ntp_reads_clock_unsynced_and_recovers() {
    let server = TestServer::start().await;
    let (_, code) = server.add_device(false);
    let tmp = tempfile::tempdir().unwrap();
    let clock = pbx_remote::agent::clock::Clock::default();
    clock.skew_wall_clock(-20 * 365 * 86_400);
    let agent = TestAgent::start_with_clock(
        tmp.path(),
        &server.agent_toml(tmp.path()).code(&code).build(),
        clock.clone(),
    );
    let s = agent
        .wait(Duration::from_secs(5), |s| {
            s.reason == Some(Reason::ClockUnsynced)
        })
        .await;
    assert_eq!(s.state, State::Reconnecting, "retried, not terminal");
    assert!(s.message.unwrap().contains("NTP"));
    clock.skew_wall_clock(0);
    agent
        .wait(Duration::from_secs(20), |s| s.state == State::Connected)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn both_hot_standby_nodes_enrol_with_one_code_under_one_device() {
    let server = TestServer::start().await;
    pbx_remote::server::admin::capacity_set(&server.data_dir(), "1").unwrap();
    let (device, code) = server.add_device(false);
    let tmp = tempfile::tempdir().unwrap();
    let mut agents = vec![];
    for role in ["primary", "secondary"] {
        let dir = tmp.path().join(role);
        let ha = format!(
            "\n[ha]\nrole = \"{role}\"\nstate_file = \"{}\"\n",
            dir.join("ha-state").display()
        );
        let toml = server.agent_toml(&dir).code(&code).extra(&ha).build();
        let a = TestAgent::start(&dir, &toml);
        a.connected().await;
        agents.push(a);
    }
    let d = server.db().device(&device).unwrap().unwrap();
    let roles: Vec<_> = d.nodes.iter().map(|n| n.role.as_str()).collect();
    assert_eq!(roles, ["primary", "secondary"]);
    assert!(
        d.nodes.iter().all(|n| n.online),
        "neither node displaces the other"
    );
    assert_eq!(
        server.db().capacity().unwrap(),
        Capacity {
            used: 1,
            total: Some(1)
        },
        "a pair holds one slot"
    );
    // The code is spent for anyone else.
    let third = TestAgent::start(
        &tmp.path().join("x"),
        &server.agent_toml(&tmp.path().join("x")).code(&code).build(),
    );
    assert_eq!(
        third
            .wait(Duration::from_secs(10), |s| s.state == State::Failed)
            .await
            .reason,
        Some(Reason::CodeUsed)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn visits_follow_the_active_hot_standby_node() {
    let server = TestServer::start().await;
    let (device, code) = server.add_device(false);
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes = vec![];
    for (role, state) in [("primary", "active"), ("secondary", "standby")] {
        let dir = tmp.path().join(role);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ha-state"), format!("{state}\n")).unwrap();
        let portal = PortalFixture::start().await;
        let ha = format!(
            "\n[ha]\nrole = \"{role}\"\nstate_file = \"{}\"\n",
            dir.join("ha-state").display()
        );
        let agent = TestAgent::start(
            &dir,
            &server
                .agent_toml(&dir)
                .code(&code)
                .portal(&portal.url())
                .extra(&ha)
                .build(),
        );
        let s = agent.connected().await;
        assert_eq!(s.ha_role.as_deref(), Some(role));
        assert_eq!(s.ha_state.map(|h| h.as_str()), Some(state));
        nodes.push((dir, portal, agent));
    }
    let hits = |i: usize| nodes[i].1.hits();
    let url = server.visit(&device, "alice", false);
    let mut v = Visitor::new(server.public, &device);
    v.open_visit(&url).await;
    v.login(USER, PASSWORD).await;
    assert_eq!(v.get("/").await.status(), 200);
    assert_eq!((hits(0), hits(1)), (1, 0), "the active primary serves");
    let shown = pbx_remote::server::admin::device_show(&server.data_dir(), &device, false).unwrap();
    assert!(
        shown.contains("node primary (active)") && shown.contains("node secondary (standby)"),
        "{shown}"
    );

    // Failover: the secondary becomes active; reported within a heartbeat (1 s here).
    std::fs::write(nodes[0].0.join("ha-state"), "standby\n").unwrap();
    std::fs::write(nodes[1].0.join("ha-state"), "active\n").unwrap();
    let t0 = std::time::Instant::now();
    let mut routed = false;
    while t0.elapsed() < Duration::from_secs(5) {
        // Sessions live on a node: after failover the visitor logs in on the new one.
        if v.get("/__remote/session").await.status() == 401 {
            routed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(routed, "visits did not follow the failover");
    v.login(USER, PASSWORD).await;
    assert_eq!(v.get("/").await.status(), 200);
    assert_eq!(hits(1), 1, "the new active node serves");

    // One node down: the pair is flagged.
    let (_, _, agent) = nodes.remove(0);
    agent.shutdown().await;
    let mut warned = false;
    for _ in 0..50 {
        if server
            .db()
            .device(&device)
            .unwrap()
            .unwrap()
            .warning
            .is_some()
        {
            warned = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(warned, "a pair with one reachable node is flagged");
}

#[test]
fn device_show_json_and_groups() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let new = |name: &str, group: Option<&str>| NewDevice {
        name: name.into(),
        group: group.map(str::to_string),
        comment: Some("rack 3".into()),
        allow_passwordless: true,
        ..Default::default()
    };
    let err = pbx_remote::server::admin::device_add(data, &new("Acme HQ", Some("acme")), true)
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("group add acme"),
        "groups are rows, not free text: {err:#}"
    );
    pbx_remote::server::admin::group_add(data, "acme").unwrap();
    let out =
        pbx_remote::server::admin::device_add(data, &new("Acme HQ", Some("acme")), true).unwrap();
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["device_id"]
        .as_str()
        .unwrap()
        .to_string();
    pbx_remote::server::admin::device_add(data, &new("Acme Branch", Some("acme")), true).unwrap();
    pbx_remote::server::admin::device_add(data, &new("Other", None), true).unwrap();
    let show: serde_json::Value =
        serde_json::from_str(&pbx_remote::server::admin::device_show(data, &id, true).unwrap())
            .unwrap();
    for field in [
        "id",
        "name",
        "group",
        "comment",
        "allow_passwordless",
        "allow_provisioning",
        "nodes",
        "online",
        "created_at",
    ] {
        assert!(show.get(field).is_some(), "{field} in {show}");
    }
    assert_eq!(show["group"], "acme");
    assert_eq!(show["comment"], "rack 3");
    let groups: serde_json::Value =
        serde_json::from_str(&pbx_remote::server::admin::device_groups(data, true).unwrap())
            .unwrap();
    assert_eq!(
        groups,
        serde_json::json!([{"group": "", "devices": 1}, {"group": "acme", "devices": 2}])
    );
    let list = pbx_remote::server::admin::device_list(data, Some("acme"), false).unwrap();
    assert!(
        list.contains("Acme HQ") && list.contains("Acme Branch") && !list.contains("Other"),
        "{list}"
    );
}

fn provisioned_device(server: &TestServer) -> String {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("t.xml");
    std::fs::write(&template, "<config><ext>100</ext></config>").unwrap();
    let out = pbx_remote::server::admin::device_add(
        &server.data_dir(),
        &NewDevice {
            name: "Prov PBX".into(),
            allow_provisioning: true,
            template: Some(std::fs::read_to_string(&template).unwrap()),
            serial: Some("SN0001".into()),
            mac: Some("02:00:00:00:00:01".into()),
            ..Default::default()
        },
        true,
    )
    .unwrap();
    serde_json::from_str::<serde_json::Value>(&out)
        .unwrap()
        .to_string()
}

fn task_state(server: &TestServer, device: &str) -> (String, Option<String>) {
    let t = server
        .db()
        .device(device)
        .unwrap()
        .unwrap()
        .provisioning
        .unwrap();
    (t.state.to_string(), t.output)
}

#[tokio::test(flavor = "multi_thread")]
async fn provisioning_templates_are_dropped_once_and_results_reported() {
    use std::os::unix::fs::PermissionsExt;
    let server = TestServer::start().await;
    let added: serde_json::Value = serde_json::from_str(&provisioned_device(&server)).unwrap();
    let (device, code) = (
        added["device_id"].as_str().unwrap().to_string(),
        added["auth_code"].as_str().unwrap().to_string(),
    );
    assert_eq!(task_state(&server, &device).0, "pending");
    let tmp = tempfile::tempdir().unwrap();
    let drop_dir = tmp.path().join("drop");
    let extra = format!("\n[provisioning]\ndrop_dir = \"{}\"\n", drop_dir.display());
    let toml = server
        .agent_toml(tmp.path())
        .code(&code)
        .extra(&extra)
        .build();
    let agent = TestAgent::start(tmp.path(), &toml);
    agent.connected().await;
    let file = drop_dir.join("Provision-Prov_PBX-SN0001.template");
    let mut dropped = false;
    for _ in 0..100 {
        if file.exists() {
            dropped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(dropped, "template not dropped");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "<config><ext>100</ext></config>"
    );
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(task_state(&server, &device).0, "executing");

    // The root unit's part: the real apply script, whose tools print so much non-ASCII that
    // its 64 KiB tail starts inside a character (65537 bytes of "é" pairs after one "x").
    let applied = std::process::Command::new(APPLY_SCRIPT)
        .arg(&drop_dir)
        .env("PBX_BACKUP_CMD", "echo backup ok")
        .env(
            "PBX_APPLY_CMD",
            "printf x; i=0; while [ $i -lt 32768 ]; do printf 'é'; i=$((i+1)); done; echo; echo 'applied 1 extension'; true",
        )
        .status()
        .unwrap();
    assert!(applied.success());
    let log = std::fs::read(drop_dir.join("Provision-Prov_PBX-SN0001.log")).unwrap();
    assert!(
        std::str::from_utf8(&log).is_err(),
        "the fixture must cut a character"
    );
    let mut finished = None;
    for _ in 0..100 {
        let (state, output) = task_state(&server, &device);
        if state == "finished" {
            finished = output;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let finished = finished.expect("the task must finish, not stay executing");
    assert!(
        finished.ends_with("éé\napplied 1 extension"),
        "{:?}",
        &finished[finished.len() - 40..]
    );

    // Never applied twice: a restart does not drop the template again.
    std::fs::remove_file(&file).unwrap();
    agent.shutdown().await;
    let again = TestAgent::start(tmp.path(), &toml);
    again.connected().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!file.exists());
    assert_eq!(task_state(&server, &device).0, "finished");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_the_provisioning_section_nothing_reaches_the_pbx() {
    let server = TestServer::start().await;
    let added: serde_json::Value = serde_json::from_str(&provisioned_device(&server)).unwrap();
    let (device, code) = (
        added["device_id"].as_str().unwrap().to_string(),
        added["auth_code"].as_str().unwrap().to_string(),
    );
    let tmp = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(
        tmp.path(),
        &server.agent_toml(tmp.path()).code(&code).build(),
    );
    agent.connected().await;
    let mut state = String::new();
    for _ in 0..100 {
        state = task_state(&server, &device).0;
        if state == "unsupported" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state, "unsupported");
    assert!(task_state(&server, &device)
        .1
        .unwrap()
        .contains("not enabled"));
}

const APPLY_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/provision-apply");

#[test]
fn the_apply_script_backs_up_applies_and_writes_a_result_once() {
    let dir = tempfile::tempdir().unwrap();
    let drop = dir.path().join("drop");
    std::fs::create_dir(&drop).unwrap();
    std::fs::write(drop.join("t1.template"), "cfg").unwrap();
    let log = dir.path().join("log");
    let run = || {
        std::process::Command::new(APPLY_SCRIPT)
            .arg(&drop)
            .env(
                "PBX_BACKUP_CMD",
                format!("echo backup >> {}", log.display()),
            )
            .env(
                "PBX_APPLY_CMD",
                format!("echo \"apply \\\"x\\\"\" >> {} && cat", log.display()),
            )
            .status()
            .unwrap()
    };
    assert!(run().success());
    assert!(run().success());
    assert_eq!(
        std::fs::read_to_string(drop.join("t1.status")).unwrap(),
        "ok\n"
    );
    assert_eq!(std::fs::read_to_string(drop.join("t1.log")).unwrap(), "cfg");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "backup\napply \"x\"\n",
        "applied exactly once"
    );
}

#[test]
fn the_apply_script_hands_its_files_to_the_templates_owner() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !root_or_skip("running the apply script as the root unit does") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let drop = dir.path().join("drop");
    std::fs::create_dir(&drop).unwrap();
    let template = drop.join("t.template");
    std::fs::write(&template, "cfg").unwrap();
    // The agent's user owns what it drops; 4242 stands for it.
    std::os::unix::fs::chown(&template, Some(4242), Some(4243)).unwrap();
    let status = std::process::Command::new(APPLY_SCRIPT)
        .arg(&drop)
        .env("PBX_BACKUP_CMD", "true")
        .env("PBX_APPLY_CMD", "false")
        .status()
        .unwrap();
    assert!(status.success());
    for name in ["t.status", "t.log"] {
        let m = std::fs::metadata(drop.join(name)).unwrap();
        assert_eq!((m.uid(), m.gid()), (4242, 4243), "{name} owner");
        assert_eq!(m.permissions().mode() & 0o777, 0o600, "{name} mode");
    }
    assert_eq!(
        std::fs::read_to_string(drop.join("t.status")).unwrap(),
        "failed\n"
    );
}

/// Waits (at most 20 s) for the agent process to end and returns how it ended.
async fn ended(agent: &mut AgentProcess) -> std::process::ExitStatus {
    for _ in 0..400 {
        if let Some(status) = agent.child.0.try_wait().unwrap() {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the agent did not crash at its step");
}

/// A5: the agent killed at each step of activation (key kept, server accepted, credential
/// half written) comes back fully activated on the next start, as the same device: the spent
/// code is not refused as used, no second device appears, and the stored key is the enrolled one.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_at_any_step_of_activation_leaves_one_activated_device() {
    use std::os::unix::process::ExitStatusExt;
    let server = TestServer::start().await;
    let portal = PortalFixture::start().await;
    crate::support::console::add_user(
        &server,
        "it@example.com",
        pbx_remote::server::db::Role::Operator,
        &[],
    );
    let steps = [
        ("activation_key_saved", false),
        ("activation_accepted", false),
        ("credential_half_written", false),
        ("activation_accepted", true),
    ];
    for (n, (step, by_email)) in steps.into_iter().enumerate() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("agent");
        let mut toml = server.agent_toml(&dir).portal(&portal.url());
        let mut expected = None;
        if !by_email {
            let (device, code) = server.add_device(false);
            toml = toml.code(&code);
            expected = Some(device);
        }
        let before = server.db().list_devices().unwrap().len();
        let mut text = toml.build().replace("SN0001", &format!("SN-CRASH-{n}"));
        if by_email {
            text = text.replace(
                "method = \"auth_code\"\nauth_code = \"UNUSED\"",
                &format!(
                    "method = \"email\"\nemail = \"it@example.com\"\npassword = \"{}\"",
                    crate::support::console::CM_PASSWORD
                ),
            );
        }
        let mut crashed = AgentProcess::spawn(&dir, &text, |c| {
            c.env("PBXRA_CRASH_AT", step);
        });
        let how = ended(&mut crashed).await;
        assert_eq!(
            how.signal(),
            Some(6),
            "{step}: aborted at the step ({how:?})"
        );
        drop(crashed);

        let agent = AgentProcess::spawn(&dir, &text, |_| {});
        let s = agent
            .wait_status(&format!("{step}: connected after the crash"), |s| {
                s.state == State::Connected || s.state == State::Failed
            })
            .await;
        assert_eq!(s.state, State::Connected, "{step}: {:?}", s.message);
        let device = s.device_id.clone().unwrap();
        if let Some(want) = &expected {
            assert_eq!(&device, want, "{step}");
        }
        let devices = server.db().list_devices().unwrap();
        let added = if by_email { 1 } else { 0 };
        assert_eq!(devices.len(), before + added, "{step}: no second device");
        let nodes = &devices.iter().find(|d| d.id == device).unwrap().nodes;
        assert_eq!(nodes.len(), 1, "{step}: one node");
        assert!(
            !dir.join("state/activation-pending.json").exists(),
            "{step}: the pending activation is let go"
        );
    }
}

/// A3: under `umask 000`, into a state directory someone left 0755 with a 0644 key: a symlink
/// where the credential goes is refused with a clear error naming it (its target untouched);
/// without it, activation tightens the directory to 0700 and writes both files as fresh 0600
/// regular files.
#[tokio::test(flavor = "multi_thread")]
async fn activation_under_umask_000_over_loose_files_and_a_symlink_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let server = TestServer::start().await;
    let portal = PortalFixture::start().await;
    let (_, code) = server.add_device(false);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("agent");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(state.join("device.key"), "not a key").unwrap();
    std::fs::set_permissions(
        state.join("device.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let elsewhere = tmp.path().join("elsewhere.json");
    std::fs::write(&elsewhere, "untouched").unwrap();
    std::os::unix::fs::symlink(&elsewhere, state.join("credential.json")).unwrap();
    let toml = server
        .agent_toml(&dir)
        .code(&code)
        .portal(&portal.url())
        .build();
    std::fs::write(dir.join("agent.toml"), &toml).unwrap();
    // The agent under umask 000, as a careless init script would start it.
    let start = || {
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "umask 000; exec '{}' run -c '{}'",
                env!("CARGO_BIN_EXE_pbx-remote-agent"),
                dir.join("agent.toml").display()
            ))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        ChildGuard(child)
    };
    let status = |want: State| {
        let file = dir.join("status.json");
        move || {
            pbx_remote::status::read(&file)
                .ok()
                .filter(|s| s.state == want)
        }
    };
    let mode = |p: &std::path::Path| std::fs::symlink_metadata(p).unwrap().permissions().mode();

    let refused = start();
    let s = eventually(
        Duration::from_secs(20),
        "stopped on the symlink",
        status(State::Stopped),
    )
    .await;
    let message = s.message.unwrap_or_default();
    assert!(
        message.contains("credential.json") && message.contains("symlinks are refused"),
        "{message}"
    );
    assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "untouched");
    assert_eq!(mode(&state) & 0o777, 0o700, "state directory tightened");
    drop(refused);

    std::fs::remove_file(state.join("credential.json")).unwrap();
    let _agent = start();
    eventually(
        Duration::from_secs(20),
        "connected",
        status(State::Connected),
    )
    .await;
    assert_eq!(mode(&state) & 0o777, 0o700);
    for f in ["device.key", "credential.json"] {
        let meta = std::fs::symlink_metadata(state.join(f)).unwrap();
        assert!(meta.file_type().is_file(), "{f} is a regular file");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{f}");
    }
    assert!(std::fs::read_to_string(state.join("device.key"))
        .unwrap()
        .contains("PRIVATE KEY"));
    assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "untouched");
}
