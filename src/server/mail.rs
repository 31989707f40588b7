//! Send to Email: mails a device's authentication code, with the server address and the pin
//! the PBX's administrator types next to it, through the provider's SMTP server.
//!
//! lettre speaks SMTP and builds the message; the connection is opened here, over TLS with the
//! project's own rustls setup (`smtps://`), or in the clear to a relay on this host
//! (`smtp://localhost`). lettre's own TLS feature is not used: it would turn on rustls's
//! logging for the whole package, agent included.

use crate::tls::{client_config, ServerTrust};
use anyhow::{Context, Result};
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream};
use lettre::transport::smtp::extension::ClientId;
use lettre::Message;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Where mail goes out: `--smtp-url` (`smtps://[user[:password]@]host[:port]`, TLS from the
/// first byte; or `smtp://` to a relay on this host), `--smtp-from`, and `--smtp-ca` for a
/// relay whose certificate a private CA signed (else the system's roots).
#[derive(Debug, Clone)]
pub struct SmtpOptions {
    /// The SMTP server's URL.
    pub url: url::Url,
    /// The sender, `Name <address>` or an address.
    pub from: String,
    /// CA certificates (PEM) to trust for the relay instead of the system's.
    pub ca_file: Option<PathBuf>,
}

/// The environment variable that carries the SMTP password when the URL names only a user.
pub const SMTP_PASSWORD_ENV: &str = "PBX_REMOTE_SERVER_SMTP_PASSWORD";

/// How long connecting, the TLS handshake and the whole SMTP exchange may take.
const SMTP_TIMEOUT: Duration = Duration::from_secs(30);

/// A checked SMTP setup; nothing is connected until a mail is sent.
pub struct Mailer {
    host: String,
    port: u16,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    credentials: Option<Credentials>,
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

/// Whether `host` is this machine. (`smtp:` is not a scheme the URL standard knows, so an
/// address comes as an opaque host name: it is parsed here.)
fn is_local(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Domain(d) => {
            d.eq_ignore_ascii_case("localhost")
                || d.trim_matches(['[', ']'])
                    .parse::<IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        url::Host::Ipv4(ip) => ip.is_loopback(),
        url::Host::Ipv6(ip) => ip.is_loopback(),
    }
}

impl Mailer {
    /// Checks the settings (the URL's scheme and host, the sender, the CA file).
    pub fn new(opts: &SmtpOptions) -> Result<Mailer> {
        let url = &opts.url;
        let host = url
            .host()
            .with_context(|| format!("--smtp-url {}: no host", redact(url)))?;
        let (tls, port) = match url.scheme() {
            "smtps" => (true, 465),
            "smtp" => {
                anyhow::ensure!(
                    is_local(&host),
                    "--smtp-url {}: plain smtp:// would carry codes (and credentials) across the network in clear; use smtps:// or a relay on this host",
                    redact(url)
                );
                (false, 25)
            }
            _ => anyhow::bail!("--smtp-url {}: expected smtps:// or smtp://", redact(url)),
        };
        let host_name = match host {
            url::Host::Domain(d) => d.trim_matches(['[', ']']).to_string(),
            url::Host::Ipv4(ip) => ip.to_string(),
            url::Host::Ipv6(ip) => ip.to_string(),
        };
        let tls = if tls {
            let trust = match &opts.ca_file {
                Some(f) => ServerTrust::CaFile(f.clone()),
                None => ServerTrust::System,
            };
            let config = client_config(&trust, &[], None).context("--smtp-ca")?;
            let name = match host_name.parse::<IpAddr>() {
                Ok(ip) => rustls::pki_types::ServerName::IpAddress(ip.into()),
                Err(_) => rustls::pki_types::ServerName::try_from(host_name.clone())
                    .with_context(|| format!("--smtp-url: {host_name:?} is not a host name"))?,
            };
            Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        let user = percent_decode(url.username());
        let password = match url.password() {
            Some(p) => Some(percent_decode(p)),
            None => std::env::var(SMTP_PASSWORD_ENV).ok(),
        };
        let credentials =
            (!user.is_empty()).then(|| Credentials::new(user, password.unwrap_or_default()));
        let from: Mailbox = opts
            .from
            .parse()
            .with_context(|| format!("--smtp-from {:?} is not a mail address", opts.from))?;
        Ok(Mailer {
            host: host_name,
            port: url.port().unwrap_or(port),
            tls,
            credentials,
            from,
        })
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
        tokio::time::timeout(SMTP_TIMEOUT, self.deliver(&msg))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the SMTP server {}:{} did not finish within {SMTP_TIMEOUT:?}",
                    self.host,
                    self.port
                )
            })?
    }

    async fn deliver(&self, msg: &Message) -> Result<()> {
        let server = format!("{}:{}", self.host, self.port);
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("cannot reach the SMTP server {server}"))?;
        let stream: Box<dyn AsyncTokioStream> = match &self.tls {
            None => Box::new(tcp),
            Some((connector, name)) => Box::new(TlsStream(
                connector
                    .connect(name.clone(), tcp)
                    .await
                    .with_context(|| format!("TLS with the SMTP server {server}"))?,
            )),
        };
        let hello = ClientId::Domain(self.from.email.domain().to_string());
        let mut conn = AsyncSmtpConnection::connect_with_transport(stream, &hello)
            .await
            .with_context(|| format!("SMTP greeting from {server}"))?;
        if let Some(c) = &self.credentials {
            conn.auth(DEFAULT_MECHANISMS, c)
                .await
                .with_context(|| format!("{server} refused the SMTP credentials"))?;
        }
        conn.send(msg.envelope(), &msg.formatted())
            .await
            .with_context(|| format!("{server} refused the mail"))?;
        let _ = conn.quit().await;
        Ok(())
    }
}

/// A TLS connection as lettre takes one.
struct TlsStream(tokio_rustls::client::TlsStream<TcpStream>);

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsStream")
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl AsyncTokioStream for TlsStream {
    fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.0.get_ref().0.peer_addr()
    }
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
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
            ca_file: None,
        }
    }

    #[test]
    fn codes_never_cross_the_network_in_clear() {
        crate::tls::install_default_provider();
        let err = Mailer::new(&opts("smtp://cm:secret@mail.example.com"))
            .err()
            .unwrap();
        let text = format!("{err:#}");
        assert!(
            text.contains("in clear") && !text.contains("secret"),
            "{text}"
        );
        assert!(
            Mailer::new(&opts("smtp://mail.example.com")).is_err(),
            "no credentials either"
        );
        assert!(Mailer::new(&opts("smtp://cm:secret@127.0.0.1:25")).is_ok());
        assert!(Mailer::new(&opts("smtp://[::1]:25")).is_ok());
        assert!(Mailer::new(&opts("smtp://10.0.0.1:25")).is_err());
        assert!(Mailer::new(&opts("smtp://localhost")).is_ok());
        assert!(Mailer::new(&opts("http://mail.example.com")).is_err());
        let bad_from = SmtpOptions {
            from: "not an address".into(),
            ..opts("smtp://127.0.0.1")
        };
        assert!(format!("{:#}", Mailer::new(&bad_from).err().unwrap()).contains("--smtp-from"));
    }

    #[test]
    fn credentials_come_from_the_url_decoded() {
        assert_eq!(percent_decode("p%40ss%2Fw+rd"), "p@ss/w+rd");
        assert_eq!(percent_decode("plain"), "plain");
    }
}
