//! Which device a request is for: the public URL, device labels from `Host`, visit links, and
//! the visitor's address (forwarded-for only from trusted proxies).

use super::*;

/// Visitor-facing view of the public URL.
pub(super) struct PublicUrl {
    pub(super) scheme: Scheme,
    pub(super) host: String,
    pub(super) port_suffix: String,
}

impl PublicUrl {
    pub(super) fn of(state: &ServerState) -> PublicUrl {
        let u = &state.opts.public_url;
        PublicUrl {
            // ServerState::open refused any other scheme.
            scheme: Scheme::parse(u.scheme()).unwrap_or(Scheme::Https),
            host: u.host_str().unwrap_or("localhost").to_ascii_lowercase(),
            port_suffix: u.port().map(|p| format!(":{p}")).unwrap_or_default(),
        }
    }

    pub(super) fn device_origin(&self, device: &str) -> String {
        format!(
            "{}://{device}.{}{}",
            self.scheme, self.host, self.port_suffix
        )
    }

    pub(super) fn secure(&self) -> bool {
        self.scheme == Scheme::Https
    }

    pub(super) fn cookie_name(&self) -> &'static str {
        if self.secure() {
            GRANT_COOKIE_SECURE
        } else {
            GRANT_COOKIE
        }
    }

    /// The device label in `Host`, if it is one of ours.
    pub(super) fn device_of(&self, host: &str) -> Option<String> {
        let name = match host.rsplit_once(':') {
            Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !h.ends_with(']') => h,
            _ => host,
        };
        // `LABEL.` + our host, compared without case.
        let cut = name.len().checked_sub(self.host.len() + 1)?;
        let (label, suffix) = (name.get(..cut)?, name.get(cut..)?);
        let ours = suffix.starts_with('.') && suffix[1..].eq_ignore_ascii_case(&self.host);
        let valid = ours
            && !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        valid.then(|| label.to_ascii_lowercase())
    }
}

/// The link a visitor opens: `ORIGIN/__cm/visit/TOKEN?login=passwordless|account` (the query
/// only tells a human which kind of link it is; the token decides).
pub fn visit_url(public_url: &url::Url, device: &str, token: &str, passwordless: bool) -> String {
    let scheme = public_url.scheme();
    let host = public_url.host_str().unwrap_or("localhost");
    let port = public_url
        .port()
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    let login = if passwordless {
        "passwordless"
    } else {
        "account"
    };
    format!("{scheme}://{device}.{host}{port}/__cm/visit/{token}?login={login}")
}
