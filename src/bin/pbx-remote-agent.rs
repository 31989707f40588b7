//! `pbx-remote-agent`: parses the CLI, sets up logging, loads the config and calls the library.

use pbx_remote::cli::{Command, Parsed};
use pbx_remote::config::{self, AgentConfig};
use pbx_remote::status::{self, StatusHandle};
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Writes to stdout; a closed pipe (`| head`, `| grep -q`) is not an error worth a panic.
fn out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().write_all(text.as_bytes());
}

/// Exit status for an invalid config or usage (the unit's RestartPreventExitStatus).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let command = match pbx_remote::cli::parse(std::env::args_os().skip(1)) {
        Ok(Parsed::Run(c)) => c,
        Ok(Parsed::Help(text)) => {
            out(&text);
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            out(concat!(
                "pbx-remote-agent ",
                env!("CARGO_PKG_VERSION"),
                "\n"
            ));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    pbx_remote::tls::install_default_provider();
    match command {
        Command::Run { config } => run(&config::resolve_path(config)),
        Command::Check { config } => check(&config::resolve_path(config)),
        Command::Status { config, json } => show_status(&config::resolve_path(config), json),
        Command::HashPassword => hash_password(),
        Command::Deactivate { config, force } => deactivate(&config::resolve_path(config), force),
    }
}

/// What `run` and `deactivate` start from: a private umask, the config (or exit 64), logging,
/// and the runtime.
fn start(path: &Path) -> Result<(AgentConfig, tokio::runtime::Runtime), ExitCode> {
    // Everything the agent creates is private unless it says otherwise (status: 0644).
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let config = AgentConfig::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_CONFIG)
    })?;
    pbx_remote::logging::init(config.log_format == config::LogFormat::Json);
    // One thread runs the agent (argon2 checks still go to tokio's blocking pool). The agent is
    // I/O-bound and a PBX's cores belong to telephony; quinn drives a connection from one task
    // anyway, so a second worker bought no throughput, while tokio's multi-thread scheduler
    // costs cross-thread wake-ups on every request and, through its poll-time statistics
    // (`f64::powf`), links libm and its idle RSS (figures: bench/README.md).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })?;
    Ok((config, runtime))
}

