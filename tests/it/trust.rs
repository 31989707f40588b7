//! Server identity: pins, private CAs, an impostor holding the certificate but not the key, and
//! a server speaking another protocol version.

use crate::support::*;
use pbx_remote::protocol::Reason;
use pbx_remote::server::keys::{ServerKeys, TlsSource};
use pbx_remote::status::State;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_pin_is_a_tls_error_and_retried() {
    let server = TestServer::start().await;
    let portal = PortalFixture::start().await;
    let (_, code) = server.add_device(false);
    let tmp = tempfile::tempdir().unwrap();
    let wrong = "00".repeat(32);
    let agent = TestAgent::start(
        tmp.path(),
        &AgentToml::new(server.tunnel, &wrong, tmp.path())
            .code(&code)
            .portal(&portal.url())
            .build(),
    );
    let s = agent
        .wait(Duration::from_secs(10), |s| {
            s.reason == Some(Reason::TlsError)
        })
        .await;
    assert_eq!(
        s.state,
        State::Reconnecting,
        "TLS trouble is retried, not terminal"
    );
    assert!(s.next_retry_at.is_some());
    // The code was never spent: the right pin still activates with it.
    let good = TestAgent::start(
        &tmp.path().join("g"),
        &server
            .agent_toml(&tmp.path().join("g"))
            .code(&code)
            .portal(&portal.url())
            .build(),
    );
    good.connected().await;
}

#[derive(Debug)]
struct Impostor(Arc<CertifiedKey>);

impl ResolvesServerCert for Impostor {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_with_the_certificate_but_not_the_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let genuine =
        ServerKeys::load_or_create(&dir.path().join("data"), &TlsSource::default()).unwrap();
    let other = pbx_remote::tls::KeyIdentity::generate(&["localhost".into()]).unwrap();
    let provider = pbx_remote::tls::provider();
    let signer = provider
        .key_provider
        .load_private_key(other.private_key())
        .unwrap();
    let stolen = Arc::new(CertifiedKey::new(genuine.certs.clone(), signer));
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Impostor(stolen)));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = handshakes.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            let h = h.clone();
            tokio::spawn(async move {
                if acceptor.accept(tcp).await.is_ok() {
                    h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            });
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(
        tmp.path(),
        &AgentToml::new(addr, &genuine.pin_hex(), tmp.path())
            .code("AAAA-BBBB-CCCC-DDDD")
            .build(),
    );
    let s = agent
        .wait(Duration::from_secs(10), |s| {
            s.reason == Some(Reason::TlsError)
        })
        .await;
    assert!(
        s.message.unwrap().contains("TLS"),
        "message says what failed"
    );
    assert_eq!(
        handshakes.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no handshake completed"
    );
    assert!(!tmp.path().join("state/credential.json").exists());
}

fn write_ca_pair(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    write_server_pki(dir, &["127.0.0.1", "localhost"], false, false)
}

fn ca_toml(
    server: &TestServer,
    ca: &std::path::Path,
    code: &str,
    portal: &str,
    dir: &std::path::Path,
) -> String {
    server
        .agent_toml(dir)
        .code(code)
        .portal(portal)
        .build()
        .replace(
            &format!("pin_sha256 = \"{}\"", server.pin),
            &format!("ca_file = \"{}\"", ca.display()),
        )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_private_ca_is_trusted_and_another_ca_is_not() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, crt, key) = write_ca_pair(&tmp.path().join("pki"));
    let (other_ca, _, _) = write_ca_pair(&tmp.path().join("other"));
    let server = TestServer::start_with(|o| o.tls.files = Some((crt, key))).await;
    let portal = PortalFixture::start().await;
    let (_, code) = server.add_device(false);

    let bad = TestAgent::start(
        &tmp.path().join("bad"),
        &ca_toml(
            &server,
            &other_ca,
            &code,
            &portal.url(),
            &tmp.path().join("bad"),
        ),
    );
    bad.wait(Duration::from_secs(10), |s| {
        s.reason == Some(Reason::TlsError)
    })
    .await;

    let good = TestAgent::start(
        &tmp.path().join("good"),
        &ca_toml(&server, &ca, &code, &portal.url(), &tmp.path().join("good")),
    );
    good.connected().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn another_protocol_version_reads_protocol_mismatch() {
    let w = World::start(false, "").await;
    let tunnel = w.server.tunnel;
    let data = w.server.data_dir();
    w.server.stop.cancel();
    let _ = w.server.task.await;
    // A "future" server on the same address with the same key but ALPN version 999.
    let keys = ServerKeys::load_or_create(&data, &TlsSource::default()).unwrap();
    let mut crypto = rustls::ServerConfig::builder_with_provider(pbx_remote::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(keys.certs.clone(), keys.key.clone_key())
        .unwrap();
    crypto.alpn_protocols = vec![b"pbxra/999".to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(crypto).unwrap();
    let udp = std::net::UdpSocket::bind(tunnel).unwrap();
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(quinn::ServerConfig::with_crypto(Arc::new(quic))),
        udp,
        Arc::new(quinn::TokioRuntime),
    )
    .unwrap();
    let ep = endpoint.clone();
    tokio::spawn(async move {
        while let Some(i) = ep.accept().await {
            tokio::spawn(async move {
                let _ = i.await;
            });
        }
    });
    let s = w
        .agent
        .wait(Duration::from_secs(30), |s| {
            s.reason == Some(Reason::ProtocolMismatch)
        })
        .await;
    assert_eq!(s.state, State::Reconnecting);
    assert!(
        s.message.unwrap().contains("protocol"),
        "not a generic TLS error"
    );
}

/// A CA and, signed by it (or by itself when `self_signed`), a server certificate for `names`,
/// expired when `expired`. Returns the CA, certificate and key paths.
fn write_server_pki(
    dir: &std::path::Path,
    names: &[&str],
    expired: bool,
    self_signed: bool,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, PKCS_ECDSA_P256_SHA256,
    };
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let leaf = if self_signed {
        params.self_signed(&leaf_key).unwrap()
    } else {
        params.signed_by(&leaf_key, &ca, &ca_key).unwrap()
    };
    std::fs::create_dir_all(dir).unwrap();
    let (ca_path, crt, key) = (
        dir.join("ca.pem"),
        dir.join("server.crt"),
        dir.join("server.key"),
    );
    std::fs::write(&ca_path, ca.pem()).unwrap();
    std::fs::write(&crt, leaf.pem()).unwrap();
    std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
    (ca_path, crt, key)
}

