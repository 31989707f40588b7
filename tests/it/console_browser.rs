//! The provider console in headless Chromium, as a provider uses it: first sign-in and 2FA
//! enrolment, a sign-in with a fresh code, Add → code → an agent activates → its row turns
//! Online without a reload, Passwordless Login into the portal as super admin with the user's
//! email in the assertion, Remove → the agent reads `device_removed`, a viewer's view, and a
//! Hot Standby pair that swaps on failover. Each page is saved under
//! `target/console-screenshots/` for a reviewer to look at.

use crate::support::browser::Browser;
use crate::support::console::*;
use crate::support::*;
use pbx_remote::protocol::Reason;
use pbx_remote::server::db::Role;
use std::time::Duration;

const LIVE: Duration = Duration::from_secs(10);

/// Fills the fields (`#id` → value) and clicks the submit button of the form posting to `action`.
async fn fill_and_submit(b: &mut Browser, fields: &[(&str, &str)], action: &str) {
    let mut js = String::new();
    for (id, value) in fields {
        js.push_str(&format!(
            "document.getElementById({id:?}).value = {value:?};"
        ));
    }
    b.js(&js).await;
    b.submit(action).await;
}

async fn sign_in(b: &mut Browser, console: &str, email: &str) {
    b.go(&format!("{console}/login")).await;
    fill_and_submit(b, &[("email", email), ("password", CM_PASSWORD)], "/login").await;
}

