//! `pbx-remote-server`: the reference CM server's CLI; parses arguments and calls the library.

use clap::{Args, Parser, Subcommand, ValueEnum};
use pbx_remote::server::{self, admin, db};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

mod run;
mod users;
use users::{AccountCommand, GroupCommand, UserCommand};

#[derive(Parser)]
#[command(
    name = "pbx-remote-server",
    version,
    about = "Reference self-hosted central management server for pbx-remote-agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
pub(crate) struct DataDir {
    /// Data directory (SQLite registry and keys).
    #[arg(long, env = "PBX_REMOTE_SERVER_DATA", global = true)]
    data_dir: Option<PathBuf>,
}

impl DataDir {
    pub(crate) fn get(&self) -> anyhow::Result<&Path> {
        self.data_dir
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("--data-dir (or PBX_REMOTE_SERVER_DATA) is required"))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: activation API + QUIC tunnel on --listen, the public front on
    /// --public-listen, and the provider console on --console-listen.
    Run(Box<run::RunArgs>),
    /// Manage devices.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Manage CM users (console sign-in and activation by email/password).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Manage device groups.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// Kept from before CM users: `account add EMAIL` is `user add EMAIL --role operator`.
    Account {
        #[command(subcommand)]
        command: AccountCommand,
    },
    /// Create a one-time visit link (valid 10 minutes) to a device's web portal.
    Visit {
        #[command(flatten)]
        data: DataDir,
        /// Device id.
        device: String,
        /// CM user recorded in audit.
        #[arg(long = "as")]
        as_user: String,
        /// Log in as super admin without a password (needs both switches on).
        #[arg(long)]
        passwordless: bool,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Device capacity.
    Capacity {
        #[command(subcommand)]
        command: CapacityCommand,
    },
    /// Print the server key's pin_sha256 (alone on the last line).
    Fingerprint {
        #[command(flatten)]
        data: DataDir,
    },
    /// Run server, agent and a demo portal on loopback and print visit links.
    Demo,
}

#[derive(Subcommand)]
enum CapacityCommand {
    /// Set the number of device slots (N or "unlimited").
    Set {
        #[command(flatten)]
        data: DataDir,
        /// N or unlimited.
        value: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Add a device; prints its id and a one-time authentication code.
    Add {
        #[command(flatten)]
        data: DataDir,
        /// Display name.
        #[arg(long)]
        name: String,
        /// Group.
        #[arg(long)]
        group: Option<String>,
        /// Comment.
        #[arg(long)]
        comment: Option<String>,
        /// Allow passwordless (super admin) visits.
        #[arg(long)]
        allow_passwordless: bool,
        /// Push --template to the device on its first connection (needs --serial and --mac).
        #[arg(long, requires_all = ["template", "serial", "mac"])]
        allow_provisioning: bool,
        /// Provisioning template file.
        #[arg(long, requires = "allow_provisioning")]
        template: Option<PathBuf>,
        /// Expected serial number.
        #[arg(long, requires = "mac")]
        serial: Option<String>,
        /// Expected MAC address.
        #[arg(long, requires = "serial")]
        mac: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// List devices with online state, last seen and agent version.
    List {
        #[command(flatten)]
        data: DataDir,
        /// Only devices of this group.
        #[arg(long)]
        group: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// List groups with their device counts.
    Groups {
        #[command(flatten)]
        data: DataDir,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Show one device.
    Show {
        #[command(flatten)]
        data: DataDir,
        /// Device id.
        device: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Remove a device; a connected agent is told within 5 s.
    Remove {
        #[command(flatten)]
        data: DataDir,
        /// Device id.
        device: String,
    },
    /// Issue a new authentication code (older unused codes stop working).
    Code {
        #[command(flatten)]
        data: DataDir,
        /// Device id.
        device: String,
        /// Code lifetime in hours.
        #[arg(long, default_value_t = 24)]
        ttl_hours: u64,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Change a device; takes effect on a connected agent within 5 s.
    Set {
        #[command(flatten)]
        data: DataDir,
        /// Device id.
        device: String,
        /// CM-side passwordless switch.
        #[arg(long)]
        allow_passwordless: Option<OnOff>,
        /// New name.
        #[arg(long)]
        name: Option<String>,
        /// New group.
        #[arg(long)]
        group: Option<String>,
        /// New comment.
        #[arg(long)]
        comment: Option<String>,
        /// Expected serial number ("" clears it).
        #[arg(long)]
        serial: Option<String>,
        /// Expected MAC address ("" clears it).
        #[arg(long)]
        mac: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    pbx_remote::tls::install_default_provider();
    pbx_remote::logging::init(false);
    match dispatch(cli.command) {
        Ok(out) => {
            use std::io::Write;
            // A closed pipe (`| head`) is not worth a panic.
            let _ = std::io::stdout().write_all(out.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<String> {
    match command {
        Command::Run(args) => run::run(*args),
        Command::Device { command } => match command {
            DeviceCommand::Add {
                data,
                name,
                group,
                comment,
                allow_passwordless,
                allow_provisioning,
                template,
                serial,
                mac,
                json,
            } => {
                let new = db::NewDevice {
                    name,
                    group,
                    comment,
                    allow_passwordless,
                    serial,
                    mac,
                    allow_provisioning,
                    template: template
                        .map(|t| {
                            std::fs::read_to_string(&t)
                                .map_err(|e| anyhow::anyhow!("--template {}: {e}", t.display()))
                        })
                        .transpose()?,
                };
                admin::device_add(data.get()?, &new, json)
            }
            DeviceCommand::List { data, group, json } => {
                admin::device_list(data.get()?, group.as_deref(), json)
            }
            DeviceCommand::Groups { data, json } => admin::device_groups(data.get()?, json),
            DeviceCommand::Show { data, device, json } => {
                admin::device_show(data.get()?, &device, json)
            }
            DeviceCommand::Remove { data, device } => admin::device_remove(data.get()?, &device),
            DeviceCommand::Code {
                data,
                device,
                ttl_hours,
                json,
            } => admin::device_code(
                data.get()?,
                &device,
                Duration::from_secs(ttl_hours * 3600),
                json,
            ),
            DeviceCommand::Set {
                data,
                device,
                allow_passwordless,
                name,
                group,
                comment,
                serial,
                mac,
            } => {
                let changes = db::DeviceChanges {
                    name,
                    group,
                    comment,
                    allow_passwordless: allow_passwordless.map(|v| matches!(v, OnOff::On)),
                    serial,
                    mac,
                };
                admin::device_set(data.get()?, &device, &changes)
            }
        },
        Command::Visit {
            data,
            device,
            as_user,
            passwordless,
            json,
        } => admin::visit(data.get()?, &device, &as_user, passwordless, json),
        Command::User { command } => users::user(command),
        Command::Group { command } => users::group(command),
        Command::Account { command } => users::account(command),
        Command::Capacity {
            command: CapacityCommand::Set { data, value },
        } => admin::capacity_set(data.get()?, &value),
        Command::Fingerprint { data } => admin::fingerprint(data.get()?),
        Command::Demo => runtime()?.block_on(async {
            let root = tokio_util::sync::CancellationToken::new();
            let _hup = pbx_remote::signals::install(root.clone())?;
            let mut out = std::io::stdout();
            server::demo::run(root, &mut out).await?;
            Ok(String::new())
        }),
    }
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// A password from stdin (prompted on stderr at a terminal), one trailing newline stripped.
fn read_password() -> anyhow::Result<String> {
    use std::io::{IsTerminal, Read};
    let mut input = String::new();
    if std::io::stdin().is_terminal() {
        eprint!("password (input is shown; pipe it in to avoid that): ");
        std::io::stdin().read_line(&mut input)?;
    } else {
        std::io::stdin().read_to_string(&mut input)?;
    }
    Ok(input
        .strip_suffix("\r\n")
        .or_else(|| input.strip_suffix('\n'))
        .unwrap_or(&input)
        .to_string())
}
