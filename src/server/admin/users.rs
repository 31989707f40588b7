//! `user`, `group` and `account`: CM users with roles and group scopes, groups as rows.

use super::log_cli;
use crate::server::db::{Db, NewUser, Role, Scope, User, UserChanges};
use anyhow::Result;
use std::path::Path;

fn scope_text(s: &Scope) -> String {
    match s {
        Scope::All => "all groups".into(),
        Scope::Groups(g) if g.is_empty() => "no group".into(),
        Scope::Groups(g) => g.join(", "),
    }
}

fn scope_of(groups: &[String]) -> Scope {
    if groups.is_empty() {
        Scope::All
    } else {
        Scope::Groups(groups.to_vec())
    }
}

fn user_text(u: &User) -> String {
    format!(
        "{:<32} {:<9} {:<5} {}\n",
        u.email,
        u.role,
        if u.totp_enabled { "2fa" } else { "-" },
        scope_text(&u.scope)
    )
}

/// `user add EMAIL --role R [--group G]...`: the password comes from stdin. No `--group` means
/// all groups.
pub fn user_add(
    data_dir: &Path,
    email: &str,
    role: Role,
    groups: &[String],
    password: &str,
) -> Result<String> {
    crate::password::check_strength(password)?;
    let db = Db::open(data_dir)?;
    let u = db.add_user(&NewUser {
        email: email.into(),
        password_hash: crate::password::hash(password)?,
        role,
        scope: scope_of(groups),
    })?;
    log_cli(&db, "user.add", &u.email, None);
    Ok(format!(
        "user {} added: {}, {}\n",
        u.email,
        u.role,
        scope_text(&u.scope)
    ))
}

/// `user list`.
pub fn user_list(data_dir: &Path, as_json: bool) -> Result<String> {
    let users = Db::open(data_dir)?.users()?;
    if as_json {
        return Ok(serde_json::to_string_pretty(&users)?);
    }
    let mut out = format!("{:<32} {:<9} {:<5} {}\n", "EMAIL", "ROLE", "2FA", "SCOPE");
    out.extend(users.iter().map(user_text));
    Ok(out)
}

/// `user set EMAIL [--role R] [--group G... | --all-groups] [--password]`.
pub fn user_set(
    data_dir: &Path,
    email: &str,
    role: Option<Role>,
    scope: Option<Scope>,
    password: Option<&str>,
) -> Result<String> {
    let password_hash = match password {
        Some(p) => {
            crate::password::check_strength(p)?;
            Some(crate::password::hash(p)?)
        }
        None => None,
    };
    let db = Db::open(data_dir)?;
    let u = db.set_user(
        email,
        &UserChanges {
            role,
            scope,
            password_hash,
        },
    )?;
    log_cli(&db, "user.edit", &u.email, None);
    Ok(user_text(&u))
}

/// `user remove EMAIL`.
pub fn user_remove(data_dir: &Path, email: &str) -> Result<String> {
    let db = Db::open(data_dir)?;
    db.remove_user(email)?;
    let email = email.trim().to_lowercase();
    log_cli(&db, "user.remove", &email, None);
    Ok(format!("user {email} removed\n"))
}

/// `user reset-2fa EMAIL`: for a user who lost both their authenticator and recovery codes.
pub fn user_reset_2fa(data_dir: &Path, email: &str) -> Result<String> {
    let db = Db::open(data_dir)?;
    db.reset_totp(email)?;
    let email = email.trim().to_lowercase();
    log_cli(&db, "user.reset_2fa", &email, None);
    Ok(format!(
        "two-factor sign-in of {email} is off; they enrol again at their next sign-in if it is mandatory\n"
    ))
}

/// `account add EMAIL`, kept from before CM users: adds an operator over all groups, or sets
/// the password of an existing user.
pub fn account_add(data_dir: &Path, email: &str, password: &str) -> Result<String> {
    crate::password::check_strength(password)?;
    let db = Db::open(data_dir)?;
    let hash = crate::password::hash(password)?;
    let u = match db.user(email)? {
        Some(u) => db.set_user(
            &u.email,
            &UserChanges {
                password_hash: Some(hash),
                ..Default::default()
            },
        )?,
        None => db.add_user(&NewUser {
            email: email.into(),
            password_hash: hash,
            role: Role::Operator,
            scope: Scope::All,
        })?,
    };
    log_cli(&db, "user.password", &u.email, None);
    Ok(format!("account {} saved ({})\n", u.email, u.role))
}

/// `group add NAME`.
pub fn group_add(data_dir: &Path, name: &str) -> Result<String> {
    let db = Db::open(data_dir)?;
    db.add_group(name)?;
    log_cli(&db, "group.add", name, None);
    Ok(format!("group {name} added\n"))
}

/// `group list`.
pub fn group_list(data_dir: &Path, as_json: bool) -> Result<String> {
    let groups = Db::open(data_dir)?.groups()?;
    if as_json {
        return Ok(serde_json::to_string_pretty(&groups)?);
    }
    let mut out = format!("{:<32} {}\n", "GROUP", "DEVICES");
    for g in &groups {
        out.push_str(&format!("{:<32} {}\n", g.name, g.devices));
    }
    Ok(out)
}

/// `group remove NAME` (only when empty).
pub fn group_remove(data_dir: &Path, name: &str) -> Result<String> {
    let db = Db::open(data_dir)?;
    db.remove_group(name)?;
    log_cli(&db, "group.remove", name, None);
    Ok(format!("group {name} removed\n"))
}
