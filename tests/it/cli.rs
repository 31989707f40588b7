//! The binaries as users run them: `check`, `status`, `hash-password`, exit codes.

use std::io::Write;
use std::process::{Command, Stdio};

const AGENT: &str = env!("CARGO_BIN_EXE_pbx-remote-agent");

fn example() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/agent.toml")).unwrap()
}

fn check(text: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(AGENT)
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_shipped_example_is_accepted_and_disabled() {
    let (code, out, err) = check(&example());
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("config OK") && out.contains("remote management: disabled"),
        "{out}"
    );
}

#[test]
fn check_names_file_key_and_expectation() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "[log]\nformat = \"text\"",
            "[log]\nformat = \"text\"\ncolour = true",
            &["unknown field", "colour"],
        ),
        (
            "address = \"cm.example.com:8443\"",
            "address = \"cm.example.com:http\"",
            &["server.address"],
        ),
        (
            "auth_code = \"XXXX-XXXX-XXXX-XXXX\"",
            "",
            &["activation.auth_code", "required"],
        ),
        (
            "firmware = \"83.19.0.110\"",
            "firmware = \"83.19.0.9\"",
            &["pbx.firmware", "83.19.0.110"],
        ),
        (
            "auto_logout_minutes = 15",
            "auto_logout_minutes = 121",
            &["remote_access.auto_logout_minutes", "5..=120"],
        ),
        (
            "portal_url = \"https://127.0.0.1:8088\"",
            "portal_url = \"127.0.0.1:8088\"",
            &["pbx.portal_url"],
        ),
        (
            "type = \"custom\"",
            "type = \"default\"",
            &["server.type", "custom"],
        ),
    ];
    for (from, to, needles) in cases {
        let text = example().replacen(from, to, 1);
        assert_ne!(text, example(), "case {from:?} did not change the file");
        let (code, _, err) = check(&text);
        assert_eq!(code, 64, "{from:?} → {err}");
        assert!(err.contains("agent.toml"), "file named: {err}");
        for n in *needles {
            assert!(err.contains(n), "{err:?} lacks {n:?}");
        }
    }
}

