//! Activation through an HTTP CONNECT proxy (issue 20, first step): `[tunnel] proxy` with Basic
//! credentials, a wrong password read as `proxy_error` naming the proxy (never the password),
//! and the environment's `HTTPS_PROXY` / `NO_PROXY` as curl reads them.

use crate::support::proxy::ConnectProxy;
use crate::support::*;
use pbx_remote::protocol::Reason;
use pbx_remote::status::State;
use std::time::Duration;

/// `toml` with `[tunnel] proxy = url`.
fn with_proxy(toml: String, url: &str) -> String {
    let out = toml.replacen("[tunnel]\n", &format!("[tunnel]\nproxy = \"{url}\"\n"), 1);
    assert_ne!(out, toml, "the config has a [tunnel] table");
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn activation_goes_through_the_configured_proxy_with_basic_credentials() {
    let server = TestServer::start().await;
    let portal = PortalFixture::start().await;
    let proxy = ConnectProxy::start(Some("pbx:pr0xy-s3cret")).await;
    let (device, code) = server.add_device(false);
    let tmp = tempfile::tempdir().unwrap();
    let toml = server
        .agent_toml(tmp.path())
        .code(&code)
        .portal(&portal.url())
        .build();
    let agent = TestAgent::start(
        tmp.path(),
        &with_proxy(toml, &proxy.url(Some("pbx:pr0xy-s3cret"))),
    );
    let s = agent.connected().await;
    assert_eq!(s.device_id.as_deref(), Some(device.as_str()));
    assert_eq!(
        *proxy.tunnels.lock().unwrap(),
        [server.tunnel.to_string()],
        "the activation request went through the proxy"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_proxy_password_reads_proxy_error_naming_the_proxy_not_the_password() {
    let server = TestServer::start().await;
    let proxy = ConnectProxy::start(Some("pbx:pr0xy-s3cret")).await;
    let (device, code) = server.add_device(false);
    let tmp = tempfile::tempdir().unwrap();
    let toml = server.agent_toml(tmp.path()).code(&code).build();
    let agent = TestAgent::start(
        tmp.path(),
        &with_proxy(toml, &proxy.url(Some("pbx:wr0ng-guess"))),
    );
    let s = agent
        .wait(Duration::from_secs(10), |s| s.state == State::Failed)
        .await;
    assert_eq!(s.reason, Some(Reason::ProxyError));
    let message = s.message.unwrap_or_default();
    assert!(
        message.contains(&proxy.addr.to_string()) && message.contains("407"),
        "names the proxy and its status line: {message}"
    );
    assert!(!message.contains("wr0ng-guess"), "{message}");
    assert!(proxy.refused.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert_eq!(proxy.tunnelled(), 0);
    assert!(
        server
            .db()
            .device(&device)
            .unwrap()
            .unwrap()
            .activated_at
            .is_none(),
        "nothing reached the server"
    );
    let text = std::fs::read_to_string(tmp.path().join("status.json")).unwrap();
    assert!(
        !text.contains("wr0ng-guess"),
        "not in the status file either"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_environment_proxy_is_used_unless_no_proxy_names_the_server() {
    let server = TestServer::start().await;
    let proxy = ConnectProxy::start(None).await;
    for (no_proxy, through) in [(None, 1), (Some("localhost,127.0.0.0/8"), 0)] {
        let (_, code) = server.add_device(false);
        let tmp = tempfile::tempdir().unwrap();
        let before = proxy.tunnelled();
        let toml = server.agent_toml(tmp.path()).code(&code).build();
        let url = proxy.url(None);
        let agent = AgentProcess::spawn(tmp.path(), &toml, |c| {
            c.env("HTTPS_PROXY", &url)
                .env_remove("NO_PROXY")
                .env_remove("no_proxy");
            if let Some(n) = no_proxy {
                c.env("NO_PROXY", n);
            }
        });
        agent.connected().await;
        assert_eq!(proxy.tunnelled() - before, through, "NO_PROXY={no_proxy:?}");
    }
}
