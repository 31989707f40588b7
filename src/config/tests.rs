//! Config validation: each rule and the error that names its key.

use super::*;

pub(crate) const GOOD: &str = r#"
[server]
enabled = true
address = "cm.example.com:8443"

[activation]
method = "auth_code"
auth_code = "ABCD-EFGH-JKMN-PQRS"

[pbx]
edition = "software"
firmware = "83.19.0.110"
model = "P-Series Software Edition"
serial = "3631A1234567"
mac = "00:11:22:33:44:55"
portal_url = "https://127.0.0.1:8088"
"#;

fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
    AgentConfig::parse(Path::new("/etc/x/agent.toml"), text)
}

fn expect_err(text: &str, needles: &[&str]) {
    let err = parse(text).expect_err("config should be refused").0;
    assert!(err.starts_with("/etc/x/agent.toml"), "{err}");
    for n in needles {
        assert!(err.contains(n), "{err:?} should contain {n:?}");
    }
}

#[test]
fn minimal_config_takes_defaults_for_optional_sections() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.server.address.port, 8443);
    assert_eq!(c.remote_access.auto_logout, Duration::from_secs(900));
    assert!(c.remote_access.account.is_none());
    assert!(!c.remote_access.passwordless);
    assert_eq!(c.tunnel.heartbeat, Duration::from_secs(30));
    assert_eq!(c.paths.status_file, PathBuf::from(DEFAULT_STATUS_FILE));
    assert!(c.ha.is_none() && c.provisioning.is_none() && c.metrics_listen.is_none());
}

#[test]
fn unknown_keys_are_named() {
    expect_err(
        &format!("{GOOD}\n[tunnel]\nheartbeat = 3\n"),
        &["unknown field", "heartbeat"],
    );
}

#[test]
fn bad_server_address() {
    expect_err(
        &GOOD.replace("cm.example.com:8443", "https://cm.example.com/x"),
        &["server.address", "no scheme"],
    );
    expect_err(
        &GOOD.replace("cm.example.com:8443", "cm.example.com:99999"),
        &["server.address", "port"],
    );
    expect_err(
        &GOOD.replace("cm.example.com:8443", "bad_host!:1"),
        &["server.address"],
    );
}

#[test]
fn server_addresses_parse() {
    assert_eq!(parse_server_addr("10.0.0.1").unwrap().port, 443);
    let v6 = parse_server_addr("[::1]:9000").unwrap();
    assert_eq!((v6.host.as_str(), v6.port), ("::1", 9000));
    assert_eq!(v6.authority(), "[::1]:9000");
    assert_eq!(parse_server_addr("fe80::1").unwrap().port, 443);
    assert_eq!(
        parse_server_addr("CM.Example.com").unwrap().host,
        "cm.example.com"
    );
}

#[test]
fn auth_code_method_needs_a_code() {
    expect_err(
        &GOOD.replace("auth_code = \"ABCD-EFGH-JKMN-PQRS\"", ""),
        &["activation.auth_code", "required"],
    );
}

#[test]
fn firmware_below_minimum_names_key_and_minimum() {
    expect_err(
        &GOOD.replace("83.19.0.110", "83.18.9.999"),
        &["pbx.firmware", "83.19.0.110", "minimum"],
    );
    // Numeric, not lexical: 83.100 > 83.19.
    assert!(parse(&GOOD.replace("83.19.0.110", "83.100.0.1")).is_ok());
    let appliance = GOOD
        .replace("\"software\"", "\"appliance\"")
        .replace("83.19.0.110", "37.9.0.1");
    expect_err(&appliance, &["pbx.firmware", "37.19.0.110"]);
}

#[test]
fn auto_logout_range() {
    for bad in ["4", "121", "0", "-1"] {
        expect_err(
            &format!("{GOOD}\n[remote_access]\nauto_logout_minutes = {bad}\n"),
            &["remote_access.auto_logout_minutes", "5..=120"],
        );
    }
    for ok in ["5", "120"] {
        assert!(parse(&format!(
            "{GOOD}\n[remote_access]\nauto_logout_minutes = {ok}\n"
        ))
        .is_ok());
    }
}

#[test]
fn bad_portal_url() {
    for bad in [
        "ftp://127.0.0.1",
        "https://127.0.0.1:8088/admin",
        "not a url",
        "http://u:p@127.0.0.1",
    ] {
        expect_err(
            &GOOD.replace("https://127.0.0.1:8088", bad),
            &["pbx.portal_url"],
        );
    }
}

#[test]
fn server_type_must_be_custom() {
    let t = GOOD.replace("enabled = true", "enabled = true\ntype = \"default\"");
    expect_err(&t, &["server.type", "custom"]);
    let t = GOOD.replace("enabled = true", "enabled = true\ntype = \"other\"");
    expect_err(&t, &["server.type", "custom"]);
}

#[test]
fn pins_accept_case_and_colons() {
    let hex64 = "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08";
    let colons: String = hex64
        .as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":");
    assert_eq!(parse_pin(hex64), parse_pin(&colons.to_lowercase()));
    assert!(parse_pin(hex64).is_some());
    expect_err(
        &GOOD.replace("enabled = true", "enabled = true\npin_sha256 = \"abc\""),
        &["server.pin_sha256", "64 hex"],
    );
}

