//! `[portal_login]` (DESIGN §12): how the agent logs in to a portal that does not read the
//! identity headers, and with which portal account per role. The password files are read here,
//! so at start and at every reload, and checked like the rest (file, key, what is expected).

use super::validate::Validator;
use super::ConfigError;
use crate::secret::Secret;
use serde::Deserialize;
use std::path::PathBuf;

/// How the agent logs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginMethod {
    /// The login page's form is fetched (its hidden fields, such as a CSRF token, are kept)
    /// and posted with the account's name and password.
    Form {
        /// The form field for the username.
        username_field: String,
        /// The form field for the password.
        password_field: String,
    },
    /// HTTP Basic credentials on a GET of `login_path`, which answers with a session cookie.
    Basic,
}

/// A portal account the agent logs in as.
#[derive(Debug, Clone, PartialEq)]
pub struct PortalAccount {
    /// Portal username.
    pub username: String,
    /// The file the password came from (for messages).
    pub password_file: PathBuf,
    /// The password (never logged).
    pub password: Secret,
}

/// `[portal_login]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PortalLogin {
    /// Form or Basic.
    pub method: LoginMethod,
    /// The login page (form) or the path taking Basic credentials; an origin path.
    pub login_path: String,
    /// Called with the session's portal cookies when the remote session ends; a visitor's own
    /// request for it ends the remote session.
    pub logout_path: Option<String>,
    /// More form fields sent with every login (a "remember me" box, a language).
    pub extra_fields: Vec<(String, String)>,
    /// A cookie that must be set for a login to count as successful (otherwise: any cookie).
    pub success_cookie: Option<String>,
    /// The account passwordless sessions use.
    pub super_admin: Option<PortalAccount>,
    /// The account remote-account sessions use.
    pub administrator: Option<PortalAccount>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPortalLogin {
    method: String,
    login_path: String,
    username_field: Option<String>,
    password_field: Option<String>,
    logout_path: Option<String>,
    #[serde(default)]
    extra_fields: std::collections::BTreeMap<String, String>,
    success_cookie: Option<String>,
    super_admin: Option<RawPortalAccount>,
    administrator: Option<RawPortalAccount>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPortalAccount {
    username: String,
    password_file: PathBuf,
}

/// Longest password file read.
const MAX_PASSWORD_FILE: u64 = 1024;

impl Validator<'_> {
    pub(super) fn portal_login(&self, raw: RawPortalLogin) -> Result<PortalLogin, ConfigError> {
        let field = |key: &str, v: Option<String>, default: &str| {
            let v = v.unwrap_or_else(|| default.to_string());
            if v.is_empty() || v.chars().any(|c| c.is_control()) {
                return Err(self.err(key, format!("expected a form field name, got {v:?}")));
            }
            Ok(v)
        };
        let method = match raw.method.as_str() {
            "form" => LoginMethod::Form {
                username_field: field(
                    "portal_login.username_field",
                    raw.username_field,
                    "username",
                )?,
                password_field: field(
                    "portal_login.password_field",
                    raw.password_field,
                    "password",
                )?,
            },
            "basic" => {
                for (key, v) in [
                    ("portal_login.username_field", &raw.username_field),
                    ("portal_login.password_field", &raw.password_field),
                ] {
                    if v.is_some() {
                        return Err(self.err(key, "only for method = \"form\""));
                    }
                }
                if !raw.extra_fields.is_empty() {
                    return Err(self.err("portal_login.extra_fields", "only for method = \"form\""));
                }
                LoginMethod::Basic
            }
            other => {
                return Err(self.err(
                    "portal_login.method",
                    format!("expected \"form\" or \"basic\", got {other:?}"),
                ))
            }
        };
        let path = |key: &str, p: String| {
            if p.starts_with('/') && !p.starts_with("//") && !p.contains(['#', ' ', '\\']) {
                Ok(p)
            } else {
                Err(self.err(
                    key,
                    format!("expected a path on the portal such as \"/login\", got {p:?}"),
                ))
            }
        };
        let login_path = path("portal_login.login_path", raw.login_path)?;
        let logout_path = raw
            .logout_path
            .map(|p| path("portal_login.logout_path", p))
            .transpose()?;
        if logout_path.as_deref() == Some(login_path.as_str()) {
            return Err(self.err(
                "portal_login.logout_path",
                "expected a path other than login_path",
            ));
        }
        let super_admin = raw
            .super_admin
            .map(|a| self.portal_account("portal_login.super_admin", a))
            .transpose()?;
        let administrator = raw
            .administrator
            .map(|a| self.portal_account("portal_login.administrator", a))
            .transpose()?;
        if super_admin.is_none() && administrator.is_none() {
            return Err(self.err(
                "portal_login",
                "expected [portal_login.super_admin] or [portal_login.administrator] (or both): the portal account each kind of remote session uses",
            ));
        }
        Ok(PortalLogin {
            method,
            login_path,
            logout_path,
            extra_fields: raw.extra_fields.into_iter().collect(),
            success_cookie: raw.success_cookie.filter(|c| !c.is_empty()),
            super_admin,
            administrator,
        })
    }

    fn portal_account(
        &self,
        key: &str,
        raw: RawPortalAccount,
    ) -> Result<PortalAccount, ConfigError> {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        if raw.username.is_empty() || raw.username.chars().any(|c| c.is_control()) {
            return Err(self.err(
                &format!("{key}.username"),
                format!("expected the portal account's name, got {:?}", raw.username),
            ));
        }
        let file_key = format!("{key}.password_file");
        let file = self.absolute(&file_key, raw.password_file)?;
        let shown = file.display();
        let bad = |what: String| self.err(&file_key, format!("{shown}: {what}"));
        let meta = std::fs::metadata(&file).map_err(|e| bad(format!("cannot read it: {e}")))?;
        if !meta.is_file() {
            return Err(bad("not a regular file".into()));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(bad(format!(
                "readable by others (mode {mode:04o}); expected 0600, owned by the agent's user"
            )));
        }
        let mut text = String::new();
        std::fs::File::open(&file)
            .and_then(|f| f.take(MAX_PASSWORD_FILE + 1).read_to_string(&mut text))
            .map_err(|e| bad(format!("cannot read it: {e}")))?;
        if text.len() as u64 > MAX_PASSWORD_FILE {
            return Err(bad(format!(
                "longer than {MAX_PASSWORD_FILE} bytes; expected the password on one line"
            )));
        }
        let password = text.strip_suffix('\n').unwrap_or(&text);
        let password = password.strip_suffix('\r').unwrap_or(password);
        if password.is_empty() || password.contains(['\n', '\r']) {
            return Err(bad("expected the password on one line".into()));
        }
        Ok(PortalAccount {
            username: raw.username,
            password_file: file,
            password: Secret::new(password),
        })
    }
}
