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
#[derive(Subcommand, Debug)]
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

/// What the agent's command line asks for, read by [`parse`].
#[derive(Debug)]
pub enum Parsed {
    /// A subcommand to run.
    Run(Command),
    /// `--help` (of the agent or of a subcommand): the text to print.
    Help(String),
    /// `--version`.
    Version,
}

/// The agent binary's own reading of its command line. The [`Cli`] definition above stays the
/// source of the man page and completions (`examples/pkg-docs.rs`); the binary reads its few
/// subcommands and flags with `lexopt`, which costs it 180 KB less than clap's parser. A test
/// holds the two to the same grammar. `Err` is a usage error, worded for the user.
pub fn parse(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Parsed, String> {
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_args(args);
    let name = match p.next().map_err(|e| e.to_string())? {
        None => return Err(format!("a subcommand is required\n\n{}", help(None))),
        Some(Short('h') | Long("help")) => return Ok(Parsed::Help(help(None))),
        Some(Short('V') | Long("version")) => return Ok(Parsed::Version),
        Some(Value(v)) => v
            .string()
            .map_err(|_| "the subcommand is not UTF-8".to_string())?,
        Some(other) => return Err(other.unexpected().to_string()),
    };
    let (mut config, mut json, mut force) = (None, false, false);
    let takes = |flag: &str| {
        matches!(
            (name.as_str(), flag),
            ("run" | "check" | "status" | "deactivate", "config")
                | ("status", "json")
                | ("deactivate", "force")
        )
    };
    if !["run", "check", "status", "hash-password", "deactivate"].contains(&name.as_str()) {
        return Err(format!(
            "unrecognized subcommand '{name}'\n\n{}",
            help(None)
        ));
    }
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        match arg {
            Short('h') | Long("help") => return Ok(Parsed::Help(help(Some(&name)))),
            Short('c') | Long("config") if takes("config") => {
                config = Some(PathBuf::from(p.value().map_err(|e| e.to_string())?));
            }
            Long("json") if takes("json") => json = true,
            Long("force") if takes("force") => force = true,
            other => {
                return Err(format!(
                    "{} for '{name}'\n\n{}",
                    other.unexpected(),
                    help(Some(&name))
                ))
            }
        }
    }
    Ok(Parsed::Run(match name.as_str() {
        "run" => Command::Run { config },
        "check" => Command::Check { config },
        "status" => Command::Status { config, json },
        "deactivate" => Command::Deactivate { config, force },
        _ => Command::HashPassword,
    }))
}

/// The help text: the agent's, or one subcommand's.
pub fn help(subcommand: Option<&str>) -> String {
    const CONFIG: &str = "  -c, --config <PATH>  Config file [default: $PBX_REMOTE_AGENT_CONFIG or /etc/pbx-remote-agent/agent.toml]\n";
    let (usage, what, options) = match subcommand {
        Some("run") => ("run [-c PATH]", "Run the daemon (systemd ExecStart).", CONFIG.to_string()),
        Some("check") => (
            "check [-c PATH]",
            "Validate the config and print a summary; exit 0 or 64.",
            CONFIG.to_string(),
        ),
        Some("status") => (
            "status [-c PATH] [--json]",
            "Show the daemon's status (works even when the config is broken).",
            format!("{CONFIG}      --json           Print the status document as JSON\n"),
        ),
        Some("hash-password") => (
            "hash-password",
            "Read a password on stdin and print its argon2id PHC string.",
            String::new(),
        ),
        Some("deactivate") => (
            "deactivate [-c PATH] [--force]",
            "Tell the CM this node is being uninstalled (its key is revoked there), then delete the credential here.",
            format!("{CONFIG}      --force          Delete the credential even when the CM cannot be reached (exit 1 all the same)\n"),
        ),
        _ => {
            return "PBX side of Remote Management: activation, QUIC tunnel and session gate for the PBX web portal\n\n\
                    Usage: pbx-remote-agent <COMMAND>\n\n\
                    Commands:\n  \
                    run            Run the daemon (systemd ExecStart)\n  \
                    check          Validate the config and print a summary; exit 0 or 64\n  \
                    status         Show the daemon's status (works even when the config is broken)\n  \
                    hash-password  Read a password on stdin and print its argon2id PHC string\n  \
                    deactivate     Tell the CM this node is being uninstalled, then delete the credential here\n\n\
                    Options:\n  -h, --help     Print help\n  -V, --version  Print version\n"
                .to_string()
        }
    };
    format!("{what}\n\nUsage: pbx-remote-agent {usage}\n\nOptions:\n{options}  -h, --help           Print help\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn ours(args: &[&str]) -> Result<Parsed, String> {
        parse(args.iter().map(std::ffi::OsString::from))
    }

    /// The binary's parser and the clap definition (man page, completions) agree on every
    /// subcommand and flag: what clap accepts, `parse` reads the same, and what clap refuses,
    /// `parse` refuses.
    #[test]
    fn the_binarys_parser_reads_the_grammar_the_man_page_documents() {
        let cli = Cli::command();
        let mut samples: Vec<Vec<String>> = vec![vec![], vec!["frobnicate".into()]];
        for sub in cli.get_subcommands() {
            let name = sub.get_name().to_string();
            assert!(help(None).contains(&name), "{name} missing from the help");
            samples.push(vec![name.clone()]);
            samples.push(vec![name.clone(), "--bogus".into()]);
            samples.push(vec![name.clone(), "extra".into()]);
            for arg in sub.get_arguments() {
                let long = format!("--{}", arg.get_long().expect("long flag"));
                assert!(
                    help(Some(&name)).contains(&long),
                    "{long} missing from {name}'s help"
                );
                let takes_value = arg.get_action().takes_values();
                let mut with = |flag: String| {
                    let mut v = vec![name.clone(), flag];
                    if takes_value {
                        v.push("/etc/x.toml".into());
                    }
                    samples.push(v);
                };
                with(long.clone());
                if let Some(short) = arg.get_short() {
                    with(format!("-{short}"));
                }
                // Every other subcommand refuses this flag, as clap does.
                for other in cli.get_subcommands().filter(|o| o.get_name() != name) {
                    samples.push(vec![other.get_name().into(), long.clone()]);
                }
            }
        }
        for sample in samples {
            let argv: Vec<&str> = std::iter::once("pbx-remote-agent")
                .chain(sample.iter().map(String::as_str))
                .collect();
            let theirs = Cli::try_parse_from(&argv).map(|c| format!("{:?}", c.command));
            let mine = match ours(&argv[1..]) {
                Ok(Parsed::Run(c)) => Ok(format!("{c:?}")),
                Ok(other) => panic!("{argv:?}: {other:?}"),
                Err(e) => Err(e),
            };
            match (&theirs, &mine) {
                (Ok(a), Ok(b)) => assert_eq!(a, b, "{argv:?}"),
                (Err(_), Err(_)) => {}
                _ => panic!("{argv:?}: clap {theirs:?}, ours {mine:?}"),
            }
        }
        assert!(matches!(ours(&["--version"]), Ok(Parsed::Version)));
        assert!(matches!(ours(&["status", "--help"]), Ok(Parsed::Help(h)) if h.contains("--json")));
        assert!(
            matches!(ours(&["check", "--config=/x.toml"]), Ok(Parsed::Run(Command::Check { config: Some(p) })) if p == std::path::Path::new("/x.toml"))
        );
    }
}
