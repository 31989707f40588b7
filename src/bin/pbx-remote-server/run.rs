//! `run`: the server's listeners and options, from the command line.

use crate::DataDir;
use clap::Args;
use pbx_remote::server::mail::SmtpOptions;
use pbx_remote::server::{self, console::ConsoleOptions, keys, Listeners, ServerOptions};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    data: DataDir,
    /// Address for the activation API (TCP) and the tunnel (UDP).
    #[arg(long, default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// Address of the public front (visitors' browsers).
    #[arg(long, default_value = "127.0.0.1:8080")]
    public_listen: SocketAddr,
    /// Visitor-facing URL of the front; devices are served at DEVICE.<host>
    /// [default: http://localhost:<public port>]
    #[arg(long)]
    public_url: Option<url::Url>,
    /// Certificate (PEM) for HTTPS on the front.
    #[arg(long, requires = "public_key")]
    public_cert: Option<PathBuf>,
    /// Private key (PEM) for HTTPS on the front.
    #[arg(long, requires = "public_cert")]
    public_key: Option<PathBuf>,
    /// Proxy (CIDR) whose X-Forwarded-For is believed, by the front and the console; repeatable.
    #[arg(long, value_parser = server::parse_trusted_proxy)]
    trusted_proxy: Vec<ipnet::IpNet>,
    /// Certificate (PEM) for the API and tunnel [default: generated in the data dir].
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Extra DNS name or IP for the generated certificate; repeatable.
    #[arg(long)]
    tls_name: Vec<String>,
    /// Address of the provider console (web pages and /api/v1/); off without it.
    #[arg(long, requires = "console_url")]
    console_listen: Option<SocketAddr>,
    /// URL users open for the console; its host must not be the front's host or under it.
    #[arg(long, requires = "console_listen")]
    console_url: Option<url::Url>,
    /// Certificate (PEM) for HTTPS on the console.
    #[arg(long, requires = "console_key", requires = "console_listen")]
    console_cert: Option<PathBuf>,
    /// Private key (PEM) for --console-cert.
    #[arg(long, requires = "console_cert")]
    console_key: Option<PathBuf>,
    /// SMTP server for Send to Email: smtps://[user[:password]@]host[:port] (TLS, port 465 by
    /// default), or plain smtp:// to a relay on this host; the password may come from
    /// PBX_REMOTE_SERVER_SMTP_PASSWORD instead.
    #[arg(long, requires = "smtp_from")]
    smtp_url: Option<url::Url>,
    /// CA certificates (PEM) that sign the SMTP server's certificate [default: the system's].
    #[arg(long, requires = "smtp_url")]
    smtp_ca: Option<PathBuf>,
    /// Sender of those mails, e.g. "CM <cm@example.com>".
    #[arg(long, requires = "smtp_url")]
    smtp_from: Option<String>,
    /// Threads for the tunnel and the front (the data path); one thread spends the least CPU
    /// per request and carries tens of thousands of requests a second.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    data_threads: u16,
}

pub(crate) fn run(a: RunArgs) -> anyhow::Result<String> {
    let data_dir = a.data.get()?.to_path_buf();
    crate::runtime()?.block_on(async move {
        let (udp, api) = server::bind_pair(a.listen)?;
        let public = tokio::net::TcpListener::bind(a.public_listen).await?;
        let public_port = public.local_addr()?.port();
        let public_url = match a.public_url {
            Some(u) => u,
            None => url::Url::parse(&format!("http://localhost:{public_port}"))?,
        };
        let console = match (a.console_listen, a.console_url) {
            (Some(listen), Some(url)) => {
                anyhow::ensure!(
                    url.scheme() == "http" || a.console_cert.is_some(),
                    "--console-url {url} is https: give --console-cert and --console-key"
                );
                let listener = tokio::net::TcpListener::bind(listen)
                    .await
                    .map_err(|e| anyhow::anyhow!("--console-listen {listen}: {e}"))?;
                Some((
                    ConsoleOptions {
                        url,
                        tls: a.console_cert.zip(a.console_key),
                    },
                    listener,
                ))
            }
            _ => None,
        };
        let (console_opts, console_listener) = console.unzip();
        let opts = ServerOptions {
            data_dir,
            public_url,
            public_tls: a.public_cert.zip(a.public_key),
            trusted_proxies: a.trusted_proxy,
            tls: keys::TlsSource {
                files: a.tls_cert.zip(a.tls_key),
                names: a.tls_name,
            },
            console: console_opts,
            smtp: a.smtp_url.map(|url| SmtpOptions {
                url,
                from: a.smtp_from.unwrap_or_default(),
                ca_file: a.smtp_ca,
            }),
            data_threads: a.data_threads.into(),
        };
        // Keys and registry first: the readiness line promises that `fingerprint` and
        // `device add` now read what this server uses (printed earlier, a script's
        // `fingerprint` could generate a second key beside the server's own).
        let public_url = opts.public_url.clone();
        let console_line = match (&opts.console, &console_listener) {
            (Some(c), Some(l)) => format!(" console={} console_url={}", l.local_addr()?, c.url),
            _ => String::new(),
        };
        let state = server::ServerState::open(opts)?;
        // Machine-readable readiness line for scripts and tests.
        println!(
            "listening tunnel={} public={} public_url={}{console_line}",
            udp.local_addr()?,
            public.local_addr()?,
            public_url
        );
        let root = tokio_util::sync::CancellationToken::new();
        let _hup = pbx_remote::signals::install(root.clone())?;
        let listeners = Listeners {
            udp,
            api: tokio::net::TcpListener::from_std(api)?,
            public,
            console: console_listener,
        };
        server::serve(state, listeners, root).await?;
        Ok(String::new())
    })
}