/// B1: an expired certificate, one for another name, and a self-signed one all fail the
/// handshake against the agent's CA file with `tls_error` naming the problem, the agent keeps
/// retrying on its backoff, and nothing is activated; no setting turns verification off.
#[tokio::test(flavor = "multi_thread")]
async fn expired_wrong_name_and_self_signed_certificates_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let portal = PortalFixture::start().await;
    let cases = [
        (
            "expired",
            &["127.0.0.1", "localhost"][..],
            true,
            false,
            "expired",
        ),
        (
            "wrong name",
            &["cm.example.net"][..],
            false,
            false,
            "not valid for",
        ),
        (
            "self-signed",
            &["127.0.0.1", "localhost"][..],
            false,
            true,
            "UnknownIssuer",
        ),
    ];
    for (what, names, expired, self_signed, says) in cases {
        let dir = tmp.path().join(what.replace(' ', "-"));
        let (ca, crt, key) = write_server_pki(&dir.join("pki"), names, expired, self_signed);
        let server = TestServer::start_with(|o| o.tls.files = Some((crt, key))).await;
        let (device, code) = server.add_device(false);
        let agent_dir = dir.join("agent");
        let agent = TestAgent::start(
            &agent_dir,
            &ca_toml(&server, &ca, &code, &portal.url(), &agent_dir),
        );
        let s = agent
            .wait(Duration::from_secs(10), |s| {
                s.reason == Some(Reason::TlsError)
            })
            .await;
        assert_eq!(
            s.state,
            State::Reconnecting,
            "{what}: retried, not given up"
        );
        let message = s.message.unwrap();
        assert!(message.contains(says), "{what}: {message}");
        let d = server.db().device(&device).unwrap().unwrap();
        assert!(d.activated_at.is_none(), "{what}: nothing activated");
        agent.shutdown().await;
    }
    // No key of the config turns verification off (unknown keys are refused)...
    for key in [
        "insecure = true",
        "skip_verify = true",
        "verify = false",
        "tls_verify = false",
    ] {
        let text = format!(
            "[server]\nenabled = true\naddress = \"cm.example.com:443\"\n{key}\n\
             [activation]\nmethod = \"auth_code\"\nauth_code = \"ABCD-EFGH-JKMN-PQRS\"\n\
             [pbx]\nedition = \"software\"\nfirmware = \"83.19.0.110\"\nmodel = \"m\"\n\
             serial = \"s\"\nmac = \"02:00:00:00:00:01\"\nportal_url = \"http://127.0.0.1:8088\"\n"
        );
        let e = pbx_remote::config::AgentConfig::parse(std::path::Path::new("/x.toml"), &text)
            .unwrap_err();
        assert!(e.0.contains("unknown field"), "{key}: {}", e.0);
    }
    // ...and no command-line option does.
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_pbx-remote-agent"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).to_lowercase();
    for word in ["insecure", "verify", "skip"] {
        assert!(!help.contains(word), "`run --help` mentions {word}: {help}");
    }
}
