//! The agent's command line, in the library so the packaging step can generate the man page and
//! shell completions from the same definition (`examples/pkg-docs.rs`).

use clap::{Parser, Subcommand};
use std::path::PathBuf;

// The whole command line of `pbx-remote-agent` (the about text is explicit: doc comments here
// would become the long help).
#[derive(Parser)]
#[command(
    name = "pbx-remote-agent",
    version,
    about = "PBX side of Remote Management: activation, QUIC tunnel and session gate for the PBX web portal"
)]
/// `pbx-remote-agent`'s command line (in the library so `packaging/` can render its man page).
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The agent's subcommands.
#[derive(Subcommand)]
pub enum Command {
    /// Run the daemon (systemd ExecStart).
    Run {
        /// Config file [default: $PBX_REMOTE_AGENT_CONFIG or /etc/pbx-remote-agent/agent.toml]
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Validate the config and print a summary; exit 0 or 64.
    Check {
        /// Config file.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Show the daemon's status (works even when the config is broken).
    Status {
        /// Config file (only [paths].status_file is read).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Print the status document as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Read a password on stdin and print its argon2id PHC string.
    HashPassword,
    /// Tell the CM this node is being uninstalled (its key is revoked there), then delete the
    /// credential here; exit 0 when the CM was told or had nothing to revoke. Package removal
    /// runs it with --force.
    Deactivate {
        /// Config file.
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Delete the credential even when the CM cannot be reached (exit 1 all the same).
        #[arg(long)]
        force: bool,
    },
}
