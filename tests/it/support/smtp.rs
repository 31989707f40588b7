//! An SMTP sink: accepts every mail on 127.0.0.1 (EHLO/HELO, AUTH PLAIN, MAIL, RCPT, DATA,
//! RSET, NOOP, QUIT), in the clear or over TLS from the first byte (smtps), and keeps what it
//! got, for tests of Send to Email.

use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// One received mail.
#[derive(Debug, Clone, Default)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    pub data: String,
    /// The decoded `AUTH PLAIN` response (`\0user\0password`), if the client logged in.
    pub auth: Option<String>,
}

pub struct SmtpSink {
    pub addr: std::net::SocketAddr,
    /// With TLS: the CA that signed the sink's certificate (PEM), for `--smtp-ca`.
    pub ca: Option<(tempfile::TempDir, std::path::PathBuf)>,
    pub mails: Arc<Mutex<Vec<Mail>>>,
    received: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SmtpSink {
    /// A sink in the clear.
    pub async fn start() -> SmtpSink {
        Self::start_with(false).await
    }

    /// A sink speaking TLS from the first byte, with a certificate for 127.0.0.1.
    pub async fn start_tls() -> SmtpSink {
        Self::start_with(true).await
    }

    async fn start_with(tls: bool) -> SmtpSink {
        pbx_remote::tls::install_default_provider();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mails = Arc::new(Mutex::new(Vec::new()));
        let received = Arc::new(tokio::sync::Notify::new());
        let (acceptor, ca) = if tls {
            // A CA of the test's own and a certificate for 127.0.0.1 it signed: what a relay
            // under a private CA looks like.
            use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
            let ca_key = KeyPair::generate().unwrap();
            let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            ca_params
                .distinguished_name
                .push(DnType::CommonName, "Sink CA");
            let ca_cert = ca_params.self_signed(&ca_key).unwrap();
            let leaf_key = KeyPair::generate().unwrap();
            let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
                .unwrap()
                .signed_by(&leaf_key, &ca_cert, &ca_key)
                .unwrap();
            let dir = tempfile::tempdir().unwrap();
            let pem = dir.path().join("sink-ca.pem");
            std::fs::write(&pem, ca_cert.pem()).unwrap();
            let key = rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into());
            let cfg = rustls::ServerConfig::builder_with_provider(pbx_remote::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![leaf.der().clone()], key)
                .unwrap();
            (
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg))),
                Some((dir, pem)),
            )
        } else {
            (None, None)
        };
        let (m, r) = (mails.clone(), received.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (m, r, acceptor) = (m.clone(), r.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let _ = match acceptor {
                        None => session(tcp, &m, &r).await,
                        Some(a) => match a.accept(tcp).await {
                            Ok(tls) => session(tls, &m, &r).await,
                            Err(_) => Ok(()),
                        },
                    };
                });
            }
        });
        SmtpSink {
            addr,
            ca,
            mails,
            received,
            task,
        }
    }

    /// `smtp://127.0.0.1:PORT`, or `smtps://` for a TLS sink.
    pub fn url(&self) -> url::Url {
        let scheme = if self.ca.is_some() { "smtps" } else { "smtp" };
        url::Url::parse(&format!("{scheme}://{}", self.addr)).unwrap()
    }

    /// Waits (bounded) for the `n`th mail and returns it.
    pub async fn wait_for(&self, n: usize) -> Mail {
        let deadline = std::time::Duration::from_secs(10);
        tokio::time::timeout(deadline, async {
            loop {
                let notified = self.received.notified();
                if let Some(m) = self.mails.lock().unwrap().get(n - 1).cloned() {
                    return m;
                }
                notified.await;
            }
        })
        .await
        .expect("no mail within 10 s")
    }
}

async fn session(
    io: impl tokio::io::AsyncRead + tokio::io::AsyncWrite,
    mails: &Mutex<Vec<Mail>>,
    received: &tokio::sync::Notify,
) -> std::io::Result<()> {
    let (rd, mut wr) = tokio::io::split(io);
    let mut lines = BufReader::new(rd);
    wr.write_all(b"220 sink ESMTP\r\n").await?;
    let mut mail = Mail::default();
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let cmd = line.trim_end().to_string();
        let upper = cmd.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") {
            b"250-sink\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n"
        } else if upper.starts_with("AUTH PLAIN ") {
            use base64::Engine;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(cmd[11..].trim())
                .unwrap_or_default();
            mail.auth = Some(String::from_utf8_lossy(&decoded).into_owned());
            b"235 ok\r\n"
        } else if upper.starts_with("HELO") || upper.starts_with("NOOP") {
            b"250 OK\r\n"
        } else if upper.starts_with("RSET") {
            mail = Mail::default();
            b"250 OK\r\n"
        } else if upper.starts_with("MAIL FROM:") {
            mail.from = cmd[10..].trim().to_string();
            b"250 OK\r\n"
        } else if upper.starts_with("RCPT TO:") {
            mail.to.push(cmd[8..].trim().to_string());
            b"250 OK\r\n"
        } else if upper == "DATA" {
            wr.write_all(b"354 go on\r\n").await?;
            loop {
                line.clear();
                if lines.read_line(&mut line).await? == 0 {
                    return Ok(());
                }
                if line == ".\r\n" || line == ".\n" {
                    break;
                }
                mail.data.push_str(line.strip_prefix('.').unwrap_or(&line));
            }
            let auth = mail.auth.clone();
            mails.lock().unwrap().push(std::mem::take(&mut mail));
            mail.auth = auth;
            received.notify_waiters();
            b"250 queued\r\n"
        } else if upper == "QUIT" {
            wr.write_all(b"221 bye\r\n").await?;
            return Ok(());
        } else {
            b"502 not here\r\n"
        };
        wr.write_all(reply).await?;
    }
}
