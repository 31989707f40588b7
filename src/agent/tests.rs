//! Reload rules in-process.

use super::*;

fn config(edit: impl FnOnce(&str) -> String) -> AgentConfig {
    let text = include_str!("../../config/agent.toml");
    AgentConfig::parse(std::path::Path::new("/etc/agent.toml"), &edit(text)).unwrap()
}

#[test]
fn reloads_keep_the_connection_only_for_what_a_running_tunnel_takes_live() {
    let base = config(|t| t.to_string());
    let keeps = [
        ("auto_logout_minutes = 15", "auto_logout_minutes = 30"),
        ("heartbeat_secs = 30", "heartbeat_secs = 60"),
        ("drain_secs = 10", "drain_secs = 20"),
        ("portal_timeout_secs = 30", "portal_timeout_secs = 5"),
        ("https://127.0.0.1:8088", "https://127.0.0.1:8089"),
        ("super_admin = \"admin\"", "super_admin = \"root\""),
        ("format = \"text\"", "format = \"json\""),
    ];
    for (from, to) in keeps {
        let new = config(|t| t.replacen(from, to, 1));
        assert_ne!(new, base, "{from} → {to} changed nothing");
        assert!(keeps_connection(&base, &new), "{from} → {to}");
    }
    assert!(portal_changed(
        &base,
        &config(|t| t.replacen("portal_timeout_secs = 30", "portal_timeout_secs = 5", 1))
    ));
    assert!(!portal_changed(
        &base,
        &config(|t| t.replacen("drain_secs = 10", "drain_secs = 20", 1))
    ));
    let restarts = [
        (
            "address = \"cm.example.com:8443\"",
            "address = \"cm.example.net:8443\"",
        ),
        (
            "auth_code = \"XXXX-XXXX-XXXX-XXXX\"",
            "auth_code = \"YYYY-YYYY-YYYY-YYYY\"",
        ),
        ("firmware = \"83.19.0.110\"", "firmware = \"83.19.0.120\""),
        ("serial = \"3631A1234567\"", "serial = \"3631A7654321\""),
        ("mac_interface = \"eth0\"", "mac_interface = \"eth1\""),
        (
            "/var/lib/pbx-remote-agent\"",
            "/var/lib/pbx-remote-agent2\"",
        ),
        ("transport = \"auto\"", "transport = \"tcp\""),
        (
            "transport = \"auto\"",
            "transport = \"auto\"\nproxy = \"http://proxy.example:3128\"",
        ),
    ];
    for (from, to) in restarts {
        let new = config(|t| t.replacen(from, to, 1));
        assert_ne!(new, base, "{from} → {to} changed nothing");
        assert!(!keeps_connection(&base, &new), "{from} → {to}");
    }
}

#[test]
fn the_agents_retries_grow_from_half_a_second_to_its_cap_with_full_jitter() {
    // The agent's own schedule (not the backoff module's example values): every failed attempt
    // of a run waits up to 0.5, 1, 2, then 4 s, so a path that returns is retried well inside
    // the 10 s reconnect promise.
    let mut r = supervise::Retry::new(clock::Clock::default());
    let mut ceilings = vec![];
    let mut delays = std::collections::HashSet::new();
    for _ in 0..40 {
        let ceiling = r.backoff.ceiling();
        let d = r.backoff.next_delay();
        assert!(d <= ceiling, "{d:?} over {ceiling:?}");
        ceilings.push(ceiling.as_millis());
        delays.insert(d);
    }
    assert_eq!(ceilings[..6], [500, 1000, 2000, 4000, 4000, 4000]);
    assert!(ceilings.iter().all(|c| *c <= BACKOFF_CAP.as_millis()));
    assert!(delays.len() > 20, "full jitter spreads the waits");
    r.backoff.reset();
    assert_eq!(r.backoff.ceiling(), BACKOFF_BASE);
}
