//! `user`, `group` and `account`: CM users with roles and group scopes, and groups as rows.

use crate::{read_password, DataDir};
use clap::{Subcommand, ValueEnum};
use pbx_remote::server::{admin, db};

#[derive(Subcommand)]
pub(crate) enum AccountCommand {
    /// Add an operator over all groups (or set an existing user's password); the password is
    /// read from stdin.
    Add {
        #[command(flatten)]
        data: DataDir,
        /// Account email.
        email: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum RoleArg {
    Admin,
    Operator,
    Viewer,
}

impl From<RoleArg> for db::Role {
    fn from(r: RoleArg) -> db::Role {
        match r {
            RoleArg::Admin => db::Role::Admin,
            RoleArg::Operator => db::Role::Operator,
            RoleArg::Viewer => db::Role::Viewer,
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum UserCommand {
    /// Add a user; the password is read from stdin. Without --group the user sees all groups.
    Add {
        #[command(flatten)]
        data: DataDir,
        /// Sign-in email.
        email: String,
        /// admin (everything), operator (devices of their groups), viewer (see only).
        #[arg(long)]
        role: RoleArg,
        /// A group the user's scope covers; repeatable.
        #[arg(long = "group")]
        groups: Vec<String>,
    },
    /// List users with role, 2FA and scope.
    List {
        #[command(flatten)]
        data: DataDir,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Change a user's role, scope or password.
    Set {
        #[command(flatten)]
        data: DataDir,
        /// Sign-in email.
        email: String,
        /// New role.
        #[arg(long)]
        role: Option<RoleArg>,
        /// The groups of the new scope; repeatable.
        #[arg(long = "group", conflicts_with = "all_groups")]
        groups: Vec<String>,
        /// The new scope is all groups.
        #[arg(long)]
        all_groups: bool,
        /// Read a new password from stdin (the user's sessions end).
        #[arg(long)]
        password: bool,
    },
    /// Remove a user (not the last admin).
    Remove {
        #[command(flatten)]
        data: DataDir,
        /// Sign-in email.
        email: String,
    },
    /// Turn a user's two-factor sign-in off (lost authenticator and recovery codes).
    #[command(name = "reset-2fa")]
    Reset2fa {
        #[command(flatten)]
        data: DataDir,
        /// Sign-in email.
        email: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum GroupCommand {
    /// Add a group.
    Add {
        #[command(flatten)]
        data: DataDir,
        /// Group name.
        name: String,
    },
    /// List groups with their device counts.
    List {
        #[command(flatten)]
        data: DataDir,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Remove an empty group.
    Remove {
        #[command(flatten)]
        data: DataDir,
        /// Group name.
        name: String,
    },
}

/// `user …`.
pub(crate) fn user(command: UserCommand) -> anyhow::Result<String> {
    match command {
        UserCommand::Add {
            data,
            email,
            role,
            groups,
        } => {
            let password = read_password()?;
            admin::user_add(data.get()?, &email, role.into(), &groups, &password)
        }
        UserCommand::List { data, json } => admin::user_list(data.get()?, json),
        UserCommand::Set {
            data,
            email,
            role,
            groups,
            all_groups,
            password,
        } => {
            let scope = if all_groups {
                Some(db::Scope::All)
            } else if groups.is_empty() {
                None
            } else {
                Some(db::Scope::Groups(groups))
            };
            let password = if password {
                Some(read_password()?)
            } else {
                None
            };
            admin::user_set(
                data.get()?,
                &email,
                role.map(Into::into),
                scope,
                password.as_deref(),
            )
        }
        UserCommand::Remove { data, email } => admin::user_remove(data.get()?, &email),
        UserCommand::Reset2fa { data, email } => admin::user_reset_2fa(data.get()?, &email),
    }
}

/// `group …`.
pub(crate) fn group(command: GroupCommand) -> anyhow::Result<String> {
    match command {
        GroupCommand::Add { data, name } => admin::group_add(data.get()?, &name),
        GroupCommand::List { data, json } => admin::group_list(data.get()?, json),
        GroupCommand::Remove { data, name } => admin::group_remove(data.get()?, &name),
    }
}

/// `account add EMAIL`.
pub(crate) fn account(command: AccountCommand) -> anyhow::Result<String> {
    let AccountCommand::Add { data, email } = command;
    let password = read_password()?;
    admin::account_add(data.get()?, &email, &password)
}
