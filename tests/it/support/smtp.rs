//! An SMTP sink: accepts every mail on 127.0.0.1 (EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP,
//! QUIT; no TLS, no auth) and keeps what it got, for tests of Send to Email.

use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// One received mail.
#[derive(Debug, Clone, Default)]
pub struct Mail {
    pub from: String,
    pub to: Vec<String>,
    pub data: String,
}

pub struct SmtpSink {
    pub addr: std::net::SocketAddr,
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
    pub async fn start() -> SmtpSink {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mails = Arc::new(Mutex::new(Vec::new()));
        let received = Arc::new(tokio::sync::Notify::new());
        let (m, r) = (mails.clone(), received.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (m, r) = (m.clone(), r.clone());
                tokio::spawn(async move {
                    let _ = session(tcp, &m, &r).await;
                });
            }
        });
        SmtpSink {
            addr,
            mails,
            received,
            task,
        }
    }

    /// `smtp://127.0.0.1:PORT`.
    pub fn url(&self) -> url::Url {
        url::Url::parse(&format!("smtp://{}", self.addr)).unwrap()
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
    tcp: tokio::net::TcpStream,
    mails: &Mutex<Vec<Mail>>,
    received: &tokio::sync::Notify,
) -> std::io::Result<()> {
    let (rd, mut wr) = tcp.into_split();
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
            b"250-sink\r\n250 8BITMIME\r\n"
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
            mails.lock().unwrap().push(std::mem::take(&mut mail));
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
