//! `pbx-remote-agent deactivate`, which package removal runs (catalogue E3): the CM revokes the
//! node's key, so a copy of the credential stops working, and the credential here is deleted;
//! a CM that cannot be told keeps the credential unless `--force`.

use crate::support::*;
use pbx_remote::protocol::Reason;
use pbx_remote::status::State;
use std::path::Path;
use std::time::Duration;

const AGENT: &str = env!("CARGO_BIN_EXE_pbx-remote-agent");

/// Runs `deactivate` on `dir/agent.toml`: exit code, stdout, stderr.
async fn deactivate(dir: &Path, force: bool) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(AGENT);
    cmd.arg("deactivate").arg("-c").arg(dir.join("agent.toml"));
    if force {
        cmd.arg("--force");
    }
    // Bounded: the command's own connect timeouts end it well within this.
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || cmd.output()),
    )
    .await
    .expect("deactivate finishes within 30 s")
    .unwrap()
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

const CREDENTIAL_FILES: [&str; 3] = ["credential.json", "device.key", "assertion.key"];

#[tokio::test(flavor = "multi_thread")]
async fn deactivate_revokes_the_node_on_the_cm_so_a_copied_credential_stops_working() {
    for kind in ["quic", "tcp"] {
        let w = World::start_with_toml(false, transport(kind)).await;
        let dir = w.agent.dir.clone();
        let toml = std::fs::read_to_string(dir.join("agent.toml")).unwrap();
        // A thief's copy of the whole agent directory, taken while it was enrolled.
        let stolen = w.tmp.path().join("stolen");
        copy_dir(&dir.join("state"), &stolen.join("state"));
        w.agent.shutdown().await;

        let (code, out, err) = deactivate(&dir, false).await;
        assert_eq!(code, 0, "{kind}: {out}{err}");
        assert!(
            out.contains(&format!("device {}", w.device)) && out.contains("revoked"),
            "{kind}: {out}"
        );
        for f in CREDENTIAL_FILES {
            assert!(!dir.join("state").join(f).exists(), "{kind}: {f} left");
        }
        // The device stays for the provider, without the node; the device's log says why.
        let d = w
            .server
            .db()
            .device(&w.device)
            .unwrap()
            .expect("device kept");
        assert!(d.nodes.is_empty(), "{kind}: node still registered");
        let log =
            pbx_remote::server::admin::device_show(&w.server.data_dir(), &w.device, false).unwrap();
        assert!(log.contains("uninstalled"), "{kind}: {log}");
        assert_eq!(
            oplog_actions(&w.server, &w.device, "node.deactivated"),
            1,
            "{kind}"
        );

        // The copy is refused as removed, and never registers again.
        let thief = TestAgent::start(
            &stolen,
            &toml.replace(&dir.display().to_string(), &stolen.display().to_string()),
        );
        let s = thief
            .wait(Duration::from_secs(10), |s| s.state == State::Failed)
            .await;
        assert_eq!(s.reason, Some(Reason::DeviceRemoved), "{kind}: {s:?}");
        assert!(w
            .server
            .db()
            .device(&w.device)
            .unwrap()
            .unwrap()
            .nodes
            .is_empty());
        thief.shutdown().await;

        // Run again: nothing left to revoke, and it says so.
        let (code, out, _) = deactivate(&dir, false).await;
        assert_eq!(code, 0);
        assert!(out.contains("not activated"), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn deactivating_a_running_agent_closes_its_tunnel_as_removed() {
    let w = World::start(false, "").await;
    let dir = w.agent.dir.clone();
    let (code, out, err) = deactivate(&dir, false).await;
    assert_eq!(code, 0, "{out}{err}");
    let s = w
        .agent
        .wait(Duration::from_secs(5), |s| s.state == State::Failed)
        .await;
    assert_eq!(s.reason, Some(Reason::DeviceRemoved));
    assert!(
        s.message.as_deref().unwrap_or("").contains("revoked"),
        "{s:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cm_that_cannot_be_told_keeps_the_credential_unless_forced() {
    let w = World::start_with_toml(false, transport("tcp")).await;
    let dir = w.agent.dir.clone();
    w.agent.shutdown().await;
    // The server moved away: nothing listens at the address the config names.
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let toml = std::fs::read_to_string(dir.join("agent.toml")).unwrap();
    let address = format!("address = \"{}\"", w.server.tunnel);
    assert!(toml.contains(&address));
    std::fs::write(
        dir.join("agent.toml"),
        toml.replace(&address, &format!("address = \"{gone}\"")),
    )
    .unwrap();

    let (code, out, err) = deactivate(&dir, false).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("cannot tell") && err.contains("is kept") && err.contains(&gone.to_string()),
        "{err}"
    );
    for f in CREDENTIAL_FILES {
        assert!(
            dir.join("state").join(f).exists(),
            "{f} deleted without --force"
        );
    }
    let (code, _, err) = deactivate(&dir, true).await;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("deleted anyway") && err.contains(&w.device),
        "{err}"
    );
    for f in CREDENTIAL_FILES {
        assert!(
            !dir.join("state").join(f).exists(),
            "{f} left after --force"
        );
    }
    assert_eq!(
        w.server
            .db()
            .device(&w.device)
            .unwrap()
            .unwrap()
            .nodes
            .len(),
        1,
        "the CM was not told"
    );
}

/// The provider sees it: the list row turns Uninstalled in place, and the device page says what
/// happened and what to do.
#[tokio::test(flavor = "multi_thread")]
async fn the_console_shows_an_uninstalled_pbx_in_place() {
    use crate::support::browser::Browser;
    use crate::support::console::*;
    let Some(mut b) = Browser::start().await else {
        return;
    };
    let w = World::start(false, "").await;
    let console = format!("http://{}", w.server.console);
    add_user(
        &w.server,
        "ann@example.com",
        pbx_remote::server::db::Role::Admin,
        &[],
    );
    b.go(&format!("{console}/login")).await;
    b.js(&format!(
        "document.getElementById('email').value = 'ann@example.com';\
         document.getElementById('password').value = {CM_PASSWORD:?};"
    ))
    .await;
    b.submit("/login").await;
    b.go(&format!("{console}/devices")).await;
    let row = format!(
        "document.querySelector('tr[data-id=\"{}\"] .status')",
        w.device
    );
    b.wait_for(
        &format!("['Online', 'Abnormal'].includes({row}?.textContent)"),
        Duration::from_secs(10),
    )
    .await;
    b.js("window.notReloaded = true").await;

    let (code, out, err) = deactivate(&w.agent.dir, false).await;
    assert_eq!(code, 0, "{out}{err}");
    b.wait_for(
        &format!("{row}?.textContent === 'Uninstalled'"),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(b.js("window.notReloaded === true").await, true, "in place");
    b.screenshot("uninstall-01-devices").await;
    b.go(&format!("{console}/devices/{}", w.device)).await;
    let text = b
        .js("document.getElementById('uninstalled')?.textContent ?? ''")
        .await;
    assert!(
        text.as_str()
            .unwrap_or("")
            .contains("new authentication code"),
        "{text}"
    );
    b.screenshot("uninstall-02-device").await;
}