async fn sign_out(b: &mut Browser) {
    b.submit("/logout").await;
    assert_eq!(b.path().await, "/login");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_provider_enrols_2fa_adds_a_device_sees_it_online_visits_it_and_removes_it() {
    let Some(mut b) = Browser::start().await else {
        return;
    };
    let server = TestServer::start().await;
    let console = format!("http://{}", server.console);
    add_user(&server, "ann@example.com", Role::Admin, &[]);

    // First sign-in, then two-factor enrolment from Account.
    b.go(&format!("{console}/devices")).await;
    assert_eq!(b.path().await, "/login", "pages need a session");
    b.screenshot("01-sign-in").await;
    fill_and_submit(
        &mut b,
        &[("email", "ann@example.com"), ("password", CM_PASSWORD)],
        "/login",
    )
    .await;
    assert_eq!(b.path().await, "/devices");
    b.go(&format!("{console}/account")).await;
    b.screenshot("02-account").await;
    b.act("document.querySelector('a[href=\"/account/2fa\"]').click()")
        .await;
    let secret = b
        .js("document.getElementById('totp-secret').textContent")
        .await;
    let secret = secret.as_str().unwrap().to_string();
    let qr_loaded = b
        .js("document.querySelector('img.qr').complete && document.querySelector('img.qr').naturalWidth > 0")
        .await;
    assert_eq!(
        qr_loaded, true,
        "the QR code image loads from the console itself"
    );
    b.screenshot("03-2fa-enrol").await;
    let step = totp_now();
    fill_and_submit(
        &mut b,
        &[("code", &totp_code(&secret, step))],
        "/account/2fa",
    )
    .await;
    let codes = b
        .js("document.querySelectorAll('#recovery-codes li').length")
        .await;
    assert_eq!(codes, 10);
    b.screenshot("04-2fa-recovery-codes").await;

    // A later sign-in asks for a fresh code.
    b.go(&format!("{console}/devices")).await;
    sign_out(&mut b).await;
    sign_in(&mut b, &console, "ann@example.com").await;
    assert_eq!(b.path().await, "/login/code");
    let autocomplete = b.js("document.getElementById('code').autocomplete").await;
    assert_eq!(autocomplete, "one-time-code");
    b.screenshot("05-2fa-code").await;
    fill_and_submit(
        &mut b,
        &[("code", &totp_code(&secret, step + 1))],
        "/login/code",
    )
    .await;
    assert_eq!(b.path().await, "/devices", "{}", b.text().await);

    // Add → the code, shown once.
    b.act("document.querySelector('a[href=\"/devices/add\"]').click()")
        .await;
    b.screenshot("06-add").await;
    b.js("document.getElementById('allow_passwordless').checked = true")
        .await;
    fill_and_submit(
        &mut b,
        &[("name", "Branch PBX"), ("comment", "2nd floor")],
        "/devices/add",
    )
    .await;
    let code = b
        .js("document.getElementById('auth-code').textContent")
        .await;
    let code = code.as_str().unwrap().to_string();
    b.screenshot("07-add-code").await;
    let device = server.db().list_devices().unwrap()[0].id.clone();

    // The list, left open: the agent activates with the code, and the row turns Online.
    b.go(&format!("{console}/devices")).await;
    let row = format!("document.querySelector('tr[data-id=\"{device}\"] .status')");
    assert_eq!(b.js(&format!("{row}.textContent")).await, "Never connected");
    b.js("window.notReloaded = true").await;
    let portal = PortalFixture::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(
        tmp.path(),
        &server
            .agent_toml(tmp.path())
            .code(&code)
            .portal(&portal.url())
            .build(),
    );
    agent.connected().await;
    // Connected: Online, or Abnormal when this machine's CPU is over 85 % (telemetry is real).
    b.wait_for(
        &format!("['Online', 'Abnormal'].includes({row}?.textContent)"),
        LIVE,
    )
    .await;
    assert_eq!(
        b.js("window.notReloaded === true").await,
        true,
        "updated in place"
    );
    b.screenshot("08-devices-online").await;
    b.go(&format!("{console}/devices/{device}")).await;
    b.screenshot("09-device").await;

    // Passwordless Login opens a new tab on the device's front (kept in this tab here, so the
    // test can follow it), lands in the portal as super admin, and the assertion names Ann.
    b.go(&format!("{console}/devices")).await;
    let form = format!("document.querySelector('form[action=\"/devices/{device}/visit\"] input[name=passwordless]').form");
    assert_eq!(b.js(&format!("{form}.target")).await, "_blank");
    b.act(&format!(
        "{form}.removeAttribute('target'); {form}.querySelector('button').click()"
    ))
    .await;
    assert_eq!(b.title().await, "Remote visit", "{}", b.text().await);
    b.act("document.querySelector('form button').click()").await;
    assert_eq!(b.text().await, "PBX portal home");
    let sessions = agent.status.get().active_sessions;
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].role, "super_admin");
    let seen = portal.log.last_headers.lock().unwrap().clone();
    let jwt = seen
        .iter()
        .find(|(k, _)| k == "x-pbx-remote-assertion")
        .map(|(_, v)| v.clone())
        .expect("the portal got an assertion");
    let pem = std::fs::read_to_string(tmp.path().join("assertion.pub")).unwrap();
    let claims = pbx_remote::agent::assertion::verify(&pem, &jwt).unwrap();
    assert_eq!(claims["cm_user"], "ann@example.com");
    assert_eq!(claims["role"], "super_admin");

    // Remove, confirmed on a page of its own: the agent is told.
    b.go(&format!("{console}/devices/{device}/remove")).await;
    b.screenshot("10-remove-confirm").await;
    b.submit(&format!("/devices/{device}/remove")).await;
    assert_eq!(b.path().await, "/devices");
    let s = agent
        .wait(LIVE, |s| s.reason == Some(Reason::DeviceRemoved))
        .await;
    assert_eq!(s.reason, Some(Reason::DeviceRemoved));
    agent.shutdown().await;

    // A viewer: neither Add nor the visit buttons, and the API refuses their change.
    server.add_device(false);
    add_user(&server, "viewer@example.com", Role::Viewer, &[]);
    sign_out(&mut b).await;
    sign_in(&mut b, &console, "viewer@example.com").await;
    assert_eq!(b.path().await, "/devices");
    assert_eq!(
        b.js("document.querySelectorAll('tbody tr[data-id]').length")
            .await,
        1
    );
    assert_eq!(
        b.js("!!document.querySelector('a[href=\"/devices/add\"]')")
            .await,
        false
    );
    assert_eq!(
        b.js("!!document.querySelector('form[action$=\"/visit\"]')")
            .await,
        false
    );
    b.screenshot("11-devices-viewer").await;
    let status = b
        .js("fetch('/api/v1/devices', {method: 'POST', headers: {'content-type': 'application/json', \
             'x-csrf-token': document.querySelector('[name=csrf]').value}, \
             body: JSON.stringify({name: 'nope'})}).then(r => r.status)")
        .await;
    assert_eq!(status, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hot_standby_pair_shows_active_and_standby_and_swaps_on_failover() {
    let Some(mut b) = Browser::start().await else {
        return;
    };
    let server = TestServer::start().await;
    let console = format!("http://{}", server.console);
    add_user(&server, "ann@example.com", Role::Operator, &[]);
    let (device, code) = server.add_device(false);
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes = vec![];
    for (role, state) in [("primary", "active"), ("secondary", "standby")] {
        let dir = tmp.path().join(role);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ha-state"), format!("{state}\n")).unwrap();
        let ha = format!(
            "\n[ha]\nrole = \"{role}\"\nstate_file = \"{}\"\n",
            dir.join("ha-state").display()
        );
        let portal = PortalFixture::start().await;
        let toml = server
            .agent_toml(&dir)
            .code(&code)
            .portal(&portal.url())
            .extra(&ha)
            .build();
        let agent = TestAgent::start(&dir, &toml);
        agent.connected().await;
        nodes.push((dir, agent, portal));
    }
    sign_in(&mut b, &console, "ann@example.com").await;
    let cell = format!("document.querySelector('tr[data-id=\"{device}\"] .status-cell').innerText");
    b.wait_for(
        &format!("{cell}.includes('primary: Active, Online') && {cell}.includes('secondary: Standby, Online')"),
        LIVE,
    )
    .await;
    b.screenshot("12-devices-hot-standby").await;
    b.js("window.notReloaded = true").await;
    std::fs::write(nodes[0].0.join("ha-state"), "standby\n").unwrap();
    std::fs::write(nodes[1].0.join("ha-state"), "active\n").unwrap();
    b.wait_for(
        &format!("{cell}.includes('primary: Standby') && {cell}.includes('secondary: Active')"),
        LIVE,
    )
    .await;
    assert_eq!(b.js("window.notReloaded === true").await, true);
    b.screenshot("13-devices-failover").await;

    // The active node's portal goes down: Abnormal, with why; then the standby disconnects.
    nodes[1].2.stop();
    let status = format!("document.querySelector('tr[data-id=\"{device}\"] .status')");
    // (Abnormal may come from this machine's CPU too: wait for the portal's reason.)
    b.wait_for(
        &format!(
            "{status}.textContent === 'Abnormal' && {cell}.includes('web portal unreachable')"
        ),
        LIVE,
    )
    .await;
    let (_, standby, _) = nodes.remove(0);
    standby.shutdown().await;
    b.wait_for(
        &format!("{cell}.includes('primary: Standby, Offline')"),
        LIVE,
    )
    .await;
    assert_eq!(b.js("window.notReloaded === true").await, true);
    b.screenshot("14-devices-abnormal-and-offline").await;
    for (_, a, _) in nodes {
        a.shutdown().await;
    }
}

/// Visible form controls without a bound label (by name), on the current page.
const UNLABELLED: &str =
    "[...document.querySelectorAll('input:not([type=hidden]), select, textarea')]\
    .filter(e => !e.labels || e.labels.length === 0).map(e => e.name || e.id)";

#[tokio::test(flavor = "multi_thread")]
async fn every_page_labels_its_fields_works_from_the_keyboard_and_is_saved_for_review() {
    let Some(mut b) = Browser::start().await else {
        return;
    };
    let server = TestServer::start().await;
    let console = format!("http://{}", server.console);
    add_user(&server, "ann@example.com", Role::Admin, &[]);
    pbx_remote::server::admin::group_add(&server.data_dir(), "east").unwrap();
    add_user(&server, "op@example.com", Role::Operator, &["east"]);
    server
        .db()
        .save_template("office", "[extensions]\n100 = \"Reception\"\n")
        .unwrap();
    let (device, _) = server.add_device(true);

    // Sign-in from the keyboard: type, Tab, type, Enter.
    b.go(&format!("{console}/login")).await;
    assert_eq!(b.js(UNLABELLED).await, serde_json::json!([]));
    b.js("document.getElementById('email').focus()").await;
    b.call(
        "Input.insertText",
        serde_json::json!({"text": "ann@example.com"}),
    )
    .await;
    b.key("Tab", 9).await;
    b.call("Input.insertText", serde_json::json!({"text": CM_PASSWORD}))
        .await;
    b.key_and_wait("Enter", 13).await;
    assert_eq!(b.path().await, "/devices", "{}", b.text().await);

    for (path, shot) in [
        ("/devices".to_string(), "20-devices"),
        ("/devices/add".to_string(), "21-add"),
        (format!("/devices/{device}"), "22-device-never-connected"),
        (format!("/devices/{device}/remove"), "23-remove"),
        ("/groups".to_string(), "24-groups"),
        ("/templates".to_string(), "25-templates"),
        ("/templates/office".to_string(), "26-template"),
        ("/users".to_string(), "27-users"),
        ("/users/op@example.com".to_string(), "28-user"),
        ("/subscription".to_string(), "29-subscription"),
        ("/log".to_string(), "30-operation-log"),
        ("/account".to_string(), "31-account"),
    ] {
        b.go(&format!("{console}{path}")).await;
        let status = b.js("document.title").await;
        assert!(
            !status.as_str().unwrap().starts_with("Not found"),
            "{path}: {status}"
        );
        assert_eq!(
            b.js(UNLABELLED).await,
            serde_json::json!([]),
            "{path}: fields without a label"
        );
        b.screenshot(shot).await;
    }

    // A form submitted from the keyboard: a group added with Enter in its name field.
    b.go(&format!("{console}/groups")).await;
    b.js("document.getElementById('group-name').focus()").await;
    b.call("Input.insertText", serde_json::json!({"text": "west"}))
        .await;
    b.key_and_wait("Enter", 13).await;
    assert!(b.text().await.contains("west"));
    assert_eq!(server.db().groups().unwrap().len(), 2);
}