#[test]
fn unreadable_config_exits_64() {
    let out = Command::new(AGENT)
        .args(["check", "-c", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/agent.toml"));
    let out = Command::new(AGENT)
        .args(["run", "-c", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let out = Command::new(AGENT).arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(64), "usage errors are 64 too");
}

#[test]
fn env_var_selects_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.toml");
    std::fs::write(&path, example()).unwrap();
    let out = Command::new(AGENT)
        .arg("check")
        .env("PBX_REMOTE_AGENT_CONFIG", &path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("x.toml"));
}

#[test]
fn status_works_with_a_broken_config() {
    let dir = tempfile::tempdir().unwrap();
    let status_path = dir.path().join("status.json");
    let doc = serde_json::json!({
        "state": "reconnecting", "reason": "server_unreachable", "message": "no route",
        "pid": std::process::id(), "updated_at": "2026-11-23T00:00:00Z", "active_sessions": []
    });
    std::fs::write(&status_path, doc.to_string()).unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "this is = = broken\n[paths]\nstatus_file = \"{}\"\n",
            status_path.display()
        ),
    )
    .unwrap();
    // Broken TOML: falls back to the default path, which does not exist here.
    let out = Command::new(AGENT)
        .args(["status", "--json", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "stopped");

    // Valid TOML but an invalid config: status_file is still honoured.
    std::fs::write(
        &cfg,
        format!(
            "[server]\nenabled = 7\n[paths]\nstatus_file = \"{}\"\n",
            status_path.display()
        ),
    )
    .unwrap();
    let out = Command::new(AGENT)
        .args(["status", "--json", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "reconnecting", "{v}");
    assert_eq!(v["reason"], "server_unreachable");
    let out = Command::new(AGENT)
        .args(["status", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("reconnecting") && text.contains("server_unreachable"),
        "{text}"
    );

    // A dead pid reads as stopped.
    let dead = serde_json::json!({"state": "connected", "pid": u32::MAX - 3, "updated_at": "x"});
    std::fs::write(&status_path, dead.to_string()).unwrap();
    let out = Command::new(AGENT)
        .args(["status", "--json", "-c"])
        .arg(&cfg)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["state"], "stopped");
}

fn hash_password(input: &str) -> (i32, String, String) {
    let mut child = Command::new(AGENT)
        .arg("hash-password")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn hash_password_reads_stdin_and_refuses_weak_passwords() {
    let (code, out, _) = hash_password("Correct-Horse-9\n");
    assert_eq!(code, 0);
    let phc = out.lines().last().unwrap();
    assert!(phc.starts_with("$argon2id$"), "{phc}");
    assert!(
        pbx_remote::password::verify("Correct-Horse-9", phc),
        "one trailing newline stripped"
    );
    assert!(!pbx_remote::password::verify("Correct-Horse-9\n", phc));
    pbx_remote::password::check_password_hash(phc).unwrap();
    assert!(
        !out.contains("Correct-Horse"),
        "the password is never echoed"
    );

    let (code, _, err) = hash_password("weakpass\n");
    assert_eq!(code, 64);
    assert!(err.contains("too weak"));
}

#[test]
fn disabled_config_reports_disabled_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, example_in(dir.path())).unwrap();
    let mut child = Command::new(AGENT)
        .args(["run", "-c"])
        .arg(&cfg)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(dir.path(), &|s| s.state.as_str() == "disabled");
    kill(&child, "TERM");
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let s = pbx_remote::status::read(&dir.path().join("status.json")).unwrap();
    assert_eq!(s.state.as_str(), "stopped");
}

#[test]
fn status_survives_a_closed_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        "[paths]\nstatus_file = \"/nonexistent/status.json\"\n",
    )
    .unwrap();
    let mut child = Command::new(AGENT)
        .args(["status", "--json", "-c"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader went away, like `| grep -q`
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
}

/// The shipped example with its state and status paths under `dir`.
fn example_in(dir: &std::path::Path) -> String {
    example()
        .replace(
            "/var/lib/pbx-remote-agent",
            &dir.join("state").display().to_string(),
        )
        .replace(
            "/run/pbx-remote-agent/status.json",
            &dir.join("status.json").display().to_string(),
        )
}

/// Polls `dir/status.json` (bounded: 5 s) until `f` holds.
fn wait_for(
    dir: &std::path::Path,
    f: &dyn Fn(&pbx_remote::status::Status) -> bool,
) -> pbx_remote::status::Status {
    let status_path = dir.join("status.json");
    for _ in 0..200 {
        if let Ok(s) = pbx_remote::status::read(&status_path) {
            if f(&s) {
                return s;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!(
        "status condition not met; last {:?}",
        pbx_remote::status::read(&status_path).ok()
    );
}

fn kill(child: &std::process::Child, signal: &str) {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
}

/// The agent's stderr from start to a clean stop, run with `config` and `rust_log`.
fn log_of(config: &str, rust_log: Option<&str>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        config.replace("@DIR@", &dir.path().display().to_string()),
    )
    .unwrap();
    let err = dir.path().join("stderr");
    let mut cmd = Command::new(AGENT);
    cmd.args(["run", "-c"])
        .arg(&cfg)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap());
    if let Some(v) = rust_log {
        cmd.env("RUST_LOG", v);
    }
    let mut child = cmd.spawn().unwrap();
    wait_for(dir.path(), &|s| s.state.as_str() == "disabled");
    kill(&child, "TERM");
    assert_eq!(child.wait().unwrap().code(), Some(0));
    std::fs::read_to_string(err).unwrap()
}

/// What the journal gets: stderr without colour codes (it is not a terminal), one JSON object
/// per line with `[log] format = "json"`, and the level `RUST_LOG` asks for.
#[test]
fn logs_are_plain_or_json_on_stderr_and_follow_rust_log() {
    let text = example_in(std::path::Path::new("@DIR@"));
    let json = text.replace("format = \"text\"", "format = \"json\"");
    assert_ne!(json, text);

    let log = log_of(&text, None);
    assert!(log.contains("agent starting"), "info by default: {log}");
    assert!(
        !log.contains('\x1b'),
        "colour codes off a terminal: {log:?}"
    );
    assert!(!log.contains("DEBUG"), "debug is off by default: {log}");

    let log = log_of(&json, None);
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .any(|v| v["level"] == "INFO" && v["fields"]["message"] == "agent starting"),
        "{log}"
    );
    assert!(!log.contains('\x1b'));

    let log = log_of(&text, Some("warn"));
    assert!(!log.contains("agent starting"), "RUST_LOG=warn: {log}");
    let log = log_of(&text, Some("debug"));
    assert!(log.contains("DEBUG"), "RUST_LOG=debug: {log}");
}

#[test]
fn sighup_reloads_and_refuses_a_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let text = example_in(dir.path());
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, &text).unwrap();
    let mut child = Command::new(AGENT)
        .args(["run", "-c"])
        .arg(&cfg)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let wait_for = |f: &dyn Fn(&pbx_remote::status::Status) -> bool| wait_for(dir.path(), f);
    wait_for(&|s| s.state.as_str() == "disabled");
    std::fs::write(
        &cfg,
        text.replace("auto_logout_minutes = 15", "auto_logout_minutes = 1"),
    )
    .unwrap();
    kill(&child, "HUP");
    let s = wait_for(&|s| s.config_error.is_some());
    assert!(s.config_error.unwrap().contains("auto_logout_minutes"));
    assert_eq!(
        s.state.as_str(),
        "disabled",
        "still running on the old config"
    );
    kill(&child, "TERM");
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
