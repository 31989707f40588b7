//! The activation API spoken to directly, as a misbehaving or outdated agent would.

use crate::support::*;
use base64::Engine;
use pbx_remote::protocol::{
    ActivateRequest, ActivationProof, DeviceFacts, ErrorBody, Reason, ACTIVATE_PATH,
    PROTOCOL_VERSION,
};
use pbx_remote::secret::Secret;
use pbx_remote::status::State;
use std::time::Duration;

fn client(server: &TestServer) -> reqwest::Client {
    let pin = pbx_remote::config::parse_pin(&server.pin).unwrap();
    let tls = pbx_remote::tls::client_config(
        &pbx_remote::tls::ServerTrust::Pin(pin),
        &[b"http/1.1"],
        None,
    )
    .unwrap();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .unwrap()
}

fn request(code: &str, firmware: &str) -> ActivateRequest {
    let key = pbx_remote::tls::KeyIdentity::generate(&[]).unwrap();
    ActivateRequest {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "test".into(),
        proof: ActivationProof::AuthCode {
            code: Secret::new(code),
        },
        device_public_key: base64::engine::general_purpose::STANDARD.encode(key.spki_der()),
        facts: DeviceFacts {
            edition: "software".into(),
            firmware: firmware.into(),
            model: "m".into(),
            serial: "s".into(),
            mac: "02:00:00:00:00:01".into(),
            ha_role: None,
        },
    }
}