fn run(path: &Path) -> ExitCode {
    let (config, runtime) = match start(path) {
        Ok(started) => started,
        Err(code) => return code,
    };
    let result = runtime.block_on(async {
        let root = tokio_util::sync::CancellationToken::new();
        let reloads = pbx_remote::signals::install(root.clone())?;
        let status = StatusHandle::new(config.paths.status_file.clone(), pbx_remote::agent::initial_status(&config));
        tracing::info!(config = %path.display(), version = env!("CARGO_PKG_VERSION"), "agent starting");
        let clock = pbx_remote::agent::clock::Clock::default();
        pbx_remote::systemd::spawn(status.clone(), root.clone());
        pbx_remote::systemd::ready();
        pbx_remote::agent::run_with(config, status, root, clock, reloads).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "agent failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn deactivate(path: &Path, force: bool) -> ExitCode {
    use pbx_remote::agent::uninstall::Deactivated;
    let (config, runtime) = match start(path) {
        Ok(started) => started,
        Err(code) => return code,
    };
    let server = config.server.address.authority();
    let state = config.paths.state_dir.display();
    match runtime.block_on(pbx_remote::agent::uninstall::deactivate(&config, force)) {
        Ok(Deactivated::NotActivated) => {
            out(&format!(
                "not activated ({state} holds no credential): nothing to revoke\n"
            ));
            ExitCode::SUCCESS
        }
        Ok(Deactivated::Revoked {
            device_id,
            nodes_left,
        }) => {
            let peer = if nodes_left > 0 {
                "; its Hot Standby peer stays registered"
            } else {
                ""
            };
            out(&format!(
                "device {device_id}: this node's key is revoked on {server}{peer}; the credential in {state} is deleted\n"
            ));
            ExitCode::SUCCESS
        }
        Ok(Deactivated::Unknown { device_id, message }) => {
            out(&format!(
                "device {device_id}: {server} no longer knows this node ({message}); nothing to revoke there; the credential in {state} is deleted\n"
            ));
            ExitCode::SUCCESS
        }
        Ok(Deactivated::Unreadable { message }) => {
            eprintln!("error: the credential cannot be read ({message}), so the CM cannot be told; it is deleted anyway (--force); remove the device in the CM's console");
            ExitCode::FAILURE
        }
        Ok(Deactivated::NotTold {
            device_id,
            reason,
            message,
            forced,
        }) => {
            let kept = if forced {
                format!("the credential in {state} is deleted anyway (--force); remove device {device_id} in the CM's console")
            } else {
                format!("the credential in {state} is kept; run this again, or with --force to delete it anyway")
            };
            eprintln!("error: cannot tell {server} that device {device_id} is leaving ({reason}: {message}); {kept}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &Path) -> ExitCode {
    match AgentConfig::load(path) {
        Ok(c) => {
            out(&summary(&c));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn summary(c: &AgentConfig) -> String {
    let trust = match (&c.server.pin_sha256, &c.server.ca_file) {
        (Some(p), _) => format!("pinned key {}", hex::encode(p)),
        (None, Some(ca)) => format!("CA file {}", ca.display()),
        (None, None) => "system CA roots".to_string(),
    };
    let activation = match &c.activation {
        config::Activation::AuthCode(_) => "authentication code".to_string(),
        config::Activation::Email { email, password } => format!(
            "provider account {email}{}",
            if password.is_some() {
                ""
            } else {
                " (no password: only an existing credential can be used)"
            }
        ),
    };
    let account = match &c.remote_access.account {
        Some(a) => format!("on (user {}, role administrator)", a.username),
        None => "off".to_string(),
    };
    let portal_login = match &c.portal_login {
        None => "off (the portal reads the identity headers)".to_string(),
        Some(p) => {
            let method = match p.method {
                config::LoginMethod::Form { .. } => "form",
                config::LoginMethod::Basic => "basic",
            };
            let who = |a: &Option<config::PortalAccount>| {
                a.as_ref().map_or("-".to_string(), |a| a.username.clone())
            };
            format!(
                "{method} at {} (super_admin as {}, administrator as {})",
                p.login_path,
                who(&p.super_admin),
                who(&p.administrator)
            )
        }
    };
    format!(
        "config OK: {}\n\
         remote management: {}\n\
         server:            {} ({trust})\n\
         activation:        {activation}\n\
         pbx:               {} {} firmware {} serial {}\n\
         portal:            {}\n\
         portal login:      {portal_login}\n\
         account login:     {account}\n\
         passwordless:      {}\n\
         auto logout:       {} min\n\
         state dir:         {}\n\
         status file:       {}\n",
        c.source.display(),
        if c.server.enabled {
            "enabled"
        } else {
            "disabled"
        },
        c.server.address,
        c.pbx.model,
        c.pbx.edition.as_str(),
        c.pbx.firmware,
        c.pbx.serial,
        c.pbx.portal_url,
        if c.remote_access.passwordless {
            "on (role super_admin)"
        } else {
            "off"
        },
        c.remote_access.auto_logout.as_secs() / 60,
        c.paths.state_dir.display(),
        c.paths.status_file.display(),
    )
}

/// `[paths].status_file` read leniently: any config problem falls back to the default path.
fn status_file_of(path: &Path) -> PathBuf {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
        .and_then(|t| {
            t.get("paths")?
                .get("status_file")?
                .as_str()
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_STATUS_FILE))
}

fn show_status(path: &Path, json: bool) -> ExitCode {
    let file = status_file_of(path);
    match status::read(&file) {
        Ok(s) => {
            if json {
                out(&format!(
                    "{}\n",
                    serde_json::to_string_pretty(&s).unwrap_or_default()
                ));
            } else {
                out(&status::render(&s));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            if json {
                let doc = serde_json::json!({"state": "stopped", "message": format!("{e:#}")});
                out(&format!("{doc}\n"));
            } else {
                out(&format!("state:       stopped\nmessage:     {e:#}\n"));
            }
            ExitCode::FAILURE
        }
    }
}

fn hash_password() -> ExitCode {
    let mut input = String::new();
    if std::io::stdin().is_terminal() {
        eprint!("password (input is shown; pipe it in to avoid that): ");
        if std::io::stdin().read_line(&mut input).is_err() {
            eprintln!("error: cannot read the password");
            return ExitCode::from(EXIT_CONFIG);
        }
    } else if std::io::stdin().read_to_string(&mut input).is_err() {
        eprintln!("error: cannot read the password from stdin");
        return ExitCode::from(EXIT_CONFIG);
    }
    let pw = input
        .strip_suffix("\r\n")
        .or_else(|| input.strip_suffix('\n'))
        .unwrap_or(&input);
    if let Err(e) = pbx_remote::password::check_strength(pw) {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    match pbx_remote::password::hash(pw) {
        Ok(h) => {
            out(&format!("{h}\n"));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