#[test]
fn macs() {
    expect_err(
        &GOOD.replace("00:11:22:33:44:55", "00:00:00:00:00:00"),
        &["pbx.mac", "not all zero"],
    );
}

#[test]
fn account_rules() {
    let hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODk";
    let with = |user: &str, h: &str| {
        format!("{GOOD}\n[remote_access.account]\nenabled = true\nusername = \"{user}\"\npassword_hash = \"{h}\"\n")
    };
    assert!(parse(&with("provider", hash)).is_ok());
    expect_err(
        &with("Admin", hash),
        &["remote_access.account.username", "super admin"],
    );
    expect_err(
        &with("provider", "plaintext"),
        &["password_hash", "argon2id"],
    );
    let big = hash.replace("m=19456", "m=131072");
    expect_err(&with("provider", &big), &["password_hash", "64 MiB"]);
    let disabled = format!("{GOOD}\n[remote_access.account]\nenabled = false\n");
    assert!(parse(&disabled).unwrap().remote_access.account.is_none());
}

#[test]
fn extension_emails_are_reserved() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("emails");
    std::fs::write(&f, "alice@example.com\nBob@Example.com\n").unwrap();
    let hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODk";
    let text = GOOD.replace(
        "portal_url",
        &format!("extension_emails_file = \"{}\"\nportal_url", f.display()),
    ) + &format!("\n[remote_access.account]\nenabled = true\nusername = \"bob@example.com\"\npassword_hash = \"{hash}\"\n");
    expect_err(&text, &["remote_access.account.username", "extension"]);
}

#[test]
fn relative_paths_are_refused() {
    expect_err(
        &format!("{GOOD}\n[paths]\nstate_dir = \"state\"\n"),
        &["paths.state_dir", "absolute"],
    );
}

#[test]
fn secrets_do_not_leak_through_debug() {
    let c = parse(GOOD).unwrap();
    assert!(!format!("{c:?}").contains("ABCD-EFGH"));
}

#[test]
fn transport_is_auto_unless_set_and_names_its_key() {
    assert_eq!(parse(GOOD).unwrap().tunnel.transport, TransportMode::Auto);
    for (word, mode) in [
        ("auto", TransportMode::Auto),
        ("quic", TransportMode::Quic),
        ("tcp", TransportMode::Tcp),
    ] {
        let c = parse(&format!("{GOOD}\n[tunnel]\ntransport = \"{word}\"\n")).unwrap();
        assert_eq!(c.tunnel.transport, mode);
    }
    expect_err(
        &format!("{GOOD}\n[tunnel]\ntransport = \"udp\"\n"),
        &[
            "tunnel.transport",
            "\"auto\", \"quic\" or \"tcp\"",
            "\"udp\"",
        ],
    );
}

#[test]
fn portal_login_is_checked_key_by_key_and_reads_its_password_files() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("admin.secret");
    std::fs::write(&secret, "s3cret pass\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let section = |body: &str| format!("{GOOD}\n[portal_login]\n{body}");
    let account = format!(
        "\n[portal_login.super_admin]\nusername = \"admin\"\npassword_file = \"{}\"\n",
        secret.display()
    );
    let form = section(&format!(
        "method = \"form\"\nlogin_path = \"/login\"\nlogout_path = \"/logout\"\nextra_fields = {{ remember = \"1\" }}\n{account}"
    ));
    let c = parse(&form).unwrap().portal_login.unwrap();
    assert_eq!(
        c.method,
        LoginMethod::Form {
            username_field: "username".into(),
            password_field: "password".into()
        }
    );
    let admin = c.super_admin.unwrap();
    assert_eq!(
        admin.password.expose(),
        "s3cret pass",
        "one line, newline dropped"
    );
    assert!(c.administrator.is_none());
    assert_eq!(
        c.extra_fields,
        vec![("remember".to_string(), "1".to_string())]
    );
    assert!(!format!("{:?}", parse(&form).unwrap()).contains("s3cret"));

    expect_err(
        &section(&format!(
            "method = \"digest\"\nlogin_path = \"/login\"\n{account}"
        )),
        &["portal_login.method", "\"form\" or \"basic\""],
    );
    expect_err(
        &section(&format!(
            "method = \"form\"\nlogin_path = \"login\"\n{account}"
        )),
        &["portal_login.login_path", "a path on the portal"],
    );
    expect_err(
        &section(&format!(
            "method = \"basic\"\nlogin_path = \"/auth\"\nusername_field = \"u\"\n{account}"
        )),
        &["portal_login.username_field", "only for method = \"form\""],
    );
    expect_err(
        &section("method = \"form\"\nlogin_path = \"/login\"\n"),
        &[
            "portal_login",
            "[portal_login.super_admin] or [portal_login.administrator]",
        ],
    );
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    expect_err(
        &form,
        &[
            "portal_login.super_admin.password_file",
            "admin.secret",
            "mode 0644",
            "0600",
        ],
    );
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&secret, "two\nlines\n").unwrap();
    expect_err(
        &form,
        &["portal_login.super_admin.password_file", "one line"],
    );
    std::fs::remove_file(&secret).unwrap();
    expect_err(
        &form,
        &["portal_login.super_admin.password_file", "cannot read it"],
    );
}