async fn post(
    c: &reqwest::Client,
    server: &TestServer,
    req: &ActivateRequest,
) -> (u16, Option<ErrorBody>) {
    let r = c
        .post(format!("https://{}{ACTIVATE_PATH}", server.tunnel))
        .json(req)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json::<ErrorBody>().await.ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_codes_are_rate_limited_per_source() {
    let server = TestServer::start().await;
    let (_, good) = server.add_device(false);
    let c = client(&server);
    for i in 0..pbx_remote::server::api::MAX_WRONG_CODES {
        let (status, body) = post(
            &c,
            &server,
            &request(&format!("WRNG-{i:04}-0000-0000"), "83.19.0.110"),
        )
        .await;
        assert_eq!(status, 403);
        assert_eq!(body.unwrap().code, Reason::InvalidCode);
    }
    // Even the right code is refused while the source is locked out, with the time left.
    let (status, body) = post(&c, &server, &request(&good, "83.19.0.110")).await;
    assert_eq!(status, 429);
    let body = body.unwrap();
    assert_eq!(body.code, Reason::RateLimited);
    assert!(body.message.contains("try again in"), "{}", body.message);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_refuses_old_firmware_without_spending_the_code() {
    let server = TestServer::start().await;
    let (_, code) = server.add_device(false);
    let c = client(&server);
    let (_, body) = post(&c, &server, &request(&code, "83.18.0.1")).await;
    let body = body.unwrap();
    assert_eq!(body.code, Reason::FirmwareUnsupported);
    assert!(body.message.contains("83.19.0.110"), "{}", body.message);
    let (status, _) = post(&c, &server, &request(&code, "83.19.0.110")).await;
    assert_eq!(status, 200, "the code still works after the refusal");
    let mut old = request(&code, "83.19.0.110");
    old.protocol_version = 0;
    assert_eq!(
        post(&c, &server, &old).await.1.unwrap().code,
        Reason::ProtocolMismatch
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn nobody_listening_reads_server_unreachable_and_retries() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    let tmp = tempfile::tempdir().unwrap();
    let agent = TestAgent::start(
        tmp.path(),
        &AgentToml::new(addr, &"ab".repeat(32), tmp.path())
            .code("AAAA-AAAA-AAAA-AAAA")
            .build(),
    );
    let s = agent
        .wait(Duration::from_secs(10), |s| {
            s.reason == Some(Reason::ServerUnreachable)
        })
        .await;
    assert_eq!(s.state, State::Reconnecting);
    assert!(s.next_retry_at.is_some());
    assert!(
        s.message.unwrap().contains(&addr.to_string()),
        "names the peer"
    );
}

/// Issue 23: a stream an idle visitor connection keeps goes to a request that finds the tunnel
/// full at once, rather than that request waiting and getting 503 while the idle stream holds
/// its place until the agent times it out (10 s).
#[tokio::test(flavor = "multi_thread")]
async fn a_full_tunnel_takes_back_the_stream_an_idle_visitor_keeps() {
    let w = World::start(false, "").await;
    let mut fillers = vec![];
    for i in 0..4 {
        fillers.push(w.visitor(&format!("filler{i}"), false).await);
    }
    let mut idle = w.visitor("bob", false).await;
    assert_eq!(
        idle.get("/").await.status(),
        200,
        "bob's connection keeps its stream"
    );
    let limit = pbx_remote::protocol::MAX_REQUEST_STREAMS as usize;
    // With bob's idle stream, `limit - 1` requests in flight take every stream. Spread over
    // the four visits (a visit may hold a quarter), the last visit has a slot left.
    let slow_from = |v: &Visitor| {
        let rb = v.request(reqwest::Method::GET, "/slow");
        tokio::spawn(async move { rb.send().await })
    };
    let mut slow: Vec<_> = (0..limit - 1).map(|i| slow_from(&fillers[i % 4])).collect();
    for _ in 0..400 {
        if w.portal.held() >= limit - 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(w.portal.held(), limit - 1, "every stream taken");
    assert!(
        slow.iter().all(|h| !h.is_finished()),
        "no request was refused while the tunnel filled"
    );
    let t0 = std::time::Instant::now();
    slow.push(slow_from(&fillers[3]));
    for _ in 0..200 {
        if w.portal.held() >= limit || slow.last().unwrap().is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        w.portal.held(),
        limit,
        "the request that found the tunnel full reached the portal on bob's stream's place \
         (finished instead: {})",
        slow.last().unwrap().is_finished()
    );
    assert!(
        t0.elapsed() < Duration::from_millis(900),
        "it did not wait for the front's one-second wait to run out: {:?}",
        t0.elapsed()
    );
    for h in &slow {
        h.abort();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_tunnel_answers_503_and_recovers() {
    let w = World::start(false, "").await;
    // One session may hold only a quarter of the streams, so four fill the tunnel.
    let per_grant = pbx_remote::server::hub::MAX_STREAMS_PER_GRANT;
    let mut fillers = vec![];
    for i in 0..4 {
        fillers.push(w.visitor(&format!("filler{i}"), false).await);
    }
    let mut v2 = w.visitor("bob", false).await;
    let limit = pbx_remote::protocol::MAX_REQUEST_STREAMS as usize;
    assert_eq!(per_grant * 4, limit);
    let mut slow = vec![];
    let mut spawned = 0usize;
    let mut spawn_slow = |slow: &mut Vec<tokio::task::JoinHandle<_>>| {
        let rb = fillers[spawned % 4].request(reqwest::Method::GET, "/slow");
        spawned += 1;
        slow.push(tokio::spawn(async move { rb.send().await }));
    };
    for _ in 0..limit {
        spawn_slow(&mut slow);
    }
    // Fill every slot: a request that raced the release of an earlier stream (and got 503) is
    // replaced until the portal holds `limit` of them.
    let seen = |w: &World| w.portal.hits();
    let mut replaced = 0;
    for _ in 0..400 {
        if seen(&w) >= limit {
            break;
        }
        let finished = slow.iter().filter(|h| h.is_finished()).count();
        for _ in replaced..finished {
            spawn_slow(&mut slow);
        }
        replaced = replaced.max(finished);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(seen(&w) >= limit, "portal saw {} of {limit}", seen(&w));
    // A full tunnel: the request waits a moment for a stream, then gets a clear 503.
    let t0 = std::time::Instant::now();
    let r = v2.get("/").await;
    assert_eq!(r.status(), 503);
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "waited {:?} for a stream",
        t0.elapsed()
    );
    assert!(r.text().await.unwrap().contains("busy"));
    for h in &slow {
        h.abort();
    }
    drop(slow);
    let mut ok = false;
    for _ in 0..200 {
        if v2.get("/").await.status() == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "slots come back when visitors go away");
}

/// Activation by account runs argon2 like the console's sign-in and shares its bound: past its
/// source's share of the line an agent is told the CM is busy (503, `server_unreachable`: it
/// retries, where a lockout's `rate_limited` would stop it) and nothing is counted against the
/// account.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_account_activations_past_the_password_line_is_answered_busy() {
    use pbx_remote::server::passwords::{PER_SOURCE, RUNNING, WAITING};
    let server = TestServer::start().await;
    let c = client(&server);
    let line = RUNNING + WAITING;
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..3 * line {
        let (c, server_tunnel) = (c.clone(), server.tunnel);
        let mut req = request("unused", "83.19.0.110");
        req.proof = ActivationProof::Email {
            email: format!("nobody{i}@example.com"),
            password: Secret::new("Guess-Passw0rd-1"),
        };
        flood.spawn(async move {
            let r = c
                .post(format!("https://{server_tunnel}{ACTIVATE_PATH}"))
                .json(&req)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<ErrorBody>().await.unwrap())
        });
    }
    let (mut busy, mut refused) = (0, 0);
    while let Some(answer) = flood.join_next().await {
        match answer.unwrap() {
            (503, e) if e.code == Reason::ServerUnreachable => {
                assert!(e.message.contains("busy"), "{}", e.message);
                busy += 1;
            }
            (403, e) if e.code == Reason::BadCredentials => refused += 1,
            // The source's budget of failures, if the flood's checked ones reach it.
            (429, e) if e.code == Reason::RateLimited => {}
            (status, e) => panic!("a flooding activation got {status}: {e:?}"),
        }
    }
    assert!(
        busy > 0,
        "no activation of {} was told the CM is busy",
        3 * line
    );
    assert!(
        refused >= PER_SOURCE,
        "only {refused} activations were checked"
    );
}
