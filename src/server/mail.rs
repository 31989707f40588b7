//! Send to Email: mails a device's authentication code, with the server address and the pin
//! the PBX's administrator types next to it, through the provider's SMTP server (lettre).

use anyhow::{Context, Result};
use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

/// Where mail goes out: `--smtp-url` (`smtps://`, `smtp://…?tls=required` for STARTTLS, or
/// plain `smtp://` for a relay on this host; credentials in the URL, or the password in
/// `PBX_REMOTE_SERVER_SMTP_PASSWORD`) and `--smtp-from`.
#[derive(Debug, Clone)]
pub struct SmtpOptions {
    /// The SMTP server's URL.
    pub url: url::Url,
    /// The sender, `Name <address>` or an address.
    pub from: String,
}

/// The environment variable that carries the SMTP password when the URL names only a user.
pub const SMTP_PASSWORD_ENV: &str = "PBX_REMOTE_SERVER_SMTP_PASSWORD";

/// A ready transport and sender.
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

/// What a code mail says.
pub struct CodeMail<'a> {
    /// Device name.
    pub device: &'a str,
    /// The code.
    pub code: &'a str,
    /// `host:port` the agent's `[server] address` takes.
    pub server_address: &'a str,
    /// `[server] pin_sha256`.
    pub pin: &'a str,
}

impl Mailer {
    /// Builds the transport (nothing is sent or connected yet).
    pub fn new(opts: &SmtpOptions) -> Result<Mailer> {
        let mut url = opts.url.clone();
        anyhow::ensure!(
            matches!(url.scheme(), "smtp" | "smtps"),
            "--smtp-url {}: expected smtp:// or smtps://",
            redact(&url)
        );
        let tls = url.scheme() == "smtps"
            || url
                .query_pairs()
                .any(|(k, v)| k == "tls" && (v == "required" || v == "opportunistic"));
        let local = matches!(url.host(), Some(url::Host::Domain("localhost")))
            || url
                .host_str()
                .and_then(|h| h.trim_matches(['[', ']']).parse::<std::net::IpAddr>().ok())
                .is_some_and(|ip| ip.is_loopback());
        anyhow::ensure!(
            tls || local || url.username().is_empty(),
            "--smtp-url {}: credentials would cross the network in clear; use smtps:// or smtp://…?tls=required",
            redact(&url)
        );
        if !url.username().is_empty() && url.password().is_none() {
            if let Ok(pw) = std::env::var(SMTP_PASSWORD_ENV) {
                url.set_password(Some(&pw))
                    .map_err(|_| anyhow::anyhow!("--smtp-url: cannot carry a password"))?;
            }
        }
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url.as_str())
            .with_context(|| format!("--smtp-url {}", redact(&url)))?
            .timeout(Some(std::time::Duration::from_secs(20)))
            .build();
        let from: Mailbox = opts
            .from
            .parse()
            .with_context(|| format!("--smtp-from {:?} is not a mail address", opts.from))?;
        Ok(Mailer { transport, from })
    }

    /// Sends a code mail to `to`.
    pub async fn send_code(&self, to: &str, m: &CodeMail<'_>) -> Result<()> {
        let to: Mailbox = to
            .parse()
            .with_context(|| format!("{to:?} is not a mail address"))?;
        // Short lines: a line over 76 characters would make the body quoted-printable, which
        // breaks a long value (the pin) across lines.
        let body = format!(
            "Remote Management for {device}\n\n\
             On the PBX, open Remote Management and fill in:\n\n\
             Server address:\n  {address}\n\
             Server pin (pin_sha256):\n  {pin}\n\
             Activation: Authentication Code\n\
             Authentication code:\n  {code}\n\n\
             The code works once and expires 24 hours after it was issued.\n",
            device = m.device,
            address = m.server_address,
            pin = m.pin,
            code = m.code,
        );
        let msg = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(format!("Authentication code for {}", m.device))
            .body(body)
            .context("building the mail")?;
        self.transport
            .send(msg)
            .await
            .map_err(|e| anyhow::anyhow!("the SMTP server refused or could not be reached: {e}"))?;
        Ok(())
    }
}

/// The URL without its password, for messages.
fn redact(url: &url::Url) -> String {
    let mut u = url.clone();
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(url: &str) -> SmtpOptions {
        SmtpOptions {
            url: url::Url::parse(url).unwrap(),
            from: "CM <cm@example.com>".into(),
        }
    }

    #[test]
    fn credentials_never_cross_the_network_in_clear() {
        crate::tls::install_default_provider();
        let err = Mailer::new(&opts("smtp://cm:secret@mail.example.com"))
            .err()
            .unwrap();
        let text = format!("{err:#}");
        assert!(
            text.contains("in clear") && !text.contains("secret"),
            "{text}"
        );
        assert!(Mailer::new(&opts("smtp://cm:secret@mail.example.com?tls=required")).is_ok());
        assert!(Mailer::new(&opts("smtps://cm:secret@mail.example.com")).is_ok());
        assert!(Mailer::new(&opts("smtp://cm:secret@127.0.0.1:25")).is_ok());
        assert!(Mailer::new(&opts("smtp://mail.example.com")).is_ok());
        assert!(Mailer::new(&opts("http://mail.example.com")).is_err());
        let bad_from = SmtpOptions {
            from: "not an address".into(),
            ..opts("smtp://127.0.0.1")
        };
        assert!(format!("{:#}", Mailer::new(&bad_from).err().unwrap()).contains("--smtp-from"));
    }
}
